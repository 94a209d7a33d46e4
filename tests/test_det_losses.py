"""RPN and ROI-head training losses against straightforward numpy re-implementations of Detectron-1's definitions
(+1 IoU and box widths, anchor labels, bbox_transform_inv targets, the loss normalisers), on inputs whose sampling
takes every candidate so the sampled set is known."""
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from normkit.models.detection import RPN, AnchorGenerator, BoxPredictor, ROIHeads, ROIPooler


def np_iou(a, b):
    """+1 IoU, a [N, 4] x b [M, 4] -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt + 1, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def np_encode(ref, tgt, weights):
    """Detectron-1 bbox_transform_inv."""
    rw, rh = ref[:, 2] - ref[:, 0] + 1, ref[:, 3] - ref[:, 1] + 1
    tw, th = tgt[:, 2] - tgt[:, 0] + 1, tgt[:, 3] - tgt[:, 1] + 1
    rx, ry = ref[:, 0] + 0.5 * rw, ref[:, 1] + 0.5 * rh
    tx, ty = tgt[:, 0] + 0.5 * tw, tgt[:, 1] + 0.5 * th
    wx, wy, ww, wh = weights
    return np.stack((wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * np.log(tw / rw), wh * np.log(th / rh)), 1)


def np_smooth_l1(x, beta):
    x = np.abs(x)
    return x if beta == 0 else np.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def np_bce(logit, label):
    return np.maximum(logit, 0) - logit * label + np.log1p(np.exp(-np.abs(logit)))


# --------------------------------------------------------------------------------------------------- RPN
RPN_GT = [np.array([[20.0, 14.0, 50.0, 44.0]]), np.array([[10.0, 10.0, 40.0, 40.0], [50.0, 40.0, 90.0, 80.0]])]
RPN_SIZES = [(71, 87), (96, 96)]  # (h, w): image 0's far anchors end exactly on its border (x2 = 87, y2 = 71)


def rpn_reference(logits, deltas, beta, cls_norm, box_norm, batch):
    """Detectron-1 RPN losses for stride-16, size-32, ratio-1 anchors on a 6x6 grid, every label sampled."""
    ys, xs = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    anchors = np.stack((xs.ravel() * 16 - 8, ys.ravel() * 16 - 8, xs.ravel() * 16 + 23, ys.ravel() * 16 + 23),
                       1).astype(np.float64)
    cls_sum, box_per_image, num_valid_all, box_sum = 0.0, [], 0, 0.0
    for i, (gt, (h, w)) in enumerate(zip(RPN_GT, RPN_SIZES)):
        inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < w) & (anchors[:, 3] < h)
        iou = np_iou(gt, anchors)
        iou[:, ~inside] = -1
        best, arg = iou.max(0), iou.argmax(0)
        labels = np.full(len(anchors), -1)
        labels[(best >= 0) & (best < 0.3)] = 0
        labels[best >= 0.7] = 1
        for g in range(len(gt)):  # every anchor sharing a ground truth's best IoU
            labels[inside & (iou[g] == iou[g].max())] = 1
        valid, fg = labels >= 0, labels == 1
        assert 0 < fg.sum() < valid.sum() and ((best >= 0.3) & (best < 0.7)).any()  # all three kinds occur
        lg = logits[i, 0].ravel()
        cls_sum += np_bce(lg[valid], labels[valid]).sum()
        num_valid_all += valid.sum()
        d = deltas[i].reshape(4, -1).T
        loss = np_smooth_l1(d[fg] - np_encode(anchors[fg], gt[arg[fg]], (1, 1, 1, 1)), beta).sum()
        box_per_image.append(loss / valid.sum())
        box_sum += loss
    cls = cls_sum / (num_valid_all if cls_norm == "num_valid" else batch * 2)
    box = np.mean(box_per_image) if box_norm == "num_valid" else box_sum / (batch * 2)
    return cls, box


@pytest.mark.parametrize("cls_norm, box_norm, beta", [("batch_size", "num_valid", 1 / 9),  # Detectron-1 FPN
                                                      ("num_valid", "num_valid", 1 / 9),   # Detectron-1 C4
                                                      ("batch_size", "batch_size", 0.0)])  # detectron2
def test_rpn_losses_match_a_reference(cls_norm, box_norm, beta):
    batch = 64  # more slots than labelled anchors: every label is sampled (without replacement)
    rpn = RPN(["p"], 4, AnchorGenerator((16,), ((32,),), (1.0,)), batch_size_per_image=batch,
              bg_with_replacement=False, cls_loss_normalizer=cls_norm, bbox_loss_normalizer=box_norm,
              smooth_l1_beta=beta).train()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 6, 6, generator=gen, dtype=torch.float64)
    deltas = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64) * 0.3
    rpn.head.forward = lambda xs: ([logits], [deltas])
    targets = [{"boxes": torch.from_numpy(g), "labels": torch.zeros(len(g), dtype=torch.int64),
                "iscrowd": torch.zeros(len(g), dtype=torch.bool)} for g in RPN_GT]
    _, losses = rpn({"p": torch.zeros(2, 4, 6, 6)}, torch.tensor(RPN_SIZES), (96, 96), torch.ones(2), targets)
    cls, box = rpn_reference(logits.numpy(), deltas.numpy(), beta, cls_norm, box_norm, batch)
    assert losses["rpn_cls_loss"].item() == pytest.approx(cls, rel=1e-9)
    assert losses["rpn_bbox_loss"].item() == pytest.approx(box, rel=1e-6)


# --------------------------------------------------------------------------------------------------- ROI heads
class _ZeroHead(nn.Module):
    out_channels = 4

    def forward(self, x):
        return x.flatten(1)[:, :4] * 0


class _ClassMaps(nn.Module):
    """Mask head stand-in: logit map c is the constant values[c] (one per predictor class)."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float64)

    def forward(self, x):
        return self.values[None, :, None, None].expand(x.shape[0], -1, 28, 28)


