"""Shared machinery of the checkpoint converters: explicit logged renames, SN reshaping, atomic writes.

Sources are read with :func:`normkit.io.read_tensor_dict` (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, Iterable, Mapping, Tuple

import torch

from normkit.io import atomic_save
from normkit.models.checkpoint import SYNCBN_BOOKKEEPING
from normkit.nn.switch_norm import flatten_official_sn  # noqa: F401 - re-exported for the converters

__all__ = ["StateDict", "IGNORED_SOURCE_BUFFERS", "rename_keys", "flatten_official_sn",
           "save_state_dict"]

logger = logging.getLogger("normkit.convert")

StateDict = Dict[str, torch.Tensor]
# CSAIL's SynchronizedBatchNorm2d bookkeeping: not part of the model's math, dropped by every converter.
IGNORED_SOURCE_BUFFERS = SYNCBN_BOOKKEEPING
Rule = Tuple[str, str]  # (regex matched against the whole key, replacement template)


def rename_keys(state: Mapping[str, torch.Tensor], rules: Iterable[Rule], *, source: str) -> StateDict:
    """Rename every key by the first rule whose regex matches it entirely; log each rename.

    Keys no rule matches are an error (listed), unless they end in one of
    :data:`IGNORED_SOURCE_BUFFERS`. Two keys renamed to one target are an error (the mapping must be
    one-to-one).
    """
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    out: StateDict = {}
    origin: Dict[str, str] = {}
    unmatched, ignored = [], []
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in IGNORED_SOURCE_BUFFERS:
            ignored.append(key)
            continue
        for pattern, repl in compiled:
            match = pattern.fullmatch(key)
            if match:
                new_key = match.expand(repl)
                break
        else:
            unmatched.append(key)
            continue
        if new_key in out:
            raise RuntimeError(f"{source}: keys {origin[new_key]!r} and {key!r} both map to {new_key!r}")
        out[new_key] = value
        origin[new_key] = key
        if new_key != key:
            logger.info("%s: %s -> %s", source, key, new_key)
    if ignored:
        logger.info("%s: ignored %d SyncBN bookkeeping buffers", source, len(ignored))
    if unmatched:
        raise RuntimeError(f"{source}: {len(unmatched)} unexpected keys no rename rule covers: "
                           f"{', '.join(unmatched[:20])}" + (" ..." if len(unmatched) > 20 else ""))
    return out


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` stored in no more bytes than it needs: a view into a larger storage is copied out, while a tensor
    whose storage is smaller than its elements (expanded, stride 0) is kept as it is. Materialising the latter
    would turn a tiny file into GBs (a 1.5 KB checkpoint can hold a 1e9-element expanded tensor)."""
    needed = tensor.numel() * tensor.element_size()
    return tensor.clone() if tensor.untyped_storage().nbytes() > needed else tensor


def save_state_dict(state: StateDict, path: str | os.PathLike) -> None:
    """Write atomically (:func:`normkit.io.atomic_save`): a partial file never replaces a good one, and no
    temporary file stays behind on failure. Each tensor is written with at most the storage it needs."""
    atomic_save({k: _compact(v) for k, v in state.items()}, path)
