"""SN-Detectron (the SN fork of Detectron.pytorch) checkpoints -> normkit ``generalized_rcnn`` state dicts.

Two sources:

- detection checkpoints ``{'model': state_dict, ...}`` (``Conv_Body.*`` for C4, ``Conv_Body.conv_body.*`` plus
  the FPN modules for FPN; ``RPN``, ``Box_Head``, ``Box_Outs``, ``Mask_Head``, ``Mask_Outs``):
  :func:`convert_sn_detectron`;
- official SN ImageNet ResNets (``{'state_dict': {'module.conv1.weight', ...}}``) as detection backbones:
  :func:`convert_sn_imagenet_for_detection`. For C4 models ImageNet ``layer4`` becomes the res5 *box head*
  (the official ``tools/convert.py`` named it ``Conv_Body.res5``, which the C4 model does not have, so its
  head silently stayed randomly initialised).

Every rename is explicit, logged and one-to-one; unknown keys are errors. SN tensors of shape (1, C, 1, 1) and
(1, C, 1) become (C,).
"""
from __future__ import annotations

import logging
import re
from typing import List, Mapping, Tuple

import torch

from normkit.convert.common import StateDict, flatten_official_sn, rename_keys
from normkit.io import read_tensor_dict

__all__ = ["convert_sn_detectron", "convert_sn_imagenet_for_detection", "describe_sn_detectron"]

logger = logging.getLogger("normkit.convert")


def _rules_for(state: Mapping[str, torch.Tensor]) -> List[Tuple[str, str]]:
    fpn = any(k.startswith("Conv_Body.conv_body.") for k in state)
    body = "Conv_Body.conv_body." if fpn else "Conv_Body."
    rules: List[Tuple[str, str]] = [
        (re.escape(body) + r"res1\.conv1\.weight", r"backbone.conv1.weight"),
        (re.escape(body) + r"res1\.(?:sn|bn|gn)1\.(\w+)", r"backbone.bn1.\1"),
    ]
    for stage in range(2, 6):
        dst = rf"backbone.layer{stage - 1}"
        p = re.escape(body) + f"res{stage}"
        rules += [(p + r"\.(\d+)\.conv([123])\.weight", dst + r".\1.conv\2.weight"),
                  (p + r"\.(\d+)\.(?:sn|bn|gn)([123])\.(\w+)", dst + r".\1.bn\2.\3"),
                  (p + r"\.0\.downsample\.([01])\.(\w+)", dst + r".0.downsample.\1.\2")]
    # FPN: conv_top is the C5 lateral; topdown_lateral_modules 0,1,2 take C4, C3, C2; posthoc 0..3 give P5..P2.
    rules += [
        (r"Conv_Body\.conv_top\.([01])\.(\w+)", r"neck.lateral_convs.3.\1.\2"),
        (r"Conv_Body\.conv_top\.(weight|bias)", r"neck.lateral_convs.3.0.\1"),
    ]
    for i in range(3):
        rules += [(rf"Conv_Body\.topdown_lateral_modules\.{i}\.conv_lateral\.([01])\.(\w+)",
                   rf"neck.lateral_convs.{2 - i}.\1.\2"),
                  (rf"Conv_Body\.topdown_lateral_modules\.{i}\.conv_lateral\.(weight|bias)",
                   rf"neck.lateral_convs.{2 - i}.0.\1")]
    for i in range(4):
        rules += [(rf"Conv_Body\.posthoc_modules\.{i}\.([01])\.(\w+)", rf"neck.output_convs.{3 - i}.\1.\2"),
                  (rf"Conv_Body\.posthoc_modules\.{i}\.(weight|bias)", rf"neck.output_convs.{3 - i}.0.\1")]
    rules += [
        (r"RPN\.(?:FPN_)?RPN_conv\.(weight|bias)", r"rpn.head.conv.\1"),
        (r"RPN\.(?:FPN_)?RPN_cls_score\.(weight|bias)", r"rpn.head.objectness_logits.\1"),
        (r"RPN\.(?:FPN_)?RPN_bbox_pred\.(weight|bias)", r"rpn.head.anchor_deltas.\1"),
        (r"Box_Head\.res5\.(\d+)\.conv([123])\.weight", r"roi_heads.box_head.res5.\1.conv\2.weight"),
        (r"Box_Head\.res5\.(\d+)\.(?:sn|bn|gn)([123])\.(\w+)", r"roi_heads.box_head.res5.\1.bn\2.\3"),
        (r"Box_Head\.res5\.0\.downsample\.([01])\.(\w+)", r"roi_heads.box_head.res5.0.downsample.\1.\2"),
        (r"Box_Head\.fc([12])\.(weight|bias)", r"roi_heads.box_head.fc\1.\2"),
        (r"Box_Head\.fc\.(weight|bias)", r"roi_heads.box_head.fc1.\1"),
        (r"Box_Head\.convs\.(\d+)\.(\w+)", r"roi_heads.box_head.convs.\1.\2"),
        (r"Box_Outs\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_predictor.\1.\2"),
        (r"Mask_Head\.conv_fcn\.(\d+)\.(\w+)", r"roi_heads.mask_head.conv_fcn.\1.\2"),
        (r"Mask_Head\.upconv\.(weight|bias)", r"roi_heads.mask_head.upconv.\1"),
        (r"Mask_Outs\.classify\.(weight|bias)", r"roi_heads.mask_head.predictor.\1"),
    ]
    return rules


