"""Iteration-based learning-rate policies: poly (CSAIL, mmseg) and step decay, both with optional linear warmup.

Every schedule is a closed-form function of the iteration, so its state is just the iteration counter and
the base learning rates: resuming sets the exact rate the uninterrupted run would have used.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from normkit.schema import check_keys, config_float, config_int

__all__ = ["IterationLRScheduler", "PolyLR", "WarmupStepLR", "build_lr_scheduler", "scale_to_total_batch"]


class IterationLRScheduler:
    """Sets each param group's lr to `lr_at(base_lr_of_the_group, iteration)` times a warmup factor.

    The lr seen by the optimizer step of iteration t (0-based) is the one set after t calls to `step()`.
    Base lrs come from each group's `initial_lr` (set on first use from its `lr`), so per-group lr
    multipliers carry through every policy.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_iters: int = 0, warmup_factor: float = 1.0 / 3,
                 warmup_method: str = "linear"):
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        if warmup_method not in ("linear", "constant"):
            raise ValueError(f"unknown warmup_method {warmup_method!r}; choose 'linear' or 'constant'")
        if not 0.0 < warmup_factor <= 1.0:
            raise ValueError(f"warmup_factor must be in (0, 1], got {warmup_factor}")
        self.optimizer = optimizer
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        self.warmup_method = warmup_method
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.iteration = 0
        self._apply()

    def lr_at(self, base_lr: float, iteration: int) -> float:
        raise NotImplementedError

    def warmup_multiplier(self, iteration: int) -> float:
        if iteration >= self.warmup_iters:
            return 1.0
        if self.warmup_method == "constant":
            return self.warmup_factor
        alpha = iteration / self.warmup_iters
        return self.warmup_factor * (1.0 - alpha) + alpha

    def _apply(self) -> None:
        warmup = self.warmup_multiplier(self.iteration)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = warmup * self.lr_at(base_lr, self.iteration)

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"scheduler state has {len(state['base_lrs'])} param groups, the optimizer has "
                             f"{len(self.optimizer.param_groups)}")
        self.iteration = int(state["iteration"])
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        self._apply()


class PolyLR(IterationLRScheduler):
    """lr = (base_lr - min_lr) * (1 - t / max_iter) ** power + min_lr  (CSAIL with min_lr = 0; mmseg)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iter: int, *, power: float = 0.9, min_lr: float = 0.0,
                 **warmup):
        if max_iter <= 0:
            raise ValueError(f"poly schedule needs max_iter > 0, got {max_iter}")
        self.max_iter = max_iter
        self.power = power
        self.min_lr = min_lr
        super().__init__(optimizer, **warmup)

    def lr_at(self, base_lr: float, iteration: int) -> float:
        progress = min(iteration, self.max_iter) / self.max_iter
        return (base_lr - self.min_lr) * (1.0 - progress) ** self.power + self.min_lr


class WarmupStepLR(IterationLRScheduler):
    """lr = base_lr * gamma ** (number of milestones <= t)  (Detectron's steps, e.g. 120k/160k of 180k)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: Sequence[int], *, gamma: float = 0.1, **warmup):
        steps = [int(s) for s in steps]
        if steps != sorted(steps):
            raise ValueError(f"step schedule milestones must be increasing, got {steps}")
        self.steps = steps
        self.gamma = gamma
        super().__init__(optimizer, **warmup)

    def lr_at(self, base_lr: float, iteration: int) -> float:
        return base_lr * self.gamma ** bisect.bisect_right(self.steps, iteration)


_POLICIES = {"poly": (PolyLR, {"power", "min_lr"}), "step": (WarmupStepLR, {"steps", "gamma"})}
_WARMUP_KEYS = {"warmup_iters", "warmup_factor", "warmup_method"}


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, max_iter: int) -> IterationLRScheduler:
    """Builds the schedule from `train.lr_schedule`, e.g. `{policy: poly, power: 0.9, min_lr: 1e-4}` or
    `{policy: step, steps: [120000, 160000], gamma: 0.1, warmup_iters: 500, warmup_factor: 0.333}`."""
    cfg = dict(cfg)
    policy = cfg.pop("policy", "poly")
    if policy not in _POLICIES:
        raise ValueError(f"unknown train.lr_schedule.policy {policy!r}; choose one of {sorted(_POLICIES)}")
    cls, keys = _POLICIES[policy]
    check_keys(cfg, keys | _WARMUP_KEYS, "train.lr_schedule")
    where = "train.lr_schedule"
    if "warmup_iters" in cfg:
        cfg["warmup_iters"] = config_int(cfg, "warmup_iters", 0, where, minimum=0)
    if "warmup_factor" in cfg:
        cfg["warmup_factor"] = config_float(cfg, "warmup_factor", 1.0, where, positive=True)
    if policy == "poly":
        cfg["power"] = config_float(cfg, "power", 0.9, where, positive=True)
        cfg["min_lr"] = config_float(cfg, "min_lr", 0.0, where, minimum=0.0)
        return PolyLR(optimizer, max_iter, **cfg)
    if "gamma" in cfg:
        cfg["gamma"] = config_float(cfg, "gamma", 0.1, where, positive=True)
    if "steps" not in cfg:
        raise ValueError("train.lr_schedule.steps is required for the step policy (a list of iterations)")
    return WarmupStepLR(optimizer, cfg.pop("steps"), **cfg)


def scale_to_total_batch(train_cfg: dict, total_batch: int) -> dict:
    """Detectron's linear scaling rule, applied when `train.optimizer.reference_batch` is set.

    A recipe states its lr and schedule for `reference_batch` images per optimizer step (Detectron: 16 = 8 GPUs
    x 2 images). For a total batch B (images per process x iter_size x processes) the returned copy of the
    `train:` section has lr (and a poly schedule's min_lr) x B / reference_batch and max_iter, lr_schedule.steps
    and lr_schedule.warmup_iters x reference_batch / B (rounded half up; at least 1 for max_iter), so the run sees the
    same number of images at each point of the schedule (Detectron's GETTING_STARTED: 1 GPU instead of 8 -> lr / 8,
    iterations x 8).
    Without reference_batch the section is returned unchanged; reference_batch itself is removed."""
    optimizer = dict(train_cfg.get("optimizer") or {})
    reference = optimizer.pop("reference_batch", None)
    if reference is None:
        return train_cfg
    if isinstance(reference, bool) or not isinstance(reference, int) or reference <= 0:
        raise ValueError(f"train.optimizer.reference_batch must be a positive integer, got {reference!r}")
    if total_batch <= 0:
        raise ValueError(f"the total batch must be positive, got {total_batch}")
    if "lr" in optimizer:
        optimizer["lr"] = float(optimizer["lr"]) * total_batch / reference
    iterations = reference / total_batch

    def scale(count) -> int:  # rounded half up, as Detectron.pytorch's int(x * step_scale + 0.5)
        return int(int(count) * iterations + 0.5)

    scaled = {**train_cfg, "optimizer": optimizer}
    if "max_iter" in train_cfg:
        scaled["max_iter"] = max(1, scale(train_cfg["max_iter"]))
    schedule = dict(train_cfg.get("lr_schedule") or {})
    if "steps" in schedule:
        schedule["steps"] = [scale(step) for step in schedule["steps"]]
    if "warmup_iters" in schedule:
        schedule["warmup_iters"] = scale(schedule["warmup_iters"])
    if "min_lr" in schedule:
        schedule["min_lr"] = float(schedule["min_lr"]) / iterations
    if schedule:
        scaled["lr_schedule"] = schedule
    return scaled
