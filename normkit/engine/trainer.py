"""A small iteration-based trainer: `run_step` is the one place a training step happens; hooks do the rest."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from normkit.engine.checkpoint import capture_rng_state, restore_rng_state
from normkit.engine.distributed import (all_gather_objects, get_rank, get_world_size, mean_over_ranks, move_to_device,
                                       unwrap_model)
from normkit.engine.lr_scheduler import IterationLRScheduler

__all__ = ["HookBase", "Trainer", "AMP_DTYPES"]

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class HookBase:
    """Called by the trainer around training and around every iteration; `self.trainer` is set on registration."""

    trainer: Trainer

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        """Runs even when training stops with an exception; check `trainer.finished` before final work."""

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass


class Trainer:
    """Trains `model` for iterations `[start_iter, max_iter)`.

    One iteration = `iter_size` micro-batches whose gradients accumulate (each loss divided by iter_size,
    DDP gradient sync only on the last one), then one optimizer step and one scheduler step.
    `data_loader_fn(start_batch)` returns an iterator of batches starting at micro-batch number `start_batch`
    (= iteration * iter_size), which makes resumed runs see the same data.

    The model contract, the same for every task: the trainer never looks inside a batch. It moves the batch
    to the device as the loader yields it (tensors inside nested dicts, lists and tuples; other objects
    untouched) and calls `model(batch)`, which in training mode returns a dict of scalar tensors: keys ending
    in "loss" are summed into the training loss, the rest (e.g. pixel_acc) are only logged.

    amp: None, "bf16" or "fp16" (autocast; fp16 adds a GradScaler whose state is checkpointed).
    After each step `self.scalars` holds the rank-averaged scalars of that iteration plus `lr`, `time`
    and `data_time`; hooks may add to it (e.g. validation metrics).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: IterationLRScheduler,
                 data_loader_fn: Callable[[int], Iterable[dict]], *, max_iter: int, iter_size: int = 1,
                 amp: str | None = None, device: torch.device | str = "cpu"):
        if max_iter <= 0:
            raise ValueError(f"train.max_iter must be > 0, got {max_iter}")
        if iter_size < 1:
            raise ValueError(f"train.iter_size must be >= 1, got {iter_size}")
        if amp not in (None, *AMP_DTYPES):
            raise ValueError(f"unknown train.amp {amp!r}; choose null, bf16 or fp16")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data_loader_fn = data_loader_fn
        self.max_iter = max_iter
        self.iter_size = iter_size
        self.device = torch.device(device)
        self.amp_dtype = AMP_DTYPES[amp] if amp else None
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.hooks: list[HookBase] = []
        self.iter = 0
        self.start_iter = 0
        self.finished = False
        self.scalars: dict[str, float] = {}
        self._data_iter: Iterator[dict] | None = None

    def register_hooks(self, hooks: Sequence[HookBase | None]) -> None:
        for hook in hooks:
            if hook is not None:
                hook.trainer = self
                self.hooks.append(hook)

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Collective under torch.distributed (RNG states are gathered from every rank)."""
        return {"iteration": self.iter, "model": unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "grad_scaler": self.grad_scaler.state_dict(), "world_size": get_world_size(),
                "rng": all_gather_objects(capture_rng_state())}

    def load_state_dict(self, state: dict) -> None:
        """Restores everything `state_dict` saved; training then continues at `state["iteration"]`.

        Hyperparameters stay those of the optimizer and schedule as constructed (the config, so that a resumed
        run can change e.g. the learning rate): each param group's base learning rate, momentum, weight decay
        and other settings that differ from the checkpoint's are set back to the constructed values and
        logged. Their state (momentum buffers, the iteration) comes from the checkpoint.
        """
        missing = {"iteration", "model", "optimizer", "scheduler", "grad_scaler", "rng"} - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)}; it is not a training checkpoint "
                             "(weights-only files load with build_model(config, checkpoint=...) instead)")
        configured = [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
                      for group in self.optimizer.param_groups]
        configured_base_lrs = list(self.scheduler.base_lrs)
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for index, (group, settings) in enumerate(zip(self.optimizer.param_groups, configured)):
            for key, value in settings.items():
                if not isinstance(value, torch.Tensor) and group.get(key) != value:
                    logger.warning("resume: param group %d %s %r (checkpoint) -> %r (configured)", index, key,
                                   group.get(key), value)
                    group[key] = value
        if configured_base_lrs != self.scheduler.base_lrs:
            for index, (old, new) in enumerate(zip(self.scheduler.base_lrs, configured_base_lrs)):
                if old != new:
                    logger.warning("resume: param group %d base lr %g (checkpoint) -> %g (configured)", index, old, new)
            for group, base_lr in zip(self.optimizer.param_groups, configured_base_lrs):
                group["initial_lr"] = base_lr
            self.scheduler.load_state_dict({"iteration": self.scheduler.iteration, "base_lrs": configured_base_lrs})
        if state["grad_scaler"]:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.iter = self.start_iter = int(state["iteration"])
        rng, rank = state["rng"], get_rank()
        if len(rng) == get_world_size():
            restore_rng_state(rng[rank])
        else:
            logger.warning("checkpoint was written by %d processes, now %d: RNG states not restored, the run "
                           "continues but will not replay the original one exactly", len(rng), get_world_size())

    # -- loop -------------------------------------------------------------------------------------------
    def train(self, start_iter: int | None = None) -> None:
        """Runs iterations from `start_iter` (default: `self.iter`, i.e. 0 or the resumed iteration)."""
        self.start_iter = self.iter = self.iter if start_iter is None else start_iter
        self.finished = False
        self.model.train()
        self._data_iter = iter(self.data_loader_fn(self.start_iter * self.iter_size))
        logger.info("training iterations %d..%d", self.start_iter, self.max_iter)
        try:
            for hook in self.hooks:
                hook.before_train()
            while self.iter < self.max_iter:
                for hook in self.hooks:
                    hook.before_step()
                self.run_step()
                for hook in self.hooks:
                    hook.after_step()
                self.iter += 1
            self.finished = True
        finally:
            for hook in self.hooks:
                hook.after_train()

    @property
    def is_last_iter(self) -> bool:
        return self.iter + 1 == self.max_iter

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def run_step(self) -> None:
        start = time.perf_counter()
        data_time = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        summed: dict[str, torch.Tensor] = {}
        for micro in range(self.iter_size):
            data_start = time.perf_counter()
            batch = move_to_device(next(self._data_iter), self.device)
            data_time += time.perf_counter() - data_start
            accumulate = micro < self.iter_size - 1 and isinstance(self.model, nn.parallel.DistributedDataParallel)
            with self.model.no_sync() if accumulate else contextlib.nullcontext():
                with self._autocast():
                    outputs = self.model(batch)
                if not isinstance(outputs, dict):
                    raise RuntimeError("in training mode the model must return a dict of scalar tensors (keys "
                                       f"ending in 'loss' are optimised), got {type(outputs).__name__}")
                losses = [v for k, v in outputs.items() if k.endswith("loss")]
                if not losses:
                    raise RuntimeError(f"the model returned no loss terms (keys ending in 'loss') in training mode; "
                                       f"got keys {sorted(outputs)}")
                total = torch.stack([v.float() for v in losses]).sum()
                self.grad_scaler.scale(total / self.iter_size).backward()
            for key, value in (*outputs.items(), ("total_loss", total)):
                summed[key] = summed.get(key, 0.0) + value.detach().float() / self.iter_size
        scalars = mean_over_ranks(summed)
        if not math.isfinite(scalars["total_loss"]):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            raise FloatingPointError(f"loss became non-finite at iteration {self.iter}: {terms}")
        groups = self.optimizer.param_groups
        lr = next((g["lr"] for g in groups if g.get("lr_mult", 1.0) == 1.0), groups[0]["lr"])  # the base lr
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.scheduler.step()
        self.scalars = {**scalars, "lr": lr, "data_time": data_time, "time": time.perf_counter() - start}
