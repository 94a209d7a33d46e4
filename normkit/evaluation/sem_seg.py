"""`evaluate(model, loader, eval_cfg)`: run inference over a (sharded) validation loader and return metrics.

eval_cfg (the `evaluation:` config section; all keys optional)::

    scales: [1.0]          # image size multipliers, probabilities averaged (CSAIL/mmseg multi-scale test)
    short_sides: null      # alternatively CSAIL-style target short sides, e.g. [300, 375, 450, 525, 600] ...
    max_long_side: 1000    # ... each capped so the long side stays <= max_long_side
    flip: false            # also average the horizontally mirrored prediction
    mode: whole            # whole | slide
    crop_size: null        # slide window [h, w] (int for square)
    stride: null           # slide stride [h, w]
    show_dir: null         # write image | prediction | label PNGs here

In a torch.distributed run every rank evaluates its shard (build_val_loader(rank=..., world_size=...)) and
the counts are summed over ranks before `compute`, so every rank returns the dataset-wide metrics.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from normkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from normkit.evaluation.inference import inference
from normkit.evaluation.metrics import SegmentationMetric
from normkit.evaluation.visualize import denormalize, side_by_side

EVAL_KEYS = ("scales", "short_sides", "max_long_side", "flip", "mode", "crop_size", "stride", "show_dir")


def image_scales(eval_cfg: dict, height: int, width: int) -> list[float]:
    """The scales of one image: `short_sides` converted to multipliers when given, else `scales`."""
    if eval_cfg.get("short_sides"):
        max_long = eval_cfg.get("max_long_side", 1000)
        return [min(s / min(height, width), max_long / max(height, width)) for s in eval_cfg["short_sides"]]
    return list(eval_cfg.get("scales") or [1.0])


def evaluate(model, loader, eval_cfg: dict | None = None, num_classes: int | None = None) -> dict:
    """Metrics of `model` on `loader` (batches {"images", "labels", "meta"}): the dict of
    SegmentationMetric.compute() plus "class_names" when the loader's dataset has them.
    `num_classes` defaults to the dataset's."""
    eval_cfg = dict(eval_cfg or {})
    unknown = set(eval_cfg) - set(EVAL_KEYS)
    if unknown:
        raise ValueError(f"unknown evaluation option(s) {sorted(unknown)}; known: {', '.join(EVAL_KEYS)}")
    samples = getattr(loader, "dataset", None)  # build_val_loader's per-rank view: has mean, std, dataset
    base = getattr(samples, "dataset", None)
    num_classes = num_classes or getattr(base, "num_classes", None)
    if num_classes is None:
        raise ValueError("evaluate needs num_classes when the loader's dataset does not state it")
    metric = SegmentationMetric(num_classes)
    device = next(model.parameters()).device
    show_dir = Path(eval_cfg["show_dir"]) if eval_cfg.get("show_dir") else None
    if show_dir is not None:
        show_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            probs = inference(model, images, image_scales(eval_cfg, *images.shape[-2:]),
                              flip=bool(eval_cfg.get("flip", False)), mode=eval_cfg.get("mode", "whole"),
                              crop_size=eval_cfg.get("crop_size"), stride=eval_cfg.get("stride"),
                              out_size=labels.shape[-2:])
            pred = probs.argmax(dim=1)
            metric.update(pred, labels)
            if show_dir is not None:
                mean = getattr(samples, "mean", IMAGENET_MEAN)
                std = getattr(samples, "std", IMAGENET_STD)
                for i, name in enumerate(batch["meta"]["names"]):
                    panel = side_by_side(denormalize(images[i], mean, std), pred[i].cpu().numpy(),
                                         labels[i].cpu().numpy())
                    Image.fromarray(panel).save(show_dir / f"{name}.png")
    finally:
        model.train(was_training)
    metric.all_reduce()
    results = metric.compute()
    if base is not None and getattr(base, "class_names", None):
        results["class_names"] = list(base.class_names)
    return results
