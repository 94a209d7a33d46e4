"""Argument handling shared by the ROI ops: box formats, output sizes, layouts and batch-index checks.

The public ops are TorchScript-compatible: the conversions they need (`output_size_pair`, `boxes_to_rois`,
`dequantized`) are scriptable, while the `check_*` functions give eager callers clear ValueErrors and run only
outside TorchScript (the C++ kernels check what they index either way).
"""
from __future__ import annotations

import math
import numbers
from typing import List, Tuple, Union

import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2

BoxesLike = Union[Tensor, List[Tensor]]


def describe(x) -> str:
    if isinstance(x, Tensor):
        return f"Tensor{list(x.shape)} ({x.dtype}, {x.device})"
    return type(x).__name__


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def plain_int(value):
    """An Integral (numpy integers too) as a Python int, as TorchScript and the ops take; anything else unchanged,
    for the argument checks to refuse."""
    return int(value) if _is_int(value) else value


def check_output_size(output_size, op: str) -> None:
    """`int` or `(height, width)`, both positive ints."""
    size = (output_size, output_size) if not isinstance(output_size, (tuple, list)) else tuple(output_size)
    if len(size) != 2 or not all(_is_int(v) for v in size):
        raise ValueError(f"{op}: output_size must be an int or a pair of ints (height, width), got {output_size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{op}: output_size must be positive, got {output_size!r}")


def output_size_pair(output_size: BroadcastingList2[int]) -> Tuple[int, int]:
    """`int` (numpy integers too) or `(height, width)` -> (height, width), as checked by check_output_size."""
    if isinstance(output_size, (list, tuple)):
        return int(output_size[0]), int(output_size[1])
    return int(output_size), int(output_size)


def check_spatial_scale(spatial_scale, op: str) -> None:
    if not isinstance(spatial_scale, numbers.Real) or isinstance(spatial_scale, bool):
        raise ValueError(f"{op}: spatial_scale must be a number (feature size / image size, e.g. 1/16), got "
                         f"{spatial_scale!r}")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"{op}: spatial_scale must be a positive finite number (feature size / image size, "
                         f"e.g. 1/16), got {spatial_scale!r}")


def check_feature_map(input, op: str) -> None:
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f"{op}: input must be Tensor[N, C, H, W], got {describe(input)}")
    if input.is_quantized:
        if input.qscheme() != torch.per_tensor_affine:
            raise ValueError(f"{op}: a quantized input must be quantized per tensor (affine), got {input.qscheme()}")
    elif not input.is_floating_point():
        raise ValueError(f"{op}: input must be a floating-point or quantized tensor, got {input.dtype}")


def dequantized(t: Tensor) -> Tensor:
    """Quantized ROI-op arguments are computed on in float32 (torchvision accepts quantized inputs too)."""
    return t.dequantize() if t.is_quantized else t


_AUTOCAST_LIBRARIES: list = []  # a Library deregisters its kernels when garbage-collected


def register_float32_autocast(qualname: str) -> None:
    """Under autocast (CPU and CUDA) run the op in float32 and cast its floating outputs back to the dtype of the
    first argument (the feature map of the ROI ops; NMS returns indices, left as they are), as torchvision's ops
    do, so they stay drop-in under mixed precision."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "IMPL")
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(_keyset, *args, excluded=excluded):
            dtype = args[0].dtype
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                out = op(*(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args))
            cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
            return tuple(cast(t) for t in out) if isinstance(out, tuple) else cast(out)

        lib.impl(name, kernel, key_name, with_keyset=True)
    _AUTOCAST_LIBRARIES.append(lib)


def autocast_active(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


def check_same_device_and_dtype(name: str, t: Tensor, ref: Tensor, ref_name: str, op: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
    # Under autocast the registered autocast kernel casts both to float32, so the dtypes may differ; quantized
    # features and boxes are both dequantized to float32.
    if ref.is_quantized:
        if not (t.is_quantized or t.dtype == torch.float32):
            raise ValueError(f"{op}: with a quantized {ref_name}, {name} must be quantized or float32, got {t.dtype}")
    elif t.dtype != ref.dtype and not autocast_active(ref.device):
        raise ValueError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def check_boxes(boxes, input: Tensor, op: str) -> None:
    """Tensor[K, 5] rows (batch_index, x1, y1, x2, y2), or a list with one Tensor[L_i, 4] per image."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{op}: boxes must be Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list of "
                             f"Tensor[L, 4] (one per image), got Tensor{list(boxes.shape)}")
        check_same_device_and_dtype("boxes", boxes, input, "input", op)
        return
    if not isinstance(boxes, (list, tuple)):
        raise ValueError(f"{op}: boxes must be Tensor[K, 5] or a list of Tensor[L, 4], got {describe(boxes)}")
    if len(boxes) > input.shape[0]:
        raise ValueError(f"{op}: got a list of {len(boxes)} box tensors for an input batch of {input.shape[0]} images")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"{op}: boxes[{i}] must be Tensor[L, 4] (x1, y1, x2, y2), got {describe(b)}")
        check_same_device_and_dtype(f"boxes[{i}]", b, input, "input", op)


def boxes_to_rois(boxes: BoxesLike, input: Tensor) -> Tensor:
    """Boxes as checked by check_boxes -> Tensor[K, 5] rows (batch_index, x1, y1, x2, y2), dequantized."""
    if isinstance(boxes, Tensor):
        return dequantized(boxes)
    if len(boxes) == 0:
        return dequantized(input).new_zeros((0, 5))
    parts: List[Tensor] = []
    dtype = dequantized(boxes[0]).dtype
    for b in boxes:  # the common dtype, as torch.cat promotes (mixed bf16/fp32 lists keep fp32 coordinates)
        dtype = torch.promote_types(dtype, dequantized(b).dtype)
    for i, b in enumerate(boxes):
        b = dequantized(b).to(dtype)
        parts.append(torch.cat([torch.full_like(b[:, :1], float(i)), b], dim=1))
    return torch.cat(parts)


def _is_exporting() -> bool:
    # Older torch (2.6) has no torch.compiler.is_exporting; its torch.export traces with dynamo, where is_compiling()
    # holds.
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


def check_batch_indices(rois: Tensor, batch: int, op: str) -> None:
    """Batch indices must be integers in [0, batch); checked on CPU only. On a GPU the check would cost a device
    sync per call (four per FPN pooling): the CUDA kernels instead give a RoI with an invalid index zeros, and no
    gradient. Skipped too while compiling or exporting and for meta tensors (no values; the kernels check on CPU)."""
    if rois.device.type != "cpu" or torch.compiler.is_compiling() or _is_exporting():
        return
    if rois.shape[0] == 0:
        return
    index = rois[:, 0]
    bad = ~((index >= 0) & (index < batch) & (index == index.floor()))  # NaN fails every comparison
    if bool(bad.any()):
        raise ValueError(f"{op}: boxes[:, 0] must hold integer batch indices in [0, {batch}) for an input batch of "
                         f"{batch}, got {index[bad][0].item()}")


