"""CondNet's conditional classifier as a module."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from normkit.ops.cond_classifier import class_embedding, dynamic_classify

__all__ = ["ConditionalClassifier"]


class _GenerateClassifier(torch.autograd.Function):
    """params[k] = weight[k] @ embedding[k] + bias[k] for (K, P, C) weights and (K, C, B) embeddings: a batched GEMM
    whose backward takes the embedding gradient as (grad^T @ weight)^T. Autograd's own form multiplies by the
    transposed weight, which MKL runs ~3x slower here, and the weight (K * (C + 1) * C values) is the head's
    largest tensor."""

    @staticmethod
    def forward(ctx, bias: Tensor, weight: Tensor, embedding: Tensor) -> Tensor:
        ctx.save_for_backward(weight, embedding)
        return torch.baddbmm(bias.unsqueeze(-1), weight, embedding)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, embedding = ctx.saved_tensors
        # Under autocast the output (and so grad) may be in a lower precision than the saved operands.
        grad_weight = torch.bmm(grad, embedding.to(grad.dtype).transpose(1, 2)).to(weight.dtype)
        grad_embedding = torch.bmm(grad.transpose(1, 2), weight.to(grad.dtype)).transpose(1, 2).to(embedding.dtype)
        return grad.sum(-1).to(weight.dtype), grad_weight, grad_embedding


def _conv_module(in_channels: int, out_channels: int, groups: int = 1) -> nn.ModuleDict:
    # mmcv's ConvModule (norm and activation off) nests its conv as `.conv`; keep that nesting so the
    # official state-dict keys load unchanged.
    return nn.ModuleDict({"conv": nn.Conv2d(in_channels, out_channels, 1, groups=groups)})


class ConditionalClassifier(nn.Module):
    """Conditional classifier of CondNet: a per-image classifier generated from class embeddings.

    Steps (docs/design.md, "Conditional classifier"): Dropout2d; guidance logits ``G = guidance_project(X)``
    (1x1 conv with bias); class embeddings ``E = class_embedding(G, X)`` (B, K, C); kernel generation, one 1x1 conv with
    groups = K over E viewed as (B, K*C, 1, 1) (computed as the equivalent batched GEMM) giving K*C
    weights (and, with bias, K biases: the first K*C outputs are the weights, the last K the biases,
    exactly as the official code slices them even though that split does not follow the conv's groups);
    dynamic classification ``Y = W X + b``.

    Parameter names follow the official CondNet code (``ConditionalDecodeHead`` in the CondNet
    MMSegmentation fork, ``mmseg/models/decode_heads/conditional_decode_head.py``), whose projections are
    mmcv ``ConvModule``s without norm or activation:

    * ``guidance_project.conv.weight`` (K, C, 1, 1), ``guidance_project.conv.bias`` (K,)
    * ``filter_project.conv.weight`` (K*C + K, C, 1, 1) with bias, (K*C, C, 1, 1) without;
      ``filter_project.conv.bias`` (K*C + K,) or (K*C,)

    so the ``decode_head.guidance_project.*`` / ``decode_head.filter_project.*`` tensors of a released
    head load with their prefix stripped. ``with_bias`` is the official ``cond_layer_with_bias`` (True in
    every released config); only the official ``num_cond_layers=1`` is supported.

    Args:
        in_channels: C, channels of the decoder features.
        num_classes: K.
        with_bias: generate a per-class bias besides the weights. Default: True.
        dropout: Dropout2d probability applied to the features first; 0 disables it. Default: 0.1.

    Shape:
        input Tensor[B, C, H, W] (NCHW or channels_last). Returns ``(logits, guidance_logits)``, both
        Tensor[B, K, H, W], in training mode (the guidance logits feed the Dice loss), and the logits
        alone in eval mode.
    """

    def __init__(self, in_channels: int, num_classes: int, with_bias: bool = True, dropout: float = 0.1):
        super().__init__()
        if in_channels <= 0 or num_classes <= 0:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.with_bias = with_bias
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        self.guidance_project = _conv_module(in_channels, num_classes)
        num_generated = num_classes * in_channels + (num_classes if with_bias else 0)
        self.filter_project = _conv_module(num_classes * in_channels, num_generated, groups=num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mmcv's ConvModule initialisation, which the official heads train from: Kaiming normal
        # (fan_out, ReLU gain) weights and zero biases.
        for project in (self.guidance_project, self.filter_project):
            nn.init.kaiming_normal_(project["conv"].weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(project["conv"].bias)

    def generate_classifier(self, embedding: Tensor) -> tuple[Tensor, Tensor | None]:
        """Class embeddings Tensor[B, K, C] -> per-sample weights Tensor[B, K, C] and biases Tensor[B, K] or None."""
        b, k, c = embedding.shape
        conv = self.filter_project["conv"]
        per_class = conv.out_channels // k
        # The grouped 1x1 conv on a (B, K*C, 1, 1) map is one (per_class x C) GEMM per class; run as a
        # batched GEMM it gives the same numbers, and its weight gradient (K*(C+1)*C values from a batch of
        # a few images) avoids oneDNN's grouped backward-weights path, several times slower on CPU.
        params = _GenerateClassifier.apply(conv.bias.view(k, per_class), conv.weight.view(k, per_class, c),
                                           embedding.permute(1, 2, 0))  # (K, per_class, B)
        params = params.permute(2, 0, 1).reshape(b, k * per_class)
        weight = params[:, :k * c].reshape(b, k, c)
        bias = params[:, k * c:] if self.with_bias else None
        return weight, bias

    def forward(self, features: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"ConditionalClassifier expects Tensor[B, {self.in_channels}, H, W], "
                             f"got {list(features.shape)}")
        if self.dropout is not None:
            features = self.dropout(features)
        guidance = self.guidance_project["conv"](features)
        # Under autocast the convs and the generator GEMM return the autocast dtype while the features may
        # not; the fused ops take one dtype, the features'.
        weight, bias = self.generate_classifier(class_embedding(guidance.to(features.dtype), features))
        if bias is not None:
            bias = bias.to(features.dtype)
        logits = dynamic_classify(features, weight.to(features.dtype), bias)
        return (logits, guidance) if self.training else logits

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, with_bias={self.with_bias}"
