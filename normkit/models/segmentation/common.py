"""Building blocks and loss helpers shared by the segmentation heads."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from normkit.nn import build_norm

LOSS_MODES = ("downsample_labels", "upsample_logits")


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int = 3, *, norm="bn",
                   norm_kwargs=None, dilation: int = 1) -> nn.Sequential:
    """``Sequential(conv, norm, ReLU)`` with indices 0/1/2 (CSAIL's ``conv3x3_bn_relu`` layout)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                  dilation=dilation, bias=False),
        build_norm(norm, out_channels, **(norm_kwargs or {})),
        nn.ReLU(inplace=True))


def is_norm(module: nn.Module) -> bool:
    """True for normalization layers (every build_norm choice; the class names all contain 'Norm')."""
    return "Norm" in type(module).__name__


def init_csail_decoder(module: nn.Module) -> None:
    """CSAIL decoder init: Kaiming-normal conv weights, norm weight 1 and bias 1e-4."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif is_norm(m) and isinstance(getattr(m, "weight", None), torch.Tensor):
            with torch.no_grad():
                m.weight.fill_(1.0)
                if isinstance(getattr(m, "bias", None), torch.Tensor):
                    m.bias.fill_(1e-4)


def resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of int64 labels Tensor[B, H, W] to ``size`` (no-op when equal)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def align_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor, mode: str
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bring logits and labels to one resolution.

    ``downsample_labels`` (CSAIL recipe): labels are nearest-resized to the logits' size.
    ``upsample_logits`` (mmseg recipe): logits are bilinearly resized (align_corners=False) to the labels'.
    """
    if mode == "downsample_labels":
        return logits, resize_labels(labels, logits.shape[-2:])
    if mode == "upsample_logits":
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return logits, labels
    raise ValueError(f"unknown loss mode {mode!r}; choose one of {', '.join(LOSS_MODES)}")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels; 0 (still attached to the graph) when none is labelled."""
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def pixel_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Fraction of labelled pixels whose argmax class is right (0 when none is labelled)."""
    valid = labels != ignore_index
    correct = (logits.argmax(1) == labels) & valid
    return correct.sum().float() / valid.sum().clamp(min=1).float()


def check_labels(labels: torch.Tensor, images: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    if labels.dim() != 3 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be Tensor[B, H, W] with B = {images.shape[0]}, got {list(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or the ignore index {ignore_index}; "
                         f"found {labels[bad].unique()[:8].tolist()}")
