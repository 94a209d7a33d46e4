"""Switchable Normalization (Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization").

`switch_norm` normalises each (n, c) plane with a learned mixture of instance (IN), layer (LN) and batch (BN)
statistics. It is one dispatcher operator (`torch.ops.normkit.switch_norm`) built from fused kernels: one
statistics pass and one elementwise pass forward, one reduction pass and one elementwise pass backward, with
O(N*C) coefficient steps in between. Autograd saves only the input and O(N*C) statistics.

`switch_norm_reference` is the official formulation in plain PyTorch, the test oracle and benchmark baseline.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from normkit.ops.layout import FLOAT_DTYPES
from normkit._extension import register_no_double_backward, register_ops, require_extension

__all__ = ["switch_norm", "switch_norm_reference", "num_mixture_weights", "check_momentum"]



def num_mixture_weights(using_bn: bool, has_instance: bool) -> int:
    """Length of mean_weight/var_weight: [IN, LN, BN] (instance mode) or [LN, BN] (SwitchNorm1d), minus BN if unused."""
    return (2 if has_instance else 1) + int(using_bn)


def _check_vector(name: str, t: Tensor | None, length: int, x: Tensor, *, floating: bool = True) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"switch_norm: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.numel() != length:
        raise ValueError(f"switch_norm: {name} must have {length} elements, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"switch_norm: {name} must be floating point, got {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(f"switch_norm: {name} is on {t.device} but input is on {x.device}")


def _check_inputs(x, weight, bias, mean_weight, var_weight, running_mean, running_var, using_bn, has_instance):
    if not isinstance(x, Tensor):
        raise TypeError(f"switch_norm: input must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"switch_norm: input must be (N, C, *), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"switch_norm: input must be float16, bfloat16, float32 or float64, got {x.dtype}")
    channels = x.shape[1]
    k = num_mixture_weights(using_bn, has_instance)
    _check_vector("weight", weight, channels, x)
    _check_vector("bias", bias, channels, x)
    _check_vector("mean_weight", mean_weight, k, x)
    _check_vector("var_weight", var_weight, k, x)
    if mean_weight is None or var_weight is None:
        raise ValueError("switch_norm: mean_weight and var_weight are required")
    if mean_weight.dim() != 1 or var_weight.dim() != 1:
        raise ValueError(f"switch_norm: mean_weight and var_weight must be 1-D of length {k}, got "
                         f"{tuple(mean_weight.shape)} and {tuple(var_weight.shape)}")
    _check_vector("running_mean", running_mean, channels, x)
    _check_vector("running_var", running_var, channels, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("switch_norm: pass both running_mean and running_var, or neither")


def check_momentum(momentum, who: str) -> None:
    """PyTorch convention: running <- (1 - momentum) * running + momentum * batch, so momentum is in [0, 1]."""
    # No None (BatchNorm's cumulative average): official SN has no such mode, and no num_batches_tracked buffer.
    if (not isinstance(momentum, numbers.Real) or isinstance(momentum, bool) or momentum != momentum
            or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"{who}: momentum must be a number in [0, 1] (PyTorch convention: the official 0.997 is "
                         f"0.003), got {momentum!r}")


def _flat(t: Tensor | None) -> Tensor | None:
    # Official checkpoints shape per-channel tensors (1, C, 1, 1) / (1, C, 1); the kernels take (C,). A view, never
    # a copy (one non-trivial dimension always has one): the op updates the running statistics in place.
    return t if t is None or t.dim() == 1 else t.view(-1)


def switch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None, mean_weight: Tensor, var_weight: Tensor,
                running_mean: Tensor | None = None, running_var: Tensor | None = None, training: bool = False,
                momentum: float = 0.003, eps: float = 1e-5, using_moving_average: bool = True, using_bn: bool = True,
                has_instance: bool = True) -> Tensor:
    """Switchable Normalization of `input` (Tensor[N, C, *]).

    Args:
        weight, bias: Tensor[C] (or official (1, C, 1, 1)) affine parameters, or None.
        mean_weight, var_weight: Tensor[K] mixture logits (softmaxed here), ordered [IN, LN, BN] when
            `has_instance` (SwitchNorm2d/3d) or [LN, BN] otherwise (SwitchNorm1d); BN dropped when `using_bn=False`.
        running_mean, running_var: Tensor[C] BN buffers, updated in place in training; used in eval.
            Without them the batch statistics are used in eval too.
        training: use batch statistics for the BN component and update the running buffers.
        momentum: PyTorch convention, r <- (1 - momentum) * r + momentum * batch (official m = 0.997 is 0.003 here).
        using_moving_average: if False, training instead accumulates sums into the buffers (official "batch average"
            mode); `normkit.nn.recompute_batch_stats` turns them into statistics after training.
        has_instance: official 2d/3d statistics (IN/LN/BN from unbiased instance variances) when True; SwitchNorm1d
            statistics (unbiased LN over (C, L) and BN over (N, L)) when False.

    Returns:
        Tensor with the shape, dtype and memory format of `input`.
    """
    _check_inputs(input, weight, bias, mean_weight, var_weight, running_mean, running_var, using_bn, has_instance)
    check_momentum(momentum, "switch_norm")
    if input.numel() == 0:
        # Nothing to normalize. The parameters stay in the graph with zero gradients, as BatchNorm's do: DDP
        # expects a gradient for each of them on every rank, an empty one included.
        output = input.clone()
        for param in (weight, bias, mean_weight, var_weight):
            if param is not None:
                output = output + param.sum() * 0
        return output
    require_extension("switch_norm")
    return torch.ops.normkit.switch_norm(
        input, _flat(weight), _flat(bias), mean_weight, var_weight, _flat(running_mean),
        _flat(running_var), training, momentum, using_moving_average, has_instance, eps)[0]


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels, and the synchronized backward. The composite forward/backward and the autograd kernel are
# C++ (csrc/autograd/switch_norm.cpp): per-layer Python overhead would outweigh the kernels of small feature maps.

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def switch_norm_input_backward(grad_output, input, moments, bn_stats, weight, mean_weight, var_weight,
                               has_instance, eps, reduce_bn_grad=None):
    """The synchronized backward: `_switch_norm_backward`'s steps (csrc/autograd/switch_norm.cpp) around a reduction.

    `reduce_bn_grad` receives the per-channel BN gradient partial sums and returns them reduced over all ranks;
    None means the BN statistics are constants (eval) and get no gradient.
    """
    ops = torch.ops.normkit
    count = math.prod(input.shape[2:])
    grad_moments = ops._switch_norm_grad_moments(grad_output, input)
    grad_weight, grad_bias, grad_mean_weight, grad_var_weight, bn_grad = ops._switch_norm_backward_reduce(
        grad_moments, moments, bn_stats, weight, mean_weight, var_weight, count, has_instance, eps)
    bn_grad = reduce_bn_grad(bn_grad) if reduce_bn_grad is not None else None
    coefficients = ops._switch_norm_backward_coefficients(
        grad_moments, moments, bn_stats, bn_grad, weight, mean_weight, var_weight, count, has_instance, eps)
    grad_input = ops._switch_norm_affine_backward(grad_output, input, coefficients)
    param_dtype = weight.dtype if weight is not None else mean_weight.dtype
    return (grad_input, grad_weight.to(param_dtype), grad_bias.to(param_dtype),
            grad_mean_weight.to(mean_weight.dtype), grad_var_weight.to(var_weight.dtype))


def _empty_in_kernel_layout(x: Tensor) -> Tensor:
    """Like x in the layout the elementwise kernels write (csrc/common/nc_layout.h, to_nc_layout): x's own when it
    is channels-last dense, or NCHW-contiguous with planes of more than one element; NCHW-contiguous otherwise
    (a permuted input is copied to NCHW first)."""
    channels_last = x.permute(0, *range(2, x.dim()), 1).is_contiguous()
    if channels_last or (math.prod(x.shape[2:]) > 1 and x.is_contiguous()):
        return torch.empty_like(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _register() -> None:
    """Fake (meta) kernels of the pieces; switch_norm's composite and autograd kernels are in C++."""
    def nc_stats(x, width):
        return x.new_empty((x.shape[0], x.shape[1], width), dtype=_acc_dtype(x.dtype))

    @torch.library.register_fake("normkit::_switch_norm_moments")
    def _(input):
        return nc_stats(input, 2)

    @torch.library.register_fake("normkit::_switch_norm_forward_coefficients")
    def _(moments, weight, bias, mean_weight, var_weight, bn_stats, count, has_instance, eps):
        return torch.empty_like(moments), moments.new_empty((3, moments.shape[1]))

    @torch.library.register_fake("normkit::_switch_norm_affine")
    def _(input, coefficients):
        return _empty_in_kernel_layout(input)

    @torch.library.register_fake("normkit::_switch_norm_grad_moments")
    def _(grad_output, input):
        return nc_stats(input, 2)

    @torch.library.register_fake("normkit::_switch_norm_backward_reduce")
    def _(grad_moments, moments, bn_stats, weight, mean_weight, var_weight, count, has_instance, eps):
        c = moments.shape[1]
        return (moments.new_empty((c,)), moments.new_empty((c,)), moments.new_empty(mean_weight.shape),
                moments.new_empty(var_weight.shape), moments.new_empty((2, c)))

    @torch.library.register_fake("normkit::_switch_norm_backward_coefficients")
    def _(grad_moments, moments, bn_stats, bn_grad, weight, mean_weight, var_weight, count, has_instance, eps):
        return moments.new_empty((moments.shape[0], moments.shape[1], 3))

    @torch.library.register_fake("normkit::_switch_norm_affine_backward")
    def _(grad_output, input, coefficients):
        return _empty_in_kernel_layout(input)

    # The backward has no derivative of its own: create_graph=True then backward must fail clearly (through the
    # not-implemented fallback it gave wrong second derivatives silently).
    register_no_double_backward("normkit::_switch_norm_backward", "switch_norm")


