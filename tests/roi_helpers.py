"""Box sets shared by the ROI op tests: random boxes plus the edge cases docs/design.md ("ROI ops and NMS") names."""
import math

import torch

NAN, INF = math.nan, math.inf


def random_rois(num: int, batch: int, image_h: float, image_w: float, *, dtype=torch.float32) -> torch.Tensor:
    """Tensor[num, 5] of boxes of varied sizes, some reaching past the image border."""
    x1 = torch.rand(num, dtype=torch.float64) * image_w * 1.1 - 0.05 * image_w
    y1 = torch.rand(num, dtype=torch.float64) * image_h * 1.1 - 0.05 * image_h
    w = torch.rand(num, dtype=torch.float64) * image_w * 0.6 + 0.5
    h = torch.rand(num, dtype=torch.float64) * image_h * 0.6 + 0.5
    index = torch.randint(0, batch, (num,)).to(torch.float64)
    return torch.stack([index, x1, y1, x1 + w, y1 + h], dim=1).to(dtype)


def edge_case_rois(batch: int, image_h: float, image_w: float, *, dtype=torch.float32) -> torch.Tensor:
    """Boxes partly and wholly outside the image, degenerate, inverted (negative size), tiny, NaN and inf."""
    h, w, last = image_h, image_w, batch - 1
    rows = [
        [0, -0.3 * w, -0.2 * h, 0.4 * w, 0.5 * h],     # partly outside (top-left)
        [last, 0.6 * w, 0.7 * h, 1.3 * w, 1.4 * h],    # partly outside (bottom-right)
        [0, 1.5 * w, 1.5 * h, 2.0 * w, 2.2 * h],       # wholly outside (beyond the far border)
        [last, -0.9 * w, -0.8 * h, -0.5 * w, -0.4 * h],  # wholly outside (negative coordinates)
        [0, 0.3 * w, 0.3 * h, 0.3 * w, 0.3 * h],       # a point
        [last, 0.2 * w, 0.6 * h, 0.2 * w, 0.9 * h],    # zero width
        [0, 0.7 * w, 0.6 * h, 0.2 * w, 0.1 * h],       # inverted (negative size)
        [last, 0.41 * w, 0.37 * h, 0.43 * w, 0.38 * h],  # smaller than a feature cell
        [0, 0.0, 0.0, w, h],                           # the whole image
        [0, NAN, 0.1 * h, 0.5 * w, 0.5 * h],           # NaN coordinate
        [last, 0.1 * w, 0.1 * h, INF, 0.5 * h],        # inf coordinate
    ]
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


def rois_to_list(rois: torch.Tensor, batch: int) -> list:
    """Tensor[K, 5] -> per-image list of Tensor[L, 4] plus the permutation that orders rois by image."""
    order = torch.argsort(rois[:, 0], stable=True)
    return [rois[rois[:, 0] == i, 1:] for i in range(batch)], order
