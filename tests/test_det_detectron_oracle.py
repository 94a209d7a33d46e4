"""RPN proposals and box post-processing against numpy oracles written from Detectron-1's definitions
(generate_anchors, bbox_transform, clip_tiled_boxes, _filter_boxes, the +1 greedy NMS,
box_results_with_nms_and_limit), on random inputs."""
import numpy as np
import pytest
import torch

from normkit.models.detection import RPN, AnchorGenerator, BoxPredictor, ROIHeads, ROIPooler
from normkit.models.detection.boxes import DEFAULT_SCALE_CLAMP


def np_nms(dets, thresh):
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    suppressed = np.zeros(len(dets), dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = np.maximum(x1[i], x1)
        yy1 = np.maximum(y1[i], y1)
        xx2 = np.minimum(x2[i], x2)
        yy2 = np.minimum(y2[i], y2)
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas - inter)
        suppressed |= ovr >= thresh
    return np.array(keep, dtype=np.int64)


def np_bbox_transform(boxes, deltas, weights):
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = np.minimum(deltas[:, 2::4] / ww, DEFAULT_SCALE_CLAMP)
    dh = np.minimum(deltas[:, 3::4] / wh, DEFAULT_SCALE_CLAMP)
    pcx = dx * widths[:, None] + ctr_x[:, None]
    pcy = dy * heights[:, None] + ctr_y[:, None]
    pw = np.exp(dw) * widths[:, None]
    ph = np.exp(dh) * heights[:, None]
    out = np.zeros(deltas.shape, dtype=deltas.dtype)
    out[:, 0::4] = pcx - 0.5 * pw
    out[:, 1::4] = pcy - 0.5 * ph
    out[:, 2::4] = pcx + 0.5 * pw - 1
    out[:, 3::4] = pcy + 0.5 * ph - 1
    return out


def np_clip(boxes, h, w):
    boxes = boxes.copy()
    boxes[:, 0::4] = np.clip(boxes[:, 0::4], 0, w - 1)
    boxes[:, 1::4] = np.clip(boxes[:, 1::4], 0, h - 1)
    boxes[:, 2::4] = np.clip(boxes[:, 2::4], 0, w - 1)
    boxes[:, 3::4] = np.clip(boxes[:, 3::4], 0, h - 1)
    return boxes


def np_generate_anchors(stride, sizes, ratios):
    base = np.array([1, 1, stride, stride], dtype=np.float64) - 1
    w, h = base[2] - base[0] + 1, base[3] - base[1] + 1
    cx, cy = base[0] + 0.5 * (w - 1), base[1] + 0.5 * (h - 1)
    ws = np.round(np.sqrt(w * h / np.array(ratios)))
    hs = np.round(ws * np.array(ratios))
    out = []
    for rw, rh in zip(ws, hs):
        for scale in np.array(sizes, dtype=np.float64) / stride:
            sw, sh = rw * scale, rh * scale
            out.append([cx - 0.5 * (sw - 1), cy - 0.5 * (sh - 1), cx + 0.5 * (sw - 1), cy + 0.5 * (sh - 1)])
    return np.array(out, dtype=np.float32)


def np_proposals_one_level(scores, deltas, anchors, stride, im_h, im_w, pre, post, nms_thresh):
    """scores (A, H, W), deltas (4A, H, W) -> (boxes, scores) as Detectron's GenerateProposalsOp."""
    a, h, w = scores.shape
    sx, sy = np.meshgrid(np.arange(w) * stride, np.arange(h) * stride)
    shifts = np.stack((sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()), axis=1).astype(np.float32)
    all_anchors = (anchors[None] + shifts[:, None]).reshape(-1, 4)
    d = deltas.transpose(1, 2, 0).reshape(-1, 4)
    s = scores.transpose(1, 2, 0).reshape(-1)
    order = np.argsort(-s, kind="stable")[:pre]
    d, s, all_anchors = d[order], s[order], all_anchors[order]
    boxes = np_clip(np_bbox_transform(all_anchors, d, (1.0, 1.0, 1.0, 1.0)), im_h, im_w)
    ws = boxes[:, 2] - boxes[:, 0] + 1
    hs = boxes[:, 3] - boxes[:, 1] + 1
    keep = (ws >= 0) & (hs >= 0) & (boxes[:, 0] + ws / 2 < im_w) & (boxes[:, 1] + hs / 2 < im_h)
    boxes, s = boxes[keep], s[keep]
    k = np_nms(np.hstack((boxes, s[:, None])), nms_thresh)[:post]
    return boxes[k], s[k]


