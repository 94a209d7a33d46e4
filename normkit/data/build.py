"""Datasets and loaders from the `data:` section of an experiment config.

Schema (every key but `dataset`, `root` and `num_classes` is optional; defaults shown)::

    data:
      dataset: ade20k            # ade20k | voc | pascal_context
      root: data/mini_ade        # dataset root; for ADE20K the folder holding the .odgt lists and/or
                                 # ADEChallengeData2016/ (or that folder itself when source: folder)
      num_classes: 150           # must equal model.num_classes
      class_names: null          # list of names; default: the dataset's standard names when num_classes
                                 # matches, else those in a generated mini set's manifest, else class_<i>
      pixel_order: rgb           # model input encoding (normkit.data.pixels): channel order rgb | bgr,
      pixel_scale: 1             # values 0..1 (1) or 0..255 (255), then minus mean, divided by std, both
      mean: [0.485, 0.456, 0.406]  # in pixel_order and pixel_scale; defaults: RGB 0..1 with ImageNet mean/std
      std: [0.229, 0.224, 0.225]   # (CSAIL, mmseg); SN-seg and DeepLab v2 configs state their BGR 0..255 means
      synthetic: null            # {num_train, num_val, size, seed}: generate the mini ADE20K-layout set
                                 # (normkit.data.synthetic) in `root` first if it is not there yet
      train:
        # which files (per dataset)
        source: odgt             # ade20k: odgt (CSAIL list) | folder (ADEChallengeData2016 layout)
        list: training.odgt      # ade20k odgt list / voc, pascal_context split list, relative to root
                                 #   voc: ImageSets/Segmentation/train_aug.txt
                                 #   pascal_context: ImageSets/SegmentationContext/train.txt
        split: training          # ade20k folder split (training | validation)
        img_dir: JPEGImages      # voc / pascal_context image folder
        ann_dir: ...             # voc: SegmentationClassAug, pascal_context: SegmentationClassContext
        # how to augment
        pipeline: csail          # csail | mmseg | deeplab_v2
        flip: true
        # csail: one short side per batch, long side capped, images grouped by orientation
        short_sides: [300, 375, 450, 525, 600]
        max_long_side: 1000
        image_resize: cv2        # cv2 (INTER_LINEAR / INTER_NEAREST) | pil (BILINEAR / NEAREST: CSAIL)
        pad_multiple: 8          # 32 for UPerNet
        # mmseg: ratio-range rescale, cat_max_ratio crop, photometric distortion, pad to the crop
        scale: [2048, 512]
        ratio_range: [0.5, 2.0]
        crop_size: [512, 512]
        cat_max_ratio: 0.75
        photometric: true
        # deeplab_v2: squash to `size`, rescale by a random ratio of `ratio_range`, flip (no crop)
        size: [321, 321]
        ratio_range: [0.5, 1.3]
      val:                       # same file keys; defaults validation.odgt / split validation,
        source: odgt             # voc: ImageSets/Segmentation/val.txt + SegmentationClass,
        list: validation.odgt    # pascal_context: ImageSets/SegmentationContext/val.txt

Unknown keys in `data:`, `data.train` (by pipeline) and `data.val` are errors naming the closest valid key.
Labels everywhere: classes 0..K-1, 255 = ignored (ADE20K 0 and Context background included; padding too).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from normkit.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from normkit.data.base import IGNORE_INDEX, SegmentationDataset, prepare_synthetic, worker_options
from normkit.data.pascal_context import PASCAL_CONTEXT59_CLASSES, PascalContextDataset
from normkit.data.samplers import SampleKey, TrainBatchSampler, sample_rng, shard_indices
from normkit.data.pixels import IMAGENET_RGB_MEAN, IMAGENET_RGB_STD, PIXEL_KEYS, PixelNormalizer
from normkit.data.transforms import CSAILTrainTransform, DeepLabV2TrainTransform, MMSegTrainTransform, pad_batch
from normkit.data.synthetic import generate_mini_ade, manifest_class_names
from normkit.data.voc import VOC_CLASSES, VOCDataset
from normkit.schema import check_keys, config_int, config_mapping

SPLITS = ("train", "val")
DATASETS = ("ade20k", "voc", "pascal_context")
PIPELINES = ("csail", "mmseg", "deeplab_v2")
_DEFAULTS = {
    "ade20k": {"train": {"source": "odgt", "list": "training.odgt", "split": "training"},
               "val": {"source": "odgt", "list": "validation.odgt", "split": "validation"}},
    "voc": {"train": {"list": "ImageSets/Segmentation/train_aug.txt", "img_dir": "JPEGImages",
                      "ann_dir": "SegmentationClassAug"},
            "val": {"list": "ImageSets/Segmentation/val.txt", "img_dir": "JPEGImages", "ann_dir": "SegmentationClass"}},
    "pascal_context": {"train": {"list": "ImageSets/SegmentationContext/train.txt", "img_dir": "JPEGImages",
                                 "ann_dir": "SegmentationClassContext"},
                       "val": {"list": "ImageSets/SegmentationContext/val.txt", "img_dir": "JPEGImages",
                               "ann_dir": "SegmentationClassContext"}},
}


DATA_KEYS = ("dataset", "root", "num_classes", "class_names", *PIXEL_KEYS, "synthetic", "train", "val")
# The keys of data.train / data.val: which files (every split), how to augment (train, per pipeline).
FILE_KEYS = ("source", "list", "split", "img_dir", "ann_dir")
TRAIN_KEYS = ("pipeline", "flip", "pad_multiple")
PIPELINE_KEYS = {"csail": ("short_sides", "max_long_side", "image_resize"),
                 "mmseg": ("scale", "ratio_range", "crop_size", "cat_max_ratio", "photometric"),
                 "deeplab_v2": ("size", "ratio_range")}


def check_data_config(data_cfg: dict) -> None:
    """Every key of the segmentation `data:` section and of `data.train` / `data.val` is known (a typo names
    the closest valid key), `root` is a path and `num_classes` an integer that labels can hold."""
    check_keys(data_cfg, DATA_KEYS, "data")
    root = _require(data_cfg, "root")
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise ValueError(f"data.root must be the path of the dataset folder, got {root!r}")
    num_classes = config_int(data_cfg, "num_classes", None, "data", minimum=1)
    if num_classes is None:
        raise ValueError("the data config needs `data.num_classes`")
    if num_classes > IGNORE_INDEX:
        raise ValueError(f"data.num_classes must be at most {IGNORE_INDEX} (label files are 8-bit with "
                         f"{IGNORE_INDEX} = ignore), got {num_classes}")
    for split in SPLITS:
        split_cfg = config_mapping(data_cfg, split, "data")
        allowed = FILE_KEYS
        if split == "train":
            pipeline = split_cfg.get("pipeline", "csail")
            if pipeline not in PIPELINES:
                raise ValueError(f"unknown pipeline {pipeline!r} (data.train.pipeline); choose one of "
                                 f"{', '.join(PIPELINES)}")
            allowed = FILE_KEYS + TRAIN_KEYS + PIPELINE_KEYS[pipeline]
        check_keys(split_cfg, allowed, f"data.{split}")


def _require(data_cfg: dict, key: str):
    if key not in data_cfg:
        raise ValueError(f"the data config needs `data.{key}`")
    return data_cfg[key]


def split_config(data_cfg: dict, split: str) -> dict:
    """The defaults of `data.dataset` for `split`, overridden by `data.<split>`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    name = _require(data_cfg, "dataset")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}' (data.dataset); choose one of {', '.join(DATASETS)}")
    return {**_DEFAULTS[name][split], **(data_cfg.get(split) or {})}


