"""RoIPool (Fast R-CNN): max over the cells of each bin of each box, on integer-rounded box coordinates.

`roi_pool` matches torchvision.ops.roi_pool (DESIGN.md §4); kernels in csrc/{cpu,cuda}/roi_pool.*, geometry in
csrc/common/roi_geometry.h. `roi_pool_reference` is a slow pure-PyTorch implementation from the definition.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from normkit._extension import has_extension, require_extension
from normkit.ops._roi_common import (BoxesLike, boxes_to_rois, check_batch_indices, check_feature_map,
                                     check_spatial_scale, opmath_dtype, output_size_pair)

__all__ = ["roi_pool", "roi_pool_reference"]


def roi_pool(input: Tensor, boxes: BoxesLike, output_size: int | tuple[int, int],
             spatial_scale: float = 1.0) -> Tensor:
    """Max-pool each box, split into output_size bins, from the feature map.

    Args:
        input: Tensor[N, C, H, W] features (a channels_last input is read as a contiguous copy).
        boxes: Tensor[K, 5] rows (batch_index, x1, y1, x2, y2), or a list of Tensor[L_i, 4] (one per image), in
            image coordinates; same dtype and device as input.
        output_size: (height, width) of each output, or an int for a square.
        spatial_scale: feature size / image size. Scaled coordinates are rounded (half away from zero).

    Returns:
        Tensor[K, C, output_size[0], output_size[1]] (NCHW). A bin that falls outside the map, or a box with
        NaN/inf coordinates, gives 0.
    """
    require_extension("roi_pool")
    op = "roi_pool"
    check_feature_map(input, op)
    rois = boxes_to_rois(boxes, input, op)
    pooled_h, pooled_w = output_size_pair(output_size, op)
    scale = check_spatial_scale(spatial_scale, op)
    check_batch_indices(rois, input.shape[0], op)
    output, _ = torch.ops.normkit.roi_pool(input, rois, scale, pooled_h, pooled_w)
    return output


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_h, pooled_w = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.input_shape = tuple(input.shape)
    ctx.args = (spatial_scale, pooled_h, pooled_w)


def _backward(ctx, grad, _grad_argmax):
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
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.long)


def _fake_roi_pool_backward(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                            height, width):
    torch._check(argmax.shape == grad.shape,
                 lambda: f"_roi_pool_backward: argmax must be shaped like grad {list(grad.shape)}")
    return grad.new_empty((batch_size, channels, height, width))


if has_extension():
    torch.library.register_fake("normkit::roi_pool")(_fake_roi_pool)
    torch.library.register_fake("normkit::_roi_pool_backward")(_fake_roi_pool_backward)
    torch.library.register_autograd("normkit::roi_pool", _backward, setup_context=_setup_context)
    for _device_type in ("cpu", "cuda"):
        torch.library.register_autocast("normkit::roi_pool", _device_type, torch.float32)


# ---- pure-PyTorch reference ----

_COORDINATE_LIMIT = float(2 ** 24)  # the kernels clamp to this before converting to int


def _round_half_away(v: Tensor) -> int:
    v = v.clamp(-_COORDINATE_LIMIT, _COORDINATE_LIMIT)
    return int(torch.sign(v) * torch.floor(v.abs() + 0.5))


def roi_pool_reference(input: Tensor, boxes: BoxesLike, output_size: int | tuple[int, int],
                       spatial_scale: float = 1.0) -> Tensor:
    """RoIPool from the definition, one bin at a time (slow). Differentiable with respect to `input`.

    Box corners are scaled and rounded; the box covers cells start..end inclusive (at least one); bin p spans
    cells [floor(p * bin) + start, ceil((p + 1) * bin) + start) clipped to the map; the output is the bin's
    maximum (the first one on ties), or 0 for an empty bin.
    """
    op = "roi_pool_reference"
    check_feature_map(input, op)
    rois = boxes_to_rois(boxes, input, op)
    pooled_h, pooled_w = output_size_pair(output_size, op)
    check_batch_indices(rois, input.shape[0], op)
    _, channels, height, width = input.shape
    compute = opmath_dtype(input.dtype)
    scale = torch.tensor(spatial_scale, dtype=compute)
    output = input.new_zeros((rois.shape[0], channels, pooled_h, pooled_w))
    rows = []
    for k in range(rois.shape[0]):
        corners = rois[k, 1:].cpu().to(compute) * scale
        bins = []
        if bool(torch.isfinite(corners).all()):
            x1, y1, x2, y2 = (_round_half_away(c) for c in corners)
            bin_h = torch.tensor(max(y2 - y1 + 1, 1), dtype=compute) / pooled_h
            bin_w = torch.tensor(max(x2 - x1 + 1, 1), dtype=compute) / pooled_w
            feature = input[int(rois[k, 0])]
            for ph in range(pooled_h):
                h0 = min(max(math.floor(float(ph * bin_h)) + y1, 0), height)
                h1 = min(max(math.ceil(float((ph + 1) * bin_h)) + y1, 0), height)
                for pw in range(pooled_w):
                    w0 = min(max(math.floor(float(pw * bin_w)) + x1, 0), width)
                    w1 = min(max(math.ceil(float((pw + 1) * bin_w)) + x1, 0), width)
                    if h1 > h0 and w1 > w0:
                        bins.append((ph, pw, feature[:, h0:h1, w0:w1].flatten(1).max(dim=1).values))
        rows.append(bins)
    if not any(rows):
        return output
    # Assemble with index_put so the result stays differentiable.
    ks, phs, pws, values = zip(*((k, ph, pw, v) for k, bins in enumerate(rows) for ph, pw, v in bins))
    return output.index_put((torch.tensor(ks, device=input.device)[:, None],
                             torch.arange(channels, device=input.device)[None, :],
                             torch.tensor(phs, device=input.device)[:, None],
                             torch.tensor(pws, device=input.device)[:, None]), torch.stack(values))
