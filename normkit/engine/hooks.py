"""Trainer hooks: periodic checkpoints, periodic evaluation, scalar logging (JSON lines, tensorboard), progress bar."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from normkit.engine.checkpoint import Checkpointer
from normkit.engine.trainer import HookBase
from normkit.io import atomic_write_text

__all__ = ["PeriodicCheckpointer", "EvalHook", "MetricsWriter", "ProgressBar", "has_evaluation_record"]

logger = logging.getLogger(__name__)


def _due(trainer, period: int) -> bool:
    """True after every `period`-th iteration and after the last one; period <= 0 means the last one only."""
    done = trainer.iter + 1
    return trainer.is_last_iter or (period > 0 and done % period == 0)


class PeriodicCheckpointer(HookBase):
    """Saves the trainer state every `period` iterations and at the end (on every rank: the state is gathered
    collectively; the checkpointer writes on rank 0 only)."""

    def __init__(self, checkpointer: Checkpointer, period: int):
        self.checkpointer = checkpointer
        self.period = period

    def after_step(self) -> None:
        if _due(self.trainer, self.period):
            trainer = self.trainer
            trainer.iter += 1  # the checkpoint holds the number of completed iterations: resume starts there
            try:
                self.checkpointer.save(trainer.state_dict(), trainer.iter)
            finally:
                trainer.iter -= 1


class EvalHook(HookBase):
    """Calls `eval_fn()` every `period` iterations and at the end; its result (a dict whose float entries
    are reported as `val/<key>`) is added to the trainer's scalars and kept in `self.latest`.
    `eval_fn` runs on every rank (distributed evaluation) and restores train mode itself or not: the hook
    puts the model back in train mode afterwards.

    The checkpoint of an evaluation iteration is saved before that evaluation (PeriodicCheckpointer comes first,
    as in detectron2, so a kill while evaluating costs no training). With `missed(iteration)`, which says (the
    same on every rank) whether the evaluation of a resumed run's first iteration was never recorded, that
    evaluation runs before training continues, and its scalars are there for MetricsWriter.before_train."""

    def __init__(self, eval_fn: Callable[[], dict], period: int, *, missed: Callable[[int], bool] | None = None):
        self.eval_fn = eval_fn
        self.period = period
        self.missed = missed
        self.latest: dict | None = None

    def before_train(self) -> None:
        start = self.trainer.start_iter
        if (self.missed is not None and self.period > 0 and 0 < start < self.trainer.max_iter
                and start % self.period == 0 and self.missed(start)):
            logger.info("evaluating iteration %d again: its evaluation was interrupted", start)
            self._evaluate()

    def after_step(self) -> None:
        if _due(self.trainer, self.period):
            self._evaluate()

    def _evaluate(self) -> None:
        self.latest = self.eval_fn()
        self.trainer.model.train()
        self.trainer.scalars.update({f"val/{k}": float(v) for k, v in self.latest.items()
                                     if isinstance(v, (int, float))})


def has_evaluation_record(directory: str | Path, iteration: int) -> bool:
    """Whether MetricsWriter's `metrics.jsonl` in `directory` holds the evaluation scalars of `iteration`."""
    path = Path(directory) / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("iteration") == iteration and any(
                k.startswith("val/") for k in record):
            return True
    return False


class MetricsWriter(HookBase):
    """Every `period` iterations (and at the end) appends the trainer's scalars to `metrics.jsonl` and, with
    `tensorboard=True`, writes them as tensorboard scalars under `directory`. Create it on rank 0 only.
    Before training, records past the iteration the run starts from are removed from `metrics.jsonl`."""

    def __init__(self, directory: str | Path, period: int = 20, *, tensorboard: bool = True):
        self.directory = Path(directory)
        self.period = period
        self.tensorboard = tensorboard
        self._writer = None

    def before_train(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(self.trainer.start_iter)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            # A resumed run hides the steps a killed run logged after its checkpoint, as metrics.jsonl drops them.
            purge_step = self.trainer.start_iter + 1 if self.trainer.start_iter > 0 else None
            self._writer = SummaryWriter(str(self.directory / "tensorboard"), purge_step=purge_step)
        if any(k.startswith("val/") for k in self.trainer.scalars):  # an interrupted evaluation, run again
            self._write(self.trainer.start_iter)

    def _drop_records_after(self, iteration: int) -> None:
        """Removes the records of iterations after `iteration` (a resumed run writes them again) and lines a
        kill left unreadable, so that every iteration appears once."""
        path = self.directory / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept, unreadable = [], 0
        for line in lines:
            try:
                record = json.loads(line)
                step = int(record["iteration"])
            except (ValueError, TypeError, KeyError):
                unreadable += 1
                continue
            if step <= iteration:
                kept.append(line)
        if unreadable:
            logger.warning("%s: dropped %d unreadable line(s)", path, unreadable)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def after_step(self) -> None:
        trainer = self.trainer
        if not (_due(trainer, self.period) or any(k.startswith("val/") for k in trainer.scalars)):
            return
        self._write(trainer.iter + 1)

    def _write(self, step: int) -> None:
        scalars = self.trainer.scalars
        with open(self.directory / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iteration": step, **scalars}) + "\n")
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def after_train(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ProgressBar(HookBase):
    """tqdm bar over the iterations with the loss and lr; tqdm adds the rate and the ETA. Rank 0 only."""

    def __init__(self, loss_key: str = "total_loss"):
        self.loss_key = loss_key
        self._bar = None

    def before_train(self) -> None:
        from tqdm import tqdm
        trainer = self.trainer
        self._bar = tqdm(total=trainer.max_iter, initial=trainer.start_iter, desc="train", unit="it",
                         dynamic_ncols=True, mininterval=1.0)

    def after_step(self) -> None:
        scalars = self.trainer.scalars
        self._bar.set_postfix(loss=f"{scalars[self.loss_key]:.4f}", lr=f"{scalars['lr']:.3g}", refresh=False)
        self._bar.update(1)

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
