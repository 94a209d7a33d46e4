"""Training and validation pipelines on decoded samples (uint8 RGB image [H, W, 3], uint8 label [H, W]).

Every random choice draws from an explicit `numpy.random.Generator` passed in by the loader, never from a
global RNG, so a batch is a pure function of (seed, iteration, sample index) and resuming reproduces it.

- CSAIL (ADE20K scene parsing framework): one short side per batch drawn from a list, long side capped,
  random horizontal flip; the batch is padded to a multiple of 8 (32 for UPerNet) with ignored labels.
  Labels stay at full resolution (nearest resize); the model downsamples them to its decoder stride.
- mmseg (CondNet): ratio-range rescale of a reference scale, random crop whose largest class covers at
  most `cat_max_ratio` of the labelled pixels, flip, photometric distortion, pad to the crop with ignore.
- DeepLab v2 port: every image squashed to one square size (321x321, aspect ratio not kept), then to a
  random fraction of it (0.5-1.3), flip; no crop.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from PIL import Image

from normkit.data.base import IGNORE_INDEX

IMAGE_RESIZES = ("cv2", "pil")


def resize_image(image: np.ndarray, height: int, width: int, backend: str = "cv2") -> np.ndarray:
    """Bilinear resize of a uint8 image [H, W, 3] with the library a recipe uses: "cv2" (cv2.INTER_LINEAR; mmcv,
    SwitchNorm_Segmentation) or "pil" (PIL BILINEAR, which widens its filter when shrinking; CSAIL). Both round
    to uint8 as the originals feed their normalisation."""
    if backend not in IMAGE_RESIZES:
        raise ValueError(f"unknown image resize '{backend}'; choose one of {', '.join(IMAGE_RESIZES)}")
    if (height, width) == image.shape[:2]:
        return image
    if backend == "pil":
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_pair(image: np.ndarray, label: np.ndarray, height: int, width: int, backend: str = "cv2"):
    """Bilinear image, nearest label (label values must never be interpolated), with the library a recipe uses
    (see `resize_image`; "pil" takes a uint8 image). PIL's nearest samples pixel centres like its bilinear;
    cv2's INTER_NEAREST is the one cv2 recipes used."""
    if (height, width) == image.shape[:2]:
        return image, label
    if backend == "pil":
        return (resize_image(image, height, width, "pil"),
                np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST)))
    return (cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST))


def hflip_pair(image: np.ndarray, label: np.ndarray):
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1])


class CSAILTrainTransform:
    """Rescale so the short side is the batch's `short_side` unless that makes the long side exceed
    `max_long_side` (each side truncated to whole pixels, as CSAIL's int32 size arrays do), then flip with
    probability 1/2. `image_resize`: "pil" (CSAIL's PIL BILINEAR / NEAREST) or "cv2"."""

    def __init__(self, short_sides=(300, 375, 450, 525, 600), max_long_side: int = 1000, flip: bool = True,
                 image_resize: str = "cv2"):
        if not short_sides:
            raise ValueError("CSAIL pipeline needs at least one short side (data.train.short_sides)")
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"unknown data.train.image_resize {image_resize!r}; choose one of "
                             f"{', '.join(IMAGE_RESIZES)}")
        self.short_sides = tuple(int(s) for s in short_sides)
        self.max_long_side = int(max_long_side)
        self.flip = flip
        self.image_resize = image_resize

    def __call__(self, image, label, rng: np.random.Generator, short_side: int):
        h, w = image.shape[:2]
        scale = min(short_side / min(h, w), self.max_long_side / max(h, w))
        image, label = resize_pair(image, label, max(1, int(h * scale)), max(1, int(w * scale)), self.image_resize)
        if self.flip and rng.random() < 0.5:
            image, label = hflip_pair(image, label)
        return image, label


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `imrescale` with keep_ratio: the largest size with long side <= max(scale), short <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def crop_with_cat_max_ratio(label: np.ndarray, crop: tuple[int, int], cat_max_ratio: float,
                            rng: np.random.Generator, tries: int = 10) -> tuple[int, int]:
    """Top-left corner of a random crop, re-drawn while one class covers `cat_max_ratio` or more of its labelled
    pixels, so crops are not all sky or all wall. As mmseg's RandomCrop: after `tries` failed checks the next
    draw is taken unchecked."""
    h, w = label.shape
    ch, cw = crop

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

    y, x = draw()
    if cat_max_ratio < 1:
        for _ in range(tries):
            values, counts = np.unique(label[y:y + ch, x:x + cw], return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return y, x


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18):
    """mmseg 0.x PhotoMetricDistortion of a uint8 RGB image: brightness, then contrast either before or after
    saturation and hue, each step with probability 1/2. As mmseg, every step returns to uint8 (clipped, then
    truncated) and saturation and hue work on OpenCV's uint8 HSV, the hue (0..179) shifted by an integer in
    [-hue_delta, hue_delta). Returns float32 0..255."""

    def convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(img: np.ndarray) -> np.ndarray:
        return convert(img, alpha=rng.uniform(*contrast_range)) if rng.random() < 0.5 else img

    img = image.astype(np.uint8)
    if rng.random() < 0.5:
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.random() < 0.5
    if contrast_first:
        img = contrast(img)
    if rng.random() < 0.5:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.random() < 0.5:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        img = contrast(img)
    return img.astype(np.float32)


