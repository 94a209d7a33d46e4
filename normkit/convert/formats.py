"""Converters from the published checkpoint layouts (docs/design.md, "Checkpoint formats") to normkit state dicts.

Each converter is a table of explicit rename rules applied by :func:`normkit.convert.common.rename_keys`
(every rename logged, one-to-one, unknown keys reported). The results load strictly with
``normkit.build_model(config, checkpoint=...)`` for the matching config.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Sequence, Set

from normkit.convert.common import StateDict, flatten_official_sn, rename_keys
from normkit.io import read_tensor_dict

__all__ = ["convert", "convert_csail", "convert_sn_imagenet", "convert_mmcv_resnet_v1c", "convert_mmseg",
           "convert_deeplab_v2", "CONVERTERS", "BACKBONE_FORMATS"]

# Published files keep the weights under "state_dict" (official SN, mmseg, with "meta"/"optimizer" beside it) or
# "model" (Detectron); CSAIL and DeepLab files are the bare state dict.
SOURCE_CONTAINERS = ("state_dict", "model")


def _resnet_rules(src: str, dst: str) -> List[tuple]:
    """torchvision-layout ResNet keys under ``src`` -> normkit ResNet keys under ``dst``.

    Norms may be called ``bnK`` (torchvision, CSAIL, DeepLab) or ``snK`` (official SN ResNetV1SN); normkit
    always calls them ``bnK``.
    """
    s = re.escape(src)
    return [
        (rf"{s}conv([123])\.weight", rf"{dst}conv\1.weight"),
        (rf"{s}(?:bn|sn)([123])\.(\w+)", rf"{dst}bn\1.\2"),
        (rf"{s}layer([1-4])\.(\d+)\.conv([123])\.weight", rf"{dst}layer\1.\2.conv\3.weight"),
        (rf"{s}layer([1-4])\.(\d+)\.(?:bn|sn)([123])\.(\w+)", rf"{dst}layer\1.\2.bn\3.\4"),
        (rf"{s}layer([1-4])\.0\.downsample\.([01])\.(\w+)", rf"{dst}layer\1.0.downsample.\2.\3"),
    ]


# CSAIL decoder modules keep their names in normkit (csail_decoders.py); they only move under decode_head.
_CSAIL_DECODER_MODULES = ("cbr", "cbr_deepsup", "conv_last", "conv_last_deepsup", "ppm", "ppm_conv",
                          "ppm_last_conv", "fpn_in", "fpn_out")


def convert_csail(encoder_path, decoder_path) -> StateDict:
    """CSAIL ``encoder_epoch_N.pth`` + ``decoder_epoch_N.pth`` (also the SN-segmentation fork's, whose
    encoder norms are ``snK``) -> an ``encoder_decoder`` state dict (``backbone.*``, ``decode_head.*``)."""
    encoder = flatten_official_sn(read_tensor_dict(encoder_path, SOURCE_CONTAINERS))
    decoder = flatten_official_sn(read_tensor_dict(decoder_path, SOURCE_CONTAINERS))
    if not any(k.startswith("layer1.") for k in encoder):
        raise ValueError(f"{encoder_path} has no layer1.* keys: pass the encoder checkpoint first, then the decoder")
    decoder_rules = [(rf"({'|'.join(_CSAIL_DECODER_MODULES)})\.(.+)", r"decode_head.\1.\2")]
    out = rename_keys(encoder, _resnet_rules("", "backbone."), source="csail encoder")
    out.update(rename_keys(decoder, decoder_rules, source="csail decoder"))
    return out


def convert_sn_imagenet(path) -> StateDict:
    """Official SN ImageNet ResNetV1SN ``{'state_dict': {'module.conv1.weight', 'module.sn1.*', ...}}`` ->
    a normkit ResNet state dict (``conv1``, ``bn1``, ..., ``fc``) with SN tensors flattened to (C,).
    Load it with ``model: {name: resnet, backbone: {..., norm: sn}}`` or as ``backbone.pretrained``.
    Any torchvision-layout ImageNet ResNet converts the same way, CSAIL's deep-stem ``resnet*-imagenet.pth``
    (``conv1..3``/``bn1..3``) included (format ``resnet-imagenet``)."""
    state = read_tensor_dict(path, SOURCE_CONTAINERS)
    if any(k.startswith("Conv_Body.") for k in state):
        raise ValueError(f"{path} is in the Detectron.pytorch layout (Conv_Body.*res*, as SN-Detectron's released "
                         "ImageNet initialisations): for a detector convert it with --from sn-imagenet-to-c4 "
                         "(C4 configs) or --from sn-imagenet-to-fpn (FPN and DC5 configs)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    rules = _resnet_rules("", "") + [(r"fc\.(weight|bias)", r"fc.\1")]
    return rename_keys(flatten_official_sn(state), rules, source="sn-imagenet")


_MMSEG_STEM = {0: "conv1", 1: "bn1", 3: "conv2", 4: "bn2", 6: "conv3", 7: "bn3"}


def convert_mmcv_resnet_v1c(path) -> StateDict:
    """mmcv's ImageNet ResNetV1c (``open-mmlab://resnet50_v1c``: ``stem.{0,1,3,4,6,7}``, ``layerK.*``, ``fc``) ->
    a normkit ResNet state dict for ``backbone.pretrained`` of the CondNet configs."""
    rules = [(rf"stem\.{i}\.(\w+)", rf"{name}.\1") for i, name in _MMSEG_STEM.items()]
    rules += _resnet_rules("", "") + [(r"fc\.(weight|bias)", r"fc.\1")]
    return rename_keys(read_tensor_dict(path, SOURCE_CONTAINERS), rules, source="mmcv-resnet-v1c")


def convert_mmseg(path) -> StateDict:
    """mmseg / CondNet ``{'state_dict': {'backbone.stem.*', 'backbone.layerK.*', 'decode_head.*',
    'auxiliary_head.*'}}`` -> an ``encoder_decoder`` state dict. The ResNetV1c deep stem
    ``stem.{0,1,3,4,6,7}`` becomes ``conv1/bn1/conv2/bn2/conv3/bn3``; CondNet's classifier projections
    move under ``decode_head.classifier``."""
    rules = [(rf"backbone\.stem\.{i}\.(\w+)", rf"backbone.{name}.\1") for i, name in _MMSEG_STEM.items()]
    rules += _resnet_rules("backbone.", "backbone.")
    rules += [
        (r"decode_head\.(guidance_project|filter_project)\.(.+)", r"decode_head.classifier.\1.\2"),
        (r"decode_head\.(image_pool|aspp_modules|bottleneck|c1_bottleneck|sep_bottleneck)\.(.+)",
         r"decode_head.\1.\2"),
        (r"auxiliary_head\.(convs|conv_seg)\.(.+)", r"auxiliary_head.\1.\2"),
    ]
    return rename_keys(read_tensor_dict(path, SOURCE_CONTAINERS), rules, source="mmseg")


def convert_deeplab_v2(path) -> StateDict:
    """DeepLab-v2 PyTorch port (``Scale.conv1``, ``Scale.layerK.*``, ``Scale.layer5.conv2d_list.{0..3}``) ->
    a ``deeplab_v2`` state dict (``backbone.*``, ``decode_head.conv2d_list.*``)."""
    rules = [(r"Scale\.layer5\.conv2d_list\.([0-3])\.(weight|bias)", r"decode_head.conv2d_list.\1.\2")]
    rules += _resnet_rules("Scale.", "backbone.")
    return rename_keys(read_tensor_dict(path, SOURCE_CONTAINERS), rules, source="deeplab-v2")


# name -> (converter, number of input files)
CONVERTERS: Dict[str, tuple] = {
    "csail": (convert_csail, 2),
    "sn-imagenet": (convert_sn_imagenet, 1),
    "resnet-imagenet": (convert_sn_imagenet, 1),
    "mmcv-resnet-v1c": (convert_mmcv_resnet_v1c, 1),
    "mmseg": (convert_mmseg, 1),
    "deeplab-v2": (convert_deeplab_v2, 1),
}
# Formats whose output initialises a backbone (``model.backbone.pretrained``; for detectors also the C4 res5
# head) instead of holding a whole model: ``normkit-convert --config`` checks them with the builder's backbone
# loader, not a strict whole-model load. Converters registered elsewhere add theirs.
BACKBONE_FORMATS: Set[str] = {"sn-imagenet", "resnet-imagenet", "mmcv-resnet-v1c"}


def convert(source_format: str, inputs: Sequence[str]) -> StateDict:
    """Run the converter for ``source_format`` on ``inputs`` (two files for csail: encoder, decoder)."""
    if source_format not in CONVERTERS:
        raise ValueError(f"unknown checkpoint format {source_format!r}; choose one of {', '.join(CONVERTERS)}")
    fn: Callable[..., StateDict]
    fn, count = CONVERTERS[source_format]
    if len(inputs) != count:
        raise ValueError(f"format {source_format!r} takes {count} input file(s), got {len(inputs)}")
    return fn(*inputs)
