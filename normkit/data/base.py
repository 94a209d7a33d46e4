"""The common segmentation dataset: a list of (image, label) files, decoded and label-mapped on access.

Readers (ADE20K, VOC, Pascal Context) only build the file list and the label lookup table; decoding, checks
and error messages live here so that every dataset fails the same clear way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path
    name: str
    size: tuple[int, int] | None = None  # (height, width) when the list file states it


def require_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} does not exist or is not a folder")
    return path


def require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_listed_files(paths, source: str) -> None:
    """Every file a dataset lists must exist: checked when the dataset is built, so a training run stops before
    its first step rather than when it reaches a missing file (the validation split only after training)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) listed by {source} not found: {', '.join(missing[:5])}"
                                + (" ..." if len(missing) > 5 else ""))


# What PIL raises for files it cannot decode, including images whose size exceeds Image.MAX_IMAGE_PIXELS
# (decompression bombs: a few KB that would decode to GBs).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)
# Integer single-channel modes of 16-bit PNGs ("I" in older Pillow); PIL's convert("RGB") clips them to 255.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I")


def _rgb(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode in _WIDE_GREY_MODES:
        values = np.array(im).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise RuntimeError(f"image file {path}: mode {im.mode} values outside 0..65535 (expected an 8- or "
                               "16-bit image)")
        grey = ((values + 128) // 257).astype(np.uint8)  # 0..65535 -> 0..255, rounded
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "F":
        raise RuntimeError(f"image file {path}: floating-point images (mode F) are not supported; expected an 8- "
                           "or 16-bit image")
    return np.array(im.convert("RGB"))


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 array [H, W, 3]; 16-bit grey images are scaled to 8 bits. A clear error names a missing,
    undecodable or oversized (decompression bomb) file."""
    require_file(path, "image file")
    try:
        with Image.open(path) as im:
            return _rgb(im, path)
    except _DECODE_ERRORS as exc:
        raise RuntimeError(f"cannot decode image file {path}: {exc}") from exc


def read_label(path: Path) -> np.ndarray:
    """Class-index array [H, W] (uint8). Read with PIL so palette PNGs give their indices, not colours."""
    require_file(path, "label file")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise RuntimeError(f"label file {path} must be a single-channel 8-bit PNG (mode L or P), "
                                   f"got mode {im.mode}")
            return np.array(im)
    except _DECODE_ERRORS as exc:
        raise RuntimeError(f"cannot decode label file {path}: {exc}") from exc


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    require_file(path, "image file")
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except _DECODE_ERRORS as exc:
        raise RuntimeError(f"cannot decode image file {path}: {exc}") from exc


def label_lut(num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """Lookup table raw value -> train id (0..K-1 or 255); -1 marks values that must not occur.

    reduce_zero_label (ADE20K, Pascal Context-59): raw 0 = "other/background" -> 255, raw k -> k - 1.
    Otherwise (VOC): raw k -> k. Raw 255 is the ignore label in both cases.
    """
    if num_classes + reduce_zero_label > IGNORE_INDEX:  # the classes' raw values must stay below the ignore label
        raise ValueError(f"{num_classes} classes do not fit in 8-bit labels with 255 ignored"
                         f"{' and 0 reduced' if reduce_zero_label else ''}: at most "
                         f"{IGNORE_INDEX - reduce_zero_label}")
    lut = np.full(256, -1, np.int16)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    if reduce_zero_label:
        lut[0] = IGNORE_INDEX
        lut[1:num_classes + 1] = np.arange(num_classes)
    else:
        lut[:num_classes] = np.arange(num_classes)
    return lut


class SegmentationDataset(Dataset):
    """Map-style dataset of decoded samples.

    `dataset[i]` -> {"image": uint8 [H, W, 3] RGB, "label": uint8 [H, W] (0..K-1, 255 = ignore),
    "name": str, "ori_size": (H, W)}. Pipelines (normkit.data.transforms) turn these into tensors.
    """

    def __init__(self, samples: list[Sample], num_classes: int, class_names, lut: np.ndarray, description: str):
        if not samples:
            raise ValueError(f"{description}: the sample list is empty")
        if num_classes < 1 or num_classes > 255:
            raise ValueError(f"num_classes must be in 1..255, got {num_classes}")
        self.samples = samples
        self.num_classes = num_classes
        self.class_names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(num_classes))
        if len(self.class_names) != num_classes:
            raise ValueError(f"{description}: {len(self.class_names)} class names given for num_classes={num_classes}")
        require_listed_files([path for s in samples for path in (s.image, s.label)], description)
        self.lut = lut
        self.description = description
        self._sizes: list[tuple[int, int] | None] = [s.size for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self)} samples, {self.num_classes} classes)"

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample `index` from the list file or the image header (cached)."""
        if self._sizes[index] is None:
            self._sizes[index] = image_size(self.samples[index].image)
        return self._sizes[index]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.image)
        raw = read_label(sample.label)
        if raw.shape != image.shape[:2]:
            raise ValueError(f"image/label size mismatch: {sample.image} is {image.shape[0]}x{image.shape[1]} "
                             f"but {sample.label} is {raw.shape[0]}x{raw.shape[1]} (height x width)")
        mapped = self.lut[raw]
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0]).tolist()
            raise ValueError(f"label file {sample.label} holds values {bad} outside the {self.num_classes} classes "
                             f"of {self.description} (check data.num_classes)")
        return {"image": image, "label": mapped.astype(np.uint8), "name": sample.name,
                "ori_size": (image.shape[0], image.shape[1])}


