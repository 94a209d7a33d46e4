"""PASCAL Context-59 in the mmseg layout: `root = VOCdevkit/VOC2010` with JPEGImages/,
SegmentationClassContext/ and ImageSets/SegmentationContext/{train,val}.txt.

Labels: 0 = background (ignored, -> 255), 1..59 -> classes 0..58 (mmseg `reduce_zero_label`).
"""
from __future__ import annotations

from normkit.data.base import SegmentationDataset, label_lut, require_dir
from normkit.data.voc import list_samples

PASCAL_CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood")
assert len(PASCAL_CONTEXT59_CLASSES) == 59


class PascalContextDataset(SegmentationDataset):
    def __init__(self, root, list_file="ImageSets/SegmentationContext/train.txt", img_dir: str = "JPEGImages",
                 ann_dir: str = "SegmentationClassContext", num_classes: int = 59, class_names=None):
        root = require_dir(root, "Pascal Context root")
        if class_names is None and num_classes == len(PASCAL_CONTEXT59_CLASSES):
            class_names = PASCAL_CONTEXT59_CLASSES
        super().__init__(list_samples(root, list_file, img_dir, ann_dir), num_classes, class_names,
                         label_lut(num_classes, reduce_zero_label=True), f"Pascal Context {root / list_file}")