def resolve_class_names(data_cfg: dict) -> tuple[str, ...]:
    """`data.class_names`, else the dataset's standard names when num_classes matches them, else the names
    in a generated mini set's manifest under `root`, else class_0, class_1, ..."""
    num_classes = int(_require(data_cfg, "num_classes"))
    if data_cfg.get("class_names") is not None:
        names = tuple(data_cfg["class_names"])
        if len(names) != num_classes:
            raise ValueError(f"data.class_names has {len(names)} class names for num_classes={num_classes}")
        return names
    standard = {"ade20k": ADE20K_CLASSES, "voc": VOC_CLASSES, "pascal_context": PASCAL_CONTEXT59_CLASSES}
    for names in (standard.get(data_cfg.get("dataset")), manifest_class_names(data_cfg.get("root", ""))):
        if names is not None and len(names) == num_classes:
            return tuple(names)
    return tuple(f"class_{i}" for i in range(num_classes))


def build_dataset(data_cfg: dict, split: str) -> SegmentationDataset:
    """The decoded dataset of `split` ("train" | "val"): items are dicts with uint8 image/label (no pipeline)."""
    check_data_config(data_cfg)
    cfg = split_config(data_cfg, split)
    root = _require(data_cfg, "root")
    num_classes = int(_require(data_cfg, "num_classes"))
    if data_cfg.get("synthetic"):
        prepare_synthetic(data_cfg, generate_mini_ade)
    class_names = resolve_class_names(data_cfg)
    name = data_cfg["dataset"]
    if name == "ade20k":
        return ADE20KDataset(root, source=cfg["source"], list_file=cfg.get("list"), split=cfg["split"],
                             num_classes=num_classes, class_names=class_names)
    cls = VOCDataset if name == "voc" else PascalContextDataset
    return cls(root, list_file=cfg["list"], img_dir=cfg["img_dir"], ann_dir=cfg["ann_dir"],
               num_classes=num_classes, class_names=class_names)


