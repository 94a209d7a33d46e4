"""Drawing detection predictions: boxes, class names, scores and mask overlays on the original image."""
from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["DETECTION_COLOURS", "draw_detections"]

# Distinct, saturated RGB colours cycled over the classes.
DETECTION_COLOURS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], np.uint8)


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def draw_detections(image_rgb_uint8: np.ndarray, prediction: dict, class_names, score_threshold: float = 0.5,
                    mask_alpha: float = 0.45) -> np.ndarray:
    """A copy of `image_rgb_uint8` ([H, W, 3] uint8 RGB) with the detections of `prediction` scoring at least
    `score_threshold` drawn on it: a translucent mask and its outline (when "masks" [N, H, W] is present), the
    box, and a "name score" label above the box; colours by class. `prediction` follows the detection
    contract in original-image pixels ("boxes" [N, 4] xyxy, "scores" [N], "labels" [N] in 0..K-1).
    Returns an [H, W, 3] uint8 RGB image; lower-scoring detections are drawn first so the best stay on top."""
    image = np.asarray(image_rgb_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_detections needs a uint8 RGB image [H, W, 3], got {image.dtype} "
                         f"{list(image.shape)}")
    out = image.copy()
    h, w = out.shape[:2]
    boxes = _numpy(prediction["boxes"]).reshape(-1, 4)
    scores = _numpy(prediction["scores"]).reshape(-1)
    labels = _numpy(prediction["labels"]).reshape(-1).astype(np.int64)
    masks = _numpy(prediction["masks"]) if prediction.get("masks") is not None else None
    if masks is not None and (masks.ndim != 3 or masks.shape[1:] != (h, w)):
        raise ValueError(f"masks must be [N, {h}, {w}] (the image size), got {list(masks.shape)}")
    keep = np.flatnonzero(scores >= score_threshold)
    keep = keep[np.argsort(scores[keep], kind="stable")]
    thickness = max(1, round(min(h, w) / 200))
    font_scale = max(0.3, min(h, w) / 600)
    for i in keep:
        label = int(labels[i])
        colour = DETECTION_COLOURS[label % len(DETECTION_COLOURS)]
        if masks is not None:
            m = masks[i] > 0
            out[m] = (out[m] * (1 - mask_alpha) + colour * mask_alpha).astype(np.uint8)
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, colour.tolist(), thickness)
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), colour.tolist(), thickness)
        name = class_names[label] if 0 <= label < len(class_names) else f"class_{label}"
        text = f"{name} {float(scores[i]):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(h - 1, y1 + th + 2)
        cv2.rectangle(out, (x1, ty - th - 1), (x1 + tw + 2, ty + base - 1), colour.tolist(), -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        cv2.putText(out, text, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0) if luminance > 140 else (255, 255, 255), 1, cv2.LINE_AA)
    return out
