"""ADE20K scene parsing (SceneParsing150): CSAIL `.odgt` lists or the `ADEChallengeData2016` folder layout.

Raw labels: 0 = "other" (ignored, -> 255), 1..150 -> classes 0..149.
"""
from __future__ import annotations

import json
from pathlib import Path

from normkit.data.base import Sample, SegmentationDataset, label_lut, require_dir, require_file

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag")
assert len(ADE20K_CLASSES) == 150

FOLDER_NAME = "ADEChallengeData2016"


def odgt_samples(root: Path, list_file: Path) -> list[Sample]:
    """Samples from a CSAIL list: one JSON object per line with fpath_img, fpath_segm, width, height,
    paths relative to `root` (the CSAIL `root_dataset`)."""
    require_file(list_file, "ADE20K .odgt list")
    samples = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            img, segm = record["fpath_img"], record["fpath_segm"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{list_file}:{lineno}: expected a JSON object with fpath_img and fpath_segm "
                             f"({exc})") from exc
        size = (int(record["height"]), int(record["width"])) if "height" in record and "width" in record else None
        samples.append(Sample(root / img, root / segm, Path(img).stem, size))
    return samples


def folder_samples(root: Path, split: str) -> list[Sample]:
    """Samples from `ADEChallengeData2016/{images,annotations}/<split>`; `root` may be that folder or its parent."""
    base = root / FOLDER_NAME if (root / FOLDER_NAME).is_dir() else root
    img_dir = require_dir(base / "images" / split, f"ADE20K image folder for split '{split}'")
    ann_dir = require_dir(base / "annotations" / split, f"ADE20K annotation folder for split '{split}'")
    return [Sample(img, ann_dir / f"{img.stem}.png", img.stem) for img in sorted(img_dir.glob("*.jpg"))]


class ADE20KDataset(SegmentationDataset):
    """ADE20K from `source="odgt"` (list = path of the .odgt, relative to root) or `source="folder"`
    (split = training | validation)."""

    def __init__(self, root, source: str = "odgt", list_file=None, split: str = "training",
                 num_classes: int = 150, class_names=None):
        root = require_dir(root, "ADE20K root")
        if source == "odgt":
            if list_file is None:
                raise ValueError("ADE20K source 'odgt' needs a list file (data.<split>.list, e.g. training.odgt)")
            samples = odgt_samples(root, root / list_file)
            description = f"ADE20K {root / list_file}"
        elif source == "folder":
            samples = folder_samples(root, split)
            description = f"ADE20K {root} [{split}]"
        else:
            raise ValueError(f"unknown ADE20K source '{source}'; choose odgt or folder")
        if class_names is None and num_classes == len(ADE20K_CLASSES):
            class_names = ADE20K_CLASSES
        super().__init__(samples, num_classes, class_names, label_lut(num_classes, reduce_zero_label=True),
                         description)
