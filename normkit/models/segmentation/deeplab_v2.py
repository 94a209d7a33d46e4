"""DeepLab v2 (ResNet-101, ASPP-sum classifier, multi-scale inputs with max fusion).

Module names follow the DeepLab-v2 PyTorch port (``layer5.conv2d_list.i`` becomes
``decode_head.conv2d_list.i``) so its ``Scale.*`` checkpoints load after renaming.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.registry import MODELS, SEG_HEADS, call_with_config
from normkit.models.segmentation.common import (build_segmentation_parts, check_images, check_labels, cross_entropy,
                                                pixel_accuracy, resize_labels, unpack_batch)

__all__ = ["ASPPSumHead", "DeepLabV2"]

ASPP_DILATIONS = (6, 12, 18, 24)


@SEG_HEADS.register("aspp_sum")
class ASPPSumHead(nn.Module):
    """Sum of four 3x3 convs (with bias) of dilations 6/12/18/24 straight to K classes.

    Weights are drawn from N(0, 0.01) as in the original; biases start at 0 (Caffe's default filler).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, dilations: Sequence[int] = ASPP_DILATIONS):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels[-1], num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        x = features[-1]
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return {"logits": out}


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    # The port resizes with nn.UpsamplingBilinear2d, i.e. align_corners=True.
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


@MODELS.register("deeplab_v2")
class DeepLabV2(nn.Module):
    """Multi-scale DeepLab v2 with shared weights.

    Each input is run at scale 1 and at ``int(s * H) + 1`` x ``int(s * W) + 1`` for s in ``scales[1:]``
    (0.75 and 0.5, the port's sizes); every output is resized to the scale-1 output size and the
    element-wise maximum over scales is the fused output. ``model(batch)`` (images, or a batch dict
    ``{"images", "labels"}``) in training mode with labels returns one cross-entropy per scale plus the fused
    one (``scale1_loss``, ``scale0.75_loss``, ``scale0.5_loss``, ``fused_loss``), each against labels
    resized to the scale-1 output size (nearest on the port's align_corners grid), and ``pixel_acc`` of the
    fused output; otherwise it returns the fused logits upsampled to the input size (align_corners=True, the
    port's ``UpsamplingBilinear2d``); ``head_logits(images)`` returns them fused at the scale-1 output size,
    not upsampled.

    Deviations from the port, documented: the port scores its 0.5 output at that output's own size and
    merges label 255 into background; normkit scores every output at the scale-1 size and ignores 255. The
    port resizes labels bilinearly on the align_corners=True grid and truncates, which mixes two classes'
    indices into a third at boundaries; normkit takes the nearest label on that grid.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, *, num_classes: int, ignore_index: int = 255,
                 scales: Sequence[float] = (1.0, 0.75, 0.5)):
        super().__init__()
        if not scales or scales[0] != 1.0:
            raise ValueError(f"scales must start with 1.0, got {list(scales)}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.scales = tuple(float(s) for s in scales)

    @classmethod
    def from_config(cls, cfg: dict) -> "DeepLabV2":
        cfg = {k: v for k, v in cfg.items() if k != "name"}
        num_classes, backbone, heads = build_segmentation_parts(cfg, ("decode_head",))
        return call_with_config(cls, "model", backbone, heads["decode_head"], num_classes=num_classes, **cfg)

    def forward_scales(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Logits per scale (resized to the scale-1 output size) followed by their max fusion."""
        check_images(images)
        height, width = images.shape[-2:]
        outputs = []
        for scale in self.scales:
            x = images if scale == 1.0 else _resize(images, (int(height * scale) + 1, int(width * scale) + 1))
            logits = self.decode_head(list(self.backbone(x).values()))["logits"]
            outputs.append(logits if scale == 1.0 else _resize(logits, outputs[0].shape[-2:]))
        fused = outputs[0]
        for logits in outputs[1:]:
            fused = torch.max(fused, logits)
        return outputs + [fused]

    def head_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The fused logits at the scale-1 output size (the port's outS), not upsampled."""
        return self.forward_scales(images)[-1]

    def forward(self, batch):
        images, labels = unpack_batch(batch)
        if labels is None or not self.training:
            return _resize(self.head_logits(images), images.shape[-2:])
        outputs = self.forward_scales(images)
        check_labels(labels, images, self.num_classes, self.ignore_index)
        small = resize_labels(labels, outputs[0].shape[-2:], "corners")
        names = [f"scale{scale:g}_loss" for scale in self.scales] + ["fused_loss"]
        losses = {name: cross_entropy(logits, small, self.ignore_index) for name, logits in zip(names, outputs)}
        losses["pixel_acc"] = pixel_accuracy(outputs[-1].detach(), small, self.ignore_index)
        return losses