@pytest.mark.parametrize("seed", [0, 1])
def test_fpn_proposals_match_the_detectron_oracle(seed):
    strides, sizes = (4, 8, 16, 32, 64), [(32,), (64,), (128,), (256,), (512,)]
    rpn = RPN(["p2", "p3", "p4", "p5", "p6"], 4, AnchorGenerator(strides, sizes), pre_nms_topk=(2000, 300),
              post_nms_topk=(2000, 300), collect="per_batch").eval()
    gen = torch.Generator().manual_seed(seed)
    im_h, im_w = 128, 160
    shapes = [(im_h // s + (1 if s == 64 else 0), im_w // s + (1 if s == 64 else 0)) for s in strides]
    logits = [torch.randn(1, 3, h, w, generator=gen) * 3 for h, w in shapes]
    deltas = [torch.randn(1, 12, h, w, generator=gen) * 0.3 for h, w in shapes]
    rpn.head.forward = lambda xs: (logits, deltas)
    feats = {f"p{l}": torch.zeros(1, 4, h, w) for l, (h, w) in zip(range(2, 7), shapes)}
    props, _ = rpn(feats, torch.tensor([[im_h - 10, im_w - 20]]), (im_h, im_w), torch.ones(1))
    # oracle: per level with the padded test im_info, then collect the best 300 over the levels
    boxes_all, scores_all = [], []
    for stride, size, lg, dl in zip(strides, sizes, logits, deltas):
        b, s = np_proposals_one_level(torch.sigmoid(lg[0]).numpy(), dl[0].numpy(),
                                      np_generate_anchors(stride, size, (0.5, 1.0, 2.0)), stride, im_h, im_w,
                                      300, 300, 0.7)
        boxes_all.append(b)
        scores_all.append(s)
    boxes, scores = np.concatenate(boxes_all), np.concatenate(scores_all)
    expected = boxes[np.argsort(-scores, kind="stable")[:300]]
    np.testing.assert_allclose(props[0].numpy(), expected, rtol=0, atol=1e-4)


def np_box_results(scores, boxes, thresh=0.05, nms=0.5, max_per_image=100):
    num_classes = scores.shape[1]
    out = []
    for j in range(1, num_classes):
        inds = np.where(scores[:, j] > thresh)[0]
        dets = np.hstack((boxes[inds, j * 4:(j + 1) * 4], scores[inds, j][:, None])).astype(np.float32)
        keep = np_nms(dets, nms)
        out.append((j, dets[keep]))
    all_scores = np.hstack([d[:, -1] for _, d in out])
    if len(all_scores) > max_per_image:
        t = np.sort(all_scores)[-max_per_image]
        out = [(j, d[d[:, -1] >= t]) for j, d in out]
    return out


def test_box_post_processing_matches_the_detectron_oracle():
    gen = torch.Generator().manual_seed(0)
    k, n = 5, 400
    heads = ROIHeads(("f",), ROIPooler(1, (1.0,), 1), torch.nn.Identity(), BoxPredictor(4, k, "first"),
                     detections_per_image=50)
    probs = torch.softmax(torch.randn(n, k + 1, generator=gen) * 2, dim=1)
    xy = torch.rand(n, 2, generator=gen) * 200
    props = torch.cat((xy, xy + 20 + torch.rand(n, 2, generator=gen) * 100), dim=1)
    deltas = torch.randn(n, 4 * (k + 1), generator=gen) * 0.5
    boxes = torch.from_numpy(np_clip(np_bbox_transform(props.numpy(), deltas.numpy(), (10.0, 10.0, 5.0, 5.0)),
                                     240, 300))
    ours = heads._postprocess(probs, boxes, (240, 300))
    oracle = np_box_results(probs.numpy(), boxes.numpy(), max_per_image=50)
    exp_boxes = np.concatenate([d[:, :4] for _, d in oracle])
    exp_scores = np.concatenate([d[:, 4] for _, d in oracle])
    exp_labels = np.concatenate([np.full(len(d), j - 1) for j, d in oracle])
    np.testing.assert_array_equal(ours["labels"].numpy(), exp_labels)
    np.testing.assert_allclose(ours["scores"].numpy(), exp_scores, rtol=1e-6)
    np.testing.assert_allclose(ours["boxes"].numpy(), exp_boxes, rtol=1e-6)
    # and the decode itself matches Detectron's bbox_transform
    ours_decoded = heads.box_coder.decode(props, deltas).numpy()
    np.testing.assert_allclose(ours_decoded, np_bbox_transform(props.numpy(), deltas.numpy(), (10.0, 10.0, 5.0, 5.0)),
                               rtol=1e-5, atol=1e-3)
