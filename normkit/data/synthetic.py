"""A deterministic mini scene-parsing set in the real ADE20K on-disk layout (the embedded default dataset).

`generate_mini_ade(root)` writes::

    root/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg   RGB JPEG
    root/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_XXXXXXXX.png   8-bit labels
    root/training.odgt, root/validation.odgt    CSAIL lists: JSON lines with fpath_img, fpath_segm, width, height
    root/mini_ade.json                          manifest: generator parameters and class names

Labels follow ADE20K: 0 = "other" (ignored by the readers), 1..K = `MINI_ADE_CLASSES`. Every scene has a
textured wall above a random horizon and a textured floor below it, then 2-4 objects (ball, box, tent,
fence, rug), each with its own colour family and texture, plus small clutter blobs of random colour
labelled 0. Colour, brightness and noise are jittered per instance and per image so that a model has to
use texture and shape rather than one exact RGB value. Images vary in aspect (landscape, square, portrait)
so the orientation-grouped CSAIL sampler has something to group.

Generation is a pure function of (seed, split, index): every image has its own numpy Generator, so the
set is identical on every run and machine. Re-running with the same parameters is a no-op once the
manifest matches and every listed file exists.

CLI: ``python -m normkit.data.synthetic --root data/mini_ade [--num-train N --num-val N --size S --seed S]``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from normkit.io import atomic_write_text

MINI_ADE_CLASSES = ("wall", "floor", "ball", "box", "tent", "fence", "rug")
GENERATOR_VERSION = 1
MANIFEST_NAME = "mini_ade.json"
SPLITS = {"training": "train", "validation": "val"}
_CLASS_ID = {name: i + 1 for i, name in enumerate(MINI_ADE_CLASSES)}
_OBJECTS = ("ball", "box", "tent", "fence", "rug")
# (height, width) multipliers of `size`: landscape, square and portrait scenes.
_ASPECTS = ((1.0, 1.25), (1.0, 1.0), (1.25, 1.0))


def _jittered(rng: np.random.Generator, rgb, spread: float = 0.15) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) * rng.uniform(1 - spread, 1 + spread, 3), 0, 255)


def _wall(rng, yy, xx):
    """Brick texture: mortar lines every `course` rows, vertical joints offset on alternate courses."""
    course = rng.integers(7, 12)
    brick = course * 2 + rng.integers(0, 6)
    row = yy // course
    mortar = (yy % course == 0) | (((xx + (row % 2) * brick // 2) % brick) == 0)
    base = _jittered(rng, (175, 165, 145))
    return base * np.where(mortar, 0.72, 1.0)[..., None]


def _floor(rng, yy, xx):
    """Wooden planks: dark seams every `plank` columns and a sinusoidal grain along them."""
    plank = rng.integers(10, 18)
    grain = 0.9 + 0.1 * np.sin(yy * rng.uniform(0.3, 0.6) + (xx // plank) * 1.7)
    seam = (xx % plank) == 0
    base = _jittered(rng, (125, 85, 50))
    return base * (grain * np.where(seam, 0.6, 1.0))[..., None]


def _ball(rng, yy, xx, cy, cx, r):
    """Red sphere shading: bright highlight up-left of the centre, darker towards the rim."""
    d = np.sqrt((yy - (cy - 0.3 * r)) ** 2 + (xx - (cx - 0.3 * r)) ** 2) / max(r, 1)
    return _jittered(rng, (205, 45, 40)) * np.clip(1.25 - 0.55 * d, 0.45, 1.3)[..., None]


def _box(rng, yy, xx):
    """Blue crate with a square grid of slats."""
    cell = rng.integers(6, 10)
    grid = ((yy % cell) < 2) | ((xx % cell) < 2)
    return _jittered(rng, (50, 85, 195)) * np.where(grid, 0.6, 1.0)[..., None]


def _tent(rng, yy, xx):
    """Green canvas with diagonal stripes."""
    period = rng.integers(6, 10)
    stripe = ((yy + xx) % period) < period // 2
    return _jittered(rng, (60, 165, 75)) * np.where(stripe, 1.0, 0.7)[..., None]


def _fence(rng, yy, xx):
    """Yellow pickets: alternating bright and dark vertical bars."""
    period = rng.integers(5, 9)
    bar = (xx % period) < (period + 1) // 2
    return _jittered(rng, (215, 190, 60)) * np.where(bar, 1.0, 0.55)[..., None]


def _rug(rng, yy, xx):
    """Purple rug speckled with light dots."""
    dots = rng.random(yy.shape) < 0.12
    return _jittered(rng, (140, 60, 165)) * np.where(dots, 1.35, 1.0)[..., None]


def _object_mask(rng, kind, h, w, cy, cx, r):
    mask = np.zeros((h, w), np.uint8)
    if kind == "ball":
        cv2.circle(mask, (int(cx), int(cy)), int(r), 1, -1)
    elif kind == "box":
        rect = ((float(cx), float(cy)), (float(2 * r * rng.uniform(0.7, 1.3)), float(2 * r * rng.uniform(0.7, 1.3))),
                float(rng.uniform(-25, 25)))
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1)
    elif kind == "tent":
        half = r * rng.uniform(0.9, 1.3)
        pts = np.array([[cx, cy - r], [cx - half, cy + r], [cx + half, cy + r]], np.float64)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    elif kind == "fence":
        x0 = int(max(0, cx - 2 * r))
        x1 = int(min(w, cx + 2 * r))
        mask[int(max(0, cy - 0.6 * r)):int(min(h, cy + 0.6 * r)), x0:x1] = 1
    else:  # rug: a flat ellipse, as seen in perspective
        axes = (int(r * rng.uniform(1.2, 1.6)), int(r * rng.uniform(0.45, 0.7)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(-15, 15)), 0, 360, 1, -1)
    return mask.astype(bool)


_TEXTURES = {"ball": None, "box": _box, "tent": _tent, "fence": _fence, "rug": _rug}


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 RGB image [H, W, 3], uint8 label [H, W] with 0 = other, 1..K = MINI_ADE_CLASSES)."""
    ah, aw = _ASPECTS[rng.integers(len(_ASPECTS))]
    h, w = int(round(size * ah)), int(round(size * aw))
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.35, 0.65))
    image = np.where((yy < horizon)[..., None], _wall(rng, yy, xx), _floor(rng, yy, xx))
    label = np.where(yy < horizon, _CLASS_ID["wall"], _CLASS_ID["floor"]).astype(np.uint8)

    short = min(h, w)
    for _ in range(rng.integers(2, 5)):
        kind = _OBJECTS[rng.integers(len(_OBJECTS))]
        r = short * rng.uniform(0.13, 0.26)
        cy = rng.uniform(horizon if kind == "rug" else r, h - r * 0.5)
        cx = rng.uniform(r * 0.5, w - r * 0.5)
        mask = _object_mask(rng, kind, h, w, cy, cx, r)
        texture = _ball(rng, yy, xx, cy, cx, r) if kind == "ball" else _TEXTURES[kind](rng, yy, xx)
        image[mask] = texture[mask]
        label[mask] = _CLASS_ID[kind]

    # Clutter of random colour, labelled "other" (0): exercises the ignore label like ADE20K's unlabelled stuff.
    for _ in range(rng.integers(0, 3)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rad = short * rng.uniform(0.04, 0.08)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 5))
        pts = np.stack([cx + rad * np.cos(angles), cy + rad * np.sin(angles)], 1)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
        mask = mask.astype(bool)
        image[mask] = rng.uniform(0, 255, 3)
        label[mask] = 0

    image = image * rng.uniform(0.75, 1.25) + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _manifest(num_train: int, num_val: int, size: int, seed: int) -> dict:
    return {"generator": "normkit.data.synthetic", "version": GENERATOR_VERSION, "num_train": num_train,
            "num_val": num_val, "size": size, "seed": seed, "classes": list(MINI_ADE_CLASSES)}


