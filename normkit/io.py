"""File I/O shared by every layer: safe checkpoint reading, atomic writes, YAML, experiment config files.

- Checkpoints are read with ``torch.load(weights_only=True)``: loading a file never runs code from it.
- Writes go to a temporary file in the target's folder, are fsynced and then renamed over the target, so a
  crash or a kill leaves either the old file or the complete new one, and no temporary file behind.
- YAML is parsed with the safe loader; a key given twice in one mapping is an error (PyYAML would silently
  keep the last one).
- A config is named by a YAML path or by the name of a config shipped in the package (``normkit/configs/``,
  e.g. ``"csail/r50d8_ppm_deepsup"``); an existing file wins over a shipped name. A top-level ``_base_: NAME``
  starts the config from another one (a shipped name, or a path relative to the including file): mappings
  merge key by key, any other value replaces the base's.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Callable, Dict, IO, Mapping, Sequence, Union

import torch
import yaml

__all__ = ["fsync_dir", "atomic_write", "atomic_save", "atomic_write_text", "load_checkpoint", "read_tensor_dict",
           "load_yaml", "parse_yaml", "CONFIG_DIR", "list_configs", "resolve_config_path", "load_config_file",
           "merge_configs"]

PathLike = Union[str, os.PathLike]

# In a checkout this is a symlink to the top-level configs/; installs copy the files into the package.
CONFIG_DIR = Path(__file__).parent / "configs"
BASE_KEY = "_base_"


def fsync_dir(directory: Path) -> None:
    """Makes a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[IO], None], *, binary: bool = True) -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it and renames it onto ``path``.
    On any failure (or interruption) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_save(obj, path: PathLike) -> Path:
    """``torch.save(obj)`` written atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """A UTF-8 text file written atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def _numpy_scalar_globals() -> list:
    """What a pickled numpy scalar refers to (training scripts often store e.g. `best_prec1` as one): the
    `scalar` constructor, under numpy 2's and numpy 1's module names, `numpy.dtype` and the numeric dtype
    classes. None of them runs code."""
    import numpy as np
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = {type(np.dtype(code)) for code in "?bhilqpBHILQPefdgFDG"}
    return [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            *sorted(dtype_classes, key=str)]


def load_checkpoint(path: PathLike, map_location="cpu") -> dict:
    """Reads a checkpoint with `torch.load(weights_only=True)`, so loading never runs code from the file; numpy
    scalars in its metadata are allowed.

    Clear errors for a missing, truncated or unsafe file, and for one that does not hold a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" (it is a directory)"
                                                                      if os.path.isdir(path) else ""))
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):  # (object, name) entries: torch >= 2.6
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated zips and forbidden globals
        raise RuntimeError(f"cannot read checkpoint {path} (truncated, corrupt, or holding objects that "
                           f"weights_only loading refuses): {exc}") from exc
    if not isinstance(state, dict):
        raise RuntimeError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def read_tensor_dict(source: Union[PathLike, Mapping],
                     containers: Sequence[str] = ("model", "state_dict")) -> Dict[str, torch.Tensor]:
    """A dict of tensors from a checkpoint file (read by :func:`load_checkpoint`) or a mapping.

    Unwraps the first of ``containers`` present (``{"model": ...}``, ``{"state_dict": ...}``); every entry must be
    a tensor.
    """
    origin = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "checkpoint"
    state = load_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(state, Mapping):
        raise ValueError(f"{origin}: expected a dict of tensors, got {type(state).__name__}")
    for container in containers:
        if isinstance(state.get(container), Mapping):
            state = state[container]
            break
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        kinds = sorted({type(state[k]).__name__ for k in non_tensors})
        raise ValueError(f"{origin}: entries are not tensors: {non_tensors[:10]} ({', '.join(kinds)}; wrong file "
                         "or format?)")
    return dict(state)


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping, and reading exponent floats without a dot or
    without an exponent sign (`1e-4`, `1.0e4`, floats in YAML 1.2 and Python) as floats, not strings (YAML 1.1)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (a later value would silently replace the first)",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def parse_yaml(text: str):
    """A YAML value or document read as config files are (see :func:`load_yaml`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: PathLike):
    """Parses a YAML file with the safe loader; duplicate keys and unreadable files are clear errors."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, expected a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return parse_yaml(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"cannot parse YAML file {path}: {exc}") from exc


def list_configs() -> list[str]:
    """Names of the configs shipped in the package (``"csail/r50d8_ppm_deepsup"``, ...), sorted."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config_path(config: PathLike, relative_to: Union[PathLike, None] = None) -> Path:
    """The YAML file that ``config`` names: an existing file (a relative path is taken from ``relative_to``,
    default the current directory), else a shipped config name, with or without ``.yaml``."""
    path = Path(config)
    candidate = Path(relative_to) / path if relative_to is not None else path
    if candidate.is_dir():
        raise IsADirectoryError(f"{candidate} is a directory, expected a YAML file or a shipped config name")
    if candidate.is_file():
        return candidate
    shipped = CONFIG_DIR / (path if path.suffix in (".yaml", ".yml") else path.with_name(path.name + ".yaml"))
    if not path.is_absolute() and shipped.is_file():
        return shipped
    close = difflib.get_close_matches(path.with_suffix("").as_posix() if path.suffix else path.as_posix(),
                                      list_configs(), n=3)
    raise FileNotFoundError(f"config file {candidate} does not exist and {os.fspath(config)!r} is not the name of a "
                            f"shipped config" + (f" (close: {', '.join(close)})" if close else "")
                            + "; list them with `normkit-train --list-configs` or normkit.list_configs()")


def load_config_file(config: PathLike, relative_to: Union[PathLike, None] = None, _including: tuple = ()):
    """The parsed YAML of a config path or shipped name (see :func:`resolve_config_path`), with its ``_base_``
    chain merged in."""
    path = resolve_config_path(config, relative_to)
    cfg = load_yaml(path)
    if not isinstance(cfg, dict) or BASE_KEY not in cfg:
        return cfg
    base = cfg.pop(BASE_KEY)
    if not isinstance(base, str):
        raise ValueError(f"{path}: {BASE_KEY} must be one config name or path, got {base!r}")
    identity = path.resolve()
    if identity in _including:
        chain = " -> ".join(os.fspath(p) for p in _including + (identity,))
        raise ValueError(f"{BASE_KEY} cycle: {chain}")
    base_cfg = load_config_file(base, path.parent, _including + (identity,))
    if not isinstance(base_cfg, dict):
        raise ValueError(f"{path}: its {BASE_KEY} {base!r} is not a mapping")
    return merge_configs(base_cfg, cfg)


def merge_configs(base: dict, override: Mapping) -> dict:
    """``base`` with ``override`` applied: mappings present in both merge recursively, other values replace."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged
