"""Experiment configs: one YAML file (a path or a shipped config name, optionally starting from a `_base_` config;
see normkit.io) with top-level `model`, `data`, `train`, `evaluation`; `--set` overrides."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from normkit.io import load_config_file, parse_yaml
from normkit.schema import check_keys

__all__ = ["load_config", "apply_overrides", "check_sections", "parse_value", "SECTIONS"]

SECTIONS = ("model", "data", "train", "evaluation")


def load_config(path: str | Path) -> dict:
    """Reads the config (a YAML path or a shipped config name) and checks its top level: the sections, each
    present afterwards."""
    cfg = load_config_file(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a mapping with sections {list(SECTIONS)}, got {type(cfg).__name__}")
    try:
        check_keys(cfg, SECTIONS, "")
    except ValueError as exc:
        raise ValueError(f"config {path}: {exc}") from None
    for section in SECTIONS:
        cfg.setdefault(section, {})
    return check_sections(cfg)


def check_sections(cfg: dict) -> dict:
    """Each section present is a mapping (an empty one, `evaluation:` with nothing under it, becomes {})."""
    for section in SECTIONS:
        value = cfg.get(section, {})
        if value is None:
            cfg[section] = {}
        elif not isinstance(value, dict):
            raise ValueError(f"config section {section} must be a mapping of keys to values, got {value!r}")
    return cfg


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Returns a copy of `cfg` with each `dotted.key=value` applied; values are parsed as YAML
    (`train.max_iter=100`, `train.amp=bf16`, `train.optimizer.lr_mult={decode_head: 10}`, `x.y=null`).
    Intermediate keys must exist (a typo then fails instead of silently adding a key); the last may be new."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like dotted.key=value")
        if not raw.strip():
            raise ValueError(f"override {item!r} has no value (write {key}=null to set null)")
        parts = key.split(".")
        node = cfg
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                raise KeyError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section of the config")
            node = child
        value = parse_value(raw)
        if len(parts) == 1 and key in SECTIONS and not isinstance(value, dict):
            raise ValueError(f"override {item!r}: {key} is a config section, a mapping; set one of its entries "
                             f"({key}.<key>=...) or give a mapping ({key}={{...}})")
        node[parts[-1]] = value
    return check_sections(cfg)


def parse_value(raw: str):
    """The value of a `--set KEY=VALUE` override, read as config files are (`1e-3` is a float)."""
    return parse_yaml(raw)
