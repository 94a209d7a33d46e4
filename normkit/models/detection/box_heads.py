"""Box heads (C4 res5, conv/fc heads) and the box predictor."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from normkit.models.backbones.resnet import Bottleneck, make_stage
from normkit.models.registry import BOX_HEADS
from normkit.models.necks.fpn import xavier_fill_
from normkit.nn import build_norm

__all__ = ["Res5BoxHead", "FastRCNNConvFCHead", "BoxPredictor", "msra_fill_", "BACKGROUND_INDICES"]

BACKGROUND_INDICES = ("first", "last")


def msra_fill_(weight: Tensor) -> Tensor:
    """Caffe2 ``MSRAFill``: N(0, sqrt(2 / fan_out))."""
    return nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


@BOX_HEADS.register("res5")
class Res5BoxHead(nn.Module):
    """The C4 box head: ResNet's res5 stage (3 bottlenecks, 2048 channels, first stride ``stride``, by default
    ``resolution // 7``) on the 14x14 RoI features, then average pooling (7x7 -> 1) -> Tensor[K, 2048].

    ``norm`` is the backbone's norm; in training an SN/BN layer here takes its batch statistics over the RoIs.
    Parameter names (``res5.{0,1,2}.conv1``, ``.bn1``, ``.downsample.0/1``) follow the backbone's stages so
    ImageNet ``layer4`` weights load into it.
    """

    def __init__(self, in_channels: int = 1024, resolution: int = 14, *, stride: Optional[int] = None,
                 dilation: int = 1, num_blocks: int = 3, norm="bn", norm_kwargs: Optional[Mapping] = None,
                 stride_in_1x1: bool = False):
        super().__init__()
        stride = stride or max(resolution // 7, 1)  # Detectron: ROI_XFORM_RESOLUTION // 7, so res5 outputs 7x7
        planes = 512
        self.res5 = make_stage(Bottleneck, in_channels, planes, num_blocks, stride=stride,
                               dilations=[(dilation, dilation)] * num_blocks, norm=norm,
                               norm_kwargs=dict(norm_kwargs or {}), stride_in_1x1=stride_in_1x1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                msra_fill_(m.weight)
        self.out_channels = planes * 4

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x).mean(dim=(2, 3))  # == AvgPool2d(7) on the 7x7 output


@BOX_HEADS.register("conv_fc")
class FastRCNNConvFCHead(nn.Module):
    """``num_conv`` x [3x3 conv, norm, ReLU] then ``num_fc`` x [fc, ReLU] on pooled RoI features.

    Detectron's ``roi_2mlp_head`` is ``num_conv=0, num_fc=2`` (no norm); ``roi_Xconv1fc_{sn,gn}_head`` is
    ``num_conv=4, num_fc=1`` with SN/GN after each bias-free conv. Convs are MSRAFill, fcs XavierFill, biases 0.
    Keys: ``convs.{0,3,6,9}`` (conv), ``convs.{1,4,7,10}`` (norm), ``fc1``, ``fc2``.

    forward(Tensor[K, C, R, R]) -> Tensor[K, fc_dim].
    """

    def __init__(self, in_channels: int, resolution: int, *, num_conv: int = 0, conv_dim: int = 256,
                 num_fc: int = 2, fc_dim: int = 1024, norm=None, norm_kwargs: Optional[Mapping] = None):
        super().__init__()
        if num_fc < 1:
            raise ValueError(f"FastRCNNConvFCHead needs at least one fc layer, got num_fc={num_fc}")
        use_norm = norm not in (None, "")
        layers = []
        channels = in_channels
        for _ in range(num_conv):
            conv = nn.Conv2d(channels, conv_dim, 3, padding=1, bias=not use_norm)
            msra_fill_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            layers += [conv, build_norm(norm, conv_dim, **dict(norm_kwargs or {})) if use_norm else nn.Identity(),
                       nn.ReLU(inplace=True)]
            channels = conv_dim
        self.convs = nn.Sequential(*layers)
        dim = channels * resolution * resolution
        for i in range(1, num_fc + 1):
            fc = nn.Linear(dim, fc_dim)
            xavier_fill_(fc.weight)
            nn.init.zeros_(fc.bias)
            self.add_module(f"fc{i}", fc)
            dim = fc_dim
        self.num_fc = num_fc
        self.out_channels = fc_dim

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.convs(x), 1)
        for i in range(1, self.num_fc + 1):
            x = torch.relu(getattr(self, f"fc{i}")(x))
        return x


class BoxPredictor(nn.Module):
    """``cls_score``: K + 1 logits (background at index 0 for ``background="first"``, Detectron-1; at K for
    ``"last"``, detectron2); ``bbox_pred``: class-specific deltas, 4 (K + 1) with a background slot
    (Detectron-1) or 4 K (detectron2). Init N(0, 0.01) and N(0, 0.001), biases 0."""

    def __init__(self, in_channels: int, num_classes: int, background: str = "first"):
        super().__init__()
        if background not in BACKGROUND_INDICES:
            raise ValueError(f"unknown background index {background!r}; choose one of {', '.join(BACKGROUND_INDICES)}")
        self.num_classes = num_classes
        self.background = background
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, 4 * (num_classes + 1 if background == "first" else num_classes))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor):
        return self.cls_score(x), self.bbox_pred(x)