def build_train_transform(cfg: dict):
    pipeline = cfg.get("pipeline", "csail")
    if pipeline == "csail":
        return CSAILTrainTransform(cfg.get("short_sides", (300, 375, 450, 525, 600)),
                                   cfg.get("max_long_side", 1000), cfg.get("flip", True),
                                   cfg.get("image_resize", "cv2"))
    if pipeline == "mmseg":
        return MMSegTrainTransform(cfg.get("scale", (2048, 512)), cfg.get("ratio_range", (0.5, 2.0)),
                                   cfg.get("crop_size", (512, 512)), cfg.get("cat_max_ratio", 0.75),
                                   cfg.get("flip", True), cfg.get("photometric", True))
    if pipeline == "deeplab_v2":
        return DeepLabV2TrainTransform(cfg.get("size", (321, 321)), cfg.get("ratio_range", (0.5, 1.3)),
                                       cfg.get("flip", True))
    raise ValueError(f"unknown pipeline '{pipeline}' (data.train.pipeline); choose one of {', '.join(PIPELINES)}")


def segmentation_normalizer(data_cfg: dict) -> PixelNormalizer:
    """The model-input encoding of a segmentation config; default RGB 0..1 with ImageNet mean/std."""
    return PixelNormalizer.from_config(data_cfg, order="rgb", scale=1, mean=IMAGENET_RGB_MEAN, std=IMAGENET_RGB_STD)


class _SegmentationMapper(Dataset):
    """Maps records of a segmentation dataset to model inputs (normalised image tensor, int64 label); exposes
    the dataset's `num_classes` and `class_names` and the `normalizer` of the images."""

    dataset: SegmentationDataset
    normalizer: PixelNormalizer

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def class_names(self) -> tuple:
        return self.dataset.class_names


class SegmentationTrainMapper(_SegmentationMapper):
    """Indexed by `SampleKey`: decodes sample `key.index` and augments it with its own seeded Generator."""

    def __init__(self, dataset: SegmentationDataset, transform, seed: int, normalizer: PixelNormalizer):
        self.dataset, self.transform, self.seed, self.normalizer = dataset, transform, seed, normalizer

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        sample = self.dataset[key.index]
        image, label = self.transform(sample["image"], sample["label"], sample_rng(self.seed, key), key.short_side)
        return self.normalizer.to_tensor(image), torch.from_numpy(label.astype(np.int64)), sample["name"], key