ROI_GT = np.array([[10.0, 10.0, 40.0, 30.0], [50.0, 20.0, 80.0, 70.0]])  # resized pixels, classes 0 and 1
ROI_PROPOSALS = np.array([[12.0, 11.0, 41.0, 31.0],    # high IoU with gt 0
                          [45.0, 22.0, 78.0, 64.0],    # ~0.7 with gt 1
                          [25.0, 10.0, 55.0, 30.0],    # ~0.35 with gt 0: background though it touches an object
                          [0.0, 60.0, 20.0, 79.0]])    # nothing
CLS_LOGITS = np.array([0.3, -0.2, 0.5])                  # background first
BOX_DELTAS = np.array([0.4, -0.3, 0.2, 0.1, 0.05, 0.1, -0.2, 0.3, -0.1, 0.2, 0.15, -0.25])


def roi_reference(scale):
    """Detectron-1 Fast R-CNN losses, IoUs and targets in original-image pixels (the roidb's frame)."""
    gt, cand = ROI_GT / scale, np.concatenate((ROI_GT, ROI_PROPOSALS)) / scale
    iou = np_iou(cand, gt)
    best, arg = iou.max(1), iou.argmax(1)
    assert ((best > 0.3) & (best < 0.5)).any()
    labels = np.where(best >= 0.5, arg + 1, 0)  # predictor index: class + 1
    log_probs = CLS_LOGITS - np.log(np.exp(CLS_LOGITS).sum())
    cls = -log_probs[labels].mean()
    fg = labels > 0
    targets = np_encode(cand[fg], gt[arg[fg]], (10.0, 10.0, 5.0, 5.0))
    preds = BOX_DELTAS.reshape(3, 4)[labels[fg]]
    box = np_smooth_l1(preds - targets, 1.0).sum() / len(cand)  # normalised by every sampled RoI
    return cls, box


def _train_heads(mask=False):
    kwargs = {}
    if mask:
        kwargs = dict(mask_pooler=ROIPooler(14, (1.0,), 1), mask_head=_ClassMaps([0.7, -0.4, 1.3]))
    heads = ROIHeads(("f",), ROIPooler(1, (1.0,), 1), _ZeroHead(), BoxPredictor(4, 2, "first"),
                     batch_size_per_image=16, positive_fraction=0.5, **kwargs).train()
    heads.box_predictor.forward = lambda x: (torch.from_numpy(CLS_LOGITS).expand(x.shape[0], -1),
                                             torch.from_numpy(BOX_DELTAS).expand(x.shape[0], -1))
    heads.generator = torch.Generator().manual_seed(0)
    return heads


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_roi_box_losses_match_a_reference(scale):
    heads = _train_heads()
    target = {"boxes": torch.from_numpy(ROI_GT), "labels": torch.tensor([0, 1]),
              "iscrowd": torch.tensor([False, False])}
    feats = {"f": torch.zeros(1, 4, 100, 100, dtype=torch.float64)}
    losses = heads(feats, [torch.from_numpy(ROI_PROPOSALS)], torch.tensor([[100, 100]]), torch.tensor([scale]),
                   torch.tensor([[100, 100]]), [target])
    cls, box = roi_reference(scale)
    assert losses["cls_loss"].item() == pytest.approx(cls, rel=1e-9)
    assert losses["box_reg_loss"].item() == pytest.approx(box, rel=1e-6)