def read_split_list(path: Path) -> list[list[str]]:
    """The whitespace-separated fields of each non-blank line of a split file."""
    require_file(path, "split list")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"split list {path} is empty")
    return rows


def _worker_init(_worker_id: int) -> None:
    # Workers already run in parallel; nested thread pools would only oversubscribe the cores.
    import cv2
    import torch
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def worker_options(num_workers: int) -> dict:
    """DataLoader keyword arguments for `num_workers` worker processes (none: load in the main process).

    Batches go to pinned memory when this process already uses CUDA (the model is on a GPU), so copies to the GPU
    can overlap compute; a CPU run on a machine with GPUs opens no CUDA context for it.

    Workers start from a fork server, not from a fork of the (multi-threaded) training process: a forked
    child inherits thread pools without their threads, and OpenCV's pool then deadlocks on its first
    reconfiguration. Each worker runs single-threaded.

    Every loader gets its own generator: a DataLoader draws its workers' base seed whenever an iterator is
    created, from the global torch RNG unless given one. That global stream also drives the model's random
    sampling (detection RoIs and anchors, dropout), and a resumed run creates its iterators at other points
    of it than the uninterrupted run (training after the restore, evaluation between checkpoints), so
    sharing it made resumed runs diverge. Samples draw their augmentation from `sample_rng`, not from it."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    common = {"generator": torch.Generator().manual_seed(0),
              "pin_memory": torch.cuda.is_available() and torch.cuda.is_initialized()}
    if num_workers == 0:
        return {"num_workers": 0, **common}
    return {"num_workers": num_workers, "worker_init_fn": _worker_init, "multiprocessing_context": "forkserver",
            **common}


def prepare_synthetic(data_cfg: dict, generate: Callable[..., object]) -> None:
    """Generates the mini set of `data.synthetic` ({num_train, num_val, size, seed}) into `data.root` with
    `generate(root, **options)` unless it is already there; in a distributed run rank 0 writes while the
    others wait."""
    options = data_cfg["synthetic"]
    allowed = {"num_train", "num_val", "size", "seed"}
    if not isinstance(options, dict) or set(options) - allowed:
        raise ValueError(f"data.synthetic must be a mapping with keys among {sorted(allowed)}, got {options!r}")
    import torch.distributed as dist
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        generate(data_cfg["root"], **options)
    if distributed:
        dist.barrier()
