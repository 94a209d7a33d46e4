"""Matching anchors/proposals to ground truth and sampling balanced training minibatches.

Two recipes are provided:

- Detectron-1 (``rpn_anchor_labels`` with ``bg_with_replacement=True``, ``sample_rois``): RPN positives are
  anchors with IoU >= 0.7 plus, for each ground truth, every anchor sharing its highest IoU (ties included);
  positives are subsampled without replacement, negatives (IoU < 0.3) are drawn *with* replacement, and only
  when there are more candidates than free slots (Detectron-1 ``roi_data/rpn.py``); RoIs are sampled without
  replacement, foreground at IoU >= 0.5, background in ``[0, 0.5)``.
- detectron2 (``bg_with_replacement=False``): both classes drawn without replacement (``subsample_labels``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Matcher", "rpn_anchor_labels", "subsample_labels", "sample_rois"]


def _choice(indices: Tensor, count: int, generator: Optional[torch.Generator]) -> Tensor:
    """``count`` distinct elements of ``indices`` (without replacement), in random order."""
    perm = torch.randperm(indices.numel(), generator=generator, device="cpu")[:count].to(indices.device)
    return indices[perm]


class Matcher:
    """Assigns each prediction (column) to its best ground truth (row) of an IoU matrix Tensor[G, P].

    ``thresholds`` split the IoU range into intervals labelled by ``labels``, e.g. thresholds ``(0.3, 0.7)`` and
    labels ``(0, -1, 1)``: IoU < 0.3 -> 0 (negative), [0.3, 0.7) -> -1 (ignored), >= 0.7 -> 1 (positive).
    With ``allow_low_quality_matches``, every prediction whose IoU with some ground truth equals that ground
    truth's highest IoU (ties included, as Detectron and detectron2) becomes positive too.

    ``__call__(iou)`` returns ``(matched_idxs Tensor[P] int64, labels Tensor[P] int8)``; with no ground truth
    every prediction is labelled ``labels[0]`` and matched to index 0.
    """

    def __init__(self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False):
        thresholds = [float(t) for t in thresholds]
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"Matcher: {len(thresholds)} thresholds need {len(thresholds) + 1} labels, got {labels}")
        if thresholds != sorted(thresholds):
            raise ValueError(f"Matcher: thresholds must be increasing, got {thresholds}")
        if any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(f"Matcher: labels must be -1 (ignore), 0 (negative) or 1 (positive), got {labels}")
        self.thresholds = thresholds
        self.labels = [int(x) for x in labels]
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tuple[Tensor, Tensor]:
        num_pred = iou.shape[1]
        if iou.shape[0] == 0:
            return (torch.zeros(num_pred, dtype=torch.int64, device=iou.device),
                    torch.full((num_pred,), self.labels[0], dtype=torch.int8, device=iou.device))
        best, matched = iou.max(dim=0)
        labels = torch.full((num_pred,), self.labels[-1], dtype=torch.int8, device=iou.device)
        bounds = [-float("inf")] + self.thresholds + [float("inf")]
        for label, low, high in zip(self.labels, bounds[:-1], bounds[1:]):
            labels[(best >= low) & (best < high)] = label
        if self.allow_low_quality_matches:
            labels[_highest_quality(iou)] = 1
        return matched, labels

    def __repr__(self) -> str:
        return (f"Matcher(thresholds={self.thresholds}, labels={self.labels}, "
                f"allow_low_quality_matches={self.allow_low_quality_matches})")


def _highest_quality(iou: Tensor) -> Tensor:
    """Predictions whose IoU with some ground truth equals that ground truth's best IoU (a bool mask)."""
    best_per_gt = iou.max(dim=1, keepdim=True).values
    return (iou == best_per_gt).any(dim=0)


