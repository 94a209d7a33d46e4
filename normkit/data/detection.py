"""Detection pipelines and loaders: COCO records -> normalised, resized, flipped, padded batches.

Batches follow the detection contract of normkit models::

    {"images": float32 [B, 3, Hp, Wp]   normalised, zero-padded bottom/right to the largest image, rounded
                                        up to a multiple of data.size_divisibility,
     "image_sizes": int64 [B, 2]        (h, w) of each resized image before padding,
     "orig_sizes": int64 [B, 2]         (h, w) of each image as stored,
     "scales": float32 [B]              resized = original * scale,
     "image_ids": int64 [B]             COCO image ids,
     "targets": [{"boxes": float32 [K, 4] xyxy in resized pixels, "labels": int64 [K] (0..K-1),
                  "iscrowd": bool [K], "masks": (data.mask_on) K entries: a list of float32 [2P] polygons in
                  resized pixels, or a uint8 [h, w] bitmap for instances stored as RLE}, ...]}

Order of operations per image (Detectron-1's `roi_data/minibatch.py` and `utils/blob.py`): flip in original
coordinates (the image, boxes x1' = W - 1 - x2 under the legacy convention or W - x2 otherwise, polygon
x' = W - 1 - x or W - x, RLE bitmaps mirrored), pixel normalisation on the float image, resize with bilinear
`cv2.resize` by scale = short_side / min(h, w) unless round(scale * max(h, w)) > max_size, in which case
scale = max_size / max(h, w); the resized size is (round(h * scale), round(w * scale)) and boxes and polygons
are multiplied by scale, bitmaps resized with nearest neighbour.

`data:` config keys read here (every key but `root` is optional; defaults shown; any other key is an error
naming the closest valid one)::

    data:
      dataset: coco
      root: data/mini_coco
      num_classes: null          # when given, must equal the annotation file's number of categories
      class_names: null          # default: the category names of the annotation file, in category-id order
      legacy_plus_one: true      # Detectron-1 boxes (x2 = x + w - 1, results w = x2 - x1 + 1); false: detectron2
      mask_on: false             # put instance masks in the targets
      pixel_order: bgr           # channel order of the model input: bgr | rgb
      pixel_scale: 255           # 255: pixel values 0..255 | 1: values 0..1 (before mean and std)
      mean: [102.9801, 115.9465, 122.7717]   # per channel, in pixel_order and pixel_scale (Caffe BGR means)
      std: [1.0, 1.0, 1.0]       # SN configs: pixel_order rgb, pixel_scale 1, ImageNet mean and std
      size_divisibility: 32      # pad multiple: 32 for FPN, 1 for C4 / DC5
      synthetic: null            # {num_train, num_val, size, seed}: generate the mini COCO set in root first
      train:
        split: train2017         # see normkit.data.coco for the known 2017/2014 splits
        ann_file: null           # default annotations/instances_<split>.json under root
        img_dir: null            # default images/<split> or <split> under root
        short_sides: [800]       # one drawn per image
        max_size: 1333
        flip: random             # random (p = 0.5 per image) | double (Detectron-1 USE_FLIPPED: every epoch
                                 # holds each image and its mirror) | none
        grouping: orientation    # orientation (w >= h and w < h never mix in a rank's batch) | sorted
                                 # (Detectron-1: images sorted by w / h, consecutive blocks shuffled) | none
      val:
        split: val2017
        ann_file: null
        img_dir: null
        short_side: 800
        max_size: 1333
        batch_size: 1          # >1 zero-pads images to a common size: SN's IN/LN statistics then see the padding

Training is deterministic per (seed, iteration, rank): the batch of every iteration is a function of the
index stream (`DetectionBatchSampler`) and each sample's augmentation draws from `sample_rng(seed, key)`, so
a run resumed with `start_iter` sees exactly the batches an uninterrupted run would. Training drops images
without a usable non-crowd annotation; validation keeps every image.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_util
from torch.utils.data import DataLoader, Dataset

from normkit.data.base import prepare_synthetic, worker_options
from normkit.data.coco import COCODetection
from normkit.data.pixels import CAFFE_BGR_MEAN, IMAGENET_RGB_MEAN, IMAGENET_RGB_STD, PixelNormalizer
from normkit.data.samplers import SampleKey, global_batches, sample_rng, shard_indices
from normkit.data.synthetic_coco import generate_mini_coco
from normkit.schema import check_keys, config_mapping

__all__ = ["CAFFE_BGR_MEAN", "IMAGENET_RGB_MEAN", "IMAGENET_RGB_STD", "DetectionBatchSampler", "DetectionCollate",
           "DetectionMapper", "PixelNormalizer", "build_coco_dataset", "build_coco_train_loader",
           "build_coco_val_loader", "check_coco_data_config", "coco_inference_batch", "compute_scale", "flip_boxes",
           "pad_images", "pixel_normalizer", "resize_scale_info", "sorted_block_batches"]

FLIP_MODES = ("random", "double", "none")
GROUPINGS = ("orientation", "sorted", "none")


def pixel_normalizer(data_cfg: dict) -> PixelNormalizer:
    """Detection defaults: Detectron-1's Caffe BGR means, std 1, values 0..255."""
    return PixelNormalizer.from_config(data_cfg, order="bgr", scale=255, mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------------- geometry
def compute_scale(height: int, width: int, short_side: int, max_size: int) -> float:
    """Detectron-1 `prep_im_for_blob`: short side to `short_side` unless the long side would exceed
    `max_size` (after rounding)."""
    scale = short_side / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return float(scale)


def resize_scale_info(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (h, w) `cv2.resize(fx=scale, fy=scale)` produces."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def flip_boxes(boxes: np.ndarray, width: int, legacy_plus_one: bool) -> np.ndarray:
    out = boxes.copy()
    off = 1.0 if legacy_plus_one else 0.0
    out[:, 0] = width - off - boxes[:, 2]
    out[:, 2] = width - off - boxes[:, 0]
    return out


def _polygons(segmentation, width: int, scale: float, flip: bool, legacy_plus_one: bool) -> list[torch.Tensor]:
    polys = []
    for poly in segmentation:
        p = np.asarray(poly, np.float64).copy()
        if flip:
            p[0::2] = width - (1.0 if legacy_plus_one else 0.0) - p[0::2]
        polys.append(torch.from_numpy((p * scale).astype(np.float32)))
    return polys


def _bitmap(rle: dict, height: int, width: int, scale: float, size: tuple[int, int], flip: bool) -> torch.Tensor:
    if isinstance(rle["counts"], list):  # uncompressed RLE -> compressed
        rle = mask_util.frPyObjects(rle, height, width)
    bitmap = mask_util.decode(rle)
    if flip:
        bitmap = bitmap[:, ::-1]
    if bitmap.shape != size:
        # Each output pixel takes the source pixel under its centre, mapped back by exactly `scale` as the pixels
        # and polygons are. cv2's nearest modes either floor the mapping (a half-pixel shift) or map by the
        # rounded sizes (a shift growing to half a pixel at the far edge).
        rows, cols = ((np.minimum(((np.arange(n) + 0.5) / scale).astype(np.int64), m - 1))
                      for n, m in zip(size, bitmap.shape))
        bitmap = bitmap[np.ix_(rows, cols)]
    return torch.from_numpy(np.ascontiguousarray(bitmap, dtype=np.uint8))


class DetectionMapper:
    """One decoded record (from `COCODetection[i]`) -> one sample of the batch contract, unpadded.

    `short_sides`: candidates, one drawn per image from `rng` (validation: a single value, no rng needed).
    `flip`: None to draw with probability 1/2 from `rng`, True/False to force it.
    """

    def __init__(self, normalizer: PixelNormalizer, short_sides, max_size: int, *, legacy_plus_one: bool = True,
                 mask_on: bool = False, random_flip: bool = False):
        if not short_sides:
            raise ValueError("the detection pipeline needs at least one short side (data.train.short_sides)")
        self.normalizer = normalizer
        self.short_sides = tuple(int(s) for s in short_sides)
        self.max_size = int(max_size)
        self.legacy_plus_one = legacy_plus_one
        self.mask_on = mask_on
        self.random_flip = random_flip

    def __call__(self, sample: dict, rng: np.random.Generator | None = None, flip: bool | None = None) -> dict:
        image = sample["image"]
        h, w = image.shape[:2]
        short = self.short_sides[0] if len(self.short_sides) == 1 else \
            self.short_sides[int(rng.integers(len(self.short_sides)))]
        if flip is None:
            flip = self.random_flip and bool(rng.random() < 0.5)
        scale = compute_scale(h, w, short, self.max_size)
        size = resize_scale_info(h, w, scale)
        if flip:
            image = image[:, ::-1]
        pixels = self.normalizer(image)
        if size != (h, w):
            # By factor, as Detectron-1: cv2 then samples with exactly `scale` (a target size would make it use
            # round(w * scale) / w), so pixels stay aligned with boxes * scale up to the far edge. A side that
            # would round to 0 pixels (an extreme aspect ratio) takes the target size, at least 1.
            if min(h, w) * scale > 0.5:
                pixels = cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
            else:
                pixels = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
            if pixels.shape[:2] != size:
                raise RuntimeError(f"cv2.resize by {scale} gave {pixels.shape[:2]}, expected {size}")
        boxes = sample["boxes"]
        if flip:
            boxes = flip_boxes(boxes, w, self.legacy_plus_one)
        target = {"boxes": torch.from_numpy((boxes * scale).astype(np.float32)).reshape(-1, 4),
                  "labels": torch.from_numpy(np.asarray(sample["labels"], np.int64)),
                  "iscrowd": torch.from_numpy(np.asarray(sample["iscrowd"], bool))}
        if self.mask_on:
            segms = sample.get("segmentations")
            if segms is None:
                raise ValueError("data.mask_on is true but the dataset records hold no segmentations")
            target["masks"] = [_polygons(s, w, scale, flip, self.legacy_plus_one) if isinstance(s, list)
                               else _bitmap(s, h, w, scale, size, flip) for s in segms]
        return {"image": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
                "image_size": size, "orig_size": (h, w), "scale": scale, "image_id": int(sample["image_id"]),
                "flipped": bool(flip), "target": target}


# ----------------------------------------------------------------------------------------------- batching
def pad_images(images: list[torch.Tensor], size_divisibility: int = 1) -> torch.Tensor:
    """[3, h_i, w_i] tensors -> [B, 3, Hp, Wp], zero-padded bottom/right to the largest h and w, each rounded
    up to a multiple of `size_divisibility`."""
    hp = max(int(im.shape[1]) for im in images)
    wp = max(int(im.shape[2]) for im in images)
    if size_divisibility > 1:
        hp = -(-hp // size_divisibility) * size_divisibility
        wp = -(-wp // size_divisibility) * size_divisibility
    out = images[0].new_zeros((len(images), 3, hp, wp))
    for i, im in enumerate(images):
        out[i, :, :im.shape[1], :im.shape[2]].copy_(im)
    return out


class DetectionCollate:
    """List of mapped samples -> the batch dict of the contract (see the module docstring)."""

    def __init__(self, size_divisibility: int = 32):
        if int(size_divisibility) < 1:
            raise ValueError(f"data.size_divisibility must be >= 1, got {size_divisibility}")
        self.size_divisibility = int(size_divisibility)

    def __call__(self, samples: list[dict]) -> dict:
        return {"images": pad_images([s["image"] for s in samples], self.size_divisibility),
                "image_sizes": torch.tensor([s["image_size"] for s in samples], dtype=torch.int64).reshape(-1, 2),
                "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64).reshape(-1, 2),
                "scales": torch.tensor([s["scale"] for s in samples], dtype=torch.float32),
                "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
                "targets": [s["target"] for s in samples]}


# ----------------------------------------------------------------------------------------------- sampling
def sorted_block_batches(ratios, global_batch: int, seed: int):
    """Detectron-1 aspect grouping: indices sorted by aspect ratio (w / h) cut into consecutive blocks of
    `global_batch`; every epoch shuffles the blocks (Generator seeded by (seed, epoch)). The remainder
    block is dropped."""
    order = np.argsort(np.asarray(ratios, np.float64), kind="stable")
    num_blocks = len(order) // global_batch
    if num_blocks == 0:
        raise ValueError(f"the dataset has {len(order)} samples, fewer than one global batch ({global_batch} = "
                         f"batch size x world size)")
    blocks = order[:num_blocks * global_batch].reshape(num_blocks, global_batch)
    epoch = 0
    while True:
        for b in np.random.default_rng([seed, epoch, 3]).permutation(num_blocks):
            yield blocks[b].tolist()
        epoch += 1


class DetectionBatchSampler:
    """This rank's `SampleKey`s for iterations start_iter, start_iter + 1, ... forever, grouped by aspect.

    `aspect_ratios`: w / h per sample. grouping "orientation": every rank's batch holds only w >= h or only
    w < h images (epochs shuffled by (seed, epoch); as detectron2's per-GPU aspect grouping, the ranks'
    orientations may differ); "sorted": Detectron-1's sorted blocks; "none": plain shuffling. Rank r takes the
    r-th slice of each global batch (with "sorted" and "none", N processes together see the batch one process
    with N x batch_size sees), and the stream depends only on (seed, iteration, rank). Skipping to
    `start_iter` walks the index stream only (no image is decoded).
    """

    def __init__(self, aspect_ratios, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_iter: int = 0, grouping: str = "orientation"):
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping '{grouping}' (data.train.grouping); choose one of "
                             f"{', '.join(GROUPINGS)}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_iter < 0:
            raise ValueError(f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size and start_iter >= 0; "
                             f"got batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"start_iter={start_iter}")
        self.aspect_ratios = np.asarray(aspect_ratios, np.float64)
        self.num_samples = len(self.aspect_ratios)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_iter, self.grouping = seed, start_iter, grouping

    def _stream(self):
        if self.grouping == "sorted":
            return sorted_block_batches(self.aspect_ratios, self.batch_size * self.world_size, self.seed)
        landscape = self.aspect_ratios >= 1.0 if self.grouping == "orientation" else None
        return global_batches(self.num_samples, self.batch_size, self.world_size, self.seed, landscape)

    def __iter__(self):
        lo = self.rank * self.batch_size
        for iteration, batch in enumerate(self._stream()):
            if iteration >= self.start_iter:
                yield [SampleKey(iteration, index, None) for index in batch[lo:lo + self.batch_size]]


# ----------------------------------------------------------------------------------------------- datasets
DATA_KEYS = ("dataset", "root", "num_classes", "class_names", "legacy_plus_one", "mask_on", "pixel_order",
             "pixel_scale", "mean", "std", "size_divisibility", "synthetic", "train", "val")
SPLIT_KEYS = {"train": ("split", "ann_file", "img_dir", "short_sides", "max_size", "flip", "grouping"),
              "val": ("split", "ann_file", "img_dir", "short_side", "max_size", "batch_size")}


def check_coco_data_config(data_cfg: dict) -> None:
    """Every key of the detection `data:` section and of `data.train` / `data.val` is known (a typo names the
    closest valid key) and `root` is a path."""
    check_keys(data_cfg, DATA_KEYS, "data")
    for split, keys in SPLIT_KEYS.items():
        check_keys(config_mapping(data_cfg, split, "data"), keys, f"data.{split}")
    if "root" not in data_cfg:
        raise ValueError("the data config needs `data.root`")
    root = data_cfg["root"]
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise ValueError(f"data.root must be the path of the dataset folder, got {root!r}")


def build_coco_dataset(data_cfg: dict, split: str) -> COCODetection:
    """The COCODetection of `split` ("train" | "val") from the `data:` config; training drops images without
    usable annotations. Checks data.num_classes and data.class_names against the annotation file."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split '{split}'; choose train or val")
    check_coco_data_config(data_cfg)
    if data_cfg.get("synthetic"):
        prepare_synthetic(data_cfg, generate_mini_coco)
    cfg = data_cfg.get(split) or {}
    dataset = COCODetection(data_cfg["root"], cfg.get("split", "train2017" if split == "train" else "val2017"),
                            ann_file=cfg.get("ann_file"), img_dir=cfg.get("img_dir"), filter_empty=split == "train",
                            legacy_plus_one=bool(data_cfg.get("legacy_plus_one", True)),
                            mask_on=bool(data_cfg.get("mask_on", False)))
    num_classes = data_cfg.get("num_classes")
    if num_classes is not None and int(num_classes) != dataset.num_classes:
        raise ValueError(f"data.num_classes is {num_classes} but {dataset.ann_file} has {dataset.num_classes} "
                         f"categories ({', '.join(dataset.class_names)})")
    if data_cfg.get("class_names") is not None:
        names = tuple(data_cfg["class_names"])
        if len(names) != dataset.num_classes:
            raise ValueError(f"data.class_names has {len(names)} names for {dataset.num_classes} categories")
        dataset.class_names = names
    return dataset


class _TrainSamples(Dataset):
    """Indexed by `SampleKey`; with flip "double" indices >= N are the mirrored copies of 0..N-1."""

    def __init__(self, dataset: COCODetection, mapper: DetectionMapper, seed: int, doubled: bool):
        self.dataset, self.mapper, self.seed, self.doubled = dataset, mapper, seed, doubled

    def __len__(self) -> int:
        return len(self.dataset) * (2 if self.doubled else 1)

    def __getitem__(self, key: SampleKey) -> dict:
        n = len(self.dataset)
        flip = (key.index >= n) if self.doubled else None
        return self.mapper(self.dataset[key.index % n], sample_rng(self.seed, key), flip)


class _ValSamples(Dataset):
    def __init__(self, dataset: COCODetection, indices: list[int], mapper: DetectionMapper):
        self.dataset, self.indices, self.mapper = dataset, indices, mapper

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.mapper(self.dataset[self.indices[i]], None, False)


class DetectionTrainLoader:
    """Infinite iterator of training batches; batch i is iteration start_iter + i. `.dataset` is the
    COCODetection, `.sampler` the DetectionBatchSampler."""

    def __init__(self, loader: DataLoader, dataset: COCODetection):
        self.loader, self.dataset = loader, dataset
        self.sampler = loader.batch_sampler
        self._iterator = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)


def build_coco_train_loader(data_cfg: dict, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                            start_iter: int = 0, num_workers: int = 0, dataset: COCODetection | None = None
                            ) -> DetectionTrainLoader:
    """Per-rank training batches of `batch_size` images following the contract, deterministic in
    (seed, iteration, rank). `dataset` reuses a built training COCODetection."""
    cfg = data_cfg.get("train") or {}
    dataset = dataset if dataset is not None else build_coco_dataset(data_cfg, "train")
    flip = cfg.get("flip", "random")
    flip = {True: "random", False: "none"}.get(flip, flip)
    if flip not in FLIP_MODES:
        raise ValueError(f"unknown flip mode '{flip}' (data.train.flip); choose one of {', '.join(FLIP_MODES)}")
    mapper = DetectionMapper(pixel_normalizer(data_cfg), cfg.get("short_sides", (800,)), cfg.get("max_size", 1333),
                             legacy_plus_one=dataset.legacy_plus_one, mask_on=dataset.mask_on,
                             random_flip=flip == "random")
    ratios = [w / h for h, w in (dataset.image_size(i) for i in range(len(dataset)))]
    if flip == "double":
        ratios = ratios * 2
    sampler = DetectionBatchSampler(ratios, batch_size, rank=rank, world_size=world_size, seed=seed,
                                    start_iter=start_iter, grouping=cfg.get("grouping", "orientation"))
    loader = DataLoader(_TrainSamples(dataset, mapper, seed, flip == "double"), batch_sampler=sampler,
                        collate_fn=DetectionCollate(data_cfg.get("size_divisibility", 32)),
                        **worker_options(num_workers))
    return DetectionTrainLoader(loader, dataset)


def _val_mapper(data_cfg: dict, legacy_plus_one: bool, mask_on: bool) -> DetectionMapper:
    cfg = data_cfg.get("val") or {}
    return DetectionMapper(pixel_normalizer(data_cfg), (cfg.get("short_side", 800),), cfg.get("max_size", 1333),
                           legacy_plus_one=legacy_plus_one, mask_on=mask_on)


def coco_inference_batch(image: np.ndarray, data_cfg: dict) -> dict:
    """A one-image batch of the contract from a uint8 RGB image [H, W, 3] read from anywhere (a demo image):
    normalised, resized and padded as the val split is; image id 0 and empty targets."""
    mapper = _val_mapper(data_cfg, bool(data_cfg.get("legacy_plus_one", True)), mask_on=False)
    sample = {"image": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
              "iscrowd": np.zeros(0, bool), "image_id": 0}
    return DetectionCollate(data_cfg.get("size_divisibility", 32))([mapper(sample)])


def build_coco_val_loader(data_cfg: dict, *, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                          dataset: COCODetection | None = None) -> DataLoader:
    """Finite loader over this rank's shard (indices rank, rank + world_size, ...) of the val split, every
    image kept, no flip, resized to data.val.short_side / max_size; batches follow the contract (targets
    included). `loader.dataset.dataset` is the COCODetection (for COCOEvaluator)."""
    cfg = data_cfg.get("val") or {}
    dataset = dataset if dataset is not None else build_coco_dataset(data_cfg, "val")
    mapper = _val_mapper(data_cfg, dataset.legacy_plus_one, dataset.mask_on)
    samples = _ValSamples(dataset, shard_indices(len(dataset), rank, world_size), mapper)
    return DataLoader(samples, batch_size=int(cfg.get("batch_size", 1)), shuffle=False,
                      collate_fn=DetectionCollate(data_cfg.get("size_divisibility", 32)), **worker_options(num_workers))
