"""CSAIL ADE20K scene-parsing decoders: C1, C1DeepSup, PPM, PPMDeepSup, UPerNet.

Module names (``cbr``, ``conv_last``, ``cbr_deepsup``, ``conv_last_deepsup``, ``ppm``, ``ppm_conv``,
``ppm_last_conv``, ``fpn_in``, ``fpn_out``) are CSAIL's, so its ``decoder_epoch_N.pth`` files load after
prefixing. Every head takes the backbone's four stage channels and returns a dict with ``logits`` at the
decoder's stride (and ``deepsup_logits`` from layer 3 while training for the deep-supervision heads).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.registry import SEG_HEADS
from normkit.nn import ConvNormAct, build_norm
from normkit.models.segmentation.common import init_csail_decoder

__all__ = ["C1", "C1DeepSup", "PPM", "PPMDeepSup", "UPerNet"]

POOL_SCALES = (1, 2, 3, 6)
PPM_CHANNELS = 512


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@SEG_HEADS.register("c1")
class C1(nn.Module):
    """3x3 conv-norm-relu fc_dim -> fc_dim/4, then 1x1 -> K, on the last feature."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, norm="bn", norm_kwargs=None):
        super().__init__()
        fc_dim = in_channels[-1]
        self.cbr = ConvNormAct(fc_dim, fc_dim // 4, norm=norm, norm_kwargs=norm_kwargs)
        self.conv_last = nn.Conv2d(fc_dim // 4, num_classes, 1)
        init_csail_decoder(self)

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"logits": self.conv_last(self.cbr(features[-1]))}


@SEG_HEADS.register("c1_deepsup")
class C1DeepSup(C1):
    """C1 plus the same branch on layer 3 (fc_dim/2 -> fc_dim/4 -> K) for deep supervision."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, norm="bn", norm_kwargs=None):
        super().__init__(in_channels, num_classes, norm=norm, norm_kwargs=norm_kwargs)
        fc_dim = in_channels[-1]
        self.cbr_deepsup = ConvNormAct(in_channels[-2], fc_dim // 4, norm=norm, norm_kwargs=norm_kwargs)
        self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, num_classes, 1)
        init_csail_decoder(self)

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = super().forward(features)
        if self.training:
            out["deepsup_logits"] = self.conv_last_deepsup(self.cbr_deepsup(features[-2]))
        return out


def _pyramid_pooling(features: torch.Tensor, branches) -> torch.Tensor:
    size = features.shape[-2:]
    return torch.cat([features] + [_upsample(branch(features), size) for branch in branches], 1)


@SEG_HEADS.register("ppm")
class PPM(nn.Module):
    """Pyramid pooling: for each scale (1,2,3,6) AdaptiveAvgPool -> 1x1 conv 512 -> norm -> relu,
    upsampled and concatenated with the feature, then 3x3 conv 512 -> norm -> relu -> Dropout2d(0.1) -> 1x1."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, norm="bn", norm_kwargs=None,
                 pool_scales: Sequence[int] = POOL_SCALES):
        super().__init__()
        fc_dim = in_channels[-1]
        norm_kwargs = norm_kwargs or {}
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale),
                          nn.Conv2d(fc_dim, PPM_CHANNELS, 1, bias=False),
                          build_norm(norm, PPM_CHANNELS, **norm_kwargs),
                          nn.ReLU(inplace=True))
            for scale in pool_scales)
        self.conv_last = nn.Sequential(
            nn.Conv2d(fc_dim + len(pool_scales) * PPM_CHANNELS, PPM_CHANNELS, 3, padding=1, bias=False),
            build_norm(norm, PPM_CHANNELS, **norm_kwargs),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(PPM_CHANNELS, num_classes, 1))
        init_csail_decoder(self)

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"logits": self.conv_last(_pyramid_pooling(features[-1], self.ppm))}


