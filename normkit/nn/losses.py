"""Losses shared by the segmentation heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["dice_loss", "DiceLoss"]


def dice_loss(logits: Tensor, target: Tensor, num_classes: int | None = None, ignore_index: int = 255,
              smooth: float = 1e-5, exponent: float = 2, mask_denominator: bool = False) -> Tensor:
    """Multi-class Dice loss of CondNet's guidance branch, with MMSegmentation 0.x ``DiceLoss`` semantics.

    With ``P = softmax(logits, dim=1)`` (computed in fp32), ``T`` the one-hot target and ``V`` the mask of
    non-ignored pixels, per sample b and class k over the pixels i::

        loss[b, k] = 1 - (2 * sum_i P[b,k,i] T[b,k,i] V[b,i] + smooth) / (sum_i (P[b,k,i]^e + T[b,k,i]^e) + smooth)

    and the result is ``mean_b sum_{k != ignore_index} loss[b, k] / K``. Ignored pixels are masked out of
    the intersection. As in MMSegmentation (which CondNet trained with), they still enter the denominator,
    with their label clamped to class K-1 for the one-hot; ``mask_denominator=True`` drops them from the
    denominator too, the textbook masked Dice.

    Args:
        logits: Tensor[B, K, H, W] class logits (the guidance logits in CondNet).
        target: Tensor[B, H', W'] integer labels in [0, K) or ``ignore_index``. A different spatial size is
            resized to (H, W) with nearest-neighbour sampling, as the official head does.
        num_classes: K, checked against ``logits`` when given.
        ignore_index: label of pixels that carry no class. Default: 255.
        smooth: added to numerator and denominator. Default: 1e-5 (CondNet's config).
        exponent: power of the denominator terms. Default: 2.
        mask_denominator: also drop ignored pixels from the denominator. Default: False (MMSegmentation).

    Returns:
        scalar Tensor (fp32, or the dtype of fp64 logits).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be Tensor[B, K, H, W], got {list(logits.shape)}")
    b, k, h, w = logits.shape
    if num_classes is not None and num_classes != k:
        raise ValueError(f"logits have {k} classes but num_classes={num_classes}")
    if target.dim() != 3 or target.shape[0] != b:
        raise ValueError(f"target must be Tensor[{b}, H, W] to match logits {list(logits.shape)}, "
                         f"got {list(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer labels, got {target.dtype}")
    if tuple(target.shape[1:]) != (h, w):
        target = F.interpolate(target[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    target = target.long()
    valid = target != ignore_index
    if bool(((target < 0) | (target >= k)).logical_and(valid).any()):
        raise ValueError(f"target labels must be in [0, {k}) or ignore_index={ignore_index}, "
                         f"got values in [{int(target.min())}, {int(target.max())}]")

    prob = F.softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=1).reshape(b, k, -1)
    one_hot = F.one_hot(target.clamp(0, k - 1).reshape(b, -1), k).transpose(1, 2).to(prob.dtype)  # (B, K, N)
    valid = valid.reshape(b, 1, -1).to(prob.dtype)
    intersection = (prob * one_hot * valid).sum(2)
    denominator_terms = prob.pow(exponent) + one_hot.pow(exponent)
    if mask_denominator:
        denominator_terms = denominator_terms * valid
    per_class = 1 - (2 * intersection + smooth) / (denominator_terms.sum(2) + smooth)  # (B, K)
    if 0 <= ignore_index < k:  # MMSegmentation skips a class whose index equals ignore_index but divides by K
        per_class = per_class.index_fill(1, torch.tensor([ignore_index], device=per_class.device), 0)
    return (per_class.sum(1) / k).mean()


class DiceLoss(nn.Module):
    """``loss_weight * dice_loss(logits, target, ...)``; CondNet weights its guidance Dice loss by 0.2."""

    def __init__(self, loss_weight: float = 1.0, ignore_index: int = 255, smooth: float = 1e-5, exponent: float = 2,
                 mask_denominator: bool = False):
        super().__init__()
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.exponent = exponent
        self.mask_denominator = mask_denominator

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss_weight * dice_loss(logits, target, ignore_index=self.ignore_index, smooth=self.smooth,
                                            exponent=self.exponent, mask_denominator=self.mask_denominator)

    def extra_repr(self) -> str:
        return (f"loss_weight={self.loss_weight}, ignore_index={self.ignore_index}, smooth={self.smooth}, "
                f"exponent={self.exponent}, mask_denominator={self.mask_denominator}")
