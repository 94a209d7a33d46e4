"""Mask head (4 convs + 2x2 deconv + per-class 1x1), mask targets inside RoIs, and pasting masks into images."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.models.detection.box_heads import msra_fill_
from normkit.nn import build_norm
from normkit.ops import roi_align

__all__ = ["MaskHead", "polygons_to_mask_in_box", "bitmap_to_mask_in_box", "paste_masks_detectron",
           "paste_masks_grid_sample", "polygons_bounding_box", "PASTE_MODES"]

PASTE_MODES = ("cv2", "grid_sample")


class MaskHead(nn.Module):
    """Detectron ``mask_rcnn_fcn_head_v1up4convs`` (with SN/GN: ``..._sn``/``..._gn``): ``num_conv`` x
    [3x3 conv 256, norm, ReLU], a 2x2 stride-2 transposed conv + ReLU, then a 1x1 conv with one logit map per
    class (``num_outputs`` = K + 1 with Detectron-1's background slot, K for detectron2).

    forward(Tensor[K, C, 14, 14]) -> Tensor[K, num_outputs, 28, 28] logits. Convs MSRAFill, biases 0.
    Keys: ``conv_fcn.{0,3,6,9}`` (conv), ``conv_fcn.{1,4,7,10}`` (norm), ``upconv``, ``predictor``.
    """

    def __init__(self, in_channels: int, num_outputs: int, *, num_conv: int = 4, conv_dim: int = 256,
                 dilation: int = 1, norm=None, norm_kwargs: Optional[Mapping] = None):
        super().__init__()
        use_norm = norm not in (None, "")
        layers = []
        channels = in_channels
        for _ in range(num_conv):
            conv = nn.Conv2d(channels, conv_dim, 3, padding=dilation, dilation=dilation, bias=not use_norm)
            layers += [conv, build_norm(norm, conv_dim, **dict(norm_kwargs or {})) if use_norm else nn.Identity(),
                       nn.ReLU(inplace=True)]
            channels = conv_dim
        self.conv_fcn = nn.Sequential(*layers)
        self.upconv = nn.ConvTranspose2d(channels, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_outputs, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                msra_fill_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.upconv(self.conv_fcn(x)))
        return self.predictor(x)


def polygons_bounding_box(polygons: Sequence[Tensor]) -> Tensor:
    """Tight box ``(min x, min y, max x, max y)`` of an instance's polygons (Detectron ``polys_to_boxes``)."""
    points = torch.cat([p.reshape(-1) for p in polygons]).reshape(-1, 2)
    return torch.cat((points.min(dim=0).values, points.max(dim=0).values))


def polygons_to_mask_in_box(polygons: Sequence[Tensor], box: Sequence[float], size: int) -> Tensor:
    """Rasterise polygons (each Tensor[2P] ``x0, y0, x1, y1, ...``) inside ``box`` to a ``size x size`` binary mask.

    Detectron ``polys_to_mask_wrt_box``: coordinates become ``(x - x1) * size / max(x2 - x1, 1)`` (same for y)
    and are rasterised with pycocotools (a dependency of normkit: ``pip install pycocotools``).
    """
    try:
        from pycocotools import mask as mask_util
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("rasterising polygon masks needs pycocotools (pip install pycocotools)") from exc
    x1, y1, x2, y2 = (np.float32(v) for v in box)  # float32 arithmetic throughout, as Detectron
    w = np.maximum(x2 - x1, np.float32(1))
    h = np.maximum(y2 - y1, np.float32(1))
    normed = []
    for poly in polygons:
        p = np.array(poly.detach().cpu().tolist() if isinstance(poly, Tensor) else poly, dtype=np.float32)
        p[0::2] = (p[0::2] - x1) * np.float32(size) / w
        p[1::2] = (p[1::2] - y1) * np.float32(size) / h
        normed.append(p.astype(np.float64).tolist())
    rle = mask_util.frPyObjects(normed, size, size)
    mask = np.array(mask_util.decode(rle), dtype=np.float32)
    if mask.ndim == 3:
        mask = mask.sum(axis=2)
    return torch.from_numpy((mask > 0).astype(np.float32))


def bitmap_to_mask_in_box(bitmap: Tensor, box: Tensor, size: int) -> Tensor:
    """Crop ``box`` out of a binary image Tensor[H, W] and resample it to ``size x size`` (RoIAlign with the
    half-pixel offset, as detectron2's ``BitMasks.crop_and_resize``), thresholded at 0.5."""
    rois = torch.cat((box.new_zeros(1), box.to(torch.float32))).reshape(1, 5)
    out = roi_align(bitmap.to(torch.float32)[None, None], rois.to(bitmap.device), (size, size), 1.0, 0, True)
    return (out[0, 0] >= 0.5).to(torch.float32)


def _expand_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return np.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), axis=1)


