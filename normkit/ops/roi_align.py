"""RoIAlign (Mask R-CNN): bilinear sampling of box regions into fixed-size feature maps.

`roi_align` matches torchvision.ops.roi_align in signature and semantics (README: "Compatibility with
torchvision.ops"); it is scriptable and an FX leaf. The kernels are in csrc/{cpu,cuda}/roi_align.*, the geometry
in csrc/common/roi_geometry.h. `roi_align_reference` is a slow pure-PyTorch implementation written from the
definition: the test oracle and the benchmark baseline.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.jit.annotations import BroadcastingList2

from normkit._extension import register_no_double_backward, register_ops, require_extension
from normkit.ops.roi_common import (BoxesLike, boxes_to_rois, check_batch_indices, check_boxes, check_feature_map,
                                     check_output_size, check_spatial_scale, dequantized, output_size_pair,
                                     register_float32_autocast)
from normkit.ops.layout import kernel_memory_format, opmath_dtype

__all__ = ["roi_align", "roi_align_reference"]


def _check_roi_align_args(input, boxes, output_size, spatial_scale, sampling_ratio, op: str) -> None:
    require_extension("roi_align")
    check_feature_map(input, op)
    check_boxes(boxes, input, op)
    check_output_size(output_size, op)
    check_spatial_scale(spatial_scale, op)
    if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
        raise ValueError(f"{op}: sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    if sampling_ratio > 65536:  # the kernels' cap (csrc/common/roi_geometry.h kMaxAdaptiveGrid)
        raise ValueError(f"{op}: sampling_ratio must be at most 65536 samples per bin and axis, got {sampling_ratio}")


@torch.fx.wrap
def roi_align(input: Tensor, boxes: BoxesLike, output_size: BroadcastingList2[int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, deterministic: bool = False) -> Tensor:
    """Average of bilinear samples over each bin of each box.

    Args:
        input: Tensor[N, C, H, W] features (NCHW or channels_last; fp32/fp64/fp16/bf16, or quantized per tensor:
            computed in float32 and quantized back with the input's scale and zero point).
        boxes: Tensor[K, 5] rows (batch_index, x1, y1, x2, y2), or a list of N_i Tensor[L_i, 4] boxes (one per
            image, in order), in image coordinates; same dtype and device as input. A batch index that is not an
            integer in [0, N) is an error on CPU; on CUDA (no device sync to check it) that RoI gives zeros.
        output_size: (height, width) of each output, or an int for a square.
        spatial_scale: feature size / image size, e.g. 1/16 for a stride-16 map.
        sampling_ratio: samples per bin along each axis (at most 65536); <= 0 samples ceil(box size / output
            size) (adaptive).
        aligned: shift boxes by -0.5 pixel so pixel centres sit on integer coordinates (Detectron2's
            ROIAlignV2); False keeps the original Mask R-CNN behaviour, which also stretches boxes to >= 1 pixel.
        deterministic: use the deterministic (atomic-free) backward on CUDA. It is also used whenever
            torch.are_deterministic_algorithms_enabled(). The CPU backward is always deterministic.

    Returns:
        Tensor[K, C, output_size[0], output_size[1]], channels_last if the input is. A box with NaN/inf
        coordinates, or entirely more than a pixel outside the map, gives zeros.
    """
    if not torch.jit.is_scripting():
        _check_roi_align_args(input, boxes, output_size, spatial_scale, sampling_ratio, "roi_align")
    rois = boxes_to_rois(boxes, input)
    pooled_h, pooled_w = output_size_pair(output_size)
    if not torch.jit.is_scripting():
        check_batch_indices(rois, input.shape[0], "roi_align")
    output = torch.ops.normkit.roi_align(dequantized(input), rois, float(spatial_scale), pooled_h, pooled_w,
                                         int(sampling_ratio), aligned, deterministic)
    if input.is_quantized:
        return torch.quantize_per_tensor(output, input.q_scale(), input.q_zero_point(), input.dtype)
    return output


# ---- autograd, fake and autocast registration ----

def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, deterministic = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = tuple(input.shape)
    ctx.args = (spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
    ctx.deterministic = deterministic


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = ctx.args
    batch, channels, height, width = ctx.input_shape
    deterministic = ctx.deterministic or torch.are_deterministic_algorithms_enabled()
    grad_input = torch.ops.normkit._roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w, batch, channels,
                                                       height, width, sampling_ratio, aligned, deterministic)
    return grad_input, None, None, None, None, None, None, None


def _fake_roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                    deterministic=False):
    torch._check(input.dim() == 4, lambda: f"roi_align: input must be Tensor[N, C, H, W], got {input.dim()} dims")
    torch._check(rois.dim() == 2 and rois.shape[1] == 5,
                 lambda: f"roi_align: rois must be Tensor[K, 5], got {list(rois.shape)}")
    torch._check(input.dtype == rois.dtype,
                 lambda: f"roi_align: input and rois must have the same dtype, got {input.dtype} and {rois.dtype}")
    torch._check(pooled_height > 0 and pooled_width > 0,
                 lambda: f"roi_align: output size must be positive, got ({pooled_height}, {pooled_width})")
    return torch.empty((rois.shape[0], input.shape[1], pooled_height, pooled_width), dtype=input.dtype,
                       device=input.device, memory_format=kernel_memory_format(input))


def _fake_roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                             width, sampling_ratio, aligned, deterministic):
    torch._check(grad.dim() == 4 and grad.shape[0] == rois.shape[0] and grad.shape[1] == channels,
                 lambda: f"_roi_align_backward: grad must be Tensor[{rois.shape[0]}, {channels}, {pooled_height}, "
                         f"{pooled_width}], got {list(grad.shape)}")
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device,
                       memory_format=kernel_memory_format(grad))


def _register() -> None:
    torch.library.register_fake("normkit::roi_align")(_fake_roi_align)
    torch.library.register_fake("normkit::_roi_align_backward")(_fake_roi_align_backward)
    torch.library.register_autograd("normkit::roi_align", _backward, setup_context=_setup_context)
    # fp16/bf16 features meet fp32 boxes under autocast: compute in fp32, return the features' dtype.
    register_float32_autocast("normkit::roi_align")
    register_no_double_backward("normkit::_roi_align_backward", "roi_align")


register_ops(_register)


# ---- pure-PyTorch reference ----

def _axis_neighbours(coords: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Linear interpolation along one axis, by the definition: (low, high, weight_low, weight_high, valid).
    A point outside [-1, size] (or NaN) is invalid; below 0 clamps to 0; at or past the last cell it sits on
    the last cell."""
    valid = (coords >= -1) & (coords <= size)
    c = torch.where(valid, coords, torch.zeros_like(coords)).clamp(min=0)
    low = c.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(c), c - low.to(c.dtype))
    return low, high, 1 - frac, frac, valid


