"""A deterministic mini detection set in the real COCO on-disk layout (the embedded detection default).

`generate_mini_coco(root)` writes::

    root/images/train2017/000000000001.jpg ...          RGB JPEG, 12-digit COCO file names
    root/images/val2017/000000100001.jpg ...
    root/annotations/instances_train2017.json           COCO instances files (info, licenses, images,
    root/annotations/instances_val2017.json             annotations, categories)
    root/mini_coco.json                                 manifest: generator parameters and class names

Scenes are small (short side `size`, landscape, square or portrait) with a low-saturation textured, noisy
background and 0-4 non-overlapping objects of four shape classes, each with its own colour family:
rectangle (red), ellipse (blue), triangle (green) and cross (yellow), rotated, with sizes from about 16% to
50% of the short side and aspect ratios from 1:2 to 2:1, so COCO's small and medium size ranges both occur.
Colour, shading and noise are jittered per instance and per image.

Annotations use everything a COCO reader has to handle:
- most instances are polygons; about a quarter are RLE, half of them compressed (string counts) and half
  uncompressed (list counts);
- about one image in eight has a crowd region (iscrowd = 1, uncompressed RLE) covering a cluster of small
  ellipses, which evaluation ignores;
- about one image in twenty has no object at all (training drops it, evaluation keeps it);
- category ids are 1, 2, 4, 7: not contiguous, as in COCO.
Every image's pixels are painted from the same rasterised masks the annotations store, and boxes and areas
are those of the masks (pycocotools `toBbox` / `area`), so ground truth given as predictions scores AP 1.0.

Generation is a pure function of (seed, split, index) and is skipped when an identical set is already there.

CLI: ``python -m normkit.data.synthetic_coco --root data/mini_coco [--num-train N --num-val N --size S --seed S]``.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from normkit.data.synthetic import generator_cli
from normkit.io import atomic_write_text

__all__ = ["MINI_COCO_CATEGORIES", "MINI_COCO_CLASSES", "generate_mini_coco", "render_coco_scene"]

MINI_COCO_CLASSES = ("rectangle", "ellipse", "triangle", "cross")
MINI_COCO_CATEGORIES = tuple({"id": cat_id, "name": name, "supercategory": "shape"}
                             for cat_id, name in zip((1, 2, 4, 7), MINI_COCO_CLASSES))
GENERATOR_VERSION = 1
MANIFEST_NAME = "mini_coco.json"
SPLITS = {"train2017": 0, "val2017": 100000}  # split -> image id offset
_COLOURS = {"rectangle": (215, 45, 45), "ellipse": (45, 95, 215), "triangle": (40, 175, 60), "cross": (225, 200, 40)}
_ASPECTS = ((1.0, 1.25), (1.0, 1.0), (1.25, 1.0))  # (height, width) multipliers of `size`


def _shape_polygon(rng: np.random.Generator, kind: str, cx: float, cy: float, sw: float, sh: float) -> np.ndarray:
    """Vertices [P, 2] (x, y) of one shape of half-extents roughly (sw, sh) around (cx, cy), rotated."""
    if kind == "rectangle":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    elif kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "triangle":
        pts = np.array([[0, -1], [1, 1], [-1, 1]], np.float64)
    else:  # cross: arms a third of the extent wide
        a = 1 / 3
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                        [-1, -a], [-a, -a]], np.float64)
    pts = pts * [sw, sh]
    angle = np.deg2rad(rng.uniform(-30, 30) if kind != "triangle" else rng.uniform(-180, 180))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T + [cx, cy]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's list-counts RLE (column-major runs, starting with a run of zeros), as crowd annotations use."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grey = rng.uniform(95, 160)
    tint = rng.uniform(-12, 12, 3)
    pattern = np.zeros((h, w), np.float32)
    for _ in range(3):
        fy, fx, ph = rng.uniform(0.05, 0.35), rng.uniform(0.05, 0.35), rng.uniform(0, 2 * np.pi)
        pattern += rng.uniform(4, 12) * np.sin(fy * yy + fx * xx + ph)
    return (grey + tint).astype(np.float32) + pattern[..., None]


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, colour) -> None:
    ys, xs = np.nonzero(mask)
    base = np.clip(np.asarray(colour, np.float32) * rng.uniform(0.8, 1.15, 3), 0, 255)
    shade = 1.0 + rng.uniform(-0.2, 0.2) * (xs - xs.mean()) / max(1.0, np.ptp(xs)) \
        + rng.uniform(-0.2, 0.2) * (ys - ys.mean()) / max(1.0, np.ptp(ys))
    image[ys, xs] = base * shade[:, None]


def _encode(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def render_coco_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    """One scene: (uint8 RGB image [H, W, 3], annotations without ids: {"category_id", "segmentation",
    "area", "bbox", "iscrowd"})."""
    ah, aw = _ASPECTS[rng.integers(len(_ASPECTS))]
    h, w = int(round(size * ah)), int(round(size * aw))
    short = min(h, w)
    image = _background(rng, h, w)
    occupied = np.zeros((h, w), bool)
    anns = []
    num_objects = 0 if rng.random() < 0.05 else int(rng.integers(1, 5))
    for _ in range(num_objects):
        kind = MINI_COCO_CLASSES[rng.integers(len(MINI_COCO_CLASSES))]
        for _attempt in range(20):
            extent = short * rng.uniform(0.16, 0.5) / 2
            ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
            sw, sh = extent * np.sqrt(ratio), extent / np.sqrt(ratio)
            cx, cy = rng.uniform(sw, w - sw), rng.uniform(sh, h - sh)
            poly = _shape_polygon(rng, kind, cx, cy, sw, sh)
            poly[:, 0] = np.clip(poly[:, 0], 0, w - 0.01)
            poly[:, 1] = np.clip(poly[:, 1], 0, h - 0.01)
            flat = [round(float(v), 2) for v in poly.reshape(-1)]
            mask = mask_util.decode(mask_util.frPyObjects([flat], h, w))[..., 0].astype(bool)
            grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if mask.sum() >= 16 and not (grown & occupied).any():
                break
        else:
            continue
        occupied |= mask
        _paint(rng, image, mask, _COLOURS[kind])
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        storage = rng.random()
        if storage < 0.125:
            segmentation = _uncompressed_rle(mask)
        elif storage < 0.25:
            segmentation = _encode(mask)
        else:
            segmentation = [flat]
        anns.append({"category_id": MINI_COCO_CATEGORIES[MINI_COCO_CLASSES.index(kind)]["id"],
                     "segmentation": segmentation, "area": float(mask_util.area(rle)),
                     "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": 0})

    if rng.random() < 0.125:  # a crowd: a cluster of small ellipses annotated as one ignore region
        crowd = np.zeros((h, w), bool)
        cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        for _ in range(int(rng.integers(4, 7))):
            r = short * rng.uniform(0.03, 0.05)
            x, y = cx + rng.normal(0, short * 0.08), cy + rng.normal(0, short * 0.08)
            cv2.ellipse(crowd.view(np.uint8), (int(x), int(y)), (int(r), int(r * rng.uniform(0.6, 1.0))),
                        0, 0, 360, 1, -1)
        grown = cv2.dilate(crowd.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        if crowd.sum() >= 16 and not (grown & occupied).any():
            count, parts = cv2.connectedComponents(crowd.astype(np.uint8))
            for part in range(1, count):
                _paint(rng, image, parts == part, _COLOURS["ellipse"])
            rle = mask_util.encode(np.asfortranarray(crowd.astype(np.uint8)))
            anns.append({"category_id": MINI_COCO_CATEGORIES[1]["id"], "segmentation": _uncompressed_rle(crowd),
                         "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
                         "iscrowd": 1})

    image = image * np.float32(rng.uniform(0.85, 1.15)) + 7 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), anns


def _manifest(num_train: int, num_val: int, size: int, seed: int) -> dict:
    return {"generator": "normkit.data.synthetic_coco", "version": GENERATOR_VERSION, "num_train": num_train,
            "num_val": num_val, "size": size, "seed": seed, "classes": list(MINI_COCO_CLASSES)}


def _is_complete(root: Path, manifest: dict) -> bool:
    try:
        if json.loads((root / MANIFEST_NAME).read_text()) != manifest:
            return False
        for split in SPLITS:
            data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
            if len(data["images"]) != manifest["num_train" if split == "train2017" else "num_val"]:
                return False
            if not all((root / "images" / split / im["file_name"]).is_file() for im in data["images"]):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def generate_mini_coco(root, num_train: int = 500, num_val: int = 100, size: int = 128, seed: int = 0,
                       force: bool = False) -> Path:
    """Write the mini COCO-layout set under `root` (skipped when an identical one is already there).

    Args:
        root: output folder (created).
        num_train, num_val: number of training / validation images.
        size: short side of the images; landscape and portrait ones are 1.25x longer.
        seed: base seed; the set is a deterministic function of (seed, split, index).
        force: regenerate even if a matching set exists.
    Returns: `root` as a Path.
    """
    if num_train < 1 or num_val < 1 or size < 64:
        raise ValueError(f"generate_mini_coco needs num_train >= 1, num_val >= 1 and size >= 64, got "
                         f"num_train={num_train}, num_val={num_val}, size={size}")
    root = Path(root)
    manifest = _manifest(num_train, num_val, size, seed)
    if not force and _is_complete(root, manifest):
        return root
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_id, (split, id_offset) in enumerate(SPLITS.items()):
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(num_train if split == "train2017" else num_val):
            image, anns = render_coco_scene(np.random.default_rng([seed, split_id, index]), size)
            image_id = id_offset + index + 1
            name = f"{image_id:012d}.jpg"
            Image.fromarray(image).save(img_dir / name, quality=92)
            images.append({"id": image_id, "file_name": name, "height": int(image.shape[0]),
                           "width": int(image.shape[1]), "license": 1})
            for ann in anns:
                annotations.append({"id": len(annotations) + 1 + id_offset * 10, "image_id": image_id, **ann})
        data = {"info": {"description": "normkit mini COCO-layout shapes set", "version": str(GENERATOR_VERSION),
                         "year": 2024},
                "licenses": [{"id": 1, "name": "generated", "url": ""}],
                "images": images, "annotations": annotations, "categories": list(MINI_COCO_CATEGORIES)}
        atomic_write_text(root / "annotations" / f"instances_{split}.json", json.dumps(data, separators=(",", ":")))
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return root


def main(argv=None) -> None:
    generator_cli(argv, generate_mini_coco, description=__doc__.splitlines()[0], layout="COCO",
                  root="data/mini_coco", num_train=500, num_val=100, size=128, classes=MINI_COCO_CLASSES)


if __name__ == "__main__":
    main()
