"""RoIAlign over one or several feature levels with the FPN level rule of Detectron-1 or detectron2."""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor, nn

from normkit.models.detection.boxes import box_area
from normkit.ops import roi_align

__all__ = ["assign_fpn_levels", "ROIPooler", "boxes_to_rois"]


def assign_fpn_levels(boxes: Tensor, min_level: int, max_level: int, canonical_scale: float = 224.0,
                      canonical_level: int = 4, legacy_plus_one: bool = True) -> Tensor:
    """FPN level of each box Tensor[K, 4]: ``floor(canonical_level + log2(sqrt(area) / canonical_scale + eps))``
    clamped to ``[min_level, max_level]`` (Tensor[K] int64 levels).

    Detectron-1 (``legacy_plus_one``): area with ``+1`` widths and eps 1e-6; detectron2: plain area, eps 1e-8.
    """
    eps = 1e-6 if legacy_plus_one else 1e-8
    area = box_area(boxes, legacy_plus_one).clamp(min=0)
    levels = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale + eps))
    return levels.clamp(min_level, max_level).to(torch.int64)


def boxes_to_rois(boxes: List[Tensor]) -> Tensor:
    """Per-image boxes -> Tensor[K, 5] rows ``(image index, x1, y1, x2, y2)``."""
    rois = [torch.cat((torch.full_like(b[:, :1], i), b), dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rois) if rois else torch.zeros(0, 5)


class ROIPooler(nn.Module):
    """RoIAlign of per-image boxes from one level, or from the FPN level each box's size selects.

    Args:
        output_size: 7 (FPN box head), 14 (C4 box head, mask heads).
        scales: spatial scale of each level, finest first (``(1/16,)`` or ``(1/4, 1/8, 1/16, 1/32)``).
        sampling_ratio: RoIAlign samples per bin (0: adaptive).
        aligned: RoIAlign half-pixel offset (False for Detectron-1, True for detectron2's ROIAlignV2).
        legacy_plus_one, canonical_scale, canonical_level: the level rule (:func:`assign_fpn_levels`).

    forward(features: list of Tensor[N, C, H_l, W_l] finest first, boxes: list of Tensor[K_i, 4]) ->
    Tensor[sum K_i, C, output_size, output_size] in box order.
    """

    def __init__(self, output_size: int, scales: Sequence[float], sampling_ratio: int, *, aligned: bool = False,
                 legacy_plus_one: bool = True, canonical_scale: float = 224.0, canonical_level: int = 4):
        super().__init__()
        self.output_size = int(output_size)
        self.scales = tuple(float(s) for s in scales)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = aligned
        self.legacy_plus_one = legacy_plus_one
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        levels = [-math.log2(s) for s in self.scales]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels) and len(levels) > 1:
            raise ValueError(f"ROIPooler: multi-level scales must be powers of 1/2, got {self.scales}")
        self.min_level = round(levels[0])
        self.max_level = round(levels[-1])

    def forward(self, features: Sequence[Tensor], boxes: List[Tensor]) -> Tensor:
        if len(features) != len(self.scales):
            raise ValueError(f"ROIPooler has {len(self.scales)} levels, got {len(features)} feature maps")
        # Under autocast roi_align runs in float32 and takes float32 boxes: casting them to the features' fp16/bf16
        # would move 1000-px coordinates by up to 8 px.
        device = features[0].device
        dtype = torch.float32 if torch.is_autocast_enabled(device.type) else features[0].dtype
        rois = boxes_to_rois([b.to(dtype) for b in boxes]).to(device)
        size = (self.output_size, self.output_size)
        if len(features) == 1:
            return roi_align(features[0], rois, size, self.scales[0], self.sampling_ratio, self.aligned)
        levels = assign_fpn_levels(rois[:, 1:], self.min_level, self.max_level, self.canonical_scale,
                                   self.canonical_level, self.legacy_plus_one) - self.min_level
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *size))
        for index, (feature, scale) in enumerate(zip(features, self.scales)):
            selected = torch.nonzero(levels == index).flatten()
            if selected.numel():
                out = out.index_copy(0, selected, roi_align(feature, rois[selected], size, scale,
                                                            self.sampling_ratio, self.aligned))
        return out

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, scales={self.scales}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}, legacy_plus_one={self.legacy_plus_one}")