class MMSegTrainTransform:
    """Ratio-range rescale of `scale` (w, h order irrelevant: long/short), cat_max_ratio crop, flip,
    photometric distortion, pad to `crop_size` with ignored labels."""

    def __init__(self, scale=(2048, 512), ratio_range=(0.5, 2.0), crop_size=(512, 512), cat_max_ratio: float = 0.75,
                 flip: bool = True, photometric: bool = True):
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip = flip
        self.photometric = photometric
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {ratio_range}")

    def __call__(self, image, label, rng: np.random.Generator, short_side=None):
        ratio = rng.uniform(*self.ratio_range)
        # mmcv's RandomResize truncates the scaled reference size to whole pixels before the keep-ratio rescale
        h, w = rescale_size(*image.shape[:2], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image, label = resize_pair(image, label, h, w)
        y, x = crop_with_cat_max_ratio(label, self.crop_size, self.cat_max_ratio, rng)
        ch, cw = self.crop_size
        image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if self.flip and rng.random() < 0.5:
            image, label = hflip_pair(image, label)
        if self.photometric:
            image = photometric_distortion(image, rng)
        return image, label


class DeepLabV2TrainTransform:
    """The DeepLab v2 port's `get_data_from_chunk_v2`: resize to `size` (h, w), then to int(s * h) x int(s * w)
    with s uniform in `ratio_range`, both bilinear on the float image (nearest for labels), then flip with
    probability 1/2. Returns a float32 0..255 image."""

    def __init__(self, size=(321, 321), ratio_range=(0.5, 1.3), flip: bool = True):
        self.size = (int(size[0]), int(size[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.flip = flip
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {ratio_range}")

    def __call__(self, image, label, rng: np.random.Generator, short_side=None):
        scale = rng.uniform(*self.ratio_range)
        # float resizes as the port (it reads with cv2 and converts to float before resizing)
        image, label = resize_pair(image.astype(np.float32), label, *self.size)
        height, width = max(1, int(self.size[0] * scale)), max(1, int(self.size[1] * scale))
        image, label = resize_pair(image, label, height, width)
        if self.flip and rng.random() < 0.5:
            image, label = hflip_pair(image, label)
        return image, label


def pad_batch(images: list[torch.Tensor], labels: list[torch.Tensor], multiple: int = 1, min_size=(0, 0)):
    """Stack [3, h, w] images and [h, w] labels into [B, 3, H, W] / int64 [B, H, W], padding bottom/right to
    the largest size (at least `min_size`) rounded up to `multiple`: images with 0 (the mean colour after
    normalisation), labels with the ignore index."""
    height = max(max(im.shape[1] for im in images), min_size[0])
    width = max(max(im.shape[2] for im in images), min_size[1])
    height, width = math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple
    out_images = images[0].new_zeros(len(images), 3, height, width)
    out_labels = torch.full((len(labels), height, width), IGNORE_INDEX, dtype=torch.int64)
    for i, (im, lb) in enumerate(zip(images, labels)):
        out_images[i, :, :im.shape[1], :im.shape[2]] = im
        out_labels[i, :lb.shape[0], :lb.shape[1]] = lb
    return out_images, out_labels
