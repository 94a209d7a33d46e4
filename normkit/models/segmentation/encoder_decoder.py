"""``SegmentationModel``: backbone + decode head (+ auxiliary head) + loss."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.segmentation.common import (LOSS_MODES, align_logits_and_labels, check_labels,
                                                cross_entropy, pixel_accuracy)

__all__ = ["SegmentationModel", "check_images"]


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be Tensor[B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}")


class SegmentationModel(nn.Module):
    """Encoder-decoder segmentation model.

    ``model(images)`` returns class logits Tensor[B, K, H, W] at the input resolution (bilinear,
    align_corners=False). ``model(images, labels)`` (labels int64 Tensor[B, H, W], ``ignore_index`` for
    unlabelled pixels) returns a dict of scalar tensors: the loss terms (keys ending in ``loss``) and
    ``pixel_acc``:

    - ``decode_loss``: cross-entropy of the head's ``logits``;
    - ``deepsup_loss``: ``deep_sup_weight`` x cross-entropy of ``deepsup_logits`` (CSAIL deep supervision);
    - ``aux_loss``: ``aux_weight`` x cross-entropy of the auxiliary head (mmseg FCN head);
    - whatever the head's own ``extra_losses(outputs, labels)`` adds (CondNet's guidance loss).

    ``loss_mode`` ``downsample_labels`` computes each loss at the output's stride against nearest-resized
    labels (CSAIL); ``upsample_logits`` upsamples logits to the labels' size (mmseg).
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, *, num_classes: int,
                 auxiliary_head: Optional[nn.Module] = None, ignore_index: int = 255,
                 loss_mode: str = "downsample_labels", deep_sup_weight: float = 0.4, aux_weight: float = 0.4):
        super().__init__()
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode {loss_mode!r}; choose one of {', '.join(LOSS_MODES)}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.loss_mode = loss_mode
        self.deep_sup_weight = deep_sup_weight
        self.aux_weight = aux_weight

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, labels = align_logits_and_labels(logits, labels, self.loss_mode)
        return cross_entropy(logits, labels, self.ignore_index)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        check_images(images)
        features = self.backbone(images)
        outputs = self.decode_head(features)
        if labels is None:
            return F.interpolate(outputs["logits"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        check_labels(labels, images, self.num_classes, self.ignore_index)
        logits, aligned = align_logits_and_labels(outputs["logits"], labels, self.loss_mode)
        losses: Dict[str, torch.Tensor] = {"decode_loss": cross_entropy(logits, aligned, self.ignore_index)}
        if "deepsup_logits" in outputs:
            losses["deepsup_loss"] = self.deep_sup_weight * self._ce(outputs["deepsup_logits"], labels)
        extra_losses = getattr(self.decode_head, "extra_losses", None)
        if extra_losses is not None:
            losses.update(extra_losses(outputs, labels))
        if self.auxiliary_head is not None:
            losses["aux_loss"] = self.aux_weight * self._ce(self.auxiliary_head(features)["logits"], labels)
        losses["pixel_acc"] = pixel_accuracy(logits.detach(), aligned, self.ignore_index)
        return losses
