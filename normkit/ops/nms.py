"""Non-maximum suppression: greedy, by decreasing score, torchvision semantics by default.

`nms` and `batched_nms` match torchvision.ops (DESIGN.md §4); `offset=1` reproduces the Detectron legacy NMS
(+1 in widths/heights, suppress IoU >= threshold). Kernels in csrc/{cpu,cuda}/nms.*, IoU in
csrc/common/roi_geometry.h. `nms_reference` is a pure-PyTorch implementation from the definition.
"""
from __future__ import annotations

import torch
from torch import Tensor

from normkit._extension import register_ops, require_extension
from normkit.ops._roi_common import check_same_device_and_dtype, describe, opmath_dtype

__all__ = ["nms", "batched_nms", "nms_reference"]


def _check_nms_args(boxes, scores, iou_threshold, offset, op: str) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{op}: boxes must be Tensor[N, 4] (x1, y1, x2, y2), got {describe(boxes)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{op}: boxes must be a floating-point tensor, got {boxes.dtype}")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{op}: scores must be Tensor[{boxes.shape[0]}] (one per box), got {describe(scores)}")
    check_same_device_and_dtype("scores", scores, boxes, "boxes", op)
    if offset not in (0, 1):
        raise ValueError(f"{op}: offset must be 0 (torchvision) or 1 (Detectron legacy), got {offset!r}")
    if not isinstance(iou_threshold, (int, float)) or iou_threshold != iou_threshold:
        raise ValueError(f"{op}: iou_threshold must be a number, got {iou_threshold!r}")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    """Greedy NMS: visit boxes by decreasing score (ties: input order) and drop every later box whose IoU with a
    kept box is > iou_threshold (>= with offset=1).

    Args:
        boxes: Tensor[N, 4] boxes (x1, y1, x2, y2); scores: Tensor[N], same dtype and device.
        offset: 0 for torchvision's IoU (areas (x2 - x1) * (y2 - y1)); 1 for the Detectron legacy NMS.

    Returns:
        int64 Tensor of the kept boxes' indices, by decreasing score.
    """
    require_extension("nms")
    _check_nms_args(boxes, scores, iou_threshold, offset, "nms")
    return torch.ops.normkit.nms(boxes, scores, float(iou_threshold), int(offset))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    """NMS within each category `idxs` (boxes of different categories never suppress each other).

    Shifts each category's boxes by a multiple of the coordinate span so categories cannot overlap, then runs one
    NMS. Returns the kept indices by decreasing score.
    """
    _check_nms_args(boxes, scores, iou_threshold, offset, "batched_nms")
    if not isinstance(idxs, Tensor) or idxs.shape != scores.shape or idxs.is_floating_point():
        raise ValueError(f"batched_nms: idxs must be an integer Tensor[{boxes.shape[0]}] of category indices, got "
                         f"{describe(idxs)}")
    if idxs.device != boxes.device:
        raise ValueError(f"batched_nms: idxs must be on the same device as boxes ({boxes.device}), got {idxs.device}")
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    # fp16 has too few bits for the shifted coordinates; shift in at least fp32.
    coords = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    # Category c's boxes move by c * span with span > (max - min + offset), so any two boxes of different
    # categories are separated along x and y by at least one unit even counting the +1 of offset=1.
    span = coords.max() - coords.min() + 1 + offset
    shifted = coords + (idxs.to(coords.dtype) * span)[:, None]
    return nms(shifted, scores.to(coords.dtype), iou_threshold, offset)


def _fake_nms(dets, scores, iou_threshold, offset=0):
    torch._check(dets.dim() == 2 and dets.shape[1] == 4, lambda: f"nms: boxes must be Tensor[N, 4], got {list(dets.shape)}")
    torch._check(scores.dim() == 1 and scores.shape[0] == dets.shape[0],
                 lambda: f"nms: scores must be Tensor[{dets.shape[0]}], got {list(scores.shape)}")
    torch._check(dets.dtype == scores.dtype,
                 lambda: f"nms: boxes and scores must have the same dtype, got {dets.dtype} and {scores.dtype}")
    kept = torch.library.get_ctx().new_dynamic_size()  # data-dependent: between 0 and N
    return dets.new_empty((kept,), dtype=torch.long)


def _register() -> None:
    torch.library.register_fake("normkit::nms")(_fake_nms)
    for _device_type in ("cpu", "cuda"):
        torch.library.register_autocast("normkit::nms", _device_type, torch.float32)


register_ops(_register)


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    """Greedy NMS from the definition over the full pairwise IoU matrix (O(N^2) memory)."""
    _check_nms_args(boxes, scores, iou_threshold, offset, "nms_reference")
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].to(opmath_dtype(boxes.dtype))
    area = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    w = (torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0]) + offset).clamp(min=0)
    h = (torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1]) + offset).clamp(min=0)
    inter = w * h
    iou = inter / (area[:, None] + area[None, :] - inter)
    suppresses = iou >= iou_threshold if offset == 1 else iou > iou_threshold
    removed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    later = torch.ones(len(order), len(order), dtype=torch.bool, device=boxes.device).triu(1)
    keep = []
    for i in range(len(order)):
        if bool(removed[i]):
            continue
        keep.append(i)
        removed |= suppresses[i] & later[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]
