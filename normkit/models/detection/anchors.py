"""Anchor generators: Detectron-1 (quantised, ratio-major) and detectron2 (exact, size-major) styles."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "detectron_cell_anchors", "d2_cell_anchors", "ANCHOR_STYLES"]

ANCHOR_STYLES = ("detectron", "d2")


def detectron_cell_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Detectron-1 ``generate_anchors``: Tensor[len(ratios) * len(sizes), 4], ratio-major (index r * nS + s).

    Starts from the box ``(0, 0, stride - 1, stride - 1)``, enumerates ratios (h / w) keeping its area with
    widths and heights rounded to integers (half to even, as numpy), then scales each by ``size / stride``.
    Boxes use the inclusive-pixel convention (width ``x2 - x1 + 1``).
    """
    dt = torch.float64
    base_w = base_h = float(stride)
    ctr = 0.5 * (stride - 1)
    ratios = torch.tensor(list(aspect_ratios), dtype=dt)
    scales = torch.tensor(list(sizes), dtype=dt) / stride
    ws = torch.round(torch.sqrt(base_w * base_h / ratios))
    hs = torch.round(ws * ratios)
    # scale enumeration per ratio anchor: widths are exact multiples (no further rounding)
    all_w = (ws[:, None] * scales[None, :]).reshape(-1)
    all_h = (hs[:, None] * scales[None, :]).reshape(-1)
    return torch.stack((ctr - 0.5 * (all_w - 1), ctr - 0.5 * (all_h - 1),
                        ctr + 0.5 * (all_w - 1), ctr + 0.5 * (all_h - 1)), dim=1).to(torch.float32)


def d2_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """detectron2 ``DefaultAnchorGenerator`` cell anchors: size-major, exact (unrounded), centred on 0."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors of every feature level, flattened in (H, W, A) order.

    Args:
        strides: stride of each level, e.g. ``(16,)`` (C4) or ``(4, 8, 16, 32, 64)`` (FPN P2-P6).
        sizes: anchor sizes per level (a list of tuples, one per level), e.g. ``((32, 64, 128, 256, 512),)``
            or ``((32,), (64,), (128,), (256,), (512,))``.
        aspect_ratios: ratios h / w shared by all levels.
        style: ``"detectron"`` (Detectron-1: quantised, ratio-major, cell centred at ``(stride - 1) / 2``) or
            ``"d2"`` (detectron2: exact, size-major, cell centred at ``offset * stride``).
        offset: detectron2's ``ANCHOR_GENERATOR.OFFSET`` (0.0 or 0.5); only for ``style="d2"``.

    ``forward(grid_sizes)`` takes the (H, W) of each level and returns a list of Tensor[H * W * A, 4].
    """

    def __init__(self, strides: Sequence[int], sizes: Sequence[Sequence[float]],
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), style: str = "detectron", offset: float = 0.0):
        super().__init__()
        if style not in ANCHOR_STYLES:
            raise ValueError(f"unknown anchor style {style!r}; choose one of {', '.join(ANCHOR_STYLES)}")
        if len(strides) != len(sizes):
            raise ValueError(f"AnchorGenerator: {len(strides)} strides but {len(sizes)} size tuples; give one "
                             f"tuple of sizes per level")
        if style == "detectron" and offset != 0.0:
            raise ValueError("AnchorGenerator: offset applies to style 'd2' only (Detectron centres anchors at "
                             "(stride - 1) / 2)")
        self.strides = tuple(int(s) for s in strides)
        self.sizes = tuple(tuple(float(x) for x in s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.style = style
        self.offset = float(offset)
        for i, (stride, level_sizes) in enumerate(zip(self.strides, self.sizes)):
            cell = (detectron_cell_anchors(stride, level_sizes, self.aspect_ratios) if style == "detectron"
                    else d2_cell_anchors(level_sizes, self.aspect_ratios))
            self.register_buffer(f"cell_anchors_{i}", cell, persistent=False)

    @property
    def num_anchors(self) -> List[int]:
        """Anchors per position at each level."""
        return [len(s) * len(self.aspect_ratios) for s in self.sizes]

    def cell_anchors(self, level: int) -> Tensor:
        return getattr(self, f"cell_anchors_{level}")

    def forward(self, grid_sizes: Sequence[Tuple[int, int]]) -> List[Tensor]:
        if len(grid_sizes) != len(self.strides):
            raise ValueError(f"AnchorGenerator has {len(self.strides)} levels, got {len(grid_sizes)} feature maps")
        out = []
        for i, ((h, w), stride) in enumerate(zip(grid_sizes, self.strides)):
            cell = self.cell_anchors(i)
            shift = self.offset * stride
            xs = torch.arange(int(w), dtype=torch.float32, device=cell.device) * stride + shift
            ys = torch.arange(int(h), dtype=torch.float32, device=cell.device) * stride + shift
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
            out.append((shifts + cell[None]).reshape(-1, 4))
        return out

    def extra_repr(self) -> str:
        return f"style={self.style!r}, strides={self.strides}, sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"