def _grid_size(roi_size: Tensor, pooled: int, sampling_ratio: int) -> int:
    if sampling_ratio > 0:
        return sampling_ratio
    grid = torch.ceil(roi_size / pooled)
    if not bool(torch.isfinite(grid)) or float(grid) <= 0:
        return 0  # NaN/inf or negative sizes take no samples
    return int(grid)


def roi_align_reference(input: Tensor, boxes: BoxesLike, output_size: int | tuple[int, int],
                        spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign from the definition (slow: sample geometry is built box by box in Python). Differentiable with
    respect to `input`.

    Every sample point of every box contributes its four bilinear neighbours; each neighbour slot is gathered from
    the (N*H*W, C) feature table in one indexing op over all boxes, then the samples are averaged per bin.
    """
    op = "roi_align_reference"
    check_feature_map(input, op)
    check_boxes(boxes, input, op)
    check_output_size(output_size, op)
    rois = boxes_to_rois(boxes, input)
    pooled_h, pooled_w = output_size_pair(output_size)
    check_batch_indices(rois, input.shape[0], op)
    batch, channels, height, width = input.shape
    compute = opmath_dtype(input.dtype)
    boxes_c = rois.detach().cpu().to(compute)
    scale = torch.tensor(spatial_scale, dtype=compute)
    shift = 0.5 if aligned else 0.0
    cells, weights, grids = [], [], []  # per box: (samples, 4) flat cell indices and weights, (grid_h, grid_w)
    for k in range(rois.shape[0]):
        x1, y1, x2, y2 = (boxes_c[k, i] * scale - shift for i in range(1, 5))
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w = torch.where(roi_w < 1, torch.ones_like(roi_w), roi_w)
            roi_h = torch.where(roi_h < 1, torch.ones_like(roi_h), roi_h)
        grid_h = _grid_size(roi_h, pooled_h, sampling_ratio)
        grid_w = _grid_size(roi_w, pooled_w, sampling_ratio)
        if grid_h == 0 or grid_w == 0 or height == 0 or width == 0:
            grids.append(None)
            continue
        bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
        # Sample i of bin p along an axis: start + p * bin + (i + 0.5) * bin / grid.
        ys = (y1 + torch.arange(pooled_h, dtype=compute)[:, None] * bin_h
              + (torch.arange(grid_h, dtype=compute) + 0.5) * bin_h / grid_h).flatten()
        xs = (x1 + torch.arange(pooled_w, dtype=compute)[:, None] * bin_w
              + (torch.arange(grid_w, dtype=compute) + 0.5) * bin_w / grid_w).flatten()
        y_low, y_high, wy_low, wy_high, y_valid = _axis_neighbours(ys, height)
        x_low, x_high, wx_low, wx_high, x_valid = _axis_neighbours(xs, width)
        base = int(rois[k, 0]) * height * width
        row = torch.stack([y_low, y_low, y_high, y_high], -1)[:, None, :]      # (ys, 1, 4)
        col = torch.stack([x_low, x_high, x_low, x_high], -1)[None, :, :]      # (1, xs, 4)
        wy = torch.stack([wy_low, wy_low, wy_high, wy_high], -1)[:, None, :]
        wx = torch.stack([wx_low, wx_high, wx_low, wx_high], -1)[None, :, :]
        valid = (y_valid[:, None] & x_valid[None, :])[..., None]
        cells.append((base + row * width + col).reshape(-1, 4))
        weights.append((wy * wx * valid / max(grid_h * grid_w, 1)).reshape(-1, 4))
        grids.append((grid_h, grid_w))
    output = input.new_zeros((rois.shape[0], channels, pooled_h, pooled_w), dtype=compute)
    if cells:
        table = input.to(compute).permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        cell_index = torch.cat(cells).to(input.device)
        cell_weight = torch.cat(weights).to(input.device)
        samples = sum(table[cell_index[:, j]] * cell_weight[:, j, None] for j in range(4))  # (all samples, C)
        sizes = [pooled_h * g[0] * pooled_w * g[1] for g in grids if g is not None]
        pooled = [part.reshape(pooled_h, g[0], pooled_w, g[1], channels).sum((1, 3)).permute(2, 0, 1)
                  for part, g in zip(samples.split(sizes), (g for g in grids if g is not None))]
        used = torch.tensor([k for k, g in enumerate(grids) if g is not None], device=input.device)
        output = output.index_copy(0, used, torch.stack(pooled))
    return output.to(input.dtype)