def test_mask_loss_takes_the_ground_truth_class_map_in_the_sampling_frame():
    # the only foreground RoIs are the two ground-truth boxes, whose rectangle polygons fill them: every target pixel
    # is 1, so the loss is the mean of softplus(-logit) of each RoI's class map (predictor index class + 1)
    heads = _train_heads(mask=True)
    rect = lambda b: [torch.tensor([b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]])]  # noqa: E731
    target = {"boxes": torch.from_numpy(ROI_GT), "labels": torch.tensor([0, 1]),
              "iscrowd": torch.tensor([False, False]), "masks": [rect(b) for b in ROI_GT.tolist()]}
    losses = heads({"f": torch.zeros(1, 4, 100, 100, dtype=torch.float64)}, [torch.zeros(0, 4, dtype=torch.float64)],
                   torch.tensor([[100, 100]]), torch.tensor([0.5]), torch.tensor([[200, 200]]), [target])
    expected = (math.log1p(math.exp(0.4)) + math.log1p(math.exp(-1.3))) / 2
    assert losses["mask_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_mask_targets_never_come_from_crowd_regions():
    # Detectron-1 rasterises targets from non-crowd instances only. The crowd region here has the same tight box as
    # ground truth 0 and comes first, so matching it would give gt 0's RoI a half-filled (triangle) target.
    heads = _train_heads(mask=True)
    rect = lambda b: [torch.tensor([b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]])]  # noqa: E731
    triangle = [torch.tensor([10.0, 10.0, 40.0, 10.0, 10.0, 30.0])]
    target = {"boxes": torch.from_numpy(np.concatenate((ROI_GT[:1], ROI_GT))), "labels": torch.tensor([1, 0, 1]),
              "iscrowd": torch.tensor([True, False, False]), "masks": [triangle] + [rect(b) for b in ROI_GT.tolist()]}
    losses = heads({"f": torch.zeros(1, 4, 100, 100, dtype=torch.float64)}, [torch.zeros(0, 4, dtype=torch.float64)],
                   torch.tensor([[100, 100]]), torch.tensor([1.0]), torch.tensor([[100, 100]]), [target])
    expected = (math.log1p(math.exp(0.4)) + math.log1p(math.exp(-1.3))) / 2
    assert losses["mask_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_default_hyperparameters_are_detectron_1():
    # what a config that leaves them out gets (Detectron-1 config defaults)
    rpn = inspect.signature(RPN).parameters
    assert {k: rpn[k].default for k in ("nms_thresh", "batch_size_per_image", "positive_fraction",
                                        "iou_thresholds", "straddle_thresh", "smooth_l1_beta", "min_size")} == {
        "nms_thresh": 0.7, "batch_size_per_image": 256, "positive_fraction": 0.5, "iou_thresholds": (0.3, 0.7),
        "straddle_thresh": 0.0, "smooth_l1_beta": pytest.approx(1 / 9), "min_size": 0.0}
    roi = inspect.signature(ROIHeads).parameters
    assert {k: roi[k].default for k in ("batch_size_per_image", "positive_fraction", "fg_iou_threshold",
                                        "bg_iou_threshold_lo", "bbox_reg_weights", "smooth_l1_beta", "score_thresh",
                                        "nms_thresh", "detections_per_image", "mask_threshold")} == {
        "batch_size_per_image": 512, "positive_fraction": 0.25, "fg_iou_threshold": 0.5, "bg_iou_threshold_lo": 0.0,
        "bbox_reg_weights": (10.0, 10.0, 5.0, 5.0), "smooth_l1_beta": 1.0, "score_thresh": 0.05, "nms_thresh": 0.5,
        "detections_per_image": 100, "mask_threshold": 0.5}
