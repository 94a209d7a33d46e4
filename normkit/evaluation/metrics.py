"""Segmentation metrics summed over a whole dataset (CSAIL / mmseg convention).

For every class k the metric accumulates, over all images, I_k = #pixels labelled k and predicted k, and
U_k = #labelled k + #predicted k - I_k, counting only labelled pixels (label != ignore_index). Then

    IoU_k     = sum I_k / sum U_k                    (not the mean of per-image IoUs)
    pixel_acc = sum correct / sum labelled
    mean_iou  = mean of IoU_k over the classes with sum U_k > 0
    score     = (pixel_acc + mean_iou) / 2           (the ADE20K challenge score)

Classes that never occur in a label and are never predicted (on a labelled pixel) have U_k = 0: their IoU
is undefined (NaN in `per_class_iou`) and they are left out of the mean, as mmseg's nanmean does.
"""
from __future__ import annotations

import math

import torch


class SegmentationMetric:
    """Accumulates intersection / union / label counts; `update` per batch, `all_reduce` across ranks,
    `compute` at the end."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        # Rows: intersection, predicted count, labelled count (per class). int64: exact for any dataset size.
        self.counts = torch.zeros(3, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred: class indices (any int dtype) [..., H, W]; label: same shape, ignore_index marks unlabelled pixels.
        Predictions on unlabelled pixels are not counted."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction and label shapes differ: {tuple(pred.shape)} vs {tuple(label.shape)}")
        pred = pred.reshape(-1).long()
        label = label.reshape(-1).long()
        valid = label != self.ignore_index
        pred, label = pred[valid], label[valid]
        k = self.num_classes
        if label.numel() and (label.min() < 0 or label.max() >= k):
            raise ValueError(f"label values must be in 0..{k - 1} or {self.ignore_index}, "
                             f"got {sorted(set(label[(label < 0) | (label >= k)].tolist()))[:10]}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"predicted classes must be in 0..{k - 1}, got {pred.min().item()}..{pred.max().item()}")
        inter = torch.bincount(label[pred == label], minlength=k)
        self.counts[0] += inter.cpu()
        self.counts[1] += torch.bincount(pred, minlength=k).cpu()
        self.counts[2] += torch.bincount(label, minlength=k).cpu()

    def all_reduce(self) -> None:
        """Sum the counts over all torch.distributed ranks (no-op when not initialised)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            counts = self.counts.to(device)
            torch.distributed.all_reduce(counts)
            self.counts = counts.cpu()

    def compute(self) -> dict:
        """{"pixel_acc", "mean_iou", "score": float, "per_class_iou": list[float] (NaN where the class
        never occurs), "num_pixels": labelled pixel count}."""
        inter, pred_count, label_count = self.counts.double()
        union = pred_count + label_count - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, math.nan))
        present = union > 0
        labelled = label_count.sum().item()
        pixel_acc = inter.sum().item() / labelled if labelled else math.nan
        mean_iou = iou[present].mean().item() if present.any() else math.nan
        return {"pixel_acc": pixel_acc, "mean_iou": mean_iou, "score": (pixel_acc + mean_iou) / 2,
                "per_class_iou": iou.tolist(), "num_pixels": int(labelled)}


def results_to_json(results: dict) -> dict:
    """The numeric entries of `results` with NaN (undefined IoU) as None, ready for json.dumps."""
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value
    out = {k: clean(v) for k, v in results.items() if isinstance(v, (int, float))}
    out["per_class_iou"] = [clean(v) for v in results["per_class_iou"]]
    return out


def format_table(results: dict, class_names=None) -> str:
    """A plain-text table of per-class IoU followed by pixel accuracy, mIoU and score (percent)."""
    ious = results["per_class_iou"]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(len(ious))]
    if len(names) != len(ious):
        raise ValueError(f"{len(names)} class names for {len(ious)} classes")
    width = max(len(n) for n in ["class", "pixel acc", *names])
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    for name, iou in zip(names, ious):
        lines.append(f"{name:<{width}}  {'n/a' if math.isnan(iou) else f'{100 * iou:6.2f}':>7}")
    lines.append("-" * (width + 9))
    for key, title in (("pixel_acc", "pixel acc"), ("mean_iou", "mIoU"), ("score", "score")):
        lines.append(f"{title:<{width}}  {100 * results[key]:7.2f}")
    return "\n".join(lines)
