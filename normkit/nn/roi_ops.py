"""Modules over normkit's ROI ops: RoIAlign, RoIPool and the FPN MultiScaleRoIAlign.

Like torchvision's, the modules are scriptable, and FX tracing records each forward as one call of an op
(`roi_align`, `roi_pool`, `multiscale_roi_align`, wrapped with torch.fx.wrap below), so symbolic tracing,
feature extraction and FX quantization work on models that contain them.
"""
import math
from typing import Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from normkit.ops import roi_align, roi_pool
from normkit.ops.roi_common import (BoxesLike, boxes_to_rois, check_boxes, check_output_size, output_size_pair,
                                    plain_int)

__all__ = ["RoIAlign", "RoIPool", "MultiScaleRoIAlign", "assign_boxes_to_levels", "multiscale_roi_align"]

# FX leaves: calls of these names from this module become single graph nodes instead of being traced into.
torch.fx.wrap("roi_align")
torch.fx.wrap("roi_pool")


class RoIAlign(nn.Module):
    """`normkit.ops.roi_align` with fixed arguments: forward(input Tensor[N, C, H, W], boxes Tensor[K, 5] or
    list of Tensor[L, 4]) -> Tensor[K, C, *output_size]."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False, deterministic: bool = False):
        super().__init__()
        check_output_size(output_size, "RoIAlign")
        self.output_size = output_size_pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = plain_int(sampling_ratio)
        self.aligned = aligned
        self.deterministic = deterministic

    def forward(self, input: Tensor, boxes: BoxesLike) -> Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         self.deterministic)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
                + (", deterministic=True" if self.deterministic else ""))


class RoIPool(nn.Module):
    """`normkit.ops.roi_pool` with fixed arguments: forward(input, boxes) -> Tensor[K, C, *output_size]."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float):
        super().__init__()
        check_output_size(output_size, "RoIPool")
        self.output_size = output_size_pair(output_size)
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: Tensor, boxes: BoxesLike) -> Tensor:
        return roi_pool(input, boxes, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


def assign_boxes_to_levels(boxes: Tensor, min_level: int, max_level: int, canonical_scale: float = 224.0,
                           canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level of each box (Tensor[K, 4], image coordinates): floor(canonical_level + log2(sqrt(area) /
    canonical_scale) + eps) clamped to [min_level, max_level], returned as int64 offsets from min_level.

    `eps` keeps boxes exactly at a level boundary (sqrt(area) = 224 * 2^j) from dropping a level to rounding.
    Empty, inverted or NaN boxes go to the finest level.
    """
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))  # fp16 areas overflow above 256 x 256
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    levels = torch.floor(canonical_level + torch.log2(area.clamp(min=0).sqrt() / canonical_scale) + eps)
    levels = torch.nan_to_num(levels, nan=float(min_level)).clamp(min_level, max_level)
    return levels.to(torch.int64) - min_level


def _levels_from_dict(features: Dict[str, Tensor], featmap_names: List[str], num_levels: int) -> List[Tensor]:
    if len(featmap_names) == 0:
        return list(features.values())[:num_levels]
    missing: List[str] = []
    for name in featmap_names:
        if name not in features:
            missing.append(name)
    if len(missing) > 0:
        raise ValueError(f"MultiScaleRoIAlign: features lack levels {missing}; got {list(features.keys())}")
    return [features[name] for name in featmap_names]


def _levels_from_list(features: List[Tensor], featmap_names: List[str], num_levels: int) -> List[Tensor]:
    if len(featmap_names) > 0:
        raise ValueError("MultiScaleRoIAlign: built with featmap_names, so features must be a dict of them")
    if len(features) != num_levels:
        raise ValueError(f"MultiScaleRoIAlign: expected {num_levels} feature levels, got {len(features)}")
    return features


def _select_levels(features: Union[Dict[str, Tensor], List[Tensor]], featmap_names: List[str],
                   num_levels: int) -> List[Tensor]:
    if not torch.jit.is_scripting():  # (torch.compile cannot trace torch.jit.isinstance)
        if isinstance(features, dict):
            return _levels_from_dict(features, featmap_names, num_levels)
        return _levels_from_list(list(features), featmap_names, num_levels)
    if torch.jit.isinstance(features, Dict[str, Tensor]):
        return _levels_from_dict(features, featmap_names, num_levels)
    assert torch.jit.isinstance(features, List[Tensor])
    return _levels_from_list(features, featmap_names, num_levels)


def _infer_log2_scale(feature: Tensor, image_size: Tuple[int, int]) -> int:
    """log2 of the level's scale: the power of two nearest to feature extent / image extent along the image's
    longer side, where padding the batch distorts that ratio least (a 40 x 1000 image padded to 64 x 1024 is
    off by 1.3 in log2 along its height). The other side must agree: at that scale its feature extent covers the
    image (less one stride) and less than twice it (plus one stride)."""
    sides: List[Tuple[int, int]] = [(int(feature.shape[-2]), image_size[0]), (int(feature.shape[-1]), image_size[1])]
    if image_size[1] > image_size[0]:
        sides = [sides[1], sides[0]]
    (long_f, long_i), (short_f, short_i) = sides[0], sides[1]
    if long_f <= 0 or long_i <= 0:
        raise ValueError(f"MultiScaleRoIAlign: cannot infer a scale from a feature map of size "
                         f"{list(feature.shape[-2:])} for images up to {list(image_size)}")
    exponent = int(round(math.log(long_f / long_i, 2.0)))
    stride = 2.0 ** -exponent
    if short_i > 0 and not short_i - stride < short_f * stride < 2 * short_i + stride:
        raise ValueError(f"MultiScaleRoIAlign: cannot infer one power-of-two scale from a feature map of size "
                         f"{list(feature.shape[-2:])} for images up to {list(image_size)}: its longer side gives "
                         f"stride {stride}, which its other side does not fit")
    return exponent


def multiscale_roi_align(features: Union[Dict[str, Tensor], List[Tensor]], boxes: List[Tensor],
                         image_shapes: List[Tuple[int, int]], featmap_names: List[str], num_levels: int,
                         output_size: Tuple[int, int], sampling_ratio: int, canonical_scale: float = 224.0,
                         canonical_level: int = 4, aligned: bool = False) -> Tensor:
    """The computation of MultiScaleRoIAlign.forward (an FX leaf, so traced models keep it as one call);
    `featmap_names` empty selects the first `num_levels` features."""
    levels = _select_levels(features, featmap_names, num_levels)
    if len(image_shapes) == 0:
        raise ValueError("MultiScaleRoIAlign: image_shapes must give the (height, width) of every image")
    image_size = (max([s[0] for s in image_shapes]), max([s[1] for s in image_shapes]))
    log2_scales = [_infer_log2_scale(f, image_size) for f in levels]
    for k in range(len(log2_scales)):
        if log2_scales[k] != log2_scales[0] - k:
            raise ValueError(f"MultiScaleRoIAlign: levels must be consecutive powers of two, finest first; inferred "
                             f"log2 scales {log2_scales}")
    if not torch.jit.is_scripting():
        check_boxes(boxes, levels[0], "MultiScaleRoIAlign")
    rois = boxes_to_rois(boxes, levels[0])
    if len(levels) == 1:
        return roi_align(levels[0], rois, output_size, 2.0 ** log2_scales[0], sampling_ratio, aligned)
    # FPN level k has stride 2^k: scale 2^-k.
    targets = assign_boxes_to_levels(rois[:, 1:], -log2_scales[0], -log2_scales[-1], canonical_scale,
                                     canonical_level)
    first = levels[0]
    result = first.new_zeros((rois.shape[0], first.shape[1], output_size[0], output_size[1]))
    # Every level is pooled, even with no boxes: skipping would need the data-dependent count, which
    # torch.export and torch.compile cannot branch on.
    for index, feature in enumerate(levels):
        selected = torch.nonzero(targets == index).flatten()
        pooled = roi_align(feature, rois[selected], output_size, 2.0 ** log2_scales[index], sampling_ratio, aligned)
        result = result.index_copy(0, selected, pooled.to(result.dtype))
    return result


torch.fx.wrap("multiscale_roi_align")


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over FPN levels, each box pooled from the level its size selects (Feature Pyramid Networks, eq. 1).

    Args:
        featmap_names: names of the levels to use from a dict of features, finest first; or the number of levels
            when features are given as a list (finest first).
        output_size, sampling_ratio, aligned: as for `normkit.ops.roi_align`.
        canonical_scale, canonical_level: a box of sqrt(area) = canonical_scale goes to canonical_level.

    forward(features, boxes, image_shapes): features a dict (or list) of Tensor[N, C, H_l, W_l]; boxes a list of
    Tensor[L_i, 4] per image in image coordinates; image_shapes the (height, width) of each image before
    batching/padding. Each level's scale is inferred as the power of two nearest to feature size / largest
    image size along the longer image side (torchvision takes the height, which padding can mislead for very
    wide images), the other side checked against it, and levels must be consecutive powers of two. Returns
    Tensor[sum L_i, C, *output_size] in box order.
    """

    featmap_names: List[str]  # empty when the levels are given by number (typed for TorchScript)

    def __init__(self, featmap_names: list[str] | int, output_size: int | tuple[int, int], sampling_ratio: int,
                 *, canonical_scale: float = 224.0, canonical_level: int = 4, aligned: bool = False):
        super().__init__()
        if isinstance(featmap_names, int):
            if featmap_names <= 0:
                raise ValueError(f"MultiScaleRoIAlign: the number of levels must be positive, got {featmap_names}")
            self.featmap_names = []
            self.num_levels = featmap_names
        else:
            self.featmap_names = list(featmap_names)
            self.num_levels = len(self.featmap_names)
            if self.num_levels == 0:
                raise ValueError("MultiScaleRoIAlign: featmap_names must name at least one level")
        check_output_size(output_size, "MultiScaleRoIAlign")
        self.output_size = output_size_pair(output_size)
        self.sampling_ratio = plain_int(sampling_ratio)
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = canonical_level
        self.aligned = aligned

    def forward(self, features: Union[Dict[str, Tensor], List[Tensor]], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        return multiscale_roi_align(features, boxes, image_shapes, self.featmap_names, self.num_levels,
                                    self.output_size, self.sampling_ratio, self.canonical_scale,
                                    self.canonical_level, self.aligned)

    def __repr__(self) -> str:
        # torchvision's format; the number of levels stands in for names when features come as a list.
        names = self.featmap_names if self.featmap_names else self.num_levels
        return (f"{type(self).__name__}(featmap_names={names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")
