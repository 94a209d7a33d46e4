"""``SegmentationModel``: backbone + decode head (+ auxiliary head) + loss."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.registry import MODELS, call_with_config
from normkit.models.segmentation.common import (CE_AVERAGES, LOSS_MODES, align_logits_and_labels,
                                                build_segmentation_parts, check_images, check_labels, cross_entropy,
                                                pixel_accuracy, unpack_batch)

__all__ = ["SegmentationModel"]


@MODELS.register("encoder_decoder")
class SegmentationModel(nn.Module):
    """Encoder-decoder segmentation model.

    ``model(batch)`` takes the images Tensor[B, 3, H, W] or a batch dict ``{"images", "labels", ...}`` as the
    loaders yield it. In training mode, given labels (int64 Tensor[B, H, W], ``ignore_index`` for unlabelled
    pixels), it returns a dict of scalar tensors: the loss terms (keys ending in ``loss``) and ``pixel_acc``:

    - ``decode_loss``: cross-entropy of the head's ``logits``;
    - ``deepsup_loss``: ``deep_sup_weight`` x cross-entropy of ``deepsup_logits`` (CSAIL deep supervision);
    - ``aux_loss``: ``aux_weight`` x cross-entropy of the auxiliary head (mmseg FCN head);
    - whatever the head's own ``extra_losses(outputs, labels)`` adds (CondNet's guidance loss).

    ``loss_mode`` ``downsample_labels`` computes each loss at the output's stride against nearest-resized
    labels (CSAIL); ``upsample_logits`` upsamples logits to the labels' size (mmseg). ``ce_average``: every
    cross-entropy is averaged over the labelled pixels (``labelled_pixels``, CSAIL) or over all pixels with the
    ignored ones counting zero (``all_pixels``, mmseg 0.x ``avg_non_ignore=False``).

    Otherwise (eval mode, or no labels) it returns class logits Tensor[B, K, H, W] at the input resolution
    (bilinear, align_corners=False). ``head_logits(images)`` returns the decode head's logits at its own stride
    (1/8 of the input for the dilated models), for evaluation that resizes them straight to the label size as
    CSAIL's decoders do. Backbone features reach the heads as a list in stride order.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, *, num_classes: int,
                 auxiliary_head: Optional[nn.Module] = None, ignore_index: int = 255,
                 loss_mode: str = "downsample_labels", ce_average: str = "labelled_pixels",
                 deep_sup_weight: float = 0.4, aux_weight: float = 0.4):
        super().__init__()
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"unknown loss_mode {loss_mode!r}; choose one of {', '.join(LOSS_MODES)}")
        if ce_average not in CE_AVERAGES:
            raise ValueError(f"unknown ce_average {ce_average!r}; choose one of {', '.join(CE_AVERAGES)}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.loss_mode = loss_mode
        self.ce_average = ce_average
        self.deep_sup_weight = deep_sup_weight
        self.aux_weight = aux_weight

    @classmethod
    def from_config(cls, cfg: dict) -> "SegmentationModel":
        cfg = {k: v for k, v in cfg.items() if k != "name"}
        num_classes, backbone, heads = build_segmentation_parts(cfg, ("decode_head", "auxiliary_head"))
        return call_with_config(cls, "model", backbone, heads["decode_head"], num_classes=num_classes,
                                auxiliary_head=heads.get("auxiliary_head"), **cfg)

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, labels = align_logits_and_labels(logits, labels, self.loss_mode)
        return cross_entropy(logits, labels, self.ignore_index, self.ce_average)

    def head_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The decode head's class logits [B, K, h, w] at its output stride, not upsampled."""
        check_images(images)
        return self.decode_head(list(self.backbone(images).values()))["logits"]

    def forward(self, batch):
        images, labels = unpack_batch(batch)
        if labels is None or not self.training:
            return F.interpolate(self.head_logits(images), size=images.shape[-2:], mode="bilinear",
                                 align_corners=False)
        features = list(self.backbone(images).values())
        outputs = self.decode_head(features)
        check_labels(labels, images, self.num_classes, self.ignore_index)
        logits, aligned = align_logits_and_labels(outputs["logits"], labels, self.loss_mode)
        losses: Dict[str, torch.Tensor] = {"decode_loss": cross_entropy(logits, aligned, self.ignore_index,
                                                                         self.ce_average)}
        if "deepsup_logits" in outputs:
            losses["deepsup_loss"] = self.deep_sup_weight * self._ce(outputs["deepsup_logits"], labels)
        extra_losses = getattr(self.decode_head, "extra_losses", None)
        if extra_losses is not None:
            losses.update(extra_losses(outputs, labels))
        if self.auxiliary_head is not None:
            losses["aux_loss"] = self.aux_weight * self._ce(self.auxiliary_head(features)["logits"], labels)
        losses["pixel_acc"] = pixel_accuracy(logits.detach(), aligned, self.ignore_index)
        return losses
