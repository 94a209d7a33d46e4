"""Every detection config builds, trains a step and predicts on a small CPU batch; bad input errors."""
from pathlib import Path

import numpy as np
import pytest
import torch

from normkit.data.detection import DetectionCollate, DetectionMapper, PixelNormalizer
from normkit.models import build_model, read_config
from normkit.nn import SwitchNorm2d

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "detection").glob("*.yaml"))
SN_CONFIGS = [c for c in CONFIGS if "_sn" in c.stem]


def small(config, depth=None):
    """The config's model with small sampling sizes so one step runs in seconds on a CPU."""
    cfg = read_config(config)
    model = cfg["model"]
    model["rpn"].update(pre_nms_topk=[200, 100], post_nms_topk=[64, 32], batch_size_per_image=32)
    model["roi_heads"]["batch_size_per_image"] = 16
    if depth:
        model["backbone"]["name"] = f"resnet{depth}"
    return cfg


def batch(mask_on, size=(64, 96)):
    h, w = size
    poly = lambda x1, y1, x2, y2: [torch.tensor([x1, y1, x2, y1, x2, y2, x1, y2])]  # noqa: E731
    t0 = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 40.0], [0.0, 0.0, 20.0, 20.0]]),
          "labels": torch.tensor([2, 7, 1]), "iscrowd": torch.tensor([False, False, True])}
    t1 = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 45.0]]), "labels": torch.tensor([0]),
          "iscrowd": torch.tensor([False])}
    if mask_on:
        t0["masks"] = [poly(4.0, 6.0, 40.0, 50.0), poly(30.0, 10.0, 90.0, 40.0), poly(0.0, 0.0, 20.0, 20.0)]
        bitmap = torch.zeros(h - 4, w - 8, dtype=torch.uint8)
        bitmap[10:46, 10:51] = 1  # an RLE-style instance as a bitmap
        t1["masks"] = [bitmap]
    return {"images": torch.randn(2, 3, h, w), "image_sizes": torch.tensor([[h, w], [h - 4, w - 8]]),
            "orig_sizes": torch.tensor([[2 * h, 2 * w], [2 * h - 8, 2 * w - 16]]),
            "scales": torch.tensor([0.5, 0.5]), "image_ids": torch.tensor([1, 2]), "targets": [t0, t1]}


# the published SN models run by default; scratch, DC5 and GN variants with the slow tests
PUBLISHED = ("e2e_faster_rcnn_R-50-C4_2x_sn", "e2e_faster_rcnn_R-50-FPN_2x_sn", "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1",
             "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1")
SMOKE = [c if c.stem in PUBLISHED else pytest.param(c, marks=pytest.mark.slow)
         for c in SN_CONFIGS + [c for c in CONFIGS if c.stem in ("e2e_mask_rcnn_R-50-FPN_2x_gn",
                                                                 "e2e_mask_rcnn_R-50-FPN_2x_bn",
                                                                 "e2e_faster_rcnn_R-50-C4_2x_bn")]]


