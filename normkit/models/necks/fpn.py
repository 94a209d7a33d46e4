"""Feature Pyramid Network (Lin et al., 2017) with any norm in its lateral and output convs."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from normkit.models.registry import NECKS
from normkit.nn import build_norm

__all__ = ["FPN", "xavier_fill_"]


def xavier_fill_(weight: Tensor) -> Tensor:
    """Caffe2 ``XavierFill``: U(-sqrt(3 / fan_in), sqrt(3 / fan_in))."""
    return nn.init.kaiming_uniform_(weight, a=1)


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, norm, norm_kwargs) -> nn.Sequential:
    use_norm = norm not in (None, "")
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not use_norm)
    xavier_fill_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers = [conv]
    if use_norm:
        layers.append(build_norm(norm, out_channels, **dict(norm_kwargs or {})))
    return nn.Sequential(*layers)


@NECKS.register("fpn")
class FPN(nn.Module):
    """FPN over backbone features C2..C5 giving P2..P5 (+ P6 by max-pooling P5 with kernel 1, stride 2).

    Args:
        in_features: backbone feature names, finest first (``("res2", "res3", "res4", "res5")``).
        in_channels: their channels (``(256, 512, 1024, 2048)`` for ResNet-50).
        out_channels: 256.
        norm, norm_kwargs: a :func:`normkit.nn.build_norm` choice after each lateral 1x1 and output 3x3 conv
            (the convs then have no bias), or None for biased convs only.
        top_block: add P6 = MaxPool2d(1, stride 2)(P5) (Detectron ``FPN.RPN_MAX_LEVEL = 6``).
        min_level: the level of the first input (2 for C2), which names the outputs ``p{level}``.

    Top-down fusion is nearest-neighbour x2 upsampling plus the lateral; conv weights are XavierFill.
    forward(dict of features) -> dict ``{"p2": ..., "p6": ...}`` finest first; ``out_strides`` gives strides.
    """

    def __init__(self, in_features: Sequence[str], in_channels: Sequence[int], out_channels: int = 256, *,
                 norm=None, norm_kwargs: Optional[Mapping] = None, top_block: bool = True, min_level: int = 2):
        super().__init__()
        if len(in_features) != len(in_channels):
            raise ValueError(f"FPN: {len(in_features)} in_features but {len(in_channels)} in_channels")
        self.in_features = tuple(in_features)
        self.lateral_convs = nn.ModuleList(_conv_norm(c, out_channels, 1, norm, norm_kwargs) for c in in_channels)
        self.output_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3, norm, norm_kwargs)
                                          for _ in in_channels)
        self.top_block = nn.MaxPool2d(kernel_size=1, stride=2) if top_block else None
        levels = range(min_level, min_level + len(in_features) + (1 if top_block else 0))
        self.out_features = tuple(f"p{level}" for level in levels)
        self.out_strides = tuple(2 ** level for level in levels)
        self.out_channels = out_channels

    def forward(self, features: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        missing = [name for name in self.in_features if name not in features]
        if missing:
            raise ValueError(f"FPN needs backbone features {list(self.in_features)}, missing {missing}")
        inner = self.lateral_convs[-1](features[self.in_features[-1]])
        outputs = [self.output_convs[-1](inner)]
        for index in range(len(self.in_features) - 2, -1, -1):
            lateral = self.lateral_convs[index](features[self.in_features[index]])
            top_down = F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            inner = lateral + top_down
            outputs.insert(0, self.output_convs[index](inner))
        if self.top_block is not None:
            outputs.append(self.top_block(outputs[-1]))
        return dict(zip(self.out_features, outputs))
