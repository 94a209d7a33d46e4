"""Strict, safe checkpoint loading for normkit models."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Mapping, Sequence, Union

import torch
from torch import nn

from normkit.io import read_tensor_dict
from normkit.nn.switch_norm import flatten_official_sn

__all__ = ["SYNCBN_BOOKKEEPING", "IGNORABLE_BUFFERS", "read_state_dict", "load_state_dict_strict",
           "load_pretrained_backbone"]

logger = logging.getLogger("normkit.models")

# CSAIL's SynchronizedBatchNorm2d bookkeeping buffers: not part of the model's math.
SYNCBN_BOOKKEEPING = ("_tmp_running_mean", "_tmp_running_var", "_running_iter")
# Buffers a checkpoint may lack or carry without it being a mismatch: BatchNorm's step counter (absent
# in PyTorch 0.4-era and DeepLab checkpoints; meaningless to FrozenBatchNorm2d) and the SyncBN bookkeeping.
IGNORABLE_BUFFERS = ("num_batches_tracked", *SYNCBN_BOOKKEEPING)

StateDict = Dict[str, torch.Tensor]


def _is_ignorable(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in IGNORABLE_BUFFERS


def read_state_dict(source: Union[str, os.PathLike, Mapping]) -> StateDict:
    """A model state dict from a checkpoint file or mapping (see :func:`read_tensor_dict`), without a
    DataParallel ``module.`` prefix."""
    state = read_tensor_dict(source)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict_strict(model: nn.Module, source: Union[str, os.PathLike, Mapping], *,
                           ignore_prefixes: Sequence[str] = ()) -> None:
    """Load ``source`` into ``model``; every parameter and buffer must be present with a matching shape.

    Raises RuntimeError listing the missing keys, the unexpected keys and the shape mismatches. Keys of
    :data:`IGNORABLE_BUFFERS` and checkpoint keys starting with one of ``ignore_prefixes`` are exempt.
    Official SN tensors (weights shaped (1, C, 1, 1), running stats (1, C, 1)) are flattened to normkit's (C,).
    """
    state = flatten_official_sn({k: v for k, v in read_state_dict(source).items()
                                 if not any(k.startswith(p) for p in ignore_prefixes)})
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_ignorable(k)]
    unexpected = [k for k in state if k not in expected and not _is_ignorable(k)]
    mismatched, to_load = [], {}
    for key, value in state.items():
        if key not in expected:
            continue
        target = expected[key]
        if value.shape != target.shape:
            mismatched.append(f"{key}: checkpoint {list(value.shape)} vs model {list(target.shape)}")
            continue
        to_load[key] = value
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
        raise RuntimeError(f"checkpoint does not match {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(to_load, strict=False)


def load_pretrained_backbone(backbone: nn.Module, source: Union[str, os.PathLike, Mapping]) -> bool:
    """Initialise ``backbone`` from a converted checkpoint (``backbone.pretrained``), strictly: every backbone
    tensor must be in it with its shape. The file may hold the backbone alone (``conv1.weight``, ..., as
    ``normkit-convert --from resnet-imagenet`` writes it; an ImageNet classifier's ``fc.*`` is skipped when the
    backbone has none) or a whole model, of which the ``backbone.*`` tensors are used.

    A path that does not exist only warns and returns False (the backbone keeps its random initialisation):
    shipped configs name the file they expect, and building them for tests, conversion or evaluation must not
    need it; training refuses to start without it (``normkit.tools.train``)."""
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        logger.warning("model.backbone.pretrained: %s does not exist; the backbone keeps its random "
                       "initialisation", source)
        return False
    state = read_state_dict(source)
    if any(k.startswith("backbone.") for k in state):
        unused = sorted({k.split(".", 1)[0] for k in state if not k.startswith("backbone.")})
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        if unused:
            logger.info("model.backbone.pretrained: %s tensors of %s not used (backbone only)", "/".join(unused),
                        source)
    ignore = ("fc.",) if getattr(backbone, "fc", None) is None else ()
    load_state_dict_strict(backbone, state, ignore_prefixes=ignore)
    return True
