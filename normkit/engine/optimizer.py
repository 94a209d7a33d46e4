"""Optimizer with parameter groups: per-prefix lr multipliers, a bias lr multiplier (Detectron's BIAS_DOUBLE_LR),
and no weight decay on norm parameters or biases."""
from __future__ import annotations

import torch
from torch import nn

from normkit.schema import check_keys

__all__ = ["build_param_groups", "build_optimizer"]


def _lr_multiplier(name: str, lr_mult: dict[str, float]) -> float:
    """The multiplier of the longest prefix (on dotted-name boundaries) matching `name`, else 1."""
    best, best_len = 1.0, -1
    for prefix, mult in lr_mult.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = float(mult), len(prefix)
    return best


def build_param_groups(model: nn.Module, base_lr: float, weight_decay: float, *,
                       lr_mult: dict[str, float] | None = None, norm_weight_decay: float = 0.0,
                       bias_weight_decay: float = 0.0, bias_lr_mult: float = 1.0) -> list[dict]:
    """Splits the trainable parameters of `model` into optimizer groups.

    lr_mult: `{name prefix: multiplier}`, e.g. `{"decode_head": 10.0}` (the longest matching prefix wins);
    biases, those of norm layers included, get `bias_weight_decay` and their lr multiplied by `bias_lr_mult`
    (Detectron trains with 2: SOLVER.BIAS_DOUBLE_LR, which takes every parameter whose name contains "bias", SN
    and GN biases too; detectron2's BIAS_LR_FACTOR likewise); the other parameters of norm layers
    (`normkit.nn.is_norm_layer`: weights, SN's mixture weights) get `norm_weight_decay`, everything else
    `weight_decay`. Each group records its `lr_mult` (prefix multiplier times bias multiplier); every trainable
    parameter appears exactly once. Call this on the unwrapped model (before DistributedDataParallel).
    """
    lr_mult = dict(lr_mult or {})
    names = {name for name, _ in model.named_parameters()}
    unmatched = [p for p in lr_mult if not any(n == p or n.startswith(p + ".") for n in names)]
    if unmatched:
        raise ValueError(f"lr_mult prefixes {unmatched} match no parameter of the model; parameter names start "
                         f"with {sorted({n.split('.')[0] for n in names})}")
    # Imported here, not at module level, so that the engine's other parts load without the compiled ops.
    from normkit.nn.norm import is_norm_layer
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            mult = _lr_multiplier(full_name, lr_mult)
            if param_name == "bias":
                decay = bias_weight_decay
                mult *= bias_lr_mult
            elif is_norm_layer(module):
                decay = norm_weight_decay
            else:
                decay = weight_decay
            group = groups.setdefault((mult, decay), {"params": [], "param_names": [], "lr": base_lr * mult,
                                                       "weight_decay": decay, "lr_mult": mult})
            group["params"].append(param)
            group["param_names"].append(full_name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


_OPTIMIZERS = {"sgd": {"momentum", "nesterov", "dampening"},
               "adamw": {"betas", "eps"}}
_GROUP_KEYS = {"name", "lr", "weight_decay", "lr_mult", "norm_weight_decay", "bias_weight_decay", "bias_lr_mult"}


def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """Builds the optimizer from `train.optimizer`, e.g.
    `{name: sgd, lr: 0.02, momentum: 0.9, weight_decay: 1e-4, lr_mult: {decode_head: 10}}`."""
    cfg = dict(cfg)
    name = cfg.get("name", "sgd")
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown train.optimizer.name {name!r}; choose one of {sorted(_OPTIMIZERS)}")
    if "reference_batch" in cfg:
        raise ValueError("train.optimizer.reference_batch needs the total batch: apply "
                         "normkit.engine.scale_to_total_batch to the train section before build_optimizer")
    check_keys(cfg, _GROUP_KEYS | _OPTIMIZERS[name], "train.optimizer")
    if "lr" not in cfg:
        raise ValueError("train.optimizer.lr is required")
    lr, weight_decay = float(cfg["lr"]), float(cfg.get("weight_decay", 0.0))
    groups = build_param_groups(model, lr, weight_decay, lr_mult=cfg.get("lr_mult"),
                                norm_weight_decay=float(cfg.get("norm_weight_decay", 0.0)),
                                bias_weight_decay=float(cfg.get("bias_weight_decay", 0.0)),
                                bias_lr_mult=float(cfg.get("bias_lr_mult", 1.0)))
    extra = {k: cfg[k] for k in _OPTIMIZERS[name] if k in cfg}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **extra)
    if "betas" in extra:
        extra["betas"] = tuple(extra["betas"])
    return torch.optim.AdamW(groups, lr=lr, **extra)
