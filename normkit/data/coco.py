"""COCO instance annotations read through pycocotools into per-image detection records.

`COCODetection(root, split)` reads `annotations/instances_<split>.json` and finds the images in
`images/<split>/` (the layout of the Detectron data folder) or `<split>/` (the layout of the cocodataset.org
zips). Known splits and the folders they use:

    ===========================  ===========================================  ==============
    split                        annotation file                              image folder
    ===========================  ===========================================  ==============
    train2017, val2017           annotations/instances_{train,val}2017.json   {train,val}2017
    train2014, val2014           annotations/instances_{train,val}2014.json   {train,val}2014
    minival2014                  annotations/instances_minival2014.json       val2014
    valminusminival2014          annotations/instances_valminusminival2014    val2014
    ===========================  ===========================================  ==============

Any other split name uses `instances_<split>.json` and a folder named `<split>`; `ann_file` and `img_dir`
override both (relative to `root` or absolute).

What a record holds and what is dropped (the rules of Detectron-1's `json_dataset.py`):

- categories are sorted by COCO id and numbered 0..K-1 ("contiguous labels"); `contiguous_to_cat_id` maps
  them back for results;
- COCO boxes x, y, w, h become x1, y1, x2, y2 with x2 = x + w - 1 under the legacy (Detectron-1) convention
  and x2 = x + w otherwise, clipped to the image ([0, W-1] legacy, [0, W] otherwise);
- an annotation is dropped when its `area` is not positive or its clipped box has x2 <= x1 or y2 <= y1
  (zero or negative size); polygons with fewer than 3 points are removed from a segmentation, and an
  annotation left without any polygon is dropped. `stats["dropped_annotations"]` counts the drops (logged);
- crowd annotations (iscrowd = 1) are kept, flagged, as ignore regions;
- with `filter_empty=True` (training) images without a usable non-crowd annotation are dropped
  (`stats["dropped_images"]`); evaluation keeps every image.

Segmentations stay as stored (polygon lists, or RLE dicts with compressed string or uncompressed list
counts); `normkit.data.detection` moves them with the image.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from normkit.data.base import read_image, require_dir, require_file, require_listed_files

__all__ = ["COCO_SPLITS", "COCODetection", "load_coco_json"]

logger = logging.getLogger(__name__)

# split -> (annotation file under root, image folder name)
COCO_SPLITS = {
    "train2017": ("annotations/instances_train2017.json", "train2017"),
    "val2017": ("annotations/instances_val2017.json", "val2017"),
    "train2014": ("annotations/instances_train2014.json", "train2014"),
    "val2014": ("annotations/instances_val2014.json", "val2014"),
    "minival2014": ("annotations/instances_minival2014.json", "val2014"),
    "valminusminival2014": ("annotations/instances_valminusminival2014.json", "val2014"),
}


def load_coco_json(path) -> COCO:
    """A pycocotools `COCO` index of an instances file, after checking that the file is COCO: a JSON object
    with "images", "annotations" and "categories" lists whose entries carry the keys pycocotools needs."""
    path = require_file(path, "COCO annotation file")
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not a COCO annotation file: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a COCO annotation file: expected a JSON object with 'images', "
                         f"'annotations' and 'categories', got a JSON {type(data).__name__}")
    needed = {"images": ("id", "file_name", "height", "width"),
              "annotations": ("id", "image_id", "category_id", "bbox", "iscrowd"),
              "categories": ("id", "name")}
    for key, fields in needed.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            raise ValueError(f"{path} is not a COCO instances file: '{key}' must be a list, got "
                             f"{'nothing' if entries is None else type(entries).__name__}")
        for entry in entries:
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise ValueError(f"{path} is not a COCO instances file: an entry of '{key}' lacks {missing} "
                                 f"(entry: {str(entry)[:120]})")
    if not data["categories"]:
        raise ValueError(f"{path} has no categories")
    image_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in image_ids or ann["category_id"] not in cat_ids:
            raise ValueError(f"{path}: annotation {ann['id']} refers to image {ann['image_id']} / category "
                             f"{ann['category_id']}, which the file does not define")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    _fill_missing_areas(coco, path)
    return coco


def _fill_missing_areas(coco: COCO, path) -> None:
    """COCOeval sorts ground truth into size ranges by `area`, which COCO defines as the segmentation's pixel
    area; files written by other tools may leave it out. Fill it in: the mask's area, else the box's."""
    missing = [ann for ann in coco.dataset["annotations"] if "area" not in ann]
    for ann in missing:
        segmentation = ann.get("segmentation")
        polygons = _valid_polygons(segmentation)  # degenerate polygons, which the reader drops, count for nothing
        if polygons:
            image = coco.imgs[ann["image_id"]]
            rle = mask_util.merge(mask_util.frPyObjects(polygons, image["height"], image["width"]))
            ann["area"] = float(mask_util.area(rle))
        elif isinstance(segmentation, dict):
            ann["area"] = float(mask_util.area(coco.annToRLE(ann)))
        else:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    if missing:
        logger.warning("%s: %d annotation(s) without 'area'; filled in from their masks (or boxes)", path,
                       len(missing))


def _valid_polygons(segmentation):
    """Polygons with at least 3 points (6 coordinates), as float lists; None when the segmentation is RLE."""
    if isinstance(segmentation, list):
        return [[float(v) for v in poly] for poly in segmentation if len(poly) >= 6 and len(poly) % 2 == 0]
    return None


def _check_rle(segmentation, height: int, width: int, where: str) -> None:
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(f"{where}: a segmentation must be a list of polygons or an RLE dict with 'counts' and "
                         f"'size', got {str(segmentation)[:80]}")
    if list(segmentation["size"]) != [height, width]:
        raise ValueError(f"{where}: RLE size {list(segmentation['size'])} differs from the image size "
                         f"[{height}, {width}] (height, width)")


class COCODetection(Dataset):
    """Detection records of one COCO split; `dataset[i]` adds the decoded image.

    Args:
        root: dataset root (holds `annotations/` and the image folder).
        split: a split name (see the module docstring), used for the default `ann_file` and `img_dir`.
        ann_file, img_dir: explicit paths, relative to `root` unless absolute.
        filter_empty: drop images without a usable non-crowd annotation (training).
        legacy_plus_one: Detectron-1 box convention (x2 = x + w - 1); False gives x2 = x + w (detectron2).
        mask_on: keep segmentations in the records.

    `records[i]`: {"image_id": int, "file": Path, "height": int, "width": int, "boxes": float32 [K, 4] xyxy,
    "labels": int64 [K], "iscrowd": bool [K], "segmentations": list of K raw COCO segmentations or None}.
    `dataset[i]` = record plus "image": uint8 RGB [H, W, 3] as stored on disk.
    """

    def __init__(self, root, split: str = "train2017", *, ann_file=None, img_dir=None, filter_empty: bool = False,
                 legacy_plus_one: bool = True, mask_on: bool = True):
        self.root = require_dir(root, "COCO dataset root")
        default_ann, default_img = COCO_SPLITS.get(split, (f"annotations/instances_{split}.json", split))
        self.ann_file = self._resolve(ann_file or default_ann)
        if img_dir is not None:
            self.img_dir = require_dir(self._resolve(img_dir), f"image folder of COCO split {split}")
        else:
            candidates = [self.root / "images" / default_img, self.root / default_img]
            found = [c for c in candidates if c.is_dir()]
            if not found:
                raise FileNotFoundError(f"image folder of COCO split {split} not found: neither "
                                        f"{candidates[0]} nor {candidates[1]} exists (set data.<split>.img_dir)")
            self.img_dir = found[0]
        self.split = split
        self.legacy_plus_one = bool(legacy_plus_one)
        self.mask_on = bool(mask_on)
        self.filter_empty = bool(filter_empty)
        self.coco = load_coco_json(self.ann_file)

        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.contiguous_to_cat_id = [int(c["id"]) for c in cats]
        self.cat_id_to_contiguous = {cat_id: i for i, cat_id in enumerate(self.contiguous_to_cat_id)}
        self.class_names = tuple(str(c["name"]) for c in cats)
        self.num_classes = len(cats)

        self.records, dropped_anns, dropped_images = [], 0, 0
        for image_id in sorted(self.coco.imgs):
            record, dropped = self._record(image_id)
            dropped_anns += dropped
            if filter_empty and not (~record["iscrowd"]).any():
                dropped_images += 1
                continue
            self.records.append(record)
        self.stats = {"dropped_annotations": dropped_anns, "dropped_images": dropped_images}
        if dropped_anns or dropped_images:
            logger.info("%s: dropped %d annotations with zero or negative size or no valid polygon, and %d images "
                        "without usable annotations%s", self.ann_file, dropped_anns, dropped_images,
                        "" if filter_empty else " (none: empty images are kept for evaluation)")
        require_listed_files([r["file"] for r in self.records], f"{self.ann_file} (images in {self.img_dir})")
        if not self.records:
            raise ValueError(f"{self.ann_file}: no image left"
                             + (" with a usable annotation (training drops images without one)" if filter_empty
                                else ""))

    def _resolve(self, path) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def _record(self, image_id: int) -> tuple[dict, int]:
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        off = 1.0 if self.legacy_plus_one else 0.0
        boxes, labels, crowd, segms, dropped = [], [], [], [], 0
        for ann in self.coco.imgToAnns.get(image_id, []):
            where = f"{self.ann_file}: annotation {ann['id']}"
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x1, y1 = min(max(x, 0.0), w - off), min(max(y, 0.0), h - off)
            x2 = min(max(x + max(0.0, bw - off), 0.0), w - off)
            y2 = min(max(y + max(0.0, bh - off), 0.0), h - off)
            area = float(ann["area"])
            if not (area > 0 and x2 > x1 and y2 > y1):
                dropped += 1
                continue
            segm = None
            if self.mask_on:
                if "segmentation" not in ann:
                    raise ValueError(f"{where} has no 'segmentation' (data.mask_on is true)")
                segm = _valid_polygons(ann["segmentation"])
                if segm is None:
                    _check_rle(ann["segmentation"], h, w, where)
                    segm = ann["segmentation"]
                elif not segm:
                    dropped += 1
                    continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self.cat_id_to_contiguous[ann["category_id"]])
            crowd.append(bool(ann["iscrowd"]))
            segms.append(segm)
        record = {"image_id": int(image_id), "file": self.img_dir / info["file_name"], "height": h, "width": w,
                  "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                  "labels": np.asarray(labels, np.int64), "iscrowd": np.asarray(crowd, bool),
                  "segmentations": segms if self.mask_on else None}
        return record, dropped

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (f"COCODetection({self.ann_file}, {len(self)} images, {self.num_classes} classes, "
                f"{'legacy' if self.legacy_plus_one else 'no'} +1)")

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) from the annotation file."""
        record = self.records[index]
        return record["height"], record["width"]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = read_image(record["file"])
        if image.shape[:2] != (record["height"], record["width"]):
            raise ValueError(f"image file {record['file']} is {image.shape[0]}x{image.shape[1]} but "
                             f"{self.ann_file} says {record['height']}x{record['width']} (height x width)")
        return {**record, "image": image}