def manifest_class_names(root) -> tuple[str, ...] | None:
    """The class names recorded in the manifest of a generated set under `root`, or None."""
    try:
        return tuple(json.loads((Path(root) / MANIFEST_NAME).read_text())["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_complete(root: Path, manifest: dict) -> bool:
    try:
        if json.loads((root / MANIFEST_NAME).read_text()) != manifest:
            return False
        for split in SPLITS:
            lines = (root / f"{split}.odgt").read_text().splitlines()
            if len(lines) != manifest["num_train" if split == "training" else "num_val"]:
                return False
            for line in lines:
                record = json.loads(line)
                if not ((root / record["fpath_img"]).is_file() and (root / record["fpath_segm"]).is_file()):
                    return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def generate_mini_ade(root, num_train: int = 400, num_val: int = 100, size: int = 112, seed: int = 0,
                      force: bool = False) -> Path:
    """Write the mini ADE20K-layout set under `root` (skipped when an identical one is already there).

    Args:
        root: output folder (created).
        num_train, num_val: number of training / validation scenes.
        size: the short side of the square scenes; landscape/portrait scenes are 1.25x longer.
        seed: base seed; the set is a deterministic function of (seed, split, index).
        force: regenerate even if a matching set exists.
    Returns: `root` as a Path.
    """
    if num_train < 1 or num_val < 1 or size < 32:
        raise ValueError(f"generate_mini_ade needs num_train >= 1, num_val >= 1 and size >= 32, got "
                         f"num_train={num_train}, num_val={num_val}, size={size}")
    root = Path(root)
    manifest = _manifest(num_train, num_val, size, seed)
    if not force and _is_complete(root, manifest):
        return root
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete
    for split_id, (split, prefix) in enumerate(SPLITS.items()):
        img_dir = root / "ADEChallengeData2016" / "images" / split
        ann_dir = root / "ADEChallengeData2016" / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for index in range(num_train if split == "training" else num_val):
            image, label = render_scene(np.random.default_rng([seed, split_id, index]), size)
            name = f"ADE_{prefix}_{index + 1:08d}"
            Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=92)
            Image.fromarray(label, mode="L").save(ann_dir / f"{name}.png")
            records.append({"fpath_img": f"ADEChallengeData2016/images/{split}/{name}.jpg",
                            "fpath_segm": f"ADEChallengeData2016/annotations/{split}/{name}.png",
                            "width": int(image.shape[1]), "height": int(image.shape[0])})
        atomic_write_text(root / f"{split}.odgt", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return root


def generator_cli(argv, generate, *, description: str, layout: str, root: str, num_train: int, num_val: int,
                  size: int, classes) -> None:
    """The command line of a mini-set generator: ``generate(root, num_train, num_val, size, seed, force)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default=root, help=f"output folder (default: {root})")
    parser.add_argument("--num-train", type=int, default=num_train)
    parser.add_argument("--num-val", type=int, default=num_val)
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching set exists")
    args = parser.parse_args(argv)
    out = generate(args.root, args.num_train, args.num_val, args.size, args.seed, args.force)
    print(f"mini {layout}-layout set ready in {out} ({args.num_train} train / {args.num_val} val, "
          f"{len(classes)} classes: {', '.join(classes)})")


def main(argv=None) -> None:
    generator_cli(argv, generate_mini_ade, description=__doc__.splitlines()[0], layout="ADE20K",
                  root="data/mini_ade", num_train=400, num_val=100, size=112, classes=MINI_ADE_CLASSES)


if __name__ == "__main__":
    main()
