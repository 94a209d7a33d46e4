"""Multi-scale, flip, whole-image and sliding-window inference for segmentation models.

The model contract (eval mode): `model(images [B, 3, h, w])` -> class logits [B, K, h, w]. Each test input
(the image at one test size, and with flip also its mirror) gives logits that are resized bilinearly to the
output size, turned into probabilities with softmax there, and averaged over inputs: the order of CSAIL's
decoders (interpolate to segSize, then softmax) and of mmseg's `inference` / `aug_test` (logits rescaled to the
original shape, softmax, flipped back, averaged).

`logits_resize` says which logits reach that resize:

- ``via_input`` (default, mmseg): the model's logits at the input size (its `forward`), then resized to the
  output size, two bilinear steps in all;
- ``direct`` (CSAIL, SwitchNorm_Segmentation): the decode head's logits at its own stride, from the model's
  `head_logits(images)`, resized straight to the output size in one step.

`inference` resizes the given normalised images itself (bilinear on the float tensor); the originals resize
the 8-bit image before normalising, which `normkit.evaluation.SegmentationInference` does for loader batches.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

MODES = ("whole", "slide")
LOGITS_RESIZES = ("via_input", "direct")


def resize_normalised(images: torch.Tensor, size) -> torch.Tensor:
    """Normalised images [B, 3, H, W] resized bilinearly (align_corners=False) to `size` (h, w)."""
    if tuple(size) == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)


def size_pair(value, name: str) -> tuple[int, int]:
    """(height, width) from an int or an [height, width] pair of positive ints."""
    if value is None:
        raise ValueError(f"sliding-window inference needs `{name}` (an int or [height, width])")
    pair = [value, value] if isinstance(value, int) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in pair)):
        raise ValueError(f"{name} must be a positive int or [height, width], got {value!r}")
    return pair[0], pair[1]


def slide_windows(crop_size, stride) -> tuple[tuple[int, int], tuple[int, int]]:
    """The checked (crop, stride) of sliding-window inference: a stride longer than the crop would leave pixels
    that no window covers (mmseg asserts the same)."""
    crop, step = size_pair(crop_size, "crop_size"), size_pair(stride, "stride")
    if step[0] > crop[0] or step[1] > crop[1]:
        raise ValueError(f"sliding-window stride {list(step)} exceeds crop_size {list(crop)}: pixels between the "
                         f"windows would have no prediction")
    return crop, step


def _logits(model, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    if not torch.is_tensor(out) or out.dim() != 4 or out.shape[0] != images.shape[0]:
        raise RuntimeError(f"the model must return logits [B, K, H, W] in eval mode, got "
                           f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
    if out.shape[-2:] != images.shape[-2:]:
        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out


def _head_logits(model, images: torch.Tensor) -> torch.Tensor:
    head_logits = getattr(model, "head_logits", None)
    if head_logits is None:
        raise TypeError(f"logits_resize 'direct' needs the model's head_logits(images) (the decode head's logits at "
                        f"its stride; normkit's segmentation models have it), {type(model).__name__} has none: "
                        f"use logits_resize 'via_input'")
    return head_logits(images)


def padded_logits(model, images: torch.Tensor, pad_to) -> torch.Tensor:
    """Logits of `images` zero-padded at the bottom and right to at least `pad_to`, cropped back to the images'
    size (the DeepLab v2 port evaluates every image inside a 513 x 513 zero canvas of normalised values)."""
    ph, pw = size_pair(pad_to, "pad_to")
    _, _, h, w = images.shape
    padded = F.pad(images, (0, max(pw - w, 0), 0, max(ph - h, 0)))
    return _logits(model, padded)[:, :, :h, :w]


def slide_logits(model, images: torch.Tensor, crop_size, stride) -> torch.Tensor:
    """Logits averaged over windows of `crop_size` placed every `stride` (the last window of a row/column
    is shifted back to end at the border; images smaller than the crop are run whole)."""
    (ch, cw), (sh, sw) = slide_windows(crop_size, stride)
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
def average_probabilities(model, inputs: Iterable[torch.Tensor], out_size, *, flip: bool = False,
                          mode: str = "whole", crop_size=None, stride=None, pad_to=None,
                          logits_resize: str = "via_input") -> torch.Tensor:
    """Class probabilities [B, K, *out_size] averaged over `inputs` (normalised images [B, 3, h, w], one per test
    size) and, with `flip`, their horizontal mirrors; see the module notes for the order of resize and softmax.
    `pad_to` [h, w] (whole mode): each input is zero-padded to at least that size for the forward pass and its
    logits cropped back."""
    if mode not in MODES:
        raise ValueError(f"unknown inference mode '{mode}'; choose one of {', '.join(MODES)}")
    if logits_resize not in LOGITS_RESIZES:
        raise ValueError(f"unknown logits_resize '{logits_resize}'; choose one of {', '.join(LOGITS_RESIZES)}")
    if pad_to is not None and mode != "whole":
        raise ValueError("pad_to applies to whole-image inference")
    if logits_resize == "direct" and (mode != "whole" or pad_to is not None):
        raise ValueError("logits_resize 'direct' applies to whole-image inference without pad_to (windows and "
                         "canvases are cropped at the input size)")
    out_size = tuple(out_size)
    total, count = None, 0
    for images in inputs:
        for mirrored in ((False, True) if flip else (False,)):
            x = images.flip(-1) if mirrored else images
            if logits_resize == "direct":
                logits = _head_logits(model, x)
            elif mode == "slide":
                logits = slide_logits(model, x, crop_size, stride)
            else:
                logits = _logits(model, x) if pad_to is None else padded_logits(model, x, pad_to)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 up, float64 kept
            if logits.shape[-2:] != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            if mirrored:
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
            count += 1
    if total is None:
        raise ValueError("inference needs at least one scale")
    return total / count


def inference(model, images: torch.Tensor, scales=(1.0,), flip: bool = False, mode: str = "whole",
              crop_size=None, stride=None, out_size=None, sizes=None, pad_to=None,
              logits_resize: str = "via_input") -> torch.Tensor:
    """Class probabilities [B, K, H', W'] for normalised images [B, 3, H, W], averaged over `scales` (image
    size multipliers: int(s*H + 0.5) x int(s*W + 0.5); or explicit `sizes` [(h, w), ...] instead) and, with
    `flip`, horizontal mirroring. The images are resized bilinearly as float tensors. (H', W') = `out_size` or
    (H, W); the other arguments as `average_probabilities`."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be Tensor[B, 3, H, W], got {tuple(images.shape)}")
    _, _, h, w = images.shape
    if sizes is None:
        sizes = [(max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))) for scale in scales]
    scaled = (resize_normalised(images, size) for size in sizes)
    return average_probabilities(model, scaled, out_size if out_size is not None else (h, w), flip=flip, mode=mode,
                                 crop_size=crop_size, stride=stride, pad_to=pad_to, logits_resize=logits_resize)
