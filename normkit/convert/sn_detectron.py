"""SN-Detectron (the SN fork of Detectron.pytorch) checkpoints -> normkit ``generalized_rcnn`` state dicts.

Two sources:

- detection checkpoints ``{'model': state_dict, ...}`` (``Conv_Body.*`` for C4, ``Conv_Body.conv_body.*`` plus
  the FPN modules for FPN; ``RPN``, ``Box_Head``, ``Box_Outs``, ``Mask_Head``, ``Mask_Outs``):
  :func:`convert_sn_detectron`;
- ImageNet ResNets as detection backbones: :func:`convert_sn_imagenet_for_detection`, from the official SN
  ImageNet layout (``{'state_dict': {'module.conv1.weight', ...}}``) or from the Detectron.pytorch layout
  SN-Detectron released its ImageNet initialisations in (resnet-sn-50-(8,32), resnet-sn-50-(8,2)-fpn,
  resnet-sn-50-(8,1)-fpn: ``{'model': {P + 'res1.*', P + 'resK.*', P + 'classifier.*'}}`` with
  ``P = 'Conv_Body.'`` or ``'Conv_Body.conv_body.'``, written by its ``tools/convert.py``). For C4 models
  ImageNet ``layer4`` (``res5``) becomes the res5 *box head* (SN-Detectron's ``tools/convert.py`` named it
  ``Conv_Body.res5``, which the C4 model does not have, so under ``strict=False`` its head silently stayed
  randomly initialised).

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

Rule = Tuple[str, str]
# The prefix of the ResNet body in the SN-Detectron / Detectron.pytorch layouts: with FPN, without.
_BODY_PREFIXES = ("Conv_Body.conv_body.", "Conv_Body.")
# Modules only a detection checkpoint has (an ImageNet initialisation has the body and a classifier).
_DETECTION_ONLY = ("RPN.", "Box_Head.", "Box_Outs.", "Mask_Head.", "Mask_Outs.", "Conv_Body.conv_top.",
                   "Conv_Body.topdown_lateral_modules.", "Conv_Body.posthoc_modules.")


def _body_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """``Conv_Body.conv_body.`` when any key has it (FPN), else ``Conv_Body.``."""
    fpn = any(k.startswith("Conv_Body.conv_body.") for k in state)
    return "Conv_Body.conv_body." if fpn else "Conv_Body."


def _body_rules(body: str, dst: str) -> List[Rule]:
    """ResNet body keys under ``body`` (``res1`` = the stem, ``resK`` = stage ``layer{K-1}``, norms called
    ``sn``/``bn``/``gn``) -> normkit ResNet keys under ``dst``."""
    rules: List[Rule] = [
        (re.escape(body) + r"res1\.conv1\.weight", dst + "conv1.weight"),
        (re.escape(body) + r"res1\.(?:sn|bn|gn)1\.(\w+)", dst + r"bn1.\1"),
    ]
    for stage in range(2, 6):
        layer = f"{dst}layer{stage - 1}"
        p = re.escape(body) + f"res{stage}"
        rules += [(p + r"\.(\d+)\.conv([123])\.weight", layer + r".\1.conv\2.weight"),
                  (p + r"\.(\d+)\.(?:sn|bn|gn)([123])\.(\w+)", layer + r".\1.bn\2.\3"),
                  (p + r"\.0\.downsample\.([01])\.(\w+)", layer + r".0.downsample.\1.\2")]
    return rules


def _rules_for(state: Mapping[str, torch.Tensor]) -> List[Rule]:
    """The rename rules of a detection checkpoint: body, FPN, RPN and RoI heads."""
    rules = _body_rules(_body_prefix(state), "backbone.")
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
    if _classifier_keys(state) or not any(k.startswith(_DETECTION_ONLY) for k in state):
        # The released ImageNet initialisations share the Conv_Body.* names but hold a classifier and no heads.
        raise ValueError(f"{path} is an ImageNet initialisation in the Detectron.pytorch layout (Conv_Body.* "
                         f"body{', classifier' if _classifier_keys(state) else ''}, no RPN or RoI heads), not a "
                         "detection checkpoint; convert it with --from sn-imagenet-to-c4 (C4 configs: res5 goes "
                         "into the box head) or --from sn-imagenet-to-fpn (FPN and DC5 configs)")
    logger.info("sn-detectron: %s", describe_sn_detectron(state))
    return rename_keys(flatten_official_sn(state), _rules_for(state), source="sn-detectron")


def _classifier_keys(state: Mapping[str, torch.Tensor]) -> List[str]:
    """The ImageNet classifier's keys in the Detectron.pytorch layout (``P + 'classifier.*'``)."""
    return [k for k in state if any(k.startswith(p + "classifier.") for p in _BODY_PREFIXES)]


