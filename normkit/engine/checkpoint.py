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

__all__ = ["atomic_save", "load_checkpoint", "capture_rng_state", "restore_rng_state", "non_finite_entries",
           "Checkpointer"]

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
    # Only this process's GPU: a rank uses one device, and the visible set may differ when the run resumes.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # checkpoints before 2026-12 kept every visible device's state
        device = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[device] if device < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def non_finite_entries(obj, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict/list/tuple that hold NaN or inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [name for key, value in items
            for name in non_finite_entries(value, f"{prefix}.{key}" if prefix else str(key))]


class Checkpointer:
    """Writes `iter_NNNNNNN.pth` files into `directory` and keeps `latest.pth` naming the newest one.

    `latest.pth` is a hard link to (or, where links are unsupported, a copy of) the newest checkpoint, made
    atomically, so it is itself a loadable checkpoint (`tools/test.py --checkpoint work_dir/latest.pth`).
    A state holding a non-finite floating-point tensor is never written (`save` raises), so the newest file
    is always one to resume from. Only the newest `max_keep` iteration files of this run are kept (all when
    None): files this checkpointer wrote, plus those up to the checkpoint it resumed from; any other file
    in the directory is never deleted. `enabled=False` (non-zero ranks) makes `save` write nothing.
    """

    LATEST = "latest.pth"
    _PATTERN = re.compile(r"^iter_(\d+)\.pth$")
    # What a killed atomic write of an iteration file or of latest.pth leaves behind (normkit.io.atomic_write).
    _TEMPORARY = re.compile(r"^\.(iter_\d+\.pth|latest\.pth)\.tmp-\d+$")

    def __init__(self, directory: str | os.PathLike, *, max_keep: int | None = None, enabled: bool = True):
        if max_keep is not None and (isinstance(max_keep, bool) or not isinstance(max_keep, int) or max_keep < 1):
            raise ValueError(f"max_keep must be an int >= 1 or None, got {max_keep!r}")
        self.directory = Path(directory)
        self.max_keep = max_keep
        self.enabled = enabled
        self._run_files: list[Path] = []  # this run's iteration files, oldest first: the only ones pruning deletes
        if enabled and self.latest_path.exists() and not self.latest_path.is_file():
            raise IsADirectoryError(f"{self.latest_path} exists but is not a file: remove it or choose another "
                                    "work dir (checkpoints could not be written)")

    @property
    def latest_path(self) -> Path:
        return self.directory / self.LATEST

    def has_checkpoint(self) -> bool:
        return self.latest_path.is_file()

    @classmethod
    def _iteration_of(cls, path: Path) -> int | None:
        match = cls._PATTERN.match(path.name)
        return int(match.group(1)) if match else None

    def iteration_files(self) -> list[Path]:
        found = [(it, p) for p in self.directory.glob("iter_*.pth") if (it := self._iteration_of(p)) is not None]
        return [p for _, p in sorted(found)]

    def remove_stale_temporaries(self) -> list[Path]:
        """Deletes the temporary files of checkpoint writes killed before they finished (`.iter_N.pth.tmp-PID`,
        `.latest.pth.tmp-PID`); call it before training, when no write of this directory is under way."""
        stale = [p for p in self.directory.glob(".*.tmp-*") if self._TEMPORARY.match(p.name) and p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            logger.warning("removed %d temporary file(s) of interrupted checkpoint writes in %s: %s", len(stale),
                           self.directory, ", ".join(p.name for p in stale))
        return stale

    def resume(self) -> tuple[Path, dict] | None:
        """The newest readable checkpoint of the directory as `(path, state)`, or None when there is none.

        Iteration files are tried newest first, then `latest.pth` (a kill between writing `iter_N.pth` and
        linking `latest.pth` leaves the iteration file the newer one). An unreadable file (truncated, corrupt)
        is skipped with a warning; when files exist but none can be read, that is an error rather than a
        silent restart from scratch. The files up to the one resumed from become this run's files for pruning.
        """
        candidates = [*reversed(self.iteration_files()), self.latest_path]
        candidates = [p for p in candidates if p.exists()]
        failures = []
        for path in candidates:
            try:
                state = load_checkpoint(path)
            except (RuntimeError, FileNotFoundError) as exc:
                logger.warning("cannot resume from %s, trying the previous checkpoint: %s", path, exc)
                failures.append(path.name)
                continue
            resumed = state.get("iteration")
            if isinstance(resumed, int):
                self._run_files = [p for p in self.iteration_files() if self._iteration_of(p) <= resumed]
            return path, state
        if failures:
            raise RuntimeError(f"cannot resume: no checkpoint in {self.directory} can be read ({', '.join(failures)}); "
                               "move them away to start from scratch")
        return None

    def save(self, state: dict, iteration: int) -> Path | None:
        """Writes `state` as `iter_<iteration>.pth` and points `latest.pth` at it, then prunes.

        Raises FloatingPointError, writing nothing, when a floating-point tensor of `state` is NaN or inf. The
        check runs on every rank (before the `enabled` test), so under DDP, whose replicas hold the same
        weights, all ranks stop together instead of the others waiting for rank 0.
        """
        bad = non_finite_entries(state)
        if bad:
            kept = (f"; {self.latest_path} still holds the last good one"
                    if self.enabled and self.has_checkpoint() else "")
            raise FloatingPointError(f"not saving the checkpoint of iteration {iteration}: non-finite values in "
                                     f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}{kept}")
        if not self.enabled:
            return None
        path = self.directory / f"iter_{iteration:07d}.pth"
        atomic_save(state, path)
        self._point_latest_to(path)
        logger.info("saved checkpoint %s", path)
        if path in self._run_files:
            self._run_files.remove(path)
        self._run_files.append(path)
        if self.max_keep is not None:
            for old in self._run_files[:-self.max_keep]:
                old.unlink(missing_ok=True)
            del self._run_files[:-self.max_keep]
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
