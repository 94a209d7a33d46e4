"""Box arithmetic in the two conventions of two-stage detectors, and the box coder.

``legacy_plus_one=True`` is Detectron-1's convention: a box ``(x1, y1, x2, y2)`` covers the pixels
``x1..x2`` inclusive, so its width is ``x2 - x1 + 1`` and boxes are clipped to ``[0, W - 1]``.
``legacy_plus_one=False`` is detectron2/torchvision's: width ``x2 - x1``, clipped to ``[0, W]``.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "clip_boxes", "BoxCoder", "smooth_l1_loss", "DEFAULT_SCALE_CLAMP",
           "check_boxes"]

# exp() of a regressed log-size is capped so that a box grows at most 1000/16 times in one step.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _offset(legacy_plus_one: bool) -> float:
    return 1.0 if legacy_plus_one else 0.0


def box_area(boxes: Tensor, legacy_plus_one: bool = False) -> Tensor:
    """Tensor[N, 4] -> Tensor[N] areas (``(x2 - x1 + o) * (y2 - y1 + o)``, o = 1 for the legacy convention)."""
    o = _offset(legacy_plus_one)
    return (boxes[:, 2] - boxes[:, 0] + o) * (boxes[:, 3] - boxes[:, 1] + o)


def box_iou(boxes1: Tensor, boxes2: Tensor, legacy_plus_one: bool = False) -> Tensor:
    """Pairwise IoU, Tensor[N, 4] x Tensor[M, 4] -> Tensor[N, M].

    Pairs without overlap get 0 (also when a box is degenerate), as Detectron's ``bbox_overlaps``."""
    o = _offset(legacy_plus_one)
    area1 = box_area(boxes1, legacy_plus_one)
    area2 = box_area(boxes2, legacy_plus_one)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt + o).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(inter > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def clip_boxes(boxes: Tensor, size: Tuple[int, int], legacy_plus_one: bool = False) -> Tensor:
    """Clip Tensor[..., 4k] boxes to an image of ``size = (height, width)``: ``[0, W - 1]`` (legacy) or ``[0, W]``."""
    h, w = float(size[0]), float(size[1])
    o = _offset(legacy_plus_one)
    x = boxes[..., 0::2].clamp(min=0, max=w - o)
    y = boxes[..., 1::2].clamp(min=0, max=h - o)
    return _interleave(x, y)


def _interleave(x: Tensor, y: Tensor) -> Tensor:
    out = torch.empty(*x.shape[:-1], x.shape[-1] * 2, dtype=x.dtype, device=x.device)
    out[..., 0::2] = x
    out[..., 1::2] = y
    return out


def check_boxes(boxes: Tensor, what: str) -> None:
    """Raise a ValueError naming ``what`` unless boxes is a finite Tensor[K, 4] with x2 >= x1 and y2 >= y1."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{what} must be Tensor[K, 4] (x1, y1, x2, y2), got {shape}")
    if boxes.numel() and not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{what} contain non-finite coordinates")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bool(bad.any()):
        first = boxes[bad][0].tolist()
        raise ValueError(f"{what}: {int(bad.sum())} degenerate box(es) with x2 < x1 or y2 < y1, e.g. {first}")


class BoxCoder:
    """Encode boxes relative to reference boxes as ``(dx, dy, dw, dh)`` and back (R-CNN parametrisation).

    Args:
        weights: ``(wx, wy, ww, wh)`` multiplying the deltas: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the
            box head.
        legacy_plus_one: Detectron-1 widths ``x2 - x1 + 1`` and decoded ``x2 = cx + w/2 - 1``.
        scale_clamp: upper bound on ``dw, dh`` before ``exp`` (default ``log(1000/16)``).
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), legacy_plus_one: bool = False,
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.legacy_plus_one = legacy_plus_one
        self.scale_clamp = scale_clamp

    def _centres(self, boxes: Tensor):
        o = _offset(self.legacy_plus_one)
        w = boxes[:, 2] - boxes[:, 0] + o
        h = boxes[:, 3] - boxes[:, 1] + o
        return w, h, boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h

    def encode(self, reference: Tensor, targets: Tensor) -> Tensor:
        """Deltas Tensor[N, 4] that turn ``reference`` boxes Tensor[N, 4] into ``targets`` Tensor[N, 4]."""
        wx, wy, ww, wh = self.weights
        rw, rh, rx, ry = self._centres(reference)
        tw, th, tx, ty = self._centres(targets)
        return torch.stack((wx * (tx - rx) / rw, wy * (ty - ry) / rh,
                            ww * torch.log(tw / rw), wh * torch.log(th / rh)), dim=1)

    def decode(self, reference: Tensor, deltas: Tensor) -> Tensor:
        """Apply deltas Tensor[N, 4k] (k boxes per reference, e.g. one per class) to ``reference`` Tensor[N, 4]
        -> boxes Tensor[N, 4k], in float32 at least: under mixed precision the deltas are fp16/bf16, whose 4-8 px
        steps at 1000-px coordinates (and fp16 areas above 65504) would spoil proposals, IoUs and RoIs."""
        dtype = torch.promote_types(torch.promote_types(reference.dtype, deltas.dtype), torch.float32)
        reference, deltas = reference.to(dtype), deltas.to(dtype)
        wx, wy, ww, wh = self.weights
        w, h, cx, cy = self._centres(reference)
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pcx = dx * w[:, None] + cx[:, None]
        pcy = dy * h[:, None] + cy[:, None]
        pw = torch.exp(dw) * w[:, None]
        ph = torch.exp(dh) * h[:, None]
        o = _offset(self.legacy_plus_one)  # legacy: the box ends on the pixel before cx + w/2
        out = torch.empty_like(deltas)
        out[:, 0::4] = pcx - 0.5 * pw
        out[:, 1::4] = pcy - 0.5 * ph
        out[:, 2::4] = pcx + 0.5 * pw - o
        out[:, 3::4] = pcy + 0.5 * ph - o
        return out

    def __repr__(self) -> str:
        return (f"BoxCoder(weights={self.weights}, legacy_plus_one={self.legacy_plus_one}, "
                f"scale_clamp={self.scale_clamp:.4f})")


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """Element-wise smooth L1 (Huber / beta): ``0.5 x^2 / beta`` where ``|x| < beta``, else ``|x| - beta / 2``;
    ``beta = 0`` is plain L1. Not reduced."""
    diff = (input - target).abs()
    if beta < 1e-5:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
