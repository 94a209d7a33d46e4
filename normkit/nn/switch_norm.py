"""Switchable Normalization modules: SwitchNorm1d/2d/3d and the cross-process SyncSwitchNorm.

Parameter and buffer names are the official ones (`weight, bias, mean_weight, var_weight, running_mean,
running_var`), so official checkpoints load; their (1, C, 1, 1) / (1, C, 1) / (1, C) per-channel tensors are
reshaped to normkit's (C,) on load.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normkit.ops.layout import FLOAT_DTYPES
from normkit.ops.switch_norm import (check_momentum, num_mixture_weights, switch_norm, switch_norm_input_backward,
                                     switch_norm_reference)

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SyncSwitchNorm", "convert_sync_switchnorm",
           "flatten_official_sn"]


def flatten_official_sn(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Official SN stores weight/bias as (1, C, 1, 1) and running stats as (1, C, 1); normkit stores (C,).

    Only modules that have ``mean_weight`` (i.e. SN layers) are touched, so a 1-output conv is never
    mistaken for one.
    """
    sn_prefixes = {k[: -len("mean_weight")] for k in state if k.endswith("mean_weight")}
    out = dict(state)
    for prefix in sn_prefixes:
        for name in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + name
            if key in out and out[key].dim() > 1:
                out[key] = out[key].reshape(-1)
    return out


class _SwitchNorm(nn.Module):
    _version = 2  # 1: official layout with (1, C, ...) per-channel tensors
    has_instance = True
    input_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.003,
                 using_moving_average: bool = True, using_bn: bool = True, last_gamma: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int (the number of channels "
                             f"C), got {num_features!r}")
        check_momentum(momentum, type(self).__name__)
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = float(momentum)
        self.using_moving_average = using_moving_average
        self.using_bn = using_bn
        self.last_gamma = last_gamma
        # "fused" runs normkit's kernels; "reference" the official pure-PyTorch formulation (benchmarks, debugging).
        self.implementation = "fused"
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        k = num_mixture_weights(using_bn, self.has_instance)
        self.mean_weight = nn.Parameter(torch.ones(k, **factory))
        self.var_weight = nn.Parameter(torch.ones(k, **factory))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.zeros(num_features, **factory))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # last_gamma: the last norm of a residual block starts at zero, so each block starts as the identity.
        nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.zero_()

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self.input_dims:
            dims = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"{type(self).__name__} expects {dims} input, got {x.dim()}D input of shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got input with {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")

    def _normalize(self, x: Tensor) -> Tensor:
        fn = switch_norm if self.implementation == "fused" else switch_norm_reference
        return fn(x, self.weight, self.bias, self.mean_weight, self.var_weight, self.running_mean, self.running_var,
                  self.training, self.momentum, self.eps, self.using_moving_average, self.using_bn, self.has_instance)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        return self._normalize(x)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, using_bn={self.using_bn}, "
                f"using_moving_average={self.using_moving_average}, last_gamma={self.last_gamma}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        state_dict.update(flatten_official_sn(own))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class SwitchNorm1d(_SwitchNorm):
    """Official 1d Switchable Normalization: mixture of LN and BN (no IN), on (N, C) or (N, C, L) input.

    LN statistics are taken over (C, L) per sample and BN statistics over (N, L) per channel, both with the
    unbiased variance, as BatchNorm1d treats L.
    """
    has_instance = False
    input_dims = (2, 3)


class SwitchNorm2d(_SwitchNorm):
    """Switchable Normalization over (N, C, H, W): learned softmax mixtures of IN, LN and BN means and variances."""
    input_dims = (4,)


class SwitchNorm3d(_SwitchNorm):
    """Switchable Normalization over (N, C, D, H, W)."""
    input_dims = (5,)


