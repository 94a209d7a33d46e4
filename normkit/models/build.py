"""``build_model(config, checkpoint=None)``: the one entry point from a config to a model.

``config["model"]`` names a registered model (``MODELS``); the model's ``from_config(cfg)`` (or, for a
registered function, the function itself) reads the rest of the section. The segmentation schema
(every key except ``name``/``num_classes`` optional)::

    name: encoder_decoder | deeplab_v2 | resnet      (resnet = ImageNet classifier)
    num_classes: int
    ignore_index: 255
    loss_mode: downsample_labels | upsample_logits   (encoder_decoder; CSAIL vs mmseg recipe)
    ce_average: labelled_pixels | all_pixels         (encoder_decoder; CSAIL vs mmseg 0.x avg_non_ignore=False)
    deep_sup_weight: 0.4                             (encoder_decoder)
    aux_weight: 0.4                                  (encoder_decoder)
    scales: [1.0, 0.75, 0.5]                         (deeplab_v2)
    backbone: {name: resnet18|resnet34|resnet50|resnet101, stem: v1|deep|v1c, output_stride: 8|16|32,
               dilation_rule: csail|deeplab|mmseg, norm: <build_norm name>, norm_kwargs: {...},
               last_gamma: bool, stride_in_1x1: bool, ceil_mode: bool, out_features: [res2, ...],
               freeze_at: int, freeze_mode: official|eval, pretrained: <path>}
                                                     (pretrained: a converted backbone checkpoint, relative
                                                      paths from the current folder; see build_model)
    decode_head: {name: <SEG_HEADS name>, norm: <defaults to the backbone's>, norm_kwargs: {...}, ...}
    auxiliary_head: {name: fcn, ...}                 (optional)
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Mapping, Union

from torch import nn

# Importing the model packages registers their parts.
from normkit.models import backbones, detection, necks, segmentation  # noqa: F401
from normkit.io import load_config_file
from normkit.models.checkpoint import load_state_dict_strict
from normkit.models.registry import MODELS, config_section

__all__ = ["build_model", "read_config"]

logger = logging.getLogger("normkit.models")


def read_config(config: Union[str, os.PathLike, Mapping]) -> dict:
    """A config dict from a YAML path, a shipped config name (``"csail/r50d8_ppm_deepsup"``) or a mapping
    (copied: builders never change the caller's config)."""
    if isinstance(config, (str, os.PathLike)):
        config = load_config_file(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"a config must be a mapping, got {type(config).__name__}")
    return copy.deepcopy(dict(config))


def drop_backbone_pretrained(model_cfg: dict) -> None:
    """Removes ``backbone.pretrained`` from a model config section, so building never reads the ImageNet file
    (a checkpoint, or a converted initialisation being checked, takes its place)."""
    backbone_cfg = model_cfg.get("backbone")
    if isinstance(backbone_cfg, Mapping):
        model_cfg["backbone"] = {k: v for k, v in backbone_cfg.items() if k != "pretrained"}


def build_model(config: Union[str, os.PathLike, Mapping], checkpoint=None) -> nn.Module:
    """Build the model of ``config["model"]`` (config: YAML path, shipped config name or dict) and optionally load
    ``checkpoint`` (a path read with ``torch.load(weights_only=True)``, or a state dict) strictly:
    missing, unexpected or mis-shaped keys raise RuntimeError naming them.

    Without ``checkpoint``, a ``model.backbone.pretrained`` file initialises the backbone and the log names the
    parts that stay newly initialised (the heads); with one, that initialisation is skipped (every weight
    comes from the checkpoint), so evaluating or converting never needs the ImageNet file."""
    config = read_config(config)
    if "model" not in config:
        raise ValueError(f"config has no 'model' section (top-level keys: {sorted(config)})")
    model_cfg = config_section(config["model"], "model")
    if checkpoint is not None:
        drop_backbone_pretrained(model_cfg)
    builder = MODELS.get(model_cfg["name"])
    model = builder.from_config(model_cfg) if hasattr(builder, "from_config") else builder(model_cfg)
    if checkpoint is not None:
        load_state_dict_strict(model, checkpoint)
    elif getattr(getattr(model, "backbone", None), "pretrained_loaded", False):
        new = sorted({key.split(".", 1)[0] for key in model.state_dict() if not key.startswith("backbone.")})
        logger.info("backbone initialised from %s; newly initialised: %s", model_cfg["backbone"]["pretrained"],
                    ", ".join(new) or "nothing")
    return model
