"""Dtype and memory-layout rules the kernels follow, mirrored in Python for the wrappers and fake kernels."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "is_channels_last", "kernel_memory_format", "opmath_dtype"]

# The floating dtypes every kernel is compiled for.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_channels_last(t: Tensor) -> bool:
    """The kernels' layout rule (csrc/common/nc_layout.h, roi_checks.h): a 4-d tensor that is channels_last
    and not also plain contiguous (a tensor that is both, e.g. with C = 1 or H = W = 1, counts as NCHW)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def kernel_memory_format(t: Tensor) -> torch.memory_format:
    """The memory format of a kernel's output for input ``t``."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float32 for half/bfloat16, otherwise the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
