"""``build_model(config, checkpoint=None)``: the one place model config is read.

``config["model"]`` schema (every key except ``name``/``num_classes`` optional)::

    name: encoder_decoder | deeplab_v2 | resnet      (resnet = ImageNet classifier)
    num_classes: int
    ignore_index: 255
    loss_mode: downsample_labels | upsample_logits   (encoder_decoder; CSAIL vs mmseg recipe)
    deep_sup_weight: 0.4                             (encoder_decoder)
    aux_weight: 0.4                                  (encoder_decoder)
    scales: [1.0, 0.75, 0.5]                         (deeplab_v2)
    backbone: {name: resnet18|resnet34|resnet50|resnet101, stem: v1|deep|v1c, output_stride: 8|16|32,
               dilation_rule: csail|deeplab|mmseg, norm: <build_norm name>, norm_kwargs: {...},
               last_gamma: bool, stride_in_1x1: bool, ceil_mode: bool, pretrained: <path>}
    decode_head: {name: <HEADS name>, norm: <defaults to the backbone's>, norm_kwargs: {...}, ...}
    auxiliary_head: {name: fcn, ...}                 (optional)
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Tuple, Union

import yaml
from torch import nn

from normkit.models.backbones.resnet import ResNet
from normkit.models.checkpoint import load_state_dict_strict
from normkit.models.registry import BACKBONES, HEADS, MODELS
from normkit.models.segmentation import condnet, csail_decoders
from normkit.models.segmentation.deeplab_v2 import ASPPSumHead, DeepLabV2
from normkit.models.segmentation.encoder_decoder import SegmentationModel

__all__ = ["build_model", "build_backbone", "build_head", "load_config"]


def load_config(config: Union[str, os.PathLike, Mapping]) -> dict:
    """A config dict from a YAML path or a mapping."""
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config file {os.fspath(config)} does not exist")
        with open(config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    if not isinstance(config, Mapping):
        raise ValueError(f"a config must be a mapping, got {type(config).__name__}")
    return dict(config)


def _section(cfg: Any, where: str) -> dict:
    if not isinstance(cfg, Mapping):
        raise ValueError(f"config {where} must be a mapping, got {cfg!r}")
    if "name" not in cfg:
        raise ValueError(f"config {where} needs a 'name'")
    return dict(cfg)


def _call(fn, where: str, *args, **kwargs):
    """Call a constructor, turning a wrong keyword into an error naming the config section."""
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        if "argument" not in str(exc):  # a TypeError from inside the constructor, not from its signature
            raise
        raise ValueError(f"bad keys in config {where}: {exc}") from exc


# -- backbones --

def _resnet_builder(depth: int):
    def build(cfg: dict, where: str) -> ResNet:
        cfg = dict(cfg)
        pretrained = cfg.pop("pretrained", None)
        backbone = _call(ResNet, where, depth, **cfg)
        if pretrained:
            # ImageNet checkpoints carry the classifier; a backbone without one ignores it.
            load_state_dict_strict(backbone, pretrained, ignore_prefixes=("fc.",) if backbone.fc is None else ())
        return backbone
    return build


for _depth in (18, 34, 50, 101):
    BACKBONES.register(f"resnet{_depth}", _resnet_builder(_depth))


def build_backbone(cfg: Mapping, where: str = "model.backbone") -> ResNet:
    cfg = _section(cfg, where)
    return BACKBONES.get(cfg.pop("name"))(cfg, where)


# -- heads --

def _head_builder(cls, *, takes_norm: bool = True, **fixed):
    def build(cfg: dict, in_channels: Tuple[int, ...], num_classes: int, where: str) -> nn.Module:
        return _call(cls, where, in_channels, num_classes, **fixed, **cfg)
    build.takes_norm = takes_norm
    return build


HEADS.register("c1", _head_builder(csail_decoders.C1))
HEADS.register("c1_deepsup", _head_builder(csail_decoders.C1DeepSup))
HEADS.register("ppm", _head_builder(csail_decoders.PPM))
HEADS.register("ppm_deepsup", _head_builder(csail_decoders.PPMDeepSup))
HEADS.register("upernet", _head_builder(csail_decoders.UPerNet, fpn_dim=512))
HEADS.register("upernet_lite", _head_builder(csail_decoders.UPerNet, fpn_dim=256))
HEADS.register("aspp_sum", _head_builder(ASPPSumHead, takes_norm=False))
HEADS.register("cond_aspp", _head_builder(condnet.CondASPPHead))
HEADS.register("cond_sep_aspp", _head_builder(condnet.CondDepthwiseSeparableASPPHead))
HEADS.register("fcn", _head_builder(condnet.FCNHead))


def build_head(cfg: Mapping, in_channels: Tuple[int, ...], num_classes: int, *, default_norm=None,
               default_norm_kwargs: Optional[Mapping] = None, where: str = "model.decode_head") -> nn.Module:
    """Build a head; ``norm``/``norm_kwargs`` default to the backbone's for heads that take a norm."""
    cfg = _section(cfg, where)
    builder = HEADS.get(cfg.pop("name"))
    if builder.takes_norm and "norm" not in cfg and default_norm is not None:
        cfg["norm"] = default_norm
        cfg.setdefault("norm_kwargs", dict(default_norm_kwargs or {}))
    return builder(cfg, tuple(in_channels), num_classes, where)



