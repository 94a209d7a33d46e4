"""Convolution building blocks shared by backbones, necks and heads.

Two layouts exist because published checkpoints name their parameters differently:

- :class:`ConvNormAct` is a ``Sequential`` (``0`` conv, ``1`` norm, ``2`` activation; CSAIL, Detectron and
  torchvision-style keys ``x.0.weight``, ``x.1.weight``);
- :class:`ConvModule` names its parts ``conv``, ``bn``, ``activate`` (mmcv's layout, mmseg checkpoints).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from normkit.nn.norm import build_norm

__all__ = ["conv2d", "ConvNormAct", "ConvModule", "DepthwiseSeparableConvModule"]

NormSpec = Union[str, Callable[..., nn.Module], None]


def conv2d(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
           groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A conv with 'same' padding for odd kernels (``dilation * (kernel_size - 1) // 2``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=dilation * (kernel_size - 1) // 2, dilation=dilation, groups=groups, bias=bias)


class ConvNormAct(nn.Sequential):
    """``conv -> norm -> ReLU`` as a Sequential: indices 0/1/2, or 0/1 when the norm or the activation is
    left out (``norm=None``, ``activation=False``). The conv has a bias only without a norm, unless ``bias``
    says otherwise."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 dilation: int = 1, groups: int = 1, norm: NormSpec = "bn",
                 norm_kwargs: Optional[Mapping[str, Any]] = None, activation: bool = True,
                 bias: Optional[bool] = None):
        has_norm = norm not in (None, "")
        layers = [conv2d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups,
                         bias=not has_norm if bias is None else bias)]
        if has_norm:
            layers.append(build_norm(norm, out_channels, **dict(norm_kwargs or {})))
        if activation:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ConvModule(nn.Module):
    """mmcv's conv (no bias) -> norm (named ``bn`` whatever the norm) -> ReLU, with mmcv's init: Kaiming-normal
    (fan_out, ReLU) conv weights; the norm keeps weight 1, bias 0."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1,
                 groups: int = 1, norm: NormSpec = "syncbn", norm_kwargs: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.bn = build_norm(norm, out_channels, **dict(norm_kwargs or {}))
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise 3x3 ConvModule (groups = in_channels) then pointwise 1x1 ConvModule, both with norm + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int = 1, norm: NormSpec = "syncbn",
                 norm_kwargs: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, 3, dilation=dilation, groups=in_channels,
                                         norm=norm, norm_kwargs=norm_kwargs)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, norm=norm, norm_kwargs=norm_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))
