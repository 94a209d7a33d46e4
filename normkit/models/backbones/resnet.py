"""ResNet 18/34/50/101 backbones with pluggable stems, dilation rules and norms.

Parameter names follow torchvision's layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``,
``layerK.0.downsample.0/1``, ``fc``) so checkpoints of every published layout map onto it by renaming
only; the norm modules are called ``bn*`` whatever norm they hold. The deep stems use CSAIL's names
``conv1/bn1/conv2/bn2/conv3/bn3``.
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from normkit.models.registry import BACKBONES, MODELS, build_backbone
from normkit.nn import build_norm, conv2d

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "ShapeSpec", "ARCH_SETTINGS", "STEMS", "DILATION_RULES",
           "FREEZE_MODES", "STAGE_NAMES", "make_stage", "stage_dilations"]

STEMS = ("v1", "deep", "v1c")
DILATION_RULES = ("csail", "deeplab", "mmseg")
FREEZE_MODES = ("official", "eval")
STAGE_NAMES = ("res2", "res3", "res4", "res5")  # layer1..layer4; "res1" is the stem


class ShapeSpec(NamedTuple):
    """Channels and stride (w.r.t. the input image) of a named feature map."""
    channels: int
    stride: int

# Stage strides and dilations that give each output stride (layers 1..4).
_STAGE_SETTINGS = {
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
}


class BasicBlock(nn.Module):
    """Two 3x3 convs. ``dilations`` gives the dilation of conv1 and conv2."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, dilations: Tuple[int, int] = (1, 1),
                 downsample: Optional[nn.Module] = None, norm="bn", norm_kwargs=None,
                 stride_in_1x1: bool = False):
        super().__init__()
        del stride_in_1x1  # a basic block has no 1x1 conv; accepted so both blocks share one signature
        norm_kwargs = norm_kwargs or {}
        self.conv1 = conv2d(inplanes, planes, 3, stride=stride, dilation=dilations[0])
        self.bn1 = build_norm(norm, planes, **norm_kwargs)
        self.conv2 = conv2d(planes, planes, 3, dilation=dilations[1])
        self.bn2 = build_norm(norm, planes, **norm_kwargs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4). The stride sits on the 3x3 conv ("pytorch" style) unless
    ``stride_in_1x1`` (Caffe/MSRA style, used by the DeepLab v2 port). ``dilations[0]`` is the 3x3's
    dilation; ``dilations[1]`` is unused (kept so both block types share the rule tables)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, dilations: Tuple[int, int] = (1, 1),
                 downsample: Optional[nn.Module] = None, norm="bn", norm_kwargs=None,
                 stride_in_1x1: bool = False):
        super().__init__()
        norm_kwargs = norm_kwargs or {}
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv2d(inplanes, planes, 1, stride=stride_1x1)
        self.bn1 = build_norm(norm, planes, **norm_kwargs)
        self.conv2 = conv2d(planes, planes, 3, stride=stride_3x3, dilation=dilations[0])
        self.bn2 = build_norm(norm, planes, **norm_kwargs)
        self.conv3 = conv2d(planes, planes * self.expansion, 1)
        self.bn3 = build_norm(norm, planes * self.expansion, **norm_kwargs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


ARCH_SETTINGS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def stage_dilations(rule: str, block: type, num_blocks: int, dilation: int, nominal_stride: int,
                    stride_in_1x1: bool) -> List[Tuple[int, int]]:
    """Per-block (first 3x3, second 3x3) dilations of one stage dilated by ``dilation``.

    ``nominal_stride`` is the stride the stage has in the undilated network (2 for layers 2-4).

    - ``csail`` (CSAIL ``_nostride_dilate``): every conv of the stage loses its stride; a 3x3 conv that
      carried the stride gets ``dilation // 2``, every other 3x3 conv gets ``dilation``.
    - ``deeplab`` (DeepLab v2): every 3x3 conv of the stage gets ``dilation``.
    - ``mmseg`` (``contract_dilation=True``): the first block's first 3x3 gets ``dilation // 2``, later
      blocks ``dilation``; mmseg's BasicBlock never dilates its second conv.
    """
    if rule not in DILATION_RULES:
        raise ValueError(f"unknown dilation rule {rule!r}; choose one of {', '.join(DILATION_RULES)}")
    if dilation == 1:
        return [(1, 1)] * num_blocks
    if rule == "deeplab":
        return [(dilation, dilation)] * num_blocks
    if rule == "mmseg":
        second = (lambda d: 1) if block is BasicBlock else (lambda d: d)
        first_block = (max(dilation // 2, 1), second(dilation))
        return [first_block] + [(dilation, second(dilation))] * (num_blocks - 1)
    # csail: which 3x3 carried the stride in block 0? (conv1 of a BasicBlock, conv2 of a pytorch-style
    # Bottleneck, none when the Bottleneck strides in its 1x1 conv)
    strided_3x3 = nominal_stride != 1 and not (block is Bottleneck and stride_in_1x1)
    first_block = (dilation // 2 if strided_3x3 else dilation, dilation)
    return [first_block] + [(dilation, dilation)] * (num_blocks - 1)


def make_stage(block: type, inplanes: int, planes: int, num_blocks: int, *, stride: int = 1,
               dilations: Optional[Sequence[Tuple[int, int]]] = None, norm="bn", norm_kwargs=None,
               stride_in_1x1: bool = False, last_gamma: bool = False) -> nn.Sequential:
    """One residual stage: ``num_blocks`` blocks, the first with ``stride`` and a conv + norm shortcut when
    the stride or the width changes. ``dilations`` holds each block's (first, second) 3x3 dilations
    (:func:`stage_dilations`); ``last_gamma`` zeroes the weight of each block's last norm (SN recipe).
    Also builds the res5 head of C4 detectors."""
    norm_kwargs = dict(norm_kwargs or {})
    dilations = list(dilations or [(1, 1)] * num_blocks)
    if len(dilations) != num_blocks:
        raise ValueError(f"make_stage: {len(dilations)} dilations for {num_blocks} blocks")
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            build_norm(norm, planes * block.expansion, **norm_kwargs))
    blocks = []
    for i, block_dilations in enumerate(dilations):
        blocks.append(block(inplanes, planes, stride=stride if i == 0 else 1, dilations=block_dilations,
                            downsample=downsample if i == 0 else None, norm=norm, norm_kwargs=norm_kwargs,
                            stride_in_1x1=stride_in_1x1))
        inplanes = planes * block.expansion
    if last_gamma:
        for blk in blocks:
            weight = getattr(blk.last_norm(), "weight", None)
            if weight is not None:
                with torch.no_grad():
                    weight.zero_()
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """ResNet backbone returning named stage features ``{"res2": C2, ..., "res5": C5}``.

    Args:
        depth: 18, 34, 50 or 101.
        stem: ``"v1"`` (7x7 conv, 64 ch), ``"deep"`` (CSAIL: three 3x3 convs 64/64/128) or ``"v1c"``
            (mmseg: 32/32/64); each followed by a 3x3 stride-2 max-pool.
        output_stride: 32, 16 or 8; stages after the requested stride are dilated.
        dilation_rule: ``"csail"``, ``"deeplab"`` or ``"mmseg"`` (see :func:`stage_dilations`).
        norm, norm_kwargs: any :func:`normkit.nn.build_norm` choice and its keyword arguments.
        last_gamma: initialise the weight of the last norm of each residual block to 0 (SN recipe).
        stride_in_1x1: put a Bottleneck's stride on its first 1x1 conv (DeepLab v2 / Caffe ResNets).
        ceil_mode: ceil mode of the stem max-pool (DeepLab v2).
        num_classes: when given, adds average pooling, dropout and an ``fc`` layer; ``forward`` then
            returns class logits Tensor[N, num_classes] instead of the features.
        classifier_pool_size: the classifier's pooling: None averages the whole map (torchvision), k an
            ``AvgPool2d(k, stride=1)`` (the official SN ResNetV1SN: 7, which needs 224x224 inputs for one vector).
        classifier_dropout: dropout probability before ``fc`` (ResNetV1SN: 0.5); it has no parameters, so
            checkpoint keys are the same with or without it.
        out_features: which of ``res2``..``res5`` ``forward`` returns, in stride order; stages after the
            last one requested are not built (a C4 detector's body stops at ``res4``).
        freeze_at: 0 trains everything; k >= 1 freezes the stem ("res1") and the stages up to "res{k}"
            (their parameters get ``requires_grad=False``).
        freeze_mode: how the norm layers of frozen stages behave.
            ``"official"`` (Detectron-1 / the SN detection code): the stem's layers and the frozen stages'
            blocks stay in eval mode, but the layers *inside* those blocks are never switched, so their
            norms keep training-mode behaviour (an SN/BN in a frozen res2 uses batch statistics and keeps
            updating its running statistics), in training and in evaluation alike.
            ``"eval"``: every module of the frozen part is always in eval mode (running statistics used and
            never updated), the usual fine-tuning choice.

    :meth:`output_shape` gives each returned feature's channels and stride; ``out_channels`` and
    ``out_strides`` the same as tuples in ``out_features`` order.
    """

    def __init__(self, depth: int = 50, *, stem: str = "v1", output_stride: int = 32,
                 dilation_rule: str = "csail", norm="bn", norm_kwargs: Optional[dict] = None,
                 last_gamma: bool = False, stride_in_1x1: bool = False, ceil_mode: bool = False,
                 num_classes: Optional[int] = None, classifier_pool_size: Optional[int] = None,
                 classifier_dropout: float = 0.0, out_features: Sequence[str] = STAGE_NAMES,
                 freeze_at: int = 0, freeze_mode: str = "official"):
        super().__init__()
        if depth not in ARCH_SETTINGS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(ARCH_SETTINGS)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        if output_stride not in _STAGE_SETTINGS:
            raise ValueError(f"output_stride must be one of {sorted(_STAGE_SETTINGS)}, got {output_stride}")
        if dilation_rule not in DILATION_RULES:
            raise ValueError(f"unknown dilation rule {dilation_rule!r}; choose one of {', '.join(DILATION_RULES)}")
        out_features = tuple(out_features)
        if not out_features or any(f not in STAGE_NAMES for f in out_features) or \
                list(out_features) != sorted(set(out_features), key=STAGE_NAMES.index):
            raise ValueError(f"out_features must be distinct names from {list(STAGE_NAMES)} in stride order, "
                             f"got {list(out_features)}")
        num_stages = STAGE_NAMES.index(out_features[-1]) + 1
        if num_classes is not None and num_stages != 4:
            raise ValueError("a classifier (num_classes) needs all four stages: out_features must end with res5")
        if not isinstance(freeze_at, int) or not 0 <= freeze_at <= num_stages + 1:
            raise ValueError(f"freeze_at must be an int in [0, {num_stages + 1}], got {freeze_at!r}")
        if freeze_mode not in FREEZE_MODES:
            raise ValueError(f"unknown freeze_mode {freeze_mode!r}; choose one of {', '.join(FREEZE_MODES)}")
        norm_kwargs = dict(norm_kwargs or {})
        if "last_gamma" in norm_kwargs:
            raise ValueError("pass last_gamma to the backbone (backbone.last_gamma), not in norm_kwargs: "
                             "it applies only to the last norm of each residual block")
        block, layers = ARCH_SETTINGS[depth]
        self.depth, self.stem, self.output_stride = depth, stem, output_stride
        self.out_features = out_features
        self.freeze_at, self.freeze_mode = freeze_at, freeze_mode

        stem_channels = {"v1": (64,), "deep": (64, 64, 128), "v1c": (32, 32, 64)}[stem]
        if stem == "v1":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = build_norm(norm, 64, **norm_kwargs)
        else:
            in_ch = 3
            for i, out_ch in enumerate(stem_channels, start=1):
                setattr(self, f"conv{i}", conv2d(in_ch, out_ch, 3, stride=2 if i == 1 else 1))
                setattr(self, f"bn{i}", build_norm(norm, out_ch, **norm_kwargs))
                in_ch = out_ch
        self._num_stem_convs = len(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode)

        strides, dilations = _STAGE_SETTINGS[output_stride]
        inplanes = stem_channels[-1]
        self._shapes: Dict[str, ShapeSpec] = {}
        total_stride = 4
        for index in range(1, num_stages + 1):
            planes, stride, dilation = (64, 128, 256, 512)[index - 1], strides[index - 1], dilations[index - 1]
            nominal_stride = 1 if index == 1 else 2
            stage = make_stage(block, inplanes, planes, layers[index - 1], stride=stride,
                               dilations=stage_dilations(dilation_rule, block, layers[index - 1], dilation,
                                                         nominal_stride, stride_in_1x1),
                               norm=norm, norm_kwargs=norm_kwargs, stride_in_1x1=stride_in_1x1)
            setattr(self, f"layer{index}", stage)
            inplanes = planes * block.expansion
            total_stride *= stride
            self._shapes[STAGE_NAMES[index - 1]] = ShapeSpec(inplanes, total_stride)
        self.out_channels: Tuple[int, ...] = tuple(self._shapes[f].channels for f in out_features)
        self.out_strides: Tuple[int, ...] = tuple(self._shapes[f].stride for f in out_features)

        if num_classes is None and (classifier_pool_size is not None or classifier_dropout):
            raise ValueError("classifier_pool_size and classifier_dropout need a classifier (num_classes)")
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1) if classifier_pool_size is None else \
                nn.AvgPool2d(classifier_pool_size, stride=1)
            self.dropout = nn.Dropout(classifier_dropout)
            self.fc = nn.Linear(inplanes, num_classes)
        else:
            self.fc = None

        self._init_weights()
        if last_gamma:
            for stage in self.stages():
                for blk in stage:
                    weight = getattr(blk.last_norm(), "weight", None)
                    if weight is not None:
                        with torch.no_grad():
                            weight.zero_()
        for module in self._frozen_modules():
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
        self.train()

    def stages(self) -> List[nn.Sequential]:
        """The built residual stages, layer1 (res2) first."""
        return [getattr(self, f"layer{i}") for i in range(1, len(self._shapes) + 1)]

    def _stem_modules(self) -> List[nn.Module]:
        convs = [m for i in range(1, self._num_stem_convs + 1) for m in (getattr(self, f"conv{i}"),
                                                                           getattr(self, f"bn{i}"))]
        return convs + [self.relu, self.maxpool]

    def _frozen_modules(self) -> List[nn.Module]:
        if self.freeze_at == 0:
            return []
        modules = list(self._stem_modules())
        for stage in self.stages()[:self.freeze_at - 1]:
            modules.extend(stage.modules())
        return modules

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if self.freeze_at == 0:
            return self
        if self.freeze_mode == "eval":
            for module in self._frozen_modules():
                module.training = False
            return self
        # official: the direct children of res1..res{freeze_at} are switched off once and never switched again;
        # everything below them keeps its initial (training) mode.
        for module in self._stem_modules():
            module.training = False
        for stage in self.stages()[:self.freeze_at - 1]:
            stage.training = False
            for blk in stage:
                blk.training = False
                for sub in blk.modules():
                    if sub is not blk:
                        sub.training = True
        return self

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the features ``forward`` returns."""
        return {name: self._shapes[name] for name in self.out_features}

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Tensor[N, 3, H, W] -> ``{name: feature}`` for ``out_features``."""
        for i in range(1, self._num_stem_convs + 1):
            x = self.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        x = self.maxpool(x)
        features = {}
        for name, stage in zip(STAGE_NAMES, self.stages()):
            x = stage(x)
            if name in self.out_features:
                features[name] = x
        return features

    def forward(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet expects images Tensor[N, 3, H, W], got {list(x.shape)}")
        features = self.forward_features(x)
        if self.fc is None:
            return features
        return self.fc(self.dropout(torch.flatten(self.avgpool(features["res5"]), 1)))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, stem={self.stem!r}, output_stride={self.output_stride}"


# functools.partial keeps ResNet's keyword signature, so a mistyped backbone key is named with the closest valid one.
for _depth in ARCH_SETTINGS:
    BACKBONES.register(f"resnet{_depth}", functools.partial(ResNet, _depth))


@MODELS.register("resnet")
def resnet_classifier(cfg: dict) -> ResNet:
    """An ImageNet-style classifier: ``backbone`` config plus ``num_classes`` (default 1000)."""
    if "backbone" not in cfg:
        raise ValueError("config model.backbone is required for model 'resnet'")
    return build_backbone({**cfg["backbone"], "num_classes": cfg.get("num_classes", 1000)})
