"""Segmentation evaluation: `SegmentationEvaluator` (dataset-wide IoU metrics) and `SegmentationInference`
(multi-scale / flip / sliding-window test-time wrapper), tied together by `evaluate(model, loader, eval_cfg)`.

eval_cfg (the `evaluation:` config section; all keys optional)::

    short_sides: null      # target short sides, e.g. [300, 375, 450, 525, 600] (CSAIL multi-scale test) ...
    max_long_side: 1000    # ... each capped so the long side stays <= max_long_side
    scales: [1.0]          # size multipliers, probabilities averaged: of the image's size, or with short_sides of
                           # the configured size (short side and long-side cap times each, truncated to whole
                           # pixels: mmseg's img_ratios over img_scale)
    size_multiple: null    # CSAIL ValDataset: each side int(side * scale) rounded up to a multiple of this
                           # (its padding_constant); null: int(side * scale + 0.5) (mmcv imrescale)
    image_resize: cv2      # how the uint8 image is resized to each test size before normalising: cv2
                           # (cv2.INTER_LINEAR: mmcv, SwitchNorm_Segmentation) | pil (PIL BILINEAR: CSAIL)
    logits_resize: via_input  # via_input: the model's logits at the input size, then resized to the label
                           # size (mmseg); direct: the decode head's logits at its stride resized straight to
                           # the label size (CSAIL, SwitchNorm_Segmentation; whole mode without pad_to).
                           # Either way softmax follows the resize and the probabilities are averaged.
    pad_to: null           # [h, w]: zero-pad the normalised input at the bottom and right to at least this size
                           # and crop the logits back (the DeepLab v2 port's 513 x 513 test input)
    flip: false            # also average the horizontally mirrored prediction
    mode: whole            # whole | slide
    crop_size: null        # slide window [h, w] (int for square)
    stride: null           # slide stride [h, w]
    show_dir: null         # write image | prediction | label PNGs here

In a torch.distributed run every rank evaluates its shard (build_val_loader(rank=..., world_size=...)) and
the counts are summed over ranks in `SegmentationEvaluator.evaluate`, so every rank returns the dataset-wide
metrics.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from normkit.data.pixels import IMAGENET_RGB_MEAN, IMAGENET_RGB_STD, PixelNormalizer
from normkit.evaluation.evaluator import DatasetEvaluator, inference_on_dataset
from normkit.data.transforms import IMAGE_RESIZES, resize_image
from normkit.evaluation.inference import (LOGITS_RESIZES, MODES, average_probabilities, resize_normalised,
                                         size_pair, slide_windows)
from normkit.evaluation.metrics import SegmentationMetric
from normkit.evaluation.visualize import side_by_side
from normkit.schema import check_keys

__all__ = ["EVAL_KEYS", "SegmentationEvaluator", "SegmentationInference", "evaluate", "image_sizes"]

EVAL_KEYS = ("scales", "short_sides", "max_long_side", "size_multiple", "image_resize", "logits_resize", "flip",
             "mode", "crop_size", "stride", "pad_to", "show_dir")


def check_eval_config(eval_cfg: dict | None) -> dict:
    """The `evaluation:` section with its keys and values checked (clear errors before any work starts)."""
    eval_cfg = dict(eval_cfg or {})
    check_keys(eval_cfg, EVAL_KEYS, "evaluation")
    for key in ("scales", "short_sides"):
        values = eval_cfg.get(key)
        if values is not None and (not isinstance(values, (list, tuple)) or not values
                                   or not all(_positive_number(v) for v in values)):
            raise ValueError(f"evaluation.{key} must be a non-empty list of positive numbers, got {values!r}")
    if eval_cfg.get("mode", "whole") not in MODES:
        raise ValueError(f"unknown evaluation.mode {eval_cfg['mode']!r}; choose one of {', '.join(MODES)}")
    multiple = eval_cfg.get("size_multiple")
    if multiple is not None and (not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0):
        raise ValueError(f"evaluation.size_multiple must be a positive int, got {multiple!r}")
    if eval_cfg.get("pad_to") is not None and eval_cfg.get("mode", "whole") != "whole":
        raise ValueError("evaluation.pad_to applies to whole-image inference (mode: whole)")
    if eval_cfg.get("image_resize", "cv2") not in IMAGE_RESIZES:
        raise ValueError(f"unknown evaluation.image_resize {eval_cfg['image_resize']!r}; choose one of "
                         f"{', '.join(IMAGE_RESIZES)}")
    logits_resize = eval_cfg.get("logits_resize", "via_input")
    if logits_resize not in LOGITS_RESIZES:
        raise ValueError(f"unknown evaluation.logits_resize {logits_resize!r}; choose one of "
                         f"{', '.join(LOGITS_RESIZES)}")
    if logits_resize == "direct" and (eval_cfg.get("mode", "whole") != "whole" or eval_cfg.get("pad_to") is not None):
        raise ValueError("evaluation.logits_resize: direct applies to whole-image inference without pad_to")
    for key in ("crop_size", "stride", "pad_to"):
        if eval_cfg.get(key) is not None:
            size_pair(eval_cfg[key], f"evaluation.{key}")
    if eval_cfg.get("mode") == "slide":
        slide_windows(eval_cfg.get("crop_size"), eval_cfg.get("stride"))
    max_long = eval_cfg.get("max_long_side", 1000)
    if not _positive_number(max_long):
        raise ValueError(f"evaluation.max_long_side must be a positive number, got {max_long!r}")
    return eval_cfg


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def image_sizes(eval_cfg: dict, height: int, width: int) -> list[tuple[int, int]]:
    """The test sizes (h, w) of one image, each side rounded as `size_multiple` says: with `short_sides`, one per
    (`scales` ratio, short side) pair, the short side scaled to int(short side * ratio) unless the long side would
    pass int(max_long_side * ratio) (mmseg's MultiScaleFlipAug truncates the scaled img_scale); without, one per
    `scales` multiplier of the image's size."""
    ratios = list(eval_cfg.get("scales") or [1.0])
    if eval_cfg.get("short_sides"):
        max_long = eval_cfg.get("max_long_side", 1000)
        scales = [min(max(1, int(s * r)) / min(height, width), max(1, int(max_long * r)) / max(height, width))
                  for r in ratios for s in eval_cfg["short_sides"]]
    else:
        scales = ratios
    multiple = eval_cfg.get("size_multiple")
    if multiple:
        # CSAIL's ValDataset: int() first, then round2nearest_multiple, ((x - 1) // p + 1) * p
        return [tuple(max(multiple, ((int(side * scale) - 1) // multiple + 1) * multiple) for side in (height, width))
                for scale in scales]
    return [tuple(max(1, int(side * scale + 0.5)) for side in (height, width)) for scale in scales]


class SegmentationInference(nn.Module):
    """Test-time wrapper: ``wrapper(batch)`` returns class probabilities [B, K, H, W] at the labels' size
    (the images' size when the batch has no labels), averaged over the configured scales, flips and windows.

    Given the `normalizer` of the batch's images, each test size is made as the originals make it: the batch's
    ``images_uint8`` (uint8 RGB [B, H, W, 3], as build_val_loader yields) resized with `image_resize`, then
    normalised. Without them (or without a normalizer) the normalised ``images`` are resized as float tensors."""

    def __init__(self, model: nn.Module, eval_cfg: dict | None = None, normalizer: PixelNormalizer | None = None):
        super().__init__()
        self.model = model
        self.eval_cfg = check_eval_config(eval_cfg)
        self.normalizer = normalizer

    def _test_input(self, batch, size) -> torch.Tensor:
        images = batch["images"]
        if tuple(size) == tuple(images.shape[-2:]) or self.normalizer is None or "images_uint8" not in batch:
            return resize_normalised(images, size)
        backend = self.eval_cfg.get("image_resize", "cv2")
        resized = [self.normalizer.to_tensor(resize_image(image.cpu().numpy(), *size, backend))
                   for image in batch["images_uint8"]]
        return torch.stack(resized).to(images.device)

    def forward(self, batch) -> torch.Tensor:
        images = batch["images"]
        out_size = batch["labels"].shape[-2:] if "labels" in batch else images.shape[-2:]
        cfg = self.eval_cfg
        inputs = (self._test_input(batch, size) for size in image_sizes(cfg, *images.shape[-2:]))
        return average_probabilities(self.model, inputs, out_size, flip=bool(cfg.get("flip", False)),
                                     mode=cfg.get("mode", "whole"), crop_size=cfg.get("crop_size"),
                                     stride=cfg.get("stride"), pad_to=cfg.get("pad_to"),
                                     logits_resize=cfg.get("logits_resize", "via_input"))


class SegmentationEvaluator(DatasetEvaluator):
    """Confusion-based metrics (SegmentationMetric) of the argmax of per-pixel scores [B, K, H, W] against
    the batch's ``labels``; optionally writes image | prediction | label panels (``show_dir``, images
    de-normalised by the ``normalizer`` that encoded them; default: the segmentation default encoding, RGB 0..1
    with ImageNet mean and std)."""

    def __init__(self, num_classes: int, *, class_names=None, ignore_index: int = 255, show_dir=None,
                 normalizer: PixelNormalizer | None = None):
        self.metric = SegmentationMetric(num_classes, ignore_index)
        self.class_names = list(class_names) if class_names else None
        self.show_dir = Path(show_dir) if show_dir else None
        self.normalizer = normalizer or PixelNormalizer("rgb", 1, IMAGENET_RGB_MEAN, IMAGENET_RGB_STD)

    def reset(self) -> None:
        self.metric.reset()
        if self.show_dir is not None:
            self.show_dir.mkdir(parents=True, exist_ok=True)

    def process(self, inputs, outputs) -> None:
        pred = outputs.argmax(dim=1)
        labels = inputs["labels"]
        self.metric.update(pred, labels)
        if self.show_dir is not None:
            for i, name in enumerate(inputs["meta"]["names"]):
                panel = side_by_side(self.normalizer.denormalize(inputs["images"][i]), pred[i].cpu().numpy(),
                                     labels[i].cpu().numpy())
                Image.fromarray(panel).save(self.show_dir / f"{name}.png")

    def evaluate(self) -> dict:
        local = self.metric.counts.clone()
        self.metric.all_reduce()
        results = self.metric.compute()
        self.metric.counts = local  # this rank's counts again: evaluating twice must not sum the ranks twice
        if self.class_names:
            results["class_names"] = list(self.class_names)
        return results


def evaluate(model: nn.Module, loader, eval_cfg: dict | None = None, num_classes: int | None = None) -> dict:
    """Metrics of `model` on a segmentation val loader (batches {"images", "labels", "meta"}): the dict of
    SegmentationMetric.compute() plus "class_names" when the loader's dataset has them. `num_classes`
    defaults to the dataset's."""
    samples = getattr(loader, "dataset", None)  # build_val_loader's mapped dataset: num_classes, names, normalizer
    num_classes = num_classes or getattr(samples, "num_classes", None)
    if num_classes is None:
        raise ValueError("evaluate needs num_classes when the loader's dataset does not state it")
    eval_cfg = check_eval_config(eval_cfg)
    evaluator = SegmentationEvaluator(num_classes, class_names=getattr(samples, "class_names", None),
                                      show_dir=eval_cfg.get("show_dir"),
                                      normalizer=getattr(samples, "normalizer", None))
    wrapper = SegmentationInference(model, eval_cfg, normalizer=getattr(samples, "normalizer", None))
    return inference_on_dataset(wrapper, loader, evaluator)
