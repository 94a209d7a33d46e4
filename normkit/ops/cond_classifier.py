"""Conditional-classifier ops of CondNet: class embedding and dynamic (per-sample) classification.

CondNet (Yu et al., "CondNet: Conditional Classifier for Scene Segmentation") replaces the global 1x1
classifier of a segmentation head by one generated per image. Two steps are fused ops here:

* ``class_embedding(guidance, features)``: softmax over the classes of the guidance logits at every pixel,
  then the probability-weighted mean of the features over the pixels. The backward recomputes the
  softmax, so autograd keeps only the two inputs (the official code also keeps the (B, K, H*W)
  probabilities and a pixel-major (B, H*W, C) copy of the features).
* ``dynamic_classify(features, weight, bias)``: every sample's features are classified by its own (K, C)
  weights and (K,) biases, as one batched GEMM (the official code runs a grouped conv with groups = B).

``class_embedding_reference`` and ``dynamic_classify_reference`` are the official formulations, written in
plain PyTorch; they are the oracles of the tests and the baseline of ``benchmarks/bench_cond_classifier.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normkit.ops.layout import FLOAT_DTYPES, kernel_memory_format
from normkit._extension import register_no_double_backward, register_ops, require_extension

__all__ = ["class_embedding", "dynamic_classify", "class_embedding_reference", "dynamic_classify_reference"]

def _nchw_empty_like_layout(features: Tensor, shape, like: Tensor) -> Tensor:
    # csrc/common/cond_classifier_ops.h follows the same layout rule as the other kernels.
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=kernel_memory_format(features))


def _check_float(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")


def _check_like(name: str, tensor: Tensor, ref_name: str, ref: Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {tensor.device}")
    if tensor.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {tensor.dtype}")


def _check_class_embedding(guidance: Tensor, features: Tensor) -> None:
    _check_float("features", features)
    _check_float("guidance", guidance)
    if features.dim() != 4:
        raise ValueError(f"features must be Tensor[B, C, H, W], got {list(features.shape)}")
    if guidance.dim() != 4:
        raise ValueError(f"guidance must be Tensor[B, K, H, W], got {list(guidance.shape)}")
    b, _, h, w = features.shape
    if guidance.shape[0] != b or tuple(guidance.shape[2:]) != (h, w):
        raise ValueError(f"guidance must be Tensor[{b}, K, {h}, {w}] to match features {list(features.shape)}, "
                         f"got {list(guidance.shape)}")
    if h * w == 0:
        raise ValueError(f"class_embedding averages over pixels and needs H*W > 0, got features {list(features.shape)}")
    _check_like("guidance", guidance, "features", features)


def _check_dynamic_classify(features: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    _check_float("features", features)
    _check_float("weight", weight)
    if features.dim() != 4:
        raise ValueError(f"features must be Tensor[B, C, H, W], got {list(features.shape)}")
    b, c = features.shape[:2]
    if weight.dim() != 3 or weight.shape[0] != b or weight.shape[2] != c:
        raise ValueError(f"weight must be Tensor[B, K, C] = [{b}, K, {c}] to match features {list(features.shape)}, "
                         f"got {list(weight.shape)}")
    _check_like("weight", weight, "features", features)
    if bias is not None:
        _check_float("bias", bias)
        k = weight.shape[1]
        if tuple(bias.shape) != (b, k):
            raise ValueError(f"bias must be Tensor[B, K] = [{b}, {k}] to match weight {list(weight.shape)}, "
                             f"got {list(bias.shape)}")
        _check_like("bias", bias, "features", features)


def class_embedding(guidance: Tensor, features: Tensor) -> Tensor:
    """Class embeddings of CondNet: probability-weighted mean features per class.

    Args:
        guidance: Tensor[B, K, H, W] class logits (softmax is taken over K at every pixel).
        features: Tensor[B, C, H, W] features, NCHW or channels_last, same dtype and device.

    Returns:
        Tensor[B, K, C]: ``E[b, k] = 1/(H*W) * sum_i softmax(guidance[b, :, i])[k] * features[b, :, i]``.
    """
    _check_class_embedding(guidance, features)
    require_extension("class_embedding")
    return torch.ops.normkit.class_embedding(guidance, features)


def dynamic_classify(features: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Per-sample 1x1 classification with generated weights.

    Args:
        features: Tensor[B, C, H, W], NCHW or channels_last.
        weight: Tensor[B, K, C], the classifier of each sample.
        bias: optional Tensor[B, K].

    Returns:
        Tensor[B, K, H, W] logits ``Y[b, k, i] = sum_c weight[b, k, c] * features[b, c, i] + bias[b, k]``,
        channels_last when ``features`` is.
    """
    _check_dynamic_classify(features, weight, bias)
    require_extension("dynamic_classify")
    return torch.ops.normkit.dynamic_classify(features, weight, bias)


