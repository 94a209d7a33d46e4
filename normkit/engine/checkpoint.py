"""Atomic checkpoint files, RNG state capture, and the work-dir checkpointer with its `latest.pth`.

Everything stored is tensors and plain Python types, so checkpoints read back with
`torch.load(weights_only=True)`: loading one never runs code from the file.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from normkit.io import fsync_dir, atomic_save, load_checkpoint

__all__ = ["atomic_save", "load_checkpoint", "capture_rng_state", "restore_rng_state", "Checkpointer"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict:
    """torch, numpy, python and CUDA generator states as tensors and plain types."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Writes `iter_NNNNNNN.pth` files into `directory` and keeps `latest.pth` naming the newest one.

    `latest.pth` is a hard link to (or, where links are unsupported, a copy of) the newest checkpoint, made
    atomically, so it is itself a loadable checkpoint (`tools/test.py --checkpoint work_dir/latest.pth`).
    Only the newest `max_keep` iteration files are kept (all when None). `enabled=False` (non-zero ranks)
    makes `save` a no-op.
    """

    LATEST = "latest.pth"
    _PATTERN = re.compile(r"^iter_(\d+)\.pth$")

    def __init__(self, directory: str | os.PathLike, *, max_keep: int | None = None, enabled: bool = True):
        if max_keep is not None and max_keep < 1:
            raise ValueError(f"max_keep must be >= 1 or None, got {max_keep}")
        self.directory = Path(directory)
        self.max_keep = max_keep
        self.enabled = enabled

    @property
    def latest_path(self) -> Path:
        return self.directory / self.LATEST

    def has_checkpoint(self) -> bool:
        return self.latest_path.is_file()

    def iteration_files(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.directory.glob("iter_*.pth") if (m := self._PATTERN.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict, iteration: int) -> Path | None:
        if not self.enabled:
            return None
        path = self.directory / f"iter_{iteration:07d}.pth"
        atomic_save(state, path)
        self._point_latest_to(path)
        logger.info("saved checkpoint %s", path)
        if self.max_keep is not None:
            for old in self.iteration_files()[:-self.max_keep]:
                old.unlink()
        return path

    def _point_latest_to(self, path: Path) -> None:
        tmp = self.directory / f".{self.LATEST}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links: fall back to a second atomic write
            atomic_save(load_checkpoint(path), self.latest_path)
            return
        os.replace(tmp, self.latest_path)
        fsync_dir(self.directory)

    def load(self, path: str | os.PathLike | None = None) -> dict:
        return load_checkpoint(self.latest_path if path is None else path)
