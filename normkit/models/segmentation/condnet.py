"""CondNet heads (DeepLabV3 / DeepLabV3+ with a conditional classifier) and mmseg's auxiliary FCN head.

Module names follow the CondNet MMSegmentation fork (mmcv ``ConvModule``: ``conv`` + ``bn``;
``DepthwiseSeparableConvModule``: ``depthwise_conv`` + ``pointwise_conv``), so its checkpoints load after
the prefix renames of :mod:`normkit.convert.mmseg`; the conditional classifier's own projections sit
under ``classifier.`` (``decode_head.guidance_project`` -> ``decode_head.classifier.guidance_project``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.registry import SEG_HEADS
from normkit.nn import ConditionalClassifier, ConvModule, DepthwiseSeparableConvModule, dice_loss
from normkit.models.segmentation.common import resize_labels

__all__ = ["CondASPPHead", "CondDepthwiseSeparableASPPHead",
           "FCNHead"]


@SEG_HEADS.register("cond_aspp")
class CondASPPHead(nn.Module):
    """DeepLabV3 ASPP (image pooling + one branch per dilation; dilation 1 is a 1x1 conv), a 3x3
    bottleneck, then the conditional classifier (Dropout2d inside).

    Returns ``logits`` (and, while training, ``guidance_logits``) at the feature's stride;
    :meth:`extra_losses` adds ``guidance_weight`` x Dice loss of the guidance logits.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, channels: int = 512,
                 dilations: Sequence[int] = (1, 6, 12, 18), in_index: int = 3, dropout: float = 0.1,
                 cond_layer_with_bias: bool = True, guidance_weight: float = 0.2, ignore_index: int = 255,
                 norm="syncbn", norm_kwargs=None):
        super().__init__()
        self.in_index = in_index
        self.num_classes = num_classes
        self.guidance_weight = guidance_weight
        self.ignore_index = ignore_index
        c_in = in_channels[in_index]
        kw = {"norm": norm, "norm_kwargs": norm_kwargs}
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(c_in, channels, 1, **kw))
        self.aspp_modules = nn.ModuleList(self._aspp_branch(c_in, channels, d, kw) for d in dilations)
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, **kw)
        self.classifier = ConditionalClassifier(channels, num_classes, with_bias=cond_layer_with_bias,
                                                dropout=dropout)

    @staticmethod
    def _aspp_branch(in_channels: int, channels: int, dilation: int, kw: dict) -> nn.Module:
        return ConvModule(in_channels, channels, 1 if dilation == 1 else 3, dilation=dilation, **kw)

    def _aspp(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.bottleneck(torch.cat([pooled] + [branch(x) for branch in self.aspp_modules], 1))

    def decode(self, features: List[torch.Tensor]) -> torch.Tensor:
        """The features the conditional classifier sees."""
        return self._aspp(features[self.in_index])

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = self.classifier(self.decode(features))
        if self.training:
            return {"logits": out[0], "guidance_logits": out[1]}
        return {"logits": out}

    def extra_losses(self, outputs: Dict[str, torch.Tensor], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        guidance = outputs.get("guidance_logits")
        if guidance is None:
            return {}
        labels = resize_labels(labels, guidance.shape[-2:])
        return {"guidance_loss": self.guidance_weight * dice_loss(guidance, labels, ignore_index=self.ignore_index)}


@SEG_HEADS.register("cond_sep_aspp")
class CondDepthwiseSeparableASPPHead(CondASPPHead):
    """DeepLabV3+ with a conditional classifier: depthwise-separable ASPP branches, a 1x1 ``c1_bottleneck``
    on stage-1 features (``c1_channels``, 48), the ASPP output upsampled to stride 4 and concatenated with
    it, two depthwise-separable 3x3 convs, and the classifier at 1/4 resolution."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, c1_in_channels: int = 256,
                 c1_channels: int = 48, channels: int = 512, dilations: Sequence[int] = (1, 12, 24, 36),
                 norm="syncbn", norm_kwargs=None, **kwargs):
        super().__init__(in_channels, num_classes, channels=channels, dilations=dilations, norm=norm,
                         norm_kwargs=norm_kwargs, **kwargs)
        if c1_in_channels != in_channels[0]:
            raise ValueError(f"c1_in_channels ({c1_in_channels}) must equal the backbone's stage-1 channels "
                             f"({in_channels[0]})")
        kw = {"norm": norm, "norm_kwargs": norm_kwargs}
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1, **kw)
        self.sep_bottleneck = nn.Sequential(DepthwiseSeparableConvModule(channels + c1_channels, channels, **kw),
                                            DepthwiseSeparableConvModule(channels, channels, **kw))

    @staticmethod
    def _aspp_branch(in_channels: int, channels: int, dilation: int, kw: dict) -> nn.Module:
        if dilation == 1:
            return ConvModule(in_channels, channels, 1, **kw)
        return DepthwiseSeparableConvModule(in_channels, channels, dilation=dilation, **kw)

    def decode(self, features: List[torch.Tensor]) -> torch.Tensor:
        c1 = self.c1_bottleneck(features[0])
        aspp = F.interpolate(self._aspp(features[self.in_index]), size=c1.shape[-2:], mode="bilinear",
                             align_corners=False)
        return self.sep_bottleneck(torch.cat([aspp, c1], 1))


@SEG_HEADS.register("fcn")
class FCNHead(nn.Module):
    """mmseg FCNHead (auxiliary head): ``num_convs`` 3x3 ConvModules on ``features[in_index]``,
    Dropout2d, 1x1 ``conv_seg`` (init N(0, 0.01))."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, in_index: int = 2, channels: int = 256,
                 num_convs: int = 1, dropout: float = 0.1, norm="syncbn", norm_kwargs=None):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs num_convs >= 1, got {num_convs}")
        self.in_index = in_index
        chans = [in_channels[in_index]] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvModule(a, b, 3, norm=norm, norm_kwargs=norm_kwargs)
                                     for a, b in zip(chans[:-1], chans[1:])))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"logits": self.conv_seg(self.dropout(self.convs(features[self.in_index])))}