@SEG_HEADS.register("ppm_deepsup")
class PPMDeepSup(PPM):
    """PPM plus a layer-3 head: 3x3 conv-norm-relu fc_dim/2 -> fc_dim/4, Dropout2d(0.1), 1x1 -> K."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, norm="bn", norm_kwargs=None,
                 pool_scales: Sequence[int] = POOL_SCALES):
        super().__init__(in_channels, num_classes, norm=norm, norm_kwargs=norm_kwargs, pool_scales=pool_scales)
        fc_dim = in_channels[-1]
        self.cbr_deepsup = ConvNormAct(in_channels[-2], fc_dim // 4, norm=norm, norm_kwargs=norm_kwargs)
        self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, num_classes, 1)
        self.dropout_deepsup = nn.Dropout2d(0.1)
        init_csail_decoder(self)

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        out = super().forward(features)
        if self.training:
            deepsup = self.dropout_deepsup(self.cbr_deepsup(features[-2]))
            out["deepsup_logits"] = self.conv_last_deepsup(deepsup)
        return out


@SEG_HEADS.register("upernet")
class UPerNet(nn.Module):
    """PPM on the last feature (pool -> upsample -> 1x1 conv-norm-relu, the CSAIL order) and an FPN
    over layers 1-3 (1x1 laterals, top-down add, 3x3 outputs); all levels are upsampled to the first
    level's stride (4), concatenated, and classified by a 3x3 conv-norm-relu and a 1x1 conv.
    ``fpn_dim`` 512 (``upernet``) or 256 (``upernet_lite``)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, norm="bn", norm_kwargs=None,
                 fpn_dim: int = 512, pool_scales: Sequence[int] = POOL_SCALES):
        super().__init__()
        fc_dim = in_channels[-1]
        norm_kwargs = norm_kwargs or {}
        self.ppm_pooling = nn.ModuleList(nn.AdaptiveAvgPool2d(scale) for scale in pool_scales)
        self.ppm_conv = nn.ModuleList(
            ConvNormAct(fc_dim, PPM_CHANNELS, 1, norm=norm, norm_kwargs=norm_kwargs) for _ in pool_scales)
        self.ppm_last_conv = ConvNormAct(fc_dim + len(pool_scales) * PPM_CHANNELS, fpn_dim, norm=norm,
                                            norm_kwargs=norm_kwargs)
        self.fpn_in = nn.ModuleList(
            ConvNormAct(ch, fpn_dim, 1, norm=norm, norm_kwargs=norm_kwargs) for ch in in_channels[:-1])
        self.fpn_out = nn.ModuleList(
            nn.Sequential(ConvNormAct(fpn_dim, fpn_dim, norm=norm, norm_kwargs=norm_kwargs))
            for _ in in_channels[:-1])
        self.conv_last = nn.Sequential(
            ConvNormAct(len(in_channels) * fpn_dim, fpn_dim, norm=norm, norm_kwargs=norm_kwargs),
            nn.Conv2d(fpn_dim, num_classes, 1))
        init_csail_decoder(self)

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        top = features[-1]
        size = top.shape[-2:]
        pooled = [top] + [conv(_upsample(pool(top), size)) for pool, conv in zip(self.ppm_pooling, self.ppm_conv)]
        f = self.ppm_last_conv(torch.cat(pooled, 1))
        levels = [f]
        for i in reversed(range(len(features) - 1)):
            lateral = self.fpn_in[i](features[i])
            f = lateral + _upsample(f, lateral.shape[-2:])
            levels.append(self.fpn_out[i](f))
        levels.reverse()
        out_size = levels[0].shape[-2:]
        fused = torch.cat([levels[0]] + [_upsample(level, out_size) for level in levels[1:]], 1)
        return {"logits": self.conv_last(fused)}


@SEG_HEADS.register("upernet_lite")
def upernet_lite(in_channels: Sequence[int], num_classes: int, **kwargs) -> UPerNet:
    """UPerNet with 256-channel pyramid features (CSAIL's lighter variant)."""
    return UPerNet(in_channels, num_classes, fpn_dim=256, **kwargs)