register_ops(_register)


# ---------------------------------------------------------------------------------------------------------------
# Reference: the official formulation, op by op, in plain PyTorch.

def _unbiased_var(x: Tensor, dims) -> Tensor:
    # Official code uses torch.var (unbiased); with a single element that is NaN, which normkit replaces by 0.
    count = math.prod(x.shape[d] for d in dims)
    if count < 2:
        return torch.zeros_like(x.mean(dims, keepdim=True))
    return x.var(dims, keepdim=True, unbiased=True)


def _reference_update_running_stats(running_mean: Tensor, running_var: Tensor, batch_mean: Tensor,
                                    batch_var: Tensor, momentum: float, using_moving_average: bool) -> None:
    with torch.no_grad():
        mean = batch_mean.to(running_mean.dtype).view_as(running_mean)
        var = batch_var.to(running_var.dtype).view_as(running_var)
        if using_moving_average:
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var)
        else:  # official batch-average mode: sums of E[x] and E[x^2] terms
            running_mean.add_(mean)
            running_var.add_(var + mean * mean)


def switch_norm_reference(input: Tensor, weight: Tensor | None, bias: Tensor | None, mean_weight: Tensor,
                          var_weight: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                          training: bool = False, momentum: float = 0.003, eps: float = 1e-5,
                          using_moving_average: bool = True, using_bn: bool = True,
                          has_instance: bool = True) -> Tensor:
    """Slow pure-PyTorch Switchable Normalization following the official implementation's formulas."""
    n, c = input.shape[:2]
    x = input.reshape(n, c, -1)
    use_batch = training or running_mean is None
    if has_instance:  # SwitchNorm2d / SwitchNorm3d
        mean_in = x.mean(-1, keepdim=True)
        var_in = _unbiased_var(x, (2,))
        temp = var_in + mean_in ** 2
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        means, variances = [mean_in, mean_ln], [var_in, var_ln]
        if using_bn and use_batch:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
    else:  # SwitchNorm1d: LN over (C, L), BN over (N, L), both unbiased
        means = [x.mean((1, 2), keepdim=True)]
        variances = [_unbiased_var(x, (1, 2))]
        if using_bn and use_batch:
            mean_bn = x.mean((0, 2), keepdim=True)
            var_bn = _unbiased_var(x.transpose(0, 1), (1, 2)).transpose(0, 1)
    if using_bn:
        if use_batch:
            if training and running_mean is not None:
                _reference_update_running_stats(running_mean, running_var, mean_bn.detach().reshape(-1),
                                                var_bn.detach().reshape(-1), momentum, using_moving_average)
        else:
            mean_bn = running_mean.reshape(1, c, 1).to(x.dtype)
            var_bn = running_var.reshape(1, c, 1).to(x.dtype)
        means.append(mean_bn)
        variances.append(var_bn)
    mw = torch.softmax(mean_weight, 0)
    vw = torch.softmax(var_weight, 0)
    mean = sum(w * m for w, m in zip(mw, means))
    var = sum(w * v for w, v in zip(vw, variances))
    y = (x - mean) / (var + eps).sqrt()
    if weight is not None:
        y = y * weight.reshape(1, c, 1)
    if bias is not None:
        y = y + bias.reshape(1, c, 1)
    return y.reshape(input.shape)