class SegmentationCollate:
    """Segmentation batching: images and labels padded (labels with the ignore index) to one size, a multiple
    of `multiple` and at least `min_size`; `meta` holds the names and the sampler's keys or original sizes."""

    def __init__(self, multiple: int = 1, min_size=(0, 0)):
        self.multiple, self.min_size = multiple, min_size

    def __call__(self, items):
        images, labels = pad_batch([it[0] for it in items], [it[1] for it in items], self.multiple, self.min_size)
        meta = {"names": [it[2] for it in items]}
        if isinstance(items[0][3], SampleKey):
            meta["iteration"] = items[0][3].iteration
            meta["indices"] = [it[3].index for it in items]
        else:
            meta["ori_sizes"] = [it[3] for it in items]
        return {"images": images, "labels": labels, "meta": meta}


class TrainLoader:
    """Infinite iterator of training batches {"images": [B, 3, H, W], "labels": int64 [B, H, W],
    "meta": {"names", "iteration", "indices"}}; batch i is iteration start_iter + i."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.dataset = loader.dataset.dataset  # the records (SegmentationDataset)
        self._iterator = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)


def build_train_loader(data_cfg: dict, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                       start_iter: int = 0, num_workers: int = 0, dataset: SegmentationDataset | None = None
                       ) -> TrainLoader:
    """Per-rank training batches of `batch_size`, deterministic in (seed, iteration, rank): resuming with
    start_iter=k yields what an uninterrupted run sees from iteration k. `dataset` reuses a built one."""
    cfg = split_config(data_cfg, "train")
    dataset = dataset if dataset is not None else build_dataset(data_cfg, "train")
    transform = build_train_transform(cfg)
    if isinstance(transform, CSAILTrainTransform):
        landscape = [w >= h for h, w in (dataset.image_size(i) for i in range(len(dataset)))]
        sampler = TrainBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                    start_iter=start_iter, landscape=landscape, short_sides=transform.short_sides)
        collate = SegmentationCollate(int(cfg.get("pad_multiple", 8)))
    else:
        sampler = TrainBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                    start_iter=start_iter)
        min_size = transform.crop_size if isinstance(transform, MMSegTrainTransform) else (0, 0)
        collate = SegmentationCollate(int(cfg.get("pad_multiple", 1)), min_size)
    loader = DataLoader(SegmentationTrainMapper(dataset, transform, seed, segmentation_normalizer(data_cfg)),
                        batch_sampler=sampler, collate_fn=collate, **worker_options(num_workers))
    return TrainLoader(loader)


class SegmentationValMapper(_SegmentationMapper):
    """Full-resolution normalised image and label of this rank's shard of the val split, with the decoded uint8
    image (test-time resizing starts from it, as the originals resize before normalising)."""

    def __init__(self, dataset: SegmentationDataset, indices: list[int], normalizer: PixelNormalizer):
        self.dataset, self.indices, self.normalizer = dataset, indices, normalizer

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        sample = self.dataset[self.indices[i]]
        return (self.normalizer.to_tensor(sample["image"]), torch.from_numpy(sample["label"].astype(np.int64)),
                sample["name"], sample["ori_size"], torch.from_numpy(sample["image"]))


class SegmentationValCollate(SegmentationCollate):
    """SegmentationCollate plus "images_uint8": the decoded images, uint8 RGB [B, H, W, 3] (one size per batch)."""

    def __call__(self, items):
        batch = super().__call__(items)
        batch["images_uint8"] = torch.stack([it[4] for it in items])
        return batch


def build_val_loader(data_cfg: dict, *, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     dataset: SegmentationDataset | None = None) -> DataLoader:
    """Finite loader over this rank's shard of the val split, batch 1, full-resolution image and label:
    {"images": [1, 3, H, W], "labels": int64 [1, H, W], "images_uint8": uint8 RGB [1, H, W, 3],
    "meta": {"names": [str], "ori_sizes": [(H, W)]}}.
    `loader.dataset` (a SegmentationValMapper) states `num_classes`, `class_names` and the `normalizer`."""
    dataset = dataset if dataset is not None else build_dataset(data_cfg, "val")
    samples = SegmentationValMapper(dataset, shard_indices(len(dataset), rank, world_size),
                                    segmentation_normalizer(data_cfg))
    return DataLoader(samples, batch_size=1, shuffle=False, collate_fn=SegmentationValCollate(),
                      **worker_options(num_workers))