def class_embedding_reference(guidance: Tensor, features: Tensor) -> Tensor:
    """The official CondNet formulation: softmax, pixel-major copy of the features, matmul, scale by 1/(H*W)."""
    b, k = guidance.shape[:2]
    prob = F.softmax(guidance, dim=1).reshape(b, k, -1)
    key = features.reshape(*features.shape[:2], -1).permute(0, 2, 1).contiguous()
    return torch.matmul(prob, key) * (features.shape[2] * features.shape[3]) ** -1


def dynamic_classify_reference(features: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The official CondNet formulation: the batch folded into channels, one grouped 1x1 conv with groups = B."""
    b, c, h, w = features.shape
    k = weight.shape[1]
    value = features.reshape(1, b * c, h, w)
    out = F.conv2d(value, weight.reshape(b * k, c, 1, 1), None if bias is None else bias.reshape(b * k), groups=b)
    return out.reshape(b, k, h, w)


# ---- autograd and fake (meta) registrations ----

def _register() -> None:
    @torch.library.register_fake("normkit::class_embedding")
    def _(guidance, features):
        torch._check(guidance.dim() == 4 and features.dim() == 4,
                     lambda: f"guidance and features must be 4-D, got {guidance.shape} and {features.shape}")
        torch._check(guidance.shape[0] == features.shape[0] and guidance.shape[2:] == features.shape[2:],
                     lambda: f"guidance {guidance.shape} and features {features.shape} must share B, H, W")
        torch._check(guidance.dtype == features.dtype, lambda: "guidance and features must have the same dtype")
        return features.new_empty((features.shape[0], guidance.shape[1], features.shape[1]))

    @torch.library.register_fake("normkit::_class_embedding_backward")
    def _(grad_embedding, guidance, features):
        return torch.empty_like(guidance, memory_format=torch.contiguous_format), \
            _nchw_empty_like_layout(features, features.shape, features)

    @torch.library.register_fake("normkit::dynamic_classify")
    def _(features, weight, bias):
        torch._check(features.dim() == 4 and weight.dim() == 3,
                     lambda: f"features must be 4-D and weight 3-D, got {features.shape} and {weight.shape}")
        torch._check(weight.shape[0] == features.shape[0] and weight.shape[2] == features.shape[1],
                     lambda: f"weight {weight.shape} must be [B, K, C] for features {features.shape}")
        torch._check(bias is None or bias.shape == weight.shape[:2],
                     lambda: f"bias must be [B, K] = {list(weight.shape[:2])}")
        torch._check(weight.dtype == features.dtype, lambda: "weight and features must have the same dtype")
        b, _, h, w = features.shape
        return _nchw_empty_like_layout(features, (b, weight.shape[1], h, w), features)

    @torch.library.register_fake("normkit::_dynamic_classify_backward")
    def _(grad_output, features, weight, has_bias):
        return (_nchw_empty_like_layout(features, features.shape, features), torch.empty_like(weight),
                weight.new_empty(weight.shape[:2]))

    def class_embedding_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def class_embedding_backward(ctx, grad):
        guidance, features = ctx.saved_tensors
        return torch.ops.normkit._class_embedding_backward(grad, guidance, features)

    torch.library.register_autograd("normkit::class_embedding", class_embedding_backward,
                                    setup_context=class_embedding_setup)

    def dynamic_classify_setup(ctx, inputs, output):
        features, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(features, weight)

    def dynamic_classify_backward(ctx, grad):
        features, weight = ctx.saved_tensors
        grad_features, grad_weight, grad_bias = torch.ops.normkit._dynamic_classify_backward(
            grad, features, weight, ctx.has_bias)
        return grad_features, grad_weight, grad_bias if ctx.has_bias else None

    torch.library.register_autograd("normkit::dynamic_classify", dynamic_classify_backward,
                                    setup_context=dynamic_classify_setup)
    register_no_double_backward("normkit::_class_embedding_backward", "class_embedding")
    register_no_double_backward("normkit::_dynamic_classify_backward", "dynamic_classify")


register_ops(_register)
