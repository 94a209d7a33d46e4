"""RoIPool (Fast R-CNN): max over the cells of each bin of each box, on integer-rounded box coordinates.

`roi_pool` matches torchvision.ops.roi_pool (README: "Compatibility with torchvision.ops"); it is scriptable and
an FX leaf. Kernels in csrc/{cpu,cuda}/roi_pool.*, geometry in csrc/common/roi_geometry.h. `roi_pool_reference`
is a slow pure-PyTorch implementation from the definition.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2

from normkit._extension import register_no_double_backward, register_ops, require_extension
from normkit.ops.layout import opmath_dtype
from normkit.ops.roi_common import (BoxesLike, boxes_to_rois, check_batch_indices, check_boxes, check_feature_map,
                                     check_output_size, check_spatial_scale, dequantized,
                                     output_size_pair, register_float32_autocast)

__all__ = ["roi_pool", "roi_pool_reference"]


def _check_roi_pool_args(input, boxes, output_size, spatial_scale, op: str) -> None:
    require_extension("roi_pool")
    check_feature_map(input, op)
    check_boxes(boxes, input, op)
    check_output_size(output_size, op)
    check_spatial_scale(spatial_scale, op)


@torch.fx.wrap
def roi_pool(input: Tensor, boxes: BoxesLike, output_size: BroadcastingList2[int],
             spatial_scale: float = 1.0) -> Tensor:
    """Max-pool each box, split into output_size bins, from the feature map.

    Args:
        input: Tensor[N, C, H, W] features (a channels_last input is read as a contiguous copy; a quantized
            input is pooled in float32 and quantized back with its scale and zero point).
        boxes: Tensor[K, 5] rows (batch_index, x1, y1, x2, y2), or a list of Tensor[L_i, 4] (one per image), in
            image coordinates; same dtype and device as input. A batch index that is not an integer in [0, N) is
            an error on CPU; on CUDA (no device sync to check it) that RoI gives zeros.
        output_size: (height, width) of each output, or an int for a square.
        spatial_scale: feature size / image size. Scaled coordinates are rounded (half away from zero).

    Returns:
        Tensor[K, C, output_size[0], output_size[1]] (NCHW). A bin that falls outside the map, or a box with
        NaN/inf coordinates, gives 0.
    """
    if not torch.jit.is_scripting():
        _check_roi_pool_args(input, boxes, output_size, spatial_scale, "roi_pool")
    rois = boxes_to_rois(boxes, input)
    pooled_h, pooled_w = output_size_pair(output_size)
    if not torch.jit.is_scripting():
        check_batch_indices(rois, input.shape[0], "roi_pool")
    output, _ = torch.ops.normkit.roi_pool(dequantized(input), rois, float(spatial_scale), pooled_h, pooled_w)
    if input.is_quantized:
        return torch.quantize_per_tensor(output, input.q_scale(), input.q_zero_point(), input.dtype)
    return output


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_h, pooled_w = inputs
    ctx.save_for_backward(rois, output[1])
    # The argmax output has no gradient: without this autograd would materialise a zero tensor the size of the
    # output for it in every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.input_shape = tuple(input.shape)
    ctx.args = (spatial_scale, pooled_h, pooled_w)


def _backward(ctx, grad, _grad_argmax):
    if grad is None:  # no gradient reached the pooled output (grads are not materialised, see _setup_context)
        return None, None, None, None, None
    rois, argmax = ctx.saved_tensors
    spatial_scale, pooled_h, pooled_w = ctx.args
    batch, channels, height, width = ctx.input_shape
    grad_input = torch.ops.normkit._roi_pool_backward(grad, rois, argmax, spatial_scale, pooled_h, pooled_w, batch,
                                                      channels, height, width)
    return grad_input, None, None, None, None


def _fake_roi_pool(input, rois, spatial_scale, pooled_height, pooled_width):
    torch._check(input.dim() == 4, lambda: f"roi_pool: input must be Tensor[N, C, H, W], got {input.dim()} dims")
    torch._check(rois.dim() == 2 and rois.shape[1] == 5,
                 lambda: f"roi_pool: rois must be Tensor[K, 5], got {list(rois.shape)}")
    torch._check(input.dtype == rois.dtype,
                 lambda: f"roi_pool: input and rois must have the same dtype, got {input.dtype} and {rois.dtype}")
    torch._check(pooled_height > 0 and pooled_width > 0,
                 lambda: f"roi_pool: output size must be positive, got ({pooled_height}, {pooled_width})")
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


def _fake_roi_pool_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                            height, width):
    torch._check(argmax.shape == grad.shape,
                 lambda: f"_roi_pool_backward: argmax must be shaped like grad {list(grad.shape)}")
    return grad.new_empty((batch_size, channels, height, width))


def _register() -> None:
    torch.library.register_fake("normkit::roi_pool")(_fake_roi_pool)
    torch.library.register_fake("normkit::_roi_pool_backward")(_fake_roi_pool_backward)
    torch.library.register_autograd("normkit::roi_pool", _backward, setup_context=_setup_context)
    register_float32_autocast("normkit::roi_pool")
    register_no_double_backward("normkit::_roi_pool_backward", "roi_pool")


register_ops(_register)


# ---- pure-PyTorch reference ----

_COORDINATE_LIMIT = float(2 ** 24)  # the kernels clamp to this before converting to int


def _round_half_away(v: Tensor) -> int:
    v = v.clamp(-_COORDINATE_LIMIT, _COORDINATE_LIMIT)
    return int(torch.sign(v) * torch.floor(v.abs() + 0.5))


def _bin_ranges(start: int, bin_size: Tensor, pooled: int, limit: int) -> tuple[Tensor, Tensor]:
    """[begin, end) cells of every bin along one axis: floor(p * bin) + start .. ceil((p + 1) * bin) + start,
    clipped to [0, limit]."""
    p = torch.arange(pooled, dtype=bin_size.dtype)
    begin = (torch.floor(p * bin_size).long() + start).clamp(0, limit)
    end = (torch.ceil((p + 1) * bin_size).long() + start).clamp(0, limit)
    return begin, end


def roi_pool_reference(input: Tensor, boxes: BoxesLike, output_size: int | tuple[int, int],
                       spatial_scale: float = 1.0) -> Tensor:
    """RoIPool from the definition (slow: bin geometry is built box by box in Python). Differentiable with
    respect to `input`.

    Box corners are scaled and rounded (half away from zero); the box covers cells start..end inclusive (at
    least one); bin p spans cells [floor(p * bin) + start, ceil((p + 1) * bin) + start) clipped to the map; the
    output is the bin's maximum (the first in row-major order on ties), or 0 for an empty bin. The cells of all
    bins, padded to the largest bin, are gathered from the (N*H*W, C) feature table in one indexing op.
    """
    op = "roi_pool_reference"
    check_feature_map(input, op)
    check_boxes(boxes, input, op)
    check_output_size(output_size, op)
    rois = boxes_to_rois(boxes, input)
    pooled_h, pooled_w = output_size_pair(output_size)
    check_batch_indices(rois, input.shape[0], op)
    batch, channels, height, width = input.shape
    compute = opmath_dtype(input.dtype)
    corners_all = rois[:, 1:].detach().cpu().to(compute) * torch.tensor(spatial_scale, dtype=compute)
    regions = []  # per box: (row begin/end per bin row, column begin/end per bin column, base cell) or None
    for k in range(rois.shape[0]):
        corners = corners_all[k]
        if not bool(torch.isfinite(corners).all()):
            continue
        x1, y1, x2, y2 = (_round_half_away(c) for c in corners)
        bin_h = torch.tensor(max(y2 - y1 + 1, 1), dtype=compute) / pooled_h
        bin_w = torch.tensor(max(x2 - x1 + 1, 1), dtype=compute) / pooled_w
        regions.append((k, _bin_ranges(y1, bin_h, pooled_h, height), _bin_ranges(x1, bin_w, pooled_w, width),
                        int(rois[k, 0]) * height * width))
    output = input.new_zeros((rois.shape[0], channels, pooled_h, pooled_w))
    if not regions or height == 0 or width == 0:
        return output
    # Pad every bin to the largest bin size; padded cells are masked out of the maximum.
    max_h = max(int((r[1][1] - r[1][0]).max()) for r in regions)
    max_w = max(int((r[2][1] - r[2][0]).max()) for r in regions)
    if max_h <= 0 or max_w <= 0:
        return output
    di = torch.arange(max_h)[:, None]
    dj = torch.arange(max_w)[None, :]
    cells, masks = [], []
    for _, (h0, h1), (w0, w1), base in regions:
        rows = h0[:, None, None, None] + di                                  # (PH, 1, max_h, 1)
        cols = w0[None, :, None, None] + dj                                  # (1, PW, 1, max_w)
        inside = (rows < h1[:, None, None, None]) & (cols < w1[None, :, None, None])
        cells.append((base + rows.clamp(max=height - 1) * width + cols.clamp(max=width - 1)).reshape(
            pooled_h, pooled_w, -1))
        masks.append(inside.reshape(pooled_h, pooled_w, -1))
    table = input.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    mask = torch.stack(masks).to(input.device)                               # (R, PH, PW, cells)
    values = table[torch.stack(cells).to(input.device)]                      # (R, PH, PW, cells, C)
    values = values.masked_fill(~mask[..., None], float("-inf"))
    best = values.max(dim=3).values                                          # first maximum, NaN propagates
    nonempty = mask.any(-1)[..., None]
    pooled = torch.where(nonempty, best, torch.zeros_like(best)).permute(0, 3, 1, 2)
    used = torch.tensor([r[0] for r in regions], device=input.device)
    return output.index_copy(0, used, pooled)