def rpn_anchor_labels(iou: Tensor, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                      positive_threshold: float = 0.7, negative_threshold: float = 0.3,
                      bg_with_replacement: bool = True,
                      generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Sampled RPN labels of one image's anchors: ``(labels Tensor[P] int64 in {-1, 0, 1}, matched Tensor[P])``.

    ``iou`` is Tensor[G, P] between the (non-crowd) ground truth and the anchors; G must be positive.

    Detectron-1 order (``bg_with_replacement=True``): label the best anchors of each ground truth (ties) and
    the anchors with IoU >= ``positive_threshold`` positive; keep at most ``positive_fraction *
    batch_size_per_image`` positives (random, without replacement); then, only if more anchors have IoU <
    ``negative_threshold`` than the slots left, draw that many of them *with replacement* and label them 0 —
    overriding a positive of lower IoU. The number of distinct sampled anchors can therefore fall below the
    batch size, and no negatives are drawn when candidates do not outnumber the free slots.

    detectron2 order (``bg_with_replacement=False``): ``Matcher`` labels, then ``subsample_labels``.
    """
    if iou.shape[0] == 0:
        raise ValueError("rpn_anchor_labels needs at least one ground-truth box")
    best, matched = iou.max(dim=0)
    num_anchors = iou.shape[1]
    if not bg_with_replacement:
        labels = torch.full((num_anchors,), -1, dtype=torch.int64, device=iou.device)
        labels[best < negative_threshold] = 0
        labels[best >= positive_threshold] = 1
        labels[_highest_quality(iou)] = 1
        return subsample_labels(labels, batch_size_per_image, positive_fraction, generator), matched
    labels = torch.full((num_anchors,), -1, dtype=torch.int64, device=iou.device)
    labels[_highest_quality(iou)] = 1
    labels[best >= positive_threshold] = 1
    num_fg = int(positive_fraction * batch_size_per_image)
    fg = torch.nonzero(labels == 1).flatten()
    if fg.numel() > num_fg:
        labels[_choice(fg, fg.numel() - num_fg, generator)] = -1
    num_bg = batch_size_per_image - int((labels == 1).sum())
    bg = torch.nonzero(best < negative_threshold).flatten()
    if bg.numel() > num_bg:
        picks = torch.randint(bg.numel(), (num_bg,), generator=generator, device="cpu").to(bg.device)
        labels[bg[picks]] = 0
    return labels, matched


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """detectron2 ``subsample_labels``: keep at most ``positive_fraction * num_samples`` positives (label 1)
    and fill the rest with negatives (label 0), both without replacement; the others become -1."""
    out = torch.full_like(labels, -1)
    pos = torch.nonzero(labels == 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    num_pos = min(pos.numel(), int(num_samples * positive_fraction))
    num_neg = min(neg.numel(), num_samples - num_pos)
    out[_choice(pos, num_pos, generator)] = 1
    out[_choice(neg, num_neg, generator)] = 0
    return out


def sample_rois(max_overlaps: Tensor, batch_size_per_image: int = 512, fg_fraction: float = 0.25,
                fg_threshold: float = 0.5, bg_threshold_hi: float = 0.5, bg_threshold_lo: float = 0.0,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Detectron-1 ``_sample_rois``: ``(fg_indices, bg_indices)`` of the candidates to train on.

    Foreground: ``max_overlaps >= fg_threshold``, at most ``round(fg_fraction * batch_size_per_image)``;
    background: ``max_overlaps`` in ``[bg_threshold_lo, bg_threshold_hi)``, filling the batch; both drawn
    without replacement. Candidates with overlap -1 (crowd boxes) are never drawn.
    """
    fg_per_image = int(round(fg_fraction * batch_size_per_image))
    fg = torch.nonzero(max_overlaps >= fg_threshold).flatten()
    fg = _choice(fg, min(fg_per_image, fg.numel()), generator)
    bg = torch.nonzero((max_overlaps < bg_threshold_hi) & (max_overlaps >= bg_threshold_lo)).flatten()
    bg = _choice(bg, min(batch_size_per_image - fg.numel(), bg.numel()), generator)
    return fg, bg
