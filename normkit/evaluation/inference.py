"""Multi-scale, flip, whole-image and sliding-window inference for segmentation models.

The model contract (eval mode): `model(images [B, 3, h, w])` -> class logits [B, K, h, w]. For every scale s
the image is resized bilinearly to int(s*H + 0.5) x int(s*W + 0.5) (or to each of the given sizes); the logits (averaged over overlapping windows in
"slide" mode) are turned into probabilities with softmax, resized back to the original size and averaged
over scales and, with flip, over the mirrored input as well (mmseg `aug_test`, CSAIL multi-scale testing).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("whole", "slide")


def _pair(value, name: str) -> tuple[int, int]:
    if value is None:
        raise ValueError(f"sliding-window inference needs `{name}` (an int or [height, width])")
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def _logits(model, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    if not torch.is_tensor(out) or out.dim() != 4 or out.shape[0] != images.shape[0]:
        raise RuntimeError(f"the model must return logits [B, K, H, W] in eval mode, got "
                           f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    if out.shape[-2:] != images.shape[-2:]:
        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out


def padded_logits(model, images: torch.Tensor, pad_to) -> torch.Tensor:
    """Logits of `images` zero-padded at the bottom and right to at least `pad_to`, cropped back to the images'
    size (the DeepLab v2 port evaluates every image inside a 513 x 513 zero canvas of normalised values)."""
    ph, pw = _pair(pad_to, "pad_to")
    _, _, h, w = images.shape
    padded = F.pad(images, (0, max(pw - w, 0), 0, max(ph - h, 0)))
    return _logits(model, padded)[:, :, :h, :w]


def slide_logits(model, images: torch.Tensor, crop_size, stride) -> torch.Tensor:
    """Logits averaged over windows of `crop_size` placed every `stride` (the last window of a row/column
    is shifted back to end at the border; images smaller than the crop are run whole)."""
    ch, cw = _pair(crop_size, "crop_size")
    sh, sw = _pair(stride, "stride")
    _, _, h, w = images.shape
    rows = max(math.ceil((h - ch) / sh), 0) + 1
    cols = max(math.ceil((w - cw) / sw), 0) + 1
    total = None
    count = images.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, max(h - ch, 0)), min(c * sw, max(w - cw, 0))
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            logits = _logits(model, images[:, :, y1:y2, x1:x2])
            if total is None:
                total = images.new_zeros(images.shape[0], logits.shape[1], h, w)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def inference(model, images: torch.Tensor, scales=(1.0,), flip: bool = False, mode: str = "whole",
              crop_size=None, stride=None, out_size=None, sizes=None, pad_to=None) -> torch.Tensor:
    """Class probabilities [B, K, H', W'] for normalised images [B, 3, H, W], averaged over `scales` (image
    size multipliers; or explicit `sizes` [(h, w), ...] instead) and, with `flip`, horizontal mirroring.
    (H', W') = `out_size` or (H, W). `pad_to` [h, w] (whole mode): each input is zero-padded to at least that
    size for the forward pass and its logits cropped back."""
    if mode not in MODES:
        raise ValueError(f"unknown inference mode '{mode}'; choose one of {', '.join(MODES)}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be Tensor[B, 3, H, W], got {tuple(images.shape)}")
    if pad_to is not None and mode != "whole":
        raise ValueError("pad_to applies to whole-image inference")
    _, _, h, w = images.shape
    if sizes is None:
        sizes = [(max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))) for scale in scales]
    if not sizes:
        raise ValueError("inference needs at least one scale")
    out_size = tuple(out_size) if out_size is not None else (h, w)
    probs = None
    views = (False, True) if flip else (False,)
    for size in sizes:
        size = tuple(size)
        scaled = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for mirrored in views:
            x = scaled.flip(-1) if mirrored else scaled
            if mode == "slide":
                logits = slide_logits(model, x, crop_size, stride)
            else:
                logits = _logits(model, x) if pad_to is None else padded_logits(model, x, pad_to)
            p = logits.float().softmax(dim=1)
            if mirrored:
                p = p.flip(-1)
            if p.shape[-2:] != out_size:
                p = F.interpolate(p, size=out_size, mode="bilinear", align_corners=False)
            probs = p if probs is None else probs + p
    return probs / (len(sizes) * len(views))