# -- models --

def _model_parts(cfg: dict):
    for key in ("num_classes", "backbone", "decode_head"):
        if key not in cfg:
            raise ValueError(f"config model.{key} is required for model {cfg['name']!r}")
    num_classes = cfg.pop("num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"config model.num_classes must be a positive int, got {num_classes!r}")
    backbone_cfg = cfg.pop("backbone")
    backbone = build_backbone(backbone_cfg)
    norm, norm_kwargs = backbone_cfg.get("norm", "bn"), backbone_cfg.get("norm_kwargs")
    head = build_head(cfg.pop("decode_head"), backbone.out_channels, num_classes, default_norm=norm,
                      default_norm_kwargs=norm_kwargs)
    return num_classes, backbone, head, norm, norm_kwargs


@MODELS.register("encoder_decoder")
def _build_encoder_decoder(cfg: dict) -> SegmentationModel:
    num_classes, backbone, head, norm, norm_kwargs = _model_parts(cfg)
    aux_cfg = cfg.pop("auxiliary_head", None)
    aux = None
    if aux_cfg:
        aux = build_head(aux_cfg, backbone.out_channels, num_classes, default_norm=norm,
                         default_norm_kwargs=norm_kwargs, where="model.auxiliary_head")
    cfg.pop("name")
    return _call(SegmentationModel, "model", backbone, head, num_classes=num_classes, auxiliary_head=aux, **cfg)


@MODELS.register("deeplab_v2")
def _build_deeplab_v2(cfg: dict) -> DeepLabV2:
    num_classes, backbone, head, _, _ = _model_parts(cfg)
    cfg.pop("name")
    return _call(DeepLabV2, "model", backbone, head, num_classes=num_classes, **cfg)


@MODELS.register("resnet")
def _build_classifier(cfg: dict) -> ResNet:
    """An ImageNet-style classifier: ``backbone`` config plus ``num_classes`` (default 1000)."""
    if "backbone" not in cfg:
        raise ValueError("config model.backbone is required for model 'resnet'")
    backbone_cfg = dict(cfg["backbone"])
    backbone_cfg["num_classes"] = cfg.get("num_classes", 1000)
    return build_backbone(backbone_cfg)


def build_model(config: Union[str, os.PathLike, Mapping], checkpoint=None) -> nn.Module:
    """Build the model of ``config["model"]`` (config: YAML path or dict) and optionally load
    ``checkpoint`` (a path read with ``torch.load(weights_only=True)``, or a state dict) strictly:
    missing, unexpected or mis-shaped keys raise RuntimeError naming them."""
    config = load_config(config)
    if "model" not in config:
        raise ValueError(f"config has no 'model' section (top-level keys: {sorted(config)})")
    model_cfg = _section(config["model"], "model")
    model = MODELS.get(model_cfg["name"])(_deep_copy(model_cfg))
    if checkpoint is not None:
        load_state_dict_strict(model, checkpoint)
    return model


def _deep_copy(cfg):
    # builders pop keys; never mutate the caller's config
    if isinstance(cfg, Mapping):
        return {k: _deep_copy(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_deep_copy(v) for v in cfg]
    return cfg
