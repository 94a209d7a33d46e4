"""Building blocks and loss helpers shared by the segmentation heads."""
from __future__ import annotations

import difflib
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.registry import build_backbone, build_head

LOSS_MODES = ("downsample_labels", "upsample_logits")
# What a cross-entropy is averaged over: the labelled pixels (CSAIL, torch's default), or every pixel with the
# ignored ones counting zero (mmseg 0.x `avg_non_ignore=False`, the CondNet recipe).
CE_AVERAGES = ("labelled_pixels", "all_pixels")


def init_csail_decoder(module: nn.Module) -> None:
    """CSAIL decoder init: Kaiming-normal conv weights; batch-norm weight 1 and bias 1e-4. Its weights_init
    matches class names containing "BatchNorm" only, so other norms (SN in the SwitchNorm_Segmentation fork,
    GN) keep their own initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.fill_(1.0)
                m.bias.fill_(1e-4)


LABEL_SAMPLINGS = ("floor", "centres", "corners")


def _corner_indices(length: int, size: int, device) -> torch.Tensor:
    """Output i of ``size`` at input i * (length - 1) / (size - 1), rounded: the align_corners=True grid."""
    if size == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    position = torch.arange(size, dtype=torch.float64, device=device) * ((length - 1) / (size - 1))
    return torch.floor(position + 0.5).long()


def resize_labels(labels: torch.Tensor, size, sampling: str = "floor") -> torch.Tensor:
    """Nearest-neighbour resize of int64 labels Tensor[B, H, W] to ``size`` (no-op when equal), reading input
    ``floor(i * in / out)`` (``floor``: torch's nearest, mmseg), the pixel under output i's centre
    (``centres``: PIL's NEAREST, CSAIL; 8i + 4 at stride 8) or the align_corners=True grid (``corners``: the
    DeepLab v2 port's label resize)."""
    if sampling not in LABEL_SAMPLINGS:
        raise ValueError(f"unknown label sampling {sampling!r}; choose one of {', '.join(LABEL_SAMPLINGS)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    if sampling == "corners":
        rows = _corner_indices(labels.shape[-2], size[0], labels.device)
        cols = _corner_indices(labels.shape[-1], size[1], labels.device)
        return labels.index_select(-2, rows).index_select(-1, cols)
    mode = "nearest" if sampling == "floor" else "nearest-exact"
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode=mode)[:, 0].long()


def align_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor, mode: str
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bring logits and labels to one resolution.

    ``downsample_labels`` (CSAIL recipe): labels are nearest-resized to the logits' size, sampled at pixel
    centres as CSAIL's PIL NEAREST does.
    ``upsample_logits`` (mmseg recipe): logits are bilinearly resized (align_corners=False) to the labels'.
    """
    if mode == "downsample_labels":
        return logits, resize_labels(labels, logits.shape[-2:], "centres")
    if mode == "upsample_logits":
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return logits, labels
    raise ValueError(f"unknown loss mode {mode!r}; choose one of {', '.join(LOSS_MODES)}")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  average: str = "labelled_pixels") -> torch.Tensor:
    """Cross-entropy summed over labelled pixels and divided by their number (``labelled_pixels``) or by the
    number of all pixels (``all_pixels``); 0 (still attached to the graph) when none is labelled."""
    if average not in CE_AVERAGES:
        raise ValueError(f"unknown cross-entropy average {average!r}; choose one of {', '.join(CE_AVERAGES)}")
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0
    if average == "all_pixels":
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / labels.numel()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def pixel_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Fraction of labelled pixels whose argmax class is right (0 when none is labelled)."""
    valid = labels != ignore_index
    correct = (logits.argmax(1) == labels) & valid
    return correct.sum().float() / valid.sum().clamp(min=1).float()


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be Tensor[B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}")


def unpack_batch(batch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(images, labels or None)`` from what a segmentation model is called with: the images tensor itself,
    or a batch mapping ``{"images": ..., "labels": ... (optional), ...}`` as the loaders yield it."""
    if isinstance(batch, torch.Tensor):
        images, labels = batch, None
    elif isinstance(batch, Mapping) and "images" in batch:
        images, labels = batch["images"], batch.get("labels")
    else:
        raise ValueError("a segmentation model takes images Tensor[B, 3, H, W] or a batch dict with 'images' "
                         f"(and 'labels' for training), got {type(batch).__name__}"
                         + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
    check_images(images)
    return images, labels


def check_labels(labels: torch.Tensor, images: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    if labels.dim() != 3 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be Tensor[B, H, W] with B = {images.shape[0]}, got {list(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or the ignore index {ignore_index}; "
                         f"found {labels[bad].unique()[:8].tolist()}")


def build_segmentation_parts(cfg: dict, head_keys: Tuple[str, ...]) -> Tuple[int, nn.Module, dict]:
    """Pops ``num_classes``, ``backbone`` and the ``head_keys`` sections from a model config and builds them:
    ``(num_classes, backbone, {key: head})``. The first head key is required; heads default to the backbone's
    norm."""
    for key in ("num_classes", "backbone", head_keys[0]):
        if key not in cfg:
            typo = difflib.get_close_matches(key, [str(k) for k in cfg], n=1)
            raise ValueError(f"config model.{key} is required"
                             + (f" (is model.{typo[0]} a misspelling of it?)" if typo else ""))
    num_classes = cfg.pop("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"config model.num_classes must be a positive int, got {num_classes!r}")
    backbone_cfg = cfg.pop("backbone")
    backbone = build_backbone(backbone_cfg)
    in_channels = [shape.channels for shape in backbone.output_shape().values()]
    heads = {}
    for key in head_keys:
        head_cfg = cfg.pop(key, None)
        if head_cfg:
            heads[key] = build_head(head_cfg, in_channels, num_classes, default_norm=backbone_cfg.get("norm", "bn"),
                                    default_norm_kwargs=backbone_cfg.get("norm_kwargs"), where=f"model.{key}")
    return num_classes, backbone, heads