class _SyncSwitchNormFunction(torch.autograd.Function):
    """SN whose BN statistics cover the whole process group: one all_gather forward, one all_reduce backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weight, var_weight, eps, process_group):
        ops = torch.ops.normkit
        count = math.prod(x.shape[2:])
        moments = ops._switch_norm_moments(x)
        bn_stats = _global_bn_stats(moments, count, process_group)
        coefficients, _ = ops._switch_norm_forward_coefficients(
            moments, weight, bias, mean_weight, var_weight, bn_stats, count, True, eps)
        ctx.save_for_backward(x, weight, mean_weight, var_weight, moments, bn_stats)
        ctx.eps, ctx.process_group, ctx.has_bias = eps, process_group, bias is not None
        ctx.mark_non_differentiable(bn_stats)
        return ops._switch_norm_affine(x, coefficients), bn_stats

    @staticmethod
    def backward(ctx, grad_output, _grad_bn_stats):
        x, weight, mean_weight, var_weight, moments, bn_stats = ctx.saved_tensors

        def all_reduce(bn_grad: Tensor) -> Tensor:
            dist.all_reduce(bn_grad, group=ctx.process_group)
            return bn_grad

        grad_x, grad_w, grad_b, grad_mw, grad_vw = switch_norm_input_backward(
            grad_output, x, moments, bn_stats, weight, mean_weight,
            var_weight, True, ctx.eps, reduce_bn_grad=all_reduce)
        return (grad_x, grad_w if weight is not None else None, grad_b if ctx.has_bias else None, grad_mw, grad_vw,
                None, None)


def _global_bn_stats(moments: Tensor, count: int, process_group) -> Tensor:
    """(3, C) [mean, var, members] of the BN statistics over every rank's batch.

    Each rank packs (members, mean, sum of (var_in + (mu - mean)^2)) per channel; ranks are combined with the
    parallel-variance formula, so batch sizes may differ between ranks and no E[x^2] - E[x]^2 cancellation occurs.
    """
    mu, m2 = moments[..., 0], moments[..., 1]
    members = mu.shape[0]
    var_in = m2 / max(count - 1, 1)
    local_mean = mu.mean(0) if members > 0 else moments.new_zeros(moments.shape[1])
    local_sum = (var_in + (mu - local_mean) ** 2).sum(0)
    packed = torch.stack([torch.full_like(local_mean, members), local_mean, local_sum])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, packed, group=process_group)
    ranks = torch.stack(gathered)  # (R, 3, C)
    rank_members, rank_mean, rank_sum = ranks[:, 0], ranks[:, 1], ranks[:, 2]
    total = rank_members.sum(0)
    divisor = total.clamp(min=1)  # every rank empty: statistics 0, not 0 / 0 (the update is skipped then)
    mean = (rank_members * rank_mean).sum(0) / divisor
    var = (rank_sum + rank_members * (rank_mean - mean) ** 2).sum(0) / divisor
    return torch.stack([mean, var, total])


class SyncSwitchNorm(_SwitchNorm):
    """Switchable Normalization whose BN statistics are synchronized over a torch.distributed process group.

    Works for (N, C, *) inputs with any number of spatial dims. Per-rank batch sizes may differ (including 0).
    The result on R ranks equals SwitchNorm on the concatenated batch. Outside training, without an initialised
    process group, or with one process, it behaves as SwitchNorm2d/3d.
    """
    input_dims = (3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.003,
                 using_moving_average: bool = True, using_bn: bool = True, last_gamma: bool = False,
                 process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, using_moving_average, using_bn, last_gamma, device, dtype)
        self.process_group = process_group

    def _synchronized(self) -> bool:
        return (self.training and self.using_bn and self.implementation == "fused" and dist.is_available()
                and dist.is_initialized() and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self._synchronized():
            return self._normalize(x)
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"SyncSwitchNorm: input must be floating point, got {x.dtype}")
        # Empty local batches still take part in the collectives.
        y, bn_stats = _SyncSwitchNormFunction.apply(x, self.weight, self.bias, self.mean_weight, self.var_weight,
                                                    self.eps, self.process_group)
        # When every rank's batch is empty there is nothing to move the running statistics towards, as in
        # SwitchNorm2d: update towards themselves (moving average) or add zeros (batch average), without the host
        # synchronization that testing the count would cost.
        if self.using_moving_average:
            unchanged = torch.stack([self.running_mean.reshape(-1), self.running_var.reshape(-1)]).to(bn_stats.dtype)
        else:
            unchanged = torch.zeros_like(bn_stats[:2])
        stats = torch.cat([torch.where(bn_stats[2] > 0, bn_stats[:2], unchanged), bn_stats[2:]])
        torch.ops.normkit._switch_norm_update_running_stats(self.running_mean, self.running_var, stats,
                                                            self.momentum, self.using_moving_average)
        return y


def convert_sync_switchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replaces every SwitchNorm2d/SwitchNorm3d in `module` by a SyncSwitchNorm sharing its parameters and buffers."""
    if isinstance(module, (SwitchNorm2d, SwitchNorm3d)) and not isinstance(module, SyncSwitchNorm):
        sync = SyncSwitchNorm(module.num_features, module.eps, module.momentum, module.using_moving_average,
                              module.using_bn, module.last_gamma, process_group)
        sync.implementation = module.implementation
        for name, param in module.named_parameters(recurse=False):
            setattr(sync, name, param)
        for name, buf in module.named_buffers(recurse=False):
            setattr(sync, name, buf)
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_switchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
