"""Non-maximum suppression: greedy, by decreasing score, torchvision semantics by default.

`nms` and `batched_nms` match torchvision.ops (README: "Compatibility with torchvision.ops"); both are scriptable
and FX leaves. `offset=1` reproduces the Detectron legacy NMS (+1 in widths/heights, suppress IoU >= threshold).
Kernels in csrc/{cpu,cuda}/nms.*, IoU in csrc/common/roi_geometry.h. `nms_reference` is a pure-PyTorch
implementation from the definition.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from normkit._extension import register_ops, require_extension
from normkit.ops.layout import opmath_dtype
from normkit.ops.roi_common import check_same_device_and_dtype, dequantized, describe, register_float32_autocast

__all__ = ["nms", "batched_nms", "nms_reference"]


def _check_nms_args(boxes, scores, iou_threshold, offset, op: str) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{op}: boxes must be Tensor[N, 4] (x1, y1, x2, y2), got {describe(boxes)}")
    if not (boxes.is_floating_point() or boxes.is_quantized):
        raise ValueError(f"{op}: boxes must be a floating-point or quantized tensor, got {boxes.dtype}")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{op}: scores must be Tensor[{boxes.shape[0]}] (one per box), got {describe(scores)}")
    if boxes.is_quantized != scores.is_quantized:
        raise ValueError(f"{op}: boxes and scores must both be quantized or both not, got {boxes.dtype} and "
                         f"{scores.dtype}")
    if not boxes.is_quantized:
        check_same_device_and_dtype("scores", scores, boxes, "boxes", op)
    # A bool would pass as 0/1 but reads like "use an offset"; the legacy convention is asked for explicitly.
    if not (isinstance(offset, numbers.Integral) and not isinstance(offset, bool) and offset in (0, 1)):
        raise ValueError(f"{op}: offset must be the int 0 (torchvision) or 1 (Detectron legacy), got {offset!r}")
    if isinstance(iou_threshold, Tensor) and iou_threshold.numel() == 1 and not iou_threshold.is_complex():
        iou_threshold = iou_threshold.item()  # a one-element tensor passes, as in torchvision
    if (not isinstance(iou_threshold, numbers.Real) or isinstance(iou_threshold, bool)
            or iou_threshold != iou_threshold):
        raise ValueError(f"{op}: iou_threshold must be a number, got {iou_threshold!r}")


@torch.fx.wrap
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    """Greedy NMS: visit boxes by decreasing score (ties: input order) and drop every later box whose IoU with a
    kept box is > iou_threshold (>= with offset=1).

    Args:
        boxes: Tensor[N, 4] boxes (x1, y1, x2, y2); scores: Tensor[N], same dtype and device. Quantized boxes and
            scores are compared in float32.
        offset: the int 0 for torchvision's IoU (areas (x2 - x1) * (y2 - y1)); 1 for the Detectron legacy NMS.
            A bool is rejected.

    Returns:
        int64 Tensor of the kept boxes' indices, by decreasing score.
    """
    if not torch.jit.is_scripting():
        require_extension("nms")
        _check_nms_args(boxes, scores, iou_threshold, offset, "nms")
    return torch.ops.normkit.nms(dequantized(boxes), dequantized(scores), float(iou_threshold), offset)


@torch.fx.wrap
def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    """NMS within each category `idxs` (boxes of different categories never suppress each other).

    Equals NMS run per category with the kept indices merged by decreasing score (ties: input order), also for
    NaN/inf or huge coordinates and any integer category ids: the kernel groups the boxes by category instead of
    shifting their coordinates. Floating-point or bool `idxs` group the boxes by value. Empty `boxes` return an
    empty int64 tensor before any other argument is looked at, as in torchvision. On CUDA, whose kernel keeps a
    bit per pair of boxes, more than 4096 boxes run over groups of whole categories (as torchvision switches to a
    loop over categories), so memory grows with the square of a group's boxes, not of all boxes.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if not torch.jit.is_scripting():
        require_extension("batched_nms")
        _check_nms_args(boxes, scores, iou_threshold, offset, "batched_nms")
        if not isinstance(idxs, Tensor) or idxs.shape != scores.shape or idxs.is_complex():
            raise ValueError(f"batched_nms: idxs must be a Tensor[{boxes.shape[0]}] of category indices, "
                             f"got {describe(idxs)}")
        if idxs.device != boxes.device:
            raise ValueError(f"batched_nms: idxs must be on the same device as boxes ({boxes.device}), got "
                             f"{idxs.device}")
    if idxs.is_floating_point() or idxs.dtype == torch.bool:
        # e.g. a detector's class column: categories are the distinct values, as torchvision's offsets make them
        idxs = torch.unique(idxs, return_inverse=True)[1]
    return torch.ops.normkit.batched_nms(dequantized(boxes), dequantized(scores), idxs, float(iou_threshold), offset)


def _fake_nms(dets, scores, iou_threshold, offset=0):
    torch._check(dets.dim() == 2 and dets.shape[1] == 4,
                 lambda: f"nms: boxes must be Tensor[N, 4], got {list(dets.shape)}")
    torch._check(scores.dim() == 1 and scores.shape[0] == dets.shape[0],
                 lambda: f"nms: scores must be Tensor[{dets.shape[0]}], got {list(scores.shape)}")
    torch._check(dets.dtype == scores.dtype,
                 lambda: f"nms: boxes and scores must have the same dtype, got {dets.dtype} and {scores.dtype}")
    kept = torch.library.get_ctx().new_dynamic_size()  # data-dependent: between 0 and N
    return dets.new_empty((kept,), dtype=torch.long)


def _fake_batched_nms(dets, scores, idxs, iou_threshold, offset=0):
    torch._check(idxs.dim() == 1 and idxs.shape[0] == dets.shape[0],
                 lambda: f"batched_nms: idxs must be Tensor[{dets.shape[0]}], got {list(idxs.shape)}")
    return _fake_nms(dets, scores, iou_threshold, offset)


def _fake_batched_nms_in_groups(dets, scores, idxs, iou_threshold, offset, max_group_boxes):
    return _fake_batched_nms(dets, scores, idxs, iou_threshold, offset)


def _register() -> None:
    torch.library.register_fake("normkit::nms")(_fake_nms)
    torch.library.register_fake("normkit::batched_nms")(_fake_batched_nms)
    torch.library.register_fake("normkit::_batched_nms_in_groups")(_fake_batched_nms_in_groups)
    for name in ("normkit::nms", "normkit::batched_nms"):
        register_float32_autocast(name)


register_ops(_register)


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int = 0) -> Tensor:
    """Greedy NMS from the definition over the full pairwise IoU matrix (O(N^2) memory)."""
    _check_nms_args(boxes, scores, iou_threshold, offset, "nms_reference")
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order].to(opmath_dtype(boxes.dtype))
    area = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    w = (torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0])
         + offset).clamp(min=0)
    h = (torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1])
         + offset).clamp(min=0)
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
