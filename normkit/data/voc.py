"""PASCAL VOC 2012 with the SBD augmentation (10,582 train_aug / 1,449 val).

Layout (mmseg): `root = VOCdevkit/VOC2012` with JPEGImages/, SegmentationClass/ (palette PNGs),
SegmentationClassAug/ (grey PNGs) and ImageSets/Segmentation/{train,val,trainaug,...}.txt. A split list
holds either one name per line or DeepLab-style "image_path label_path" pairs relative to root. Labels are
read with PIL, so palette PNGs give class indices (cv2 would return the palette colours); 255 is ignored.
"""
from __future__ import annotations

from normkit.data.base import Sample, SegmentationDataset, label_lut, read_split_list, require_dir

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def list_samples(root, list_file, img_dir: str, ann_dir: str) -> list[Sample]:
    """Samples from a split list: "name" lines use img_dir/name.jpg and ann_dir/name.png; two-column lines
    name both paths explicitly (DeepLab lists, with or without a leading slash)."""
    samples = []
    for fields in read_split_list(root / list_file):
        if len(fields) >= 2:
            img, ann = (root / f.lstrip("/") for f in fields[:2])
            samples.append(Sample(img, ann, img.stem))
        else:
            samples.append(Sample(root / img_dir / f"{fields[0]}.jpg", root / ann_dir / f"{fields[0]}.png", fields[0]))
    return samples


class VOCDataset(SegmentationDataset):
    def __init__(self, root, list_file="ImageSets/Segmentation/train.txt", img_dir: str = "JPEGImages",
                 ann_dir: str = "SegmentationClassAug", num_classes: int = 21, class_names=None):
        root = require_dir(root, "VOC root")
        if class_names is None and num_classes == len(VOC_CLASSES):
            class_names = VOC_CLASSES
        super().__init__(list_samples(root, list_file, img_dir, ann_dir), num_classes, class_names,
                         label_lut(num_classes, reduce_zero_label=False), f"VOC {root / list_file}")
