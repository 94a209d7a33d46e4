"""RPN proposals and losses, FPN, level assignment, post-processing, mask targets and pasting."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.detection import (RPN, AnchorGenerator, BoxPredictor, FastRCNNConvFCHead, MaskHead, ROIHeads,
                                      ROIPooler, assign_fpn_levels, mask_head, paste_masks_detectron,
                                      paste_masks_grid_sample, polygons_to_mask_in_box)
from normkit.models.necks import FPN
from normkit.nn import SwitchNorm2d
from normkit.ops import roi_align


def _rpn(levels=1, **kw):
    strides = [16] if levels == 1 else [4, 8][:levels]
    sizes = [(32,)] * levels
    gen = AnchorGenerator(strides, sizes, (1.0,))
    names = ["p%d" % i for i in range(levels)]
    rpn = RPN(names, 4, gen, **kw)
    for p in rpn.head.parameters():
        nn.init.zeros_(p)
    return rpn, names


def test_rpn_proposals_are_decoded_clipped_anchors_by_score():
    rpn, names = _rpn(pre_nms_topk=(100, 100), post_nms_topk=(100, 3), nms_thresh=0.7)
    rpn.eval()
    logits = torch.tensor([[[[0.0, 3.0], [1.0, 2.0]]]])  # (y, x) cells
    rpn.head.forward = lambda xs: ([logits], [torch.zeros(1, 4, 2, 2)])
    proposals, losses = rpn({names[0]: torch.zeros(1, 4, 2, 2)}, torch.tensor([[32, 32]]), (32, 32),
                            torch.tensor([1.0]))
    assert losses == {}
    # Detectron anchor of size 32 at stride 16: (-8, -8, 23, 23) + 16 * (x, y); zero deltas; clipped to
    # [0, 31]; pairwise IoUs <= 0.5 so NMS 0.7 keeps all; the best 3 by logit: cells (0,1), (1,1), (1,0)
    assert proposals[0].tolist() == [[8, 0, 31, 23], [8, 8, 31, 31], [0, 8, 23, 31]]


def test_rpn_collect_per_batch_vs_per_image():
    rpn, names = _rpn(levels=2, pre_nms_topk=(50, 50), post_nms_topk=(4, 4), nms_thresh=0.0)
    gen = torch.Generator().manual_seed(0)
    l0 = torch.randn(2, 1, 4, 4, generator=gen)
    l0[1] += 10  # image 1 scores far higher: a per-batch top-4 takes all from it
    l1 = torch.randn(2, 1, 2, 2, generator=gen)
    rpn.head.forward = lambda xs: ([l0, l1], [torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 2, 2)])
    feats = {names[0]: torch.zeros(2, 4, 4, 4), names[1]: torch.zeros(2, 4, 2, 2)}
    sizes = torch.tensor([[16, 16], [16, 16]])
    targets = [{"boxes": torch.tensor([[2.0, 2.0, 9.0, 9.0]]), "labels": torch.tensor([0]),
                "iscrowd": torch.tensor([False])}] * 2

    def counts(training, collect):
        rpn.train(training)
        rpn.collect = collect
        props, _ = rpn(feats, sizes, (16, 16), torch.ones(2), targets if training else None)
        return [p.shape[0] for p in props]

    assert counts(True, "per_batch") == [0, 4]
    assert counts(True, "per_image") == [4, 4]
    # inference collects per image whatever the mode (Detectron-1 tests one image per batch), so results do not
    # depend on how images are batched
    assert counts(False, "per_batch") == counts(False, "per_image") == [4, 4]


def _rpn_loss_setup(**kw):
    rpn, names = _rpn(**kw)
    rpn.train()
    feats = {names[0]: torch.zeros(1, 4, 4, 4)}
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([0]),
                "iscrowd": torch.tensor([False])}]
    rpn.generator = torch.Generator().manual_seed(0)
    return rpn, feats, targets


def test_rpn_loss_normalisers():
    rpn, feats, targets = _rpn_loss_setup(cls_loss_normalizer="num_valid", batch_size_per_image=8)
    _, losses = rpn(feats, torch.tensor([[64, 64]]), (64, 64), torch.ones(1), targets)
    # zero head: every logit 0 -> BCE log 2 each; mean over sampled anchors
    assert losses["rpn_cls_loss"].item() == pytest.approx(math.log(2))
    rpn, feats, targets = _rpn_loss_setup(cls_loss_normalizer="batch_size", batch_size_per_image=8)
    _, losses = rpn(feats, torch.tensor([[64, 64]]), (64, 64), torch.ones(1), targets)
    # anchors inside the 64x64 image: cells 1..2 in x and y (legacy (-8,-8,23,23) + 16k): 4 anchors, all sampled
    # (1 tie-positive + fewer negatives than slots -> Detectron draws none) -> only positives count
    labels_sum = losses["rpn_cls_loss"].item() * 8 / math.log(2)
    assert labels_sum == pytest.approx(round(labels_sum))
    assert losses["rpn_bbox_loss"].item() > 0


def test_rpn_straddle_and_empty_image_errors():
    rpn, feats, targets = _rpn_loss_setup(straddle_thresh=-1, batch_size_per_image=8)
    _, losses = rpn(feats, torch.tensor([[64, 64]]), (64, 64), torch.ones(1), targets)
    assert torch.isfinite(losses["rpn_cls_loss"])
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "iscrowd": torch.zeros(0, dtype=torch.bool)}]
    with pytest.raises(ValueError, match="no non-crowd ground-truth"):
        rpn(feats, torch.tensor([[64, 64]]), (64, 64), torch.ones(1), empty)
    crowd_only = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([1]),
                   "iscrowd": torch.tensor([True])}]
    with pytest.raises(ValueError, match="no non-crowd ground-truth"):
        rpn(feats, torch.tensor([[64, 64]]), (64, 64), torch.ones(1), crowd_only)


def test_fpn_levels_p6_and_norm_placement():
    fpn = FPN(("res2", "res3", "res4", "res5"), (8, 16, 32, 64), 16, norm="sn", norm_kwargs={"using_bn": False})
    feats = {f"res{i}": torch.randn(2, c, 64 // 2 ** i, 64 // 2 ** i) for i, c in zip(range(2, 6), (8, 16, 32, 64))}
    out = fpn(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert torch.equal(out["p6"], out["p5"][:, :, ::2, ::2])
    assert fpn.out_strides == (4, 8, 16, 32, 64)
    assert sum(isinstance(m, SwitchNorm2d) for m in fpn.modules()) == 8
    assert all(m.bias is None for m in fpn.modules() if isinstance(m, nn.Conv2d))
    plain = FPN(("res4", "res5"), (32, 64), 16, top_block=False, min_level=4)
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    w = plain.lateral_convs[0][0].weight
    assert w.abs().max() <= math.sqrt(3 / 32) + 1e-6  # XavierFill bound sqrt(3 / fan_in)


def test_fpn_level_rule():
    def lv(box, legacy):
        return assign_fpn_levels(torch.tensor([box]), 2, 5, legacy_plus_one=legacy).item()
    assert lv([0.0, 0.0, 223.0, 223.0], True) == 4      # (223 + 1)^2 = 224^2
    assert lv([0.0, 0.0, 222.0, 222.0], True) == 3
    assert lv([0.0, 0.0, 111.0, 111.0], True) == 3      # 112 = 224 / 2
    assert lv([0.0, 0.0, 447.0, 447.0], True) == 5
    assert lv([0.0, 0.0, 224.0, 224.0], False) == 4
    assert lv([0.0, 0.0, 223.0, 223.0], False) == 3
    assert lv([0.0, 0.0, 3.0, 3.0], True) == 2          # clamped
    assert lv([0.0, 0.0, 2000.0, 2000.0], True) == 5


def test_pooler_pools_each_box_from_its_level():
    feats = [torch.randn(1, 2, 64 // 2 ** k, 64 // 2 ** k) for k in range(4)]
    pooler = ROIPooler(7, (1 / 4, 1 / 8, 1 / 16, 1 / 32), 2, legacy_plus_one=True)
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0], [0.0, 0.0, 250.0, 250.0], [5.0, 5.0, 120.0, 130.0]])]
    boxes = [torch.cat((boxes[0], torch.tensor([[0.0, 0.0, 600.0, 600.0]])))]  # 601 px: P5
    out = pooler(feats, boxes)
    levels = assign_fpn_levels(boxes[0], 2, 5, legacy_plus_one=True) - 2
    assert levels.tolist() == [0, 2, 1, 3]  # by hand: floor(4 + log2(sqrt(area) / 224)) in [2, 5]
    for i, level in enumerate(levels.tolist()):
        rois = torch.cat((torch.zeros(1, 1), boxes[0][i:i + 1]), dim=1)
        ref = roi_align(feats[level], rois, (7, 7), 1 / 4 / 2 ** level, 2, False)
        assert torch.allclose(out[i:i + 1], ref)


class _FixedHead(nn.Module):
    out_channels = 4

    def forward(self, x):
        return x.flatten(1)[:, :4]


def _roi_heads(num_classes=2, **kw):
    pooler = ROIPooler(1, (1.0,), 1)
    predictor = BoxPredictor(4, num_classes, "first")
    return ROIHeads(("f",), pooler, _FixedHead(), predictor, **kw)


def test_postprocess_detectron_known_logits():
    heads = _roi_heads(detections_per_image=3)
    # 4 proposals; class 1 is likely for the first two (overlapping), class 2 for the last
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.96, 0.02, 0.02], [0.3, 0.1, 0.6]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0],
                          [20.0, 20.0, 40.0, 40.0]]).repeat(1, 3)
    out = heads._postprocess(probs, boxes, (100, 100))
    # class 1: boxes 0 and 1 overlap (IoU > 0.5) -> box 0 kept (0.8); box 3 (0.1) kept; box 2 (0.02) below 0.05
    # class 2: box 3 (0.6), boxes 0/1 (0.1) -> NMS keeps box 0 (0.1, first of the tie) and box 3
    # 5 candidates > 3: keep scores >= the 3rd best (0.1) -> ties kept as Detectron does
    assert out["labels"].tolist() == [0, 0, 1, 1]
    assert out["scores"].tolist() == pytest.approx([0.8, 0.1, 0.6, 0.1])
    assert out["boxes"][0].tolist() == [0, 0, 10, 10]


def test_postprocess_empty_and_d2_top_k():
    heads = _roi_heads()
    out = heads._postprocess(torch.tensor([[0.98, 0.01, 0.01]]), torch.zeros(1, 12), (10, 10))
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].dtype == torch.int64
    d2 = ROIHeads(("f",), ROIPooler(1, (1.0,), 1), _FixedHead(), BoxPredictor(4, 2, "last"),
                  legacy_plus_one=False, detections_per_image=1)
    probs = torch.tensor([[0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])  # background last
    out = d2._postprocess(probs, torch.tensor([[0.0, 0, 5, 5, 0, 0, 5, 5], [20.0, 20, 30, 30, 20, 20, 30, 30]]),
                          (50, 50))
    assert out["labels"].tolist() == [1] and out["scores"].tolist() == pytest.approx([0.6])


def test_eval_with_no_proposals_gives_empty_predictions():
    heads = _roi_heads()
    heads.eval()
    out = heads({"f": torch.zeros(1, 4, 4, 4)}, [torch.zeros(0, 4)], torch.tensor([[4, 4]]), torch.ones(1),
                torch.tensor([[4, 4]]))
    assert out[0]["boxes"].shape == (0, 4)


def test_polygon_rasterisation_in_box():
    square = [torch.tensor([10.0, 10.0, 20.0, 10.0, 20.0, 20.0, 10.0, 20.0])]
    full = polygons_to_mask_in_box(square, [10.0, 10.0, 20.0, 20.0], 28)
    assert full.shape == (28, 28) and full.sum().item() == 28 * 28
    left = polygons_to_mask_in_box([torch.tensor([10.0, 10.0, 15.0, 10.0, 15.0, 20.0, 10.0, 20.0])],
                                   [10.0, 10.0, 20.0, 20.0], 28)
    assert left[:, :14].sum().item() == 14 * 28 and left[:, 15:].sum().item() == 0


def test_paste_round_trip():
    masks = torch.ones(1, 28, 28)
    box = torch.tensor([[10.0, 20.0, 49.0, 59.0]])  # 40x40 pixels inclusive
    pasted = paste_masks_detectron(masks, box, (80, 100))
    assert pasted.dtype == torch.uint8 and pasted.shape == (1, 80, 100)
    ys, xs = np.nonzero(pasted[0].numpy())
    # by hand: the box expands by 30/28 to x in [8.61, 50.39] -> int [8, 50], 43 px; the padded 30x30 mask
    # resized to 43 px is > 0.5 from pixel 1 (source 0.546) to pixel 41 (source 28.45): x 9..49, y 19..59
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (9, 49, 19, 59)
    grid = paste_masks_grid_sample(masks, torch.tensor([[10.0, 20.0, 50.0, 60.0]]), (80, 100))
    ys, xs = np.nonzero(grid[0].numpy())
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 49, 20, 59)
    # a box partly outside the image is cut at the border
    pasted = paste_masks_detectron(masks, torch.tensor([[-10.0, -10.0, 29.0, 29.0]]), (20, 20))
    assert pasted[0].all()
    assert paste_masks_detectron(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 6)).shape == (0, 5, 6)


def test_grid_sample_paste_in_chunks_equals_one_call(monkeypatch):
    # Each detection is pasted on its own: chunking the detections (to bound the sampling grid's memory) changes
    # nothing. Expected: one grid_sample over all of them, written out here.
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 28, 28, generator=g)
    boxes = torch.tensor([[3.0, 4.0, 30.0, 20.0], [0.0, 0.0, 40.0, 30.0], [10.5, 2.5, 12.5, 29.0],
                          [-5.0, -5.0, 20.0, 20.0], [20.0, 10.0, 39.0, 29.0]])
    ys, xs = torch.arange(30) + 0.5, torch.arange(40) + 0.5
    gx = (xs[None] - boxes[:, :1]) / (boxes[:, 2:3] - boxes[:, :1]) * 2 - 1
    gy = (ys[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1
    grid = torch.stack((gx[:, None, :].expand(5, 30, 40), gy[:, :, None].expand(5, 30, 40)), dim=3)
    expected = (F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0] >= 0.5).to(torch.uint8)
    monkeypatch.setattr(mask_head, "PASTE_CHUNK_PIXELS", 2 * 30 * 40)  # chunks of 2, 2 and 1 detections
    torch.testing.assert_close(paste_masks_grid_sample(masks, boxes, (30, 40)), expected, rtol=0, atol=0)


def test_rasterise_then_paste_recovers_the_polygon():
    poly = [torch.tensor([12.0, 12.0, 51.0, 12.0, 51.0, 31.0, 12.0, 31.0])]  # 40x20 rectangle
    target = polygons_to_mask_in_box(poly, [12.0, 12.0, 51.0, 31.0], 28)
    pasted = paste_masks_detectron(target[None], torch.tensor([[12.0, 12.0, 51.0, 31.0]]), (64, 64))[0]
    ref = torch.zeros(64, 64, dtype=torch.uint8)
    ref[12:32, 12:52] = 1
    iou = (pasted & ref).sum().item() / (pasted | ref).sum().item()
    assert iou > 0.9


def test_heads_shapes_and_norms():
    head = FastRCNNConvFCHead(8, 7, num_conv=4, conv_dim=16, num_fc=1, fc_dim=32, norm="sn",
                              norm_kwargs={"using_bn": False})
    assert head(torch.randn(3, 8, 7, 7)).shape == (3, 32)
    assert [type(m).__name__ for m in head.convs][:3] == ["Conv2d", "SwitchNorm2d", "ReLU"]
    two_fc = FastRCNNConvFCHead(8, 7)
    assert two_fc(torch.randn(2, 8, 7, 7)).shape == (2, 1024)
    assert not any(isinstance(m, (nn.Conv2d, SwitchNorm2d)) for m in two_fc.modules())
    mask = MaskHead(8, 81, conv_dim=16, norm="sn", norm_kwargs={"using_bn": False})
    assert mask(torch.randn(2, 8, 14, 14)).shape == (2, 81, 28, 28)
    pred = BoxPredictor(16, 80, "first")
    assert pred.cls_score.out_features == 81 and pred.bbox_pred.out_features == 324
    assert BoxPredictor(16, 80, "last").bbox_pred.out_features == 320


def test_roi_sampling_detectron_crowd_rules():
    heads = _roi_heads(num_classes=3, batch_size_per_image=16)  # at most 4 foreground
    heads.generator = torch.Generator().manual_seed(0)
    target = {"boxes": torch.tensor([[0.0, 0.0, 19.0, 19.0], [50.0, 50.0, 89.0, 89.0]]),
              "labels": torch.tensor([0, 2]), "iscrowd": torch.tensor([False, True])}
    proposals = torch.tensor([[51.0, 51.0, 89.0, 89.0],     # on the crowd box
                              [1.0, 1.0, 19.0, 19.0],       # on the real object
                              [200.0, 200.0, 220.0, 220.0]])  # background
    rois, labels, reg, num_fg, _ = heads._sample_image(proposals, target, 1.0)
    # candidates: gt 0 (fg), crowd gt (never), 3 proposals; fg: gt 0 and both overlapping proposals
    assert num_fg == 3 and rois.shape[0] == 4
    fg = {tuple(r.tolist()): int(l) for r, l in zip(rois[:num_fg], labels[:num_fg])}
    assert fg[(51.0, 51.0, 89.0, 89.0)] == 3  # takes the crowd box's class (Detectron-1), predictor index 2 + 1
    assert fg[(0.0, 0.0, 19.0, 19.0)] == 1
    assert labels[num_fg:].tolist() == [0]
    # its regression target points at the crowd box that gave it its label (SN-Detectron's box_to_gt_ind_map;
    # Caffe2 Detectron's precomputed targets would take the best non-crowd box, gt 0)
    crowd_row = [i for i in range(num_fg) if rois[i].tolist() == [51.0, 51.0, 89.0, 89.0]][0]
    expected = heads.box_coder.encode(rois[crowd_row:crowd_row + 1], target["boxes"][1:])
    assert torch.allclose(reg[crowd_row], expected[0])
    assert not torch.allclose(reg[crowd_row], heads.box_coder.encode(rois[crowd_row:crowd_row + 1],
                                                                     target["boxes"][:1])[0])


def test_roi_training_without_any_candidate_is_an_error():
    heads = _roi_heads(proposal_append_gt=False)
    heads.train()
    target = [{"boxes": torch.tensor([[0.0, 0.0, 3.0, 3.0]]), "labels": torch.tensor([0]),
               "iscrowd": torch.tensor([False])}]
    with pytest.raises(ValueError, match="no RoIs to train on"):
        heads({"f": torch.zeros(1, 4, 4, 4)}, [torch.zeros(0, 4)], torch.tensor([[4, 4]]), torch.ones(1),
              torch.tensor([[4, 4]]), target)


def test_pooler_keeps_float32_boxes_under_autocast():
    # A step at x = 1236 (exact in bf16). The box's one sample sits at its centre, x = 1236.0 with aligned=True;
    # the box cast to bf16 ([1232, 1240]: 8-px steps there) would sample x = 1235.5, half-way up the step.
    step = (torch.arange(1400) >= 1236).to(torch.float32).expand(1, 1, 4, 1400).contiguous()
    boxes = [torch.tensor([[1234.5, 0.0, 1238.5, 3.0]])]
    pooler = ROIPooler(1, (1.0,), 1, aligned=True)
    assert pooler([step], boxes).item() == 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pooler([step.to(torch.bfloat16)], boxes)
    assert got.dtype == torch.bfloat16 and got.item() == 1.0


def test_rpn_proposal_filters_in_a_tall_image_and_min_size_by_scale():
    rpn, names = _rpn(pre_nms_topk=(100, 100), post_nms_topk=(100, 100), nms_thresh=0.7)
    rpn.eval()
    logits = -torch.arange(8.0).reshape(1, 1, 4, 2)  # best first in (y, x) order
    rpn.head.forward = lambda xs: ([logits], [torch.zeros(1, 4, 4, 2)])

    def proposals(scale):
        props, _ = rpn({names[0]: torch.zeros(1, 4, 4, 2)}, torch.tensor([[64, 32]]), (64, 32), torch.tensor([scale]))
        return props[0].tolist()
    # anchors (-8, -8, 23, 23) + 16 (x, y) clipped to [0, 31] x [0, 63]; pairwise IoUs <= 0.5: NMS keeps all; the
    # centre test (x1 + w / 2 < W, y1 + h / 2 < H) drops none: the lower boxes' centres lie below y = W
    assert proposals(1.0) == [[0, 0, 23, 23], [8, 0, 31, 23], [0, 8, 23, 39], [8, 8, 31, 39],
                              [0, 24, 23, 55], [8, 24, 31, 55], [0, 40, 23, 63], [8, 40, 31, 63]]
    # RPN_MIN_SIZE is in original-image pixels: times the image's scale. Every proposal is 24 px wide.
    rpn.min_size = 13
    assert proposals(2.0) == []             # 26 px > 24
    rpn.min_size = 40
    assert len(proposals(0.5)) == 8         # 20 px <= 24


def test_eval_boxes_are_decoded_in_original_image_pixels():
    heads = _roi_heads()
    heads.eval()
    heads.box_predictor.forward = lambda x: (torch.tensor([[0.0, 5.0, 0.0]]).expand(x.shape[0], -1),
                                             torch.zeros(x.shape[0], 12))
    out = heads({"f": torch.zeros(1, 4, 8, 8)}, [torch.tensor([[20.0, 20.0, 59.0, 59.0]])], torch.tensor([[80, 80]]),
                torch.tensor([2.0]), torch.tensor([[50, 50]]))
    # zero deltas give back the proposal, divided by the image's scale (Detectron-1 decodes rois / im_scale)
    assert out[0]["boxes"].tolist() == [[10.0, 10.0, 29.5, 29.5]] and out[0]["labels"].tolist() == [0]


class _SignedMaps(nn.Module):
    """Mask head stand-in: the pooled feature, upsampled to 28x28, as the logits of class 0 (index 1 behind
    Detectron's background slot) and negated for the other two maps."""

    def forward(self, x):
        m = F.interpolate(x[:, :1], scale_factor=2)
        return torch.cat((-m, m, -m), dim=1)


def test_predicted_masks_pool_the_scaled_box_and_read_the_class_map():
    heads = ROIHeads(("f",), ROIPooler(1, (1.0,), 1), _FixedHead(), BoxPredictor(4, 2, "first"),
                     mask_pooler=ROIPooler(14, (1.0,), 2), mask_head=_SignedMaps())
    feats = torch.full((1, 4, 64, 64), -10.0)
    feats[..., 20:] = 10.0  # positive right of x = 20 in input pixels
    # a detection at x 10..29 of the original image is at x 20..58 of the input (scale 2): all positive there
    results = [{"boxes": torch.tensor([[10.0, 0.0, 29.0, 19.0]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([0])}]
    heads._predict_masks({"f": feats}, results, torch.tensor([2.0]), torch.tensor([[40, 40]]))
    mask = results[0]["masks"][0]
    # the box's inside (up to a pixel at its edges, where the paste thresholds the padded border) and nothing else
    assert mask.shape == (40, 40) and mask[2:18, 11:28].all()
    assert mask[:, :9].sum() == 0 and mask[:, 31:].sum() == 0 and mask[21:].sum() == 0


def test_postprocess_score_threshold_is_strict_and_d2_nms_is_per_class():
    heads = _roi_heads()
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(1, 3)
    # Detectron-1 keeps scores > 0.05: exactly 0.05 is out
    assert heads._postprocess(torch.tensor([[0.9, 0.05, 0.05]]), box, (20, 20))["labels"].numel() == 0
    d2 = ROIHeads(("f",), ROIPooler(1, (1.0,), 1), _FixedHead(), BoxPredictor(4, 2, "last"), legacy_plus_one=False)
    out = d2._postprocess(torch.tensor([[0.5, 0.4, 0.1]]), box[:, :8], (20, 20))
    # the same box for two classes: NMS runs per class, both stay
    assert out["labels"].tolist() == [0, 1] and out["scores"].tolist() == pytest.approx([0.5, 0.4])


def test_bitmap_mask_targets_sample_pixel_centres():
    # detectron2 BitMasks.crop_and_resize: RoIAlign with the half-pixel offset, then >= 0.5
    gen = torch.Generator().manual_seed(0)
    bitmap = (torch.rand(16, 16, generator=gen) > 0.5).to(torch.uint8)
    same = mask_head.bitmap_to_mask_in_box(bitmap, torch.tensor([0.0, 0.0, 16.0, 16.0]), 16)
    torch.testing.assert_close(same, bitmap.float(), rtol=0, atol=0)  # box = image, same size: the bitmap itself
    blocks = (torch.rand(8, 8, generator=gen) > 0.5).float()
    half = mask_head.bitmap_to_mask_in_box(blocks.repeat_interleave(2, 0).repeat_interleave(2, 1).to(torch.uint8),
                                           torch.tensor([0.0, 0.0, 16.0, 16.0]), 8)
    torch.testing.assert_close(half, blocks, rtol=0, atol=0)  # 2x2 blocks -> one pixel each
    # a box over columns 1..2 of [1, 1, 0, 0] averages to exactly 0.5: kept
    edge = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.uint8)
    assert mask_head.bitmap_to_mask_in_box(edge, torch.tensor([1.0, 0.0, 3.0, 2.0]), 1).tolist() == [[1.0]]
