"""Shared helpers of the COCO data and evaluation tests: tiny generated sets and ground truth as predictions."""
import numpy as np
import torch

from normkit.data.coco import COCODetection
from normkit.data.synthetic_coco import generate_mini_coco

# pycocotools' decode under numpy 2 warns on every call; harmless, and it would bury real warnings.
PYCOCOTOOLS_NUMPY2_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


def mini_coco(root, num_train=24, num_val=16, size=64, seed=0):
    return generate_mini_coco(root, num_train=num_train, num_val=num_val, size=size, seed=seed)


def val_dataset(root, legacy_plus_one=True):
    return COCODetection(root, "val2017", legacy_plus_one=legacy_plus_one, mask_on=True)


def gt_prediction(dataset, index, score=1.0):
    """The non-crowd ground truth of image `index` in the prediction contract (original pixels)."""
    record = dataset.records[index]
    anns = [a for a in dataset.coco.imgToAnns.get(record["image_id"], [])]
    assert len(anns) == len(record["labels"])  # the generated set has nothing to drop
    keep = ~record["iscrowd"]
    masks = np.stack([dataset.coco.annToMask(a) for a in anns]) if anns else \
        np.zeros((0, record["height"], record["width"]), np.uint8)
    n = int(keep.sum())
    return {"boxes": torch.from_numpy(record["boxes"][keep]).reshape(-1, 4),
            "scores": torch.full((n,), score), "labels": torch.from_numpy(record["labels"][keep]),
            "masks": torch.from_numpy(masks[keep].astype(np.uint8)).reshape(n, record["height"], record["width"])}


def batch_of(dataset, indices):
    """The evaluator-relevant part of a val batch for images `indices`."""
    records = [dataset.records[i] for i in indices]
    return {"image_ids": torch.tensor([r["image_id"] for r in records]),
            "orig_sizes": torch.tensor([[r["height"], r["width"]] for r in records])}
