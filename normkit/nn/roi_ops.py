"""Modules over normkit's ROI ops: RoIAlign, RoIPool and the FPN MultiScaleRoIAlign."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from normkit.ops import roi_align, roi_pool
from normkit.ops._roi_common import boxes_to_rois, output_size_pair

__all__ = ["RoIAlign", "RoIPool", "MultiScaleRoIAlign", "assign_boxes_to_levels"]


class RoIAlign(nn.Module):
    """`normkit.ops.roi_align` with fixed arguments: forward(input Tensor[N, C, H, W], boxes Tensor[K, 5] or
    list of Tensor[L, 4]) -> Tensor[K, C, *output_size]."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False, *, deterministic: bool = False):
        super().__init__()
        self.output_size = output_size_pair(output_size, "RoIAlign")
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.deterministic = deterministic

    def forward(self, input: Tensor, boxes) -> Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         deterministic=self.deterministic)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
                + (", deterministic=True" if self.deterministic else ""))


class RoIPool(nn.Module):
    """`normkit.ops.roi_pool` with fixed arguments: forward(input, boxes) -> Tensor[K, C, *output_size]."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float):
        super().__init__()
        self.output_size = output_size_pair(output_size, "RoIPool")
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, boxes) -> Tensor:
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
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    levels = torch.floor(canonical_level + torch.log2(area.clamp(min=0).sqrt() / canonical_scale) + eps)
    levels = torch.nan_to_num(levels, nan=min_level).clamp(min_level, max_level)
    return levels.to(torch.int64) - min_level


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
    image size, and levels must be consecutive powers of two. Returns Tensor[sum L_i, C, *output_size] in box
    order.
    """

    def __init__(self, featmap_names: Sequence[str] | int, output_size: int | tuple[int, int], sampling_ratio: int,
                 *, canonical_scale: float = 224.0, canonical_level: int = 4, aligned: bool = False):
        super().__init__()
        if isinstance(featmap_names, int):
            if featmap_names <= 0:
                raise ValueError(f"MultiScaleRoIAlign: the number of levels must be positive, got {featmap_names}")
            self.featmap_names = None
            self.num_levels = featmap_names
        else:
            self.featmap_names = list(featmap_names)
            self.num_levels = len(self.featmap_names)
            if self.num_levels == 0:
                raise ValueError("MultiScaleRoIAlign: featmap_names must name at least one level")
        self.output_size = output_size_pair(output_size, "MultiScaleRoIAlign")
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned

    def _levels(self, features) -> list[Tensor]:
        if isinstance(features, Mapping):
            if self.featmap_names is None:
                return list(features.values())[: self.num_levels]
            missing = [name for name in self.featmap_names if name not in features]
            if missing:
                raise ValueError(f"MultiScaleRoIAlign: features lack levels {missing}; got {list(features)}")
            return [features[name] for name in self.featmap_names]
        if self.featmap_names is not None:
            raise ValueError("MultiScaleRoIAlign: built with featmap_names, so features must be a dict of them")
        levels = list(features)
        if len(levels) != self.num_levels:
            raise ValueError(f"MultiScaleRoIAlign: expected {self.num_levels} feature levels, got {len(levels)}")
        return levels

    @staticmethod
    def _infer_log2_scale(feature: Tensor, image_size: tuple[int, int]) -> int:
        exponents = {round(math.log2(f / i)) for f, i in zip(feature.shape[-2:], image_size) if f > 0 and i > 0}
        if len(exponents) != 1:
            raise ValueError(f"MultiScaleRoIAlign: cannot infer one power-of-two scale from a feature map of size "
                             f"{tuple(feature.shape[-2:])} for images up to {tuple(image_size)}")
        return exponents.pop()

    def forward(self, features, boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        levels = self._levels(features)
        if not image_shapes:
            raise ValueError("MultiScaleRoIAlign: image_shapes must give the (height, width) of every image")
        image_size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        log2_scales = [self._infer_log2_scale(f, image_size) for f in levels]
        if log2_scales != list(range(log2_scales[0], log2_scales[0] - len(levels), -1)):
            raise ValueError(f"MultiScaleRoIAlign: levels must be consecutive powers of two, finest first; inferred "
                             f"scales {[2.0 ** e for e in log2_scales]}")
        rois = boxes_to_rois(boxes, levels[0], "MultiScaleRoIAlign")
        if len(levels) == 1:
            return roi_align(levels[0], rois, self.output_size, 2.0 ** log2_scales[0], self.sampling_ratio,
                             self.aligned)
        # FPN level k has stride 2^k: scale 2^-k.
        targets = assign_boxes_to_levels(rois[:, 1:], -log2_scales[0], -log2_scales[-1], self.canonical_scale,
                                         self.canonical_level)
        first = levels[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for index, (feature, log2_scale) in enumerate(zip(levels, log2_scales)):
            selected = torch.nonzero(targets == index).flatten()
            if selected.numel() == 0:
                continue
            pooled = roi_align(feature, rois[selected], self.output_size, 2.0 ** log2_scale, self.sampling_ratio,
                               self.aligned)
            result = result.index_copy(0, selected, pooled.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        names = self.featmap_names if self.featmap_names is not None else self.num_levels
        return (f"featmap_names={names}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
                f"canonical_scale={self.canonical_scale}, canonical_level={self.canonical_level}, "
                f"aligned={self.aligned}")