def paste_masks_detectron(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int],
                          threshold: float = 0.5) -> Tensor:
    """Detectron-1 ``segm_results``: paste M x M mask probabilities Tensor[N, M, M] into an image of
    ``image_size = (H, W)`` at boxes Tensor[N, 4] -> uint8 Tensor[N, H, W].

    Each mask is zero-padded to (M + 2) x (M + 2), its box expanded by (M + 2) / M about the centre and cast to
    int32, the padded mask resized with ``cv2.resize`` (bilinear) to ``(x2 - x1 + 1, y2 - y1 + 1)`` and
    thresholded with ``> threshold``.
    """
    import cv2

    h_img, w_img = int(image_size[0]), int(image_size[1])
    n = masks.shape[0]
    out = np.zeros((n, h_img, w_img), dtype=np.uint8)
    if n == 0:
        return torch.from_numpy(out)
    m = masks.shape[-1]
    probs = masks.detach().to(torch.float32).cpu().numpy()
    ref = _expand_boxes(boxes.detach().to(torch.float32).cpu().numpy(), (m + 2.0) / m).astype(np.int32)
    padded = np.zeros((m + 2, m + 2), dtype=np.float32)
    for i in range(n):
        padded[1:-1, 1:-1] = probs[i]
        x1, y1, x2, y2 = (int(v) for v in ref[i])
        w = max(x2 - x1 + 1, 1)
        h = max(y2 - y1 + 1, 1)
        mask = (cv2.resize(padded, (w, h)) > threshold).astype(np.uint8)
        x0, x1c = max(x1, 0), min(x2 + 1, w_img)
        y0, y1c = max(y1, 0), min(y2 + 1, h_img)
        if x1c > x0 and y1c > y0:
            out[i, y0:y1c, x0:x1c] = mask[y0 - y1:y1c - y1, x0 - x1:x1c - x1]
    return torch.from_numpy(out)


# Pixels (detections x image pixels) per grid_sample call: its grid holds 8 bytes a pixel, so 100 detections on an
# 800x1333 image at once would take 850 MB; chunks of 2^24 pixels keep it at 128 MB (detectron2 chunks on GPU too).
PASTE_CHUNK_PIXELS = 1 << 24


def paste_masks_grid_sample(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int],
                            threshold: float = 0.5) -> Tensor:
    """detectron2 ``paste_masks_in_image``: sample each mask at the pixel centres inside its box (bilinear
    ``grid_sample``, no padding) -> uint8 Tensor[N, H, W] with ``>= threshold``."""
    h_img, w_img = int(image_size[0]), int(image_size[1])
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, h_img, w_img), dtype=torch.uint8, device=masks.device)
    boxes = boxes.to(torch.float32)
    ys = torch.arange(h_img, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w_img, device=masks.device, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    gx = (xs[None, :] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1
    gy = (ys[None, :] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1
    out = torch.empty((n, h_img, w_img), dtype=torch.uint8, device=masks.device)
    step = max(1, PASTE_CHUNK_PIXELS // (h_img * w_img))
    for start in range(0, n, step):
        part = slice(start, start + step)
        k = gx[part].shape[0]
        grid = torch.stack((gx[part, None, :].expand(k, h_img, w_img), gy[part, :, None].expand(k, h_img, w_img)),
                           dim=3)
        pasted = F.grid_sample(masks[part, None].to(torch.float32), grid, align_corners=False)[:, 0]
        out[part] = pasted >= threshold
    return out
