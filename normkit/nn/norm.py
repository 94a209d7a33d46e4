"""The norm factory shared by every block, FrozenBatchNorm2d, and batch-statistics recomputation."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from normkit.nn.switch_norm import SwitchNorm2d, SyncSwitchNorm, _SwitchNorm

__all__ = ["FrozenBatchNorm2d", "build_norm", "is_norm_layer", "NORM_TYPES", "recompute_batch_stats", "NORM_NAMES"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters), as in detectron2.

    Loads BatchNorm2d state dicts; `num_batches_tracked` is ignored.
    """
    _version = 1

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory) - eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm2d({self.num_features}) expects (N, {self.num_features}, H, W) input, "
                             f"got {tuple(x.shape)}")
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replaces every BatchNorm2d/SyncBatchNorm in `module` by a FrozenBatchNorm2d with the same statistics,
        dtype and device."""
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            source = module.weight if module.affine else module.running_mean
            frozen = cls(module.num_features, module.eps, **({} if source is None else
                                                             {"device": source.device, "dtype": source.dtype}))
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            converted = cls.convert_frozen_batchnorm(child)
            if converted is not child:
                setattr(module, name, converted)
        return module


def _group_norm(num_channels: int, num_groups: int = 32, **kwargs) -> nn.GroupNorm:
    if num_channels % num_groups:
        raise ValueError(f"gn: num_channels {num_channels} is not divisible by num_groups {num_groups}; set num_groups")
    return nn.GroupNorm(num_groups, num_channels, **kwargs)


_NORMS: dict[str, Callable[..., nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "syncbn": nn.SyncBatchNorm,
    "frozenbn": FrozenBatchNorm2d,
    "gn": _group_norm,
    "in": lambda c, **kw: nn.InstanceNorm2d(c, **{"affine": True, **kw}),
    "ln": lambda c, **kw: nn.GroupNorm(1, c, **kw),  # LayerNorm over (C, H, W), per-channel affine
    "sn": SwitchNorm2d,
    "syncsn": SyncSwitchNorm,
}
NORM_NAMES = tuple(_NORMS)


# Every normalization layer type (torch's and normkit's): their parameters are "norm parameters" to the
# optimizer (no weight decay by default) and the CSAIL decoder init.
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                                nn.RMSNorm, _SwitchNorm, FrozenBatchNorm2d)


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalization layers: torch's BatchNorm/InstanceNorm/GroupNorm/LayerNorm/RMSNorm, every SN
    variant and FrozenBatchNorm2d."""
    return isinstance(module, NORM_TYPES)


def build_norm(norm: str | Callable[..., nn.Module] | None, num_channels: int, **kwargs: Any) -> nn.Module:
    """Builds a 2d norm layer for `num_channels` channels.

    Args:
        norm: one of bn, syncbn, frozenbn, gn, in, ln, sn, syncsn; a callable `norm(num_channels, **kwargs)`;
            or None / "" for no norm (nn.Identity).
        kwargs: passed to the layer (e.g. num_groups for gn; using_bn, using_moving_average, last_gamma,
            momentum, eps for sn/syncsn).
    """
    if norm is None or norm == "":
        return nn.Identity()
    if callable(norm):
        return norm(num_channels, **kwargs)
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_NAMES)}")
    if key not in ("sn", "syncsn"):
        kwargs.pop("last_gamma", None)  # an SN-only initialisation flag; blocks pass it to whatever norm they use
    return _NORMS[key](num_channels, **kwargs)


def recompute_batch_stats(model: nn.Module, batches: Iterable[Any], num_batches: int,
                          forward: Callable[[nn.Module, Any], Any] | None = None) -> int:
    """Recomputes the running statistics of every SN and BatchNorm layer of `model` over `num_batches` batches.

    Serves SN trained with `using_moving_average=False` (batch average) and "precise BN". Each layer's mean is the
    average of the batch means and its variance the variance over all batches (law of total variance for SN; the
    average of batch variances for torch BatchNorm, as detectron2's precise BN). Batches are fed with
    `forward(model, batch)` (default: `model(batch)`, the trainer's contract) in train mode without
    gradients; training mode and layer settings are restored afterwards, and so are the previous statistics when
    it fails (no batch, or an error while feeding one). Returns the number of batches used.
    """
    if num_batches <= 0:
        raise ValueError(f"recompute_batch_stats: num_batches must be positive, got {num_batches}")
    sn_layers = [m for m in model.modules() if isinstance(m, _SwitchNorm) and m.using_bn]
    bn_layers = [m for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not sn_layers and not bn_layers:
        return 0
    was_training = model.training
    saved_sn = [(m.using_moving_average, m.momentum) for m in sn_layers]
    saved_bn = [m.momentum for m in bn_layers]
    # The statistics before the call, restored if it fails (an error in a batch, or no batch at all), so that
    # a failure never leaves the model with wiped or partial estimates.
    saved_buffers = [{name: buf.clone() for name, buf in m.named_buffers(recurse=False)}
                     for m in (*sn_layers, *bn_layers)]
    for m in sn_layers:
        m.reset_running_stats()
        m.using_moving_average = False  # accumulate sums of E[x] and E[x^2] terms
    for m in bn_layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    used = 0
    completed = False
    try:
        with torch.no_grad():  # statistics only: no autograd graph (the activations of a training forward)
            for batch in batches:
                if used == num_batches:
                    break
                model(batch) if forward is None else forward(model, batch)
                used += 1
        completed = used > 0
    finally:
        for m, (moving, momentum) in zip(sn_layers, saved_sn):
            if completed:
                m.running_mean.div_(used)
                m.running_var.div_(used).sub_(m.running_mean ** 2)
            m.using_moving_average, m.momentum = moving, momentum
        for m, momentum in zip(bn_layers, saved_bn):
            m.momentum = momentum
        if not completed:
            with torch.no_grad():
                for m, buffers in zip((*sn_layers, *bn_layers), saved_buffers):
                    for name, value in buffers.items():
                        getattr(m, name).copy_(value)
        model.train(was_training)
    if not completed:
        raise ValueError("recompute_batch_stats: `batches` yielded no batch (the previous statistics are kept)")
    return used
