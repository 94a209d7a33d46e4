"""A fixed colour palette and `image | prediction | label` panels for segmentation results."""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def make_palette() -> np.ndarray:
    """uint8 [256, 3]: class k gets the PASCAL VOC colour of index k + 1 (bit-interleaved, so neighbouring
    classes differ strongly); the ignore index 255 is black."""
    palette = np.zeros((256, 3), np.uint8)
    for k in range(255):
        code, rgb = k + 1, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette[k] = rgb
    return palette


PALETTE = make_palette()


def colorize(label: np.ndarray) -> np.ndarray:
    """Class map [H, W] (0..254, 255 ignored) -> RGB uint8 [H, W, 3]."""
    return PALETTE[np.asarray(label).astype(np.int64).clip(0, 255)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour map of `label` over the RGB uint8 `image`; ignored pixels keep the image."""
    colour = colorize(label).astype(np.float32)
    blended = image.astype(np.float32) * (1 - alpha) + colour * alpha
    keep = (np.asarray(label) == IGNORE_INDEX)[..., None]
    return np.where(keep, image, blended).round().astype(np.uint8)


def side_by_side(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
    """One RGB panel: image | prediction colours | label colours (ignored pixels black)."""
    panels = [np.asarray(image, np.uint8), colorize(pred)]
    if label is not None:
        panels.append(colorize(label))
    return np.concatenate(panels, axis=1)