@pytest.mark.parametrize("config", SMOKE, ids=lambda c: c.stem)
def test_config_builds_trains_and_predicts(config):
    torch.manual_seed(0)
    cfg = small(config)
    model = build_model(cfg)
    mask_on = "mask_head" in cfg["model"]
    data = batch(mask_on)
    model.train()
    losses = model(data)
    expected = {"rpn_cls_loss", "rpn_bbox_loss", "cls_loss", "box_reg_loss"} | ({"mask_loss"} if mask_on else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    model.eval()
    with torch.no_grad():  # make one class confident so post-processing and mask pasting run
        model.roi_heads.box_predictor.cls_score.weight.zero_()
        model.roi_heads.box_predictor.cls_score.bias[3] = 20.0
        out = model(data)
    assert len(out) == 2
    for pred, (h, w) in zip(out, data["orig_sizes"].tolist()):
        n = pred["boxes"].shape[0]
        assert 0 < n <= 100 and pred["scores"].shape == (n,) and pred["labels"].dtype == torch.int64
        assert (pred["labels"] == 2).all()  # predictor index 3 = foreground class 2 (background first)
        assert (pred["boxes"][:, 0] >= 0).all() and (pred["boxes"][:, 2] <= w - 1).all()
        assert (pred["boxes"][:, 3] <= h - 1).all()
        if mask_on:
            assert pred["masks"].shape == (n, h, w) and pred["masks"].dtype == torch.uint8


def test_mixed_precision_step_keeps_box_geometry_in_float32():
    # train.amp: the heads run in bf16 (fp16 on GPU), proposals, IoUs and RoIs stay float32 (detectron2 does too).
    torch.manual_seed(0)
    model = build_model(small(CONFIGS[0].parent / "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1.yaml")).train()
    pooled_boxes = []
    model.roi_heads.box_pooler.register_forward_pre_hook(lambda _, args: pooled_boxes.extend(args[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch(True))
    assert pooled_boxes and all(b.dtype == torch.float32 for b in pooled_boxes)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_sn_placement_of_the_mask_config():
    cfg = read_config(next(c for c in CONFIGS if c.stem == "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1"))
    model = build_model(cfg)
    sn = [m for m in model.modules() if isinstance(m, SwitchNorm2d)]
    assert all(not m.using_bn and m.running_mean is None for m in sn)
    count = lambda mod: sum(isinstance(m, SwitchNorm2d) for m in mod.modules())  # noqa: E731
    assert count(model.backbone) == 53 and count(model.neck) == 8
    assert count(model.rpn) == 0
    assert count(model.roi_heads.box_head) == 4 and count(model.roi_heads.mask_head) == 4


def test_frozen_stages_follow_detectron():
    model = build_model(small(next(c for c in CONFIGS if c.stem == "e2e_faster_rcnn_R-50-FPN_2x_sn")))
    model.eval()
    assert not model.backbone.bn1.training              # stem norm: eval
    assert model.backbone.layer1[0].bn1.training        # frozen res2's norms keep training mode (official)
    assert not model.backbone.layer2[0].bn1.training
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    cfg = small(next(c for c in CONFIGS if c.stem == "e2e_faster_rcnn_R-50-FPN_2x_sn"))
    cfg["model"]["backbone"]["freeze_mode"] = "eval"
    strict = build_model(cfg).train()
    assert not strict.backbone.layer1[0].bn1.training


@pytest.fixture(scope="module")
def fpn_model():
    return build_model(small(next(c for c in CONFIGS if c.stem == "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1"))).train()


@pytest.mark.parametrize("change,message", [
    (lambda b: b["targets"][0].update(boxes=torch.tensor([[10.0, 10.0, 5.0, 20.0]]), labels=torch.tensor([1]),
                                      iscrowd=torch.tensor([False])), "degenerate"),
    (lambda b: b["targets"][0].update(boxes=torch.tensor([[10.0, 10.0, 200.0, 20.0]]), labels=torch.tensor([1]),
                                      iscrowd=torch.tensor([False])), "outside"),
    (lambda b: b["targets"][0].update(labels=torch.tensor([2, 80, 1])), "must be in 0..79"),
    (lambda b: b["targets"][1].update(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                                      iscrowd=torch.zeros(0, dtype=torch.bool)), "no non-crowd ground-truth"),
    (lambda b: b.pop("targets"), "needs 'targets'"),
    (lambda b: b.pop("scales"), "lacks 'scales'"),
    (lambda b: b.update(images=torch.zeros(2, 1, 64, 96)), r"Tensor\[B, 3, H, W\]"),
])
def test_bad_training_input(fpn_model, change, message):
    data = batch(False)
    change(data)
    with pytest.raises(ValueError, match=message):
        fpn_model(data)


@pytest.mark.parametrize("legacy", [True, False])
def test_downscaled_images_with_boxes_at_the_border_train(fpn_model, legacy):
    # A 121x181 image shrunk to short side 60 (scale 0.496, 60x90): a legacy box ending at the last pixel column
    # (180) scales to 89.3, beyond the new last column 89 (the slack must not reject the pipeline's own output).
    h, w = 121, 181
    off = 1 if legacy else 0
    sample = {"image": np.zeros((h, w, 3), np.uint8), "image_id": 1, "labels": np.array([0, 3]),
              "iscrowd": np.zeros(2, bool), "boxes": np.array([[100, 20, w - off, 60], [10, 50, 70, h - off]],
                                                              np.float32)}
    mapper = DetectionMapper(PixelNormalizer("rgb", 1, (0, 0, 0), (1, 1, 1)), [60], 1000, legacy_plus_one=legacy)
    data = DetectionCollate(32)([mapper(sample, None, False), mapper(sample, None, True)])
    assert data["image_sizes"][0].tolist() == [60, 90]
    if legacy:
        assert float(data["targets"][0]["boxes"][0, 2]) > 89.2
    assert all(torch.isfinite(v) for v in fpn_model(data).values())


def test_bad_config_keys():
    cfg = small(next(c for c in CONFIGS if c.stem == "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1"))
    cfg["model"]["rpn"]["nms_threshold"] = 0.7
    with pytest.raises(ValueError, match="model.rpn"):
        build_model(cfg)
    cfg = small(next(c for c in CONFIGS if c.stem == "e2e_faster_rcnn_R-50-FPN_2x_sn_8-1"))
    cfg["model"]["roi_heads"]["box_head"]["name"] = "mlp"
    with pytest.raises(ValueError, match="box_head.name: unknown box head .mlp."):
        build_model(cfg)


def test_inspect_exposes_every_stage_and_matches_forward():
    torch.manual_seed(0)
    model = build_model(small(next(c for c in CONFIGS if c.stem == "e2e_mask_rcnn_R-50-FPN_2x_sn_8-1"))).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[3] = 20.0
    data = batch(True)
    details = model.inspect(data)
    assert list(details["features"]) == ["p2", "p3", "p4", "p5", "p6"]
    assert [x.shape[1] for x in details["rpn_logits"]] == [3] * 5
    assert [x.shape[1] for x in details["rpn_deltas"]] == [12] * 5
    k = sum(p.shape[0] for p in details["proposals"])
    assert details["cls_scores"].shape == (k, 81) and details["box_deltas"].shape == (k, 324)
    with torch.no_grad():
        out = model(data)
    for a, b in zip(out, details["predictions"]):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    with pytest.raises(RuntimeError, match="eval"):
        model.train().inspect(data)