def describe_sn_detectron(state: Mapping[str, torch.Tensor]) -> str:
    """A one-line description of an SN-Detectron state dict (body, heads, SN with or without BN)."""
    fpn = any(k.startswith("Conv_Body.conv_body.") for k in state)
    mask = any(k.startswith("Mask_") for k in state)
    head = ("res5" if any(k.startswith("Box_Head.res5.") for k in state) else
            "4conv1fc" if any(k.startswith("Box_Head.convs.") for k in state) else "2fc")
    sizes = {tuple(v.shape) for k, v in state.items() if k.endswith("mean_weight")}
    sn = "no SN" if not sizes else ("SN without BN (8,1)" if sizes == {(2,)} else "SN with BN")
    return (f"{'Mask' if mask else 'Faster'} R-CNN {'FPN' if fpn else 'C4'}, {head} box head, {sn}, "
            f"{len(state)} tensors")


def convert_sn_detectron(path) -> StateDict:
    """An SN-Detectron detection checkpoint (``{'model': ...}`` or a bare state dict) -> a normkit
    ``generalized_rcnn`` state dict; load it with the matching ``configs/detection/*.yaml``."""
    state = read_tensor_dict(path, ("model", "state_dict"))
    if not any(k.startswith("Conv_Body.") for k in state):
        raise ValueError(f"{path} is not an SN-Detectron detection checkpoint (no Conv_Body.* keys; first keys "
                         f"{list(state)[:3]}); for ImageNet backbones use --from sn-imagenet-to-c4/fpn")
    logger.info("sn-detectron: %s", describe_sn_detectron(state))
    return rename_keys(flatten_official_sn(state), _rules_for(state), source="sn-detectron")


def _imagenet_state(path_or_state) -> StateDict:
    """Official SN ImageNet checkpoint (``module.`` prefixes, ``snK`` norms) or normkit ResNet keys ->
    normkit ResNet keys with SN tensors flattened; the classifier ``fc`` is dropped (logged)."""
    if isinstance(path_or_state, Mapping):
        state = dict(path_or_state)
    else:
        state = read_tensor_dict(path_or_state, ("state_dict", "model"))
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    dropped = [k for k in state if k.startswith("fc.")]
    for k in dropped:
        logger.info("sn-imagenet: dropped classifier %s", k)
        state.pop(k)
    rules = [(r"conv1\.weight", r"conv1.weight"), (r"(?:bn|sn)1\.(\w+)", r"bn1.\1"),
             (r"layer([1-4])\.(\d+)\.conv([123])\.weight", r"layer\1.\2.conv\3.weight"),
             (r"layer([1-4])\.(\d+)\.(?:bn|sn)([123])\.(\w+)", r"layer\1.\2.bn\3.\4"),
             (r"layer([1-4])\.0\.downsample\.([01])\.(\w+)", r"layer\1.0.downsample.\2.\3")]
    return rename_keys(flatten_official_sn(state), rules, source="sn-imagenet")


def convert_sn_imagenet_for_detection(path, layout: str) -> StateDict:
    """An SN ImageNet ResNet -> the backbone part of a detection state dict. ``layout="fpn"`` (or DC5): all
    four stages under ``backbone.``; ``layout="c4"``: ``layer1-3`` under ``backbone.`` and ``layer4`` as the
    box head ``roi_heads.box_head.res5``."""
    if layout not in ("c4", "fpn"):
        raise ValueError(f"layout must be 'c4' or 'fpn', got {layout!r}")
    out: StateDict = {}
    for key, value in _imagenet_state(path).items():
        if layout == "c4" and key.startswith("layer4."):
            new = "roi_heads.box_head.res5." + key[len("layer4."):]
        else:
            new = "backbone." + key
        logger.info("sn-imagenet: %s -> %s", key, new)
        out[new] = value
    return out


def _register() -> None:
    from normkit.convert.formats import CONVERTERS

    CONVERTERS.setdefault("sn-detectron", (convert_sn_detectron, 1))
    CONVERTERS.setdefault("sn-imagenet-to-c4", (lambda path: convert_sn_imagenet_for_detection(path, "c4"), 1))
    CONVERTERS.setdefault("sn-imagenet-to-fpn", (lambda path: convert_sn_imagenet_for_detection(path, "fpn"), 1))


_register()
