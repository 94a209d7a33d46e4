"""Pixel normalisation of model inputs, one implementation for every task.

Each published recipe feeds its network a different encoding of the same uint8 RGB image; the config states it
with four `data:` keys (defaults depend on the task, see `PixelNormalizer.from_config`)::

    pixel_order: rgb | bgr      # channel order of the model input
    pixel_scale: 1 | 255        # 1: values 0..1 before mean/std, 255: values 0..255
    mean: [m0, m1, m2]          # per channel, in pixel_order and pixel_scale
    std: [s0, s1, s2]

Known encodings: CSAIL and mmseg (CondNet) use RGB 0..1 with ImageNet mean/std; SwitchNorm_Segmentation and
Detectron-1 BGR 0..255 minus the Caffe means [102.9801, 115.9465, 122.7717]; the DeepLab v2 port BGR 0..255 minus
[104.008, 116.669, 122.675].
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["CAFFE_BGR_MEAN", "IMAGENET_RGB_MEAN", "IMAGENET_RGB_STD", "PIXEL_KEYS", "PixelNormalizer"]

CAFFE_BGR_MEAN = (102.9801, 115.9465, 122.7717)
IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)
PIXEL_KEYS = ("pixel_order", "pixel_scale", "mean", "std")


class PixelNormalizer:
    """uint8 (or float 0..255) RGB [H, W, 3] -> float32 [H, W, 3] in `order`, divided by 255 when `scale` is 1,
    minus `mean`, divided by `std` (Detectron-1 PIXEL_ORDER / PIXEL_MEANS / PIXEL_STDS)."""

    def __init__(self, order: str = "bgr", scale: float = 255, mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0)):
        order = str(order).lower()
        if order not in ("rgb", "bgr"):
            raise ValueError(f"unknown pixel order '{order}' (data.pixel_order); choose rgb or bgr")
        if float(scale) not in (1.0, 255.0):
            raise ValueError(f"data.pixel_scale must be 255 (values 0..255) or 1 (values 0..1), got {scale}")
        if len(mean) != 3 or len(std) != 3 or min(float(s) for s in std) <= 0:
            raise ValueError(f"data.mean and data.std need 3 values each and std > 0, got {mean} and {std}")
        self.order, self.scale = order, float(scale)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    @classmethod
    def from_config(cls, data_cfg: dict, *, order: str, scale: float, mean, std) -> "PixelNormalizer":
        """The normaliser of a `data:` section; the keyword arguments are the task's defaults for absent keys."""
        return cls(data_cfg.get("pixel_order", order), data_cfg.get("pixel_scale", scale),
                   data_cfg.get("mean", mean), data_cfg.get("std", std))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = image[..., ::-1] if self.order == "bgr" else image
        x = x.astype(np.float32)
        if self.scale == 1.0:
            x /= 255.0
        return (x - self.mean) / self.std

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """RGB [H, W, 3] -> the model input float32 [3, H, W]."""
        return torch.from_numpy(np.ascontiguousarray(self(image).transpose(2, 0, 1)))

    def denormalize(self, image: torch.Tensor) -> np.ndarray:
        """The inverse of `to_tensor` for display: normalised [3, H, W] -> RGB uint8 [H, W, 3]."""
        x = image.detach().float().cpu().numpy().transpose(1, 2, 0) * self.std + self.mean
        if self.scale == 1.0:
            x = x * 255.0
        if self.order == "bgr":
            x = x[..., ::-1]
        return np.ascontiguousarray(np.clip(np.round(x), 0, 255).astype(np.uint8))

    def __repr__(self) -> str:
        return (f"PixelNormalizer(order={self.order}, scale={self.scale:g}, mean={self.mean.tolist()}, "
                f"std={self.std.tolist()})")