def _drop(state: StateDict, keys: List[str]) -> StateDict:
    """``state`` without ``keys`` (the ImageNet classifier, which no detector has), each drop logged."""
    for k in keys:
        logger.info("sn-imagenet: dropped ImageNet classifier %s (a detector has none)", k)
    dropped = set(keys)
    return {k: v for k, v in state.items() if k not in dropped}


def _detectron_imagenet_state(state: StateDict, origin: str) -> StateDict:
    """An ImageNet initialisation in the Detectron.pytorch layout (``P + 'res1.*'``, ``P + 'resK.*'``,
    ``P + 'classifier.*'``) -> normkit ResNet keys (``res1`` -> ``conv1``/``bn1``, ``resK`` -> ``layer{K-1}``)
    with SN tensors flattened; the classifier is dropped (logged). Keys outside the prefix are errors."""
    heads = [k for k in state if k.startswith(_DETECTION_ONLY)]
    if heads:
        raise ValueError(f"{origin} is an SN-Detectron detection checkpoint ({len(heads)} FPN/RPN/RoI-head keys "
                         f"such as {heads[0]}), not an ImageNet initialisation; convert it with --from sn-detectron")
    body = _body_prefix(state)
    logger.info("sn-imagenet: %s is in the Detectron.pytorch layout (prefix %s)", origin, body)
    state = _drop(state, _classifier_keys(state))
    return rename_keys(flatten_official_sn(state), _body_rules(body, ""), source="sn-imagenet (Detectron layout)")


def _imagenet_state(path_or_state) -> StateDict:
    """ImageNet ResNet keys -> normkit ResNet keys with SN tensors flattened; the classifier is dropped (logged).

    Accepted layouts: the official SN ImageNet checkpoint (``module.`` prefixes, ``snK`` norms), normkit's
    ResNet keys, and the Detectron.pytorch layout of SN-Detectron's released initialisations
    (:func:`_detectron_imagenet_state`)."""
    if isinstance(path_or_state, Mapping):
        state, origin = dict(path_or_state), "the state dict"
    else:
        state, origin = read_tensor_dict(path_or_state, ("state_dict", "model")), str(path_or_state)
    if any(k.startswith("Conv_Body.") for k in state):
        return _detectron_imagenet_state(state, origin)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = _drop(state, [k for k in state if k.startswith("fc.")])
    rules = [(r"conv1\.weight", r"conv1.weight"), (r"(?:bn|sn)1\.(\w+)", r"bn1.\1"),
             (r"layer([1-4])\.(\d+)\.conv([123])\.weight", r"layer\1.\2.conv\3.weight"),
             (r"layer([1-4])\.(\d+)\.(?:bn|sn)([123])\.(\w+)", r"layer\1.\2.bn\3.\4"),
             (r"layer([1-4])\.0\.downsample\.([01])\.(\w+)", r"layer\1.0.downsample.\2.\3")]
    return rename_keys(flatten_official_sn(state), rules, source="sn-imagenet")


def convert_sn_imagenet_for_detection(path, layout: str) -> StateDict:
    """An SN ImageNet ResNet (official SN ImageNet or Detectron.pytorch layout, see :func:`_imagenet_state`) ->
    the backbone part of a detection state dict. ``layout="fpn"`` (or DC5): all four stages under
    ``backbone.``; ``layout="c4"``: ``layer1-3`` under ``backbone.`` and ``layer4`` (``res5``) as the box head
    ``roi_heads.box_head.res5``."""
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
    from normkit.convert.formats import BACKBONE_FORMATS, CONVERTERS

    CONVERTERS.setdefault("sn-detectron", (convert_sn_detectron, 1))
    CONVERTERS.setdefault("sn-imagenet-to-c4", (lambda path: convert_sn_imagenet_for_detection(path, "c4"), 1))
    CONVERTERS.setdefault("sn-imagenet-to-fpn", (lambda path: convert_sn_imagenet_for_detection(path, "fpn"), 1))
    BACKBONE_FORMATS.update({"sn-imagenet-to-c4", "sn-imagenet-to-fpn"})


_register()
