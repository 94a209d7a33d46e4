"""One name -> builder registry per kind of model part; parts register themselves where they are defined.

    @SEG_HEADS.register("ppm")
    class PPM(nn.Module): ...

A builder is a class or a function whose keyword arguments are the config keys of that part (the model
builders in :mod:`normkit.models.build` pass them through and name the config section in errors).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from torch import nn

from normkit.schema import check_keys

__all__ = ["Registry", "BACKBONES", "NECKS", "SEG_HEADS", "PROPOSAL_GENERATORS", "ROI_HEADS", "BOX_HEADS", "MODELS",
           "config_section", "build_from_cfg", "call_with_config", "build_backbone", "build_head"]


class Registry:
    """A mapping from names to builders whose lookup errors list the valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: Dict[str, Callable] = {}

    def register(self, name: Optional[str] = None, builder: Optional[Callable] = None):
        """``@register("name")`` above a class or function (``@register()`` uses its ``__name__``), or
        ``register("name", fn)``. A name can be registered once."""
        def add(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._builders[key] = fn
            return fn
        return add if builder is None else add(builder)

    def get(self, name: str) -> Callable:
        if name not in self._builders:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._builders[name]

    def names(self) -> List[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders


BACKBONES = Registry("backbone")
NECKS = Registry("neck")
SEG_HEADS = Registry("segmentation head")
PROPOSAL_GENERATORS = Registry("proposal generator")
ROI_HEADS = Registry("ROI head")
BOX_HEADS = Registry("box head")
MODELS = Registry("model")


def config_section(cfg: Any, where: str) -> dict:
    """A copy of the config mapping at ``where`` (e.g. ``model.backbone``), which must name its part."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"config {where} must be a mapping, got {cfg!r}")
    if "name" not in cfg:
        raise ValueError(f"config {where} needs a 'name'")
    return dict(cfg)


def build_from_cfg(registry: Registry, cfg: Mapping, where: str, *args, **kwargs):
    """``registry[cfg.name](*args, **cfg_without_name, **kwargs)``; a wrong or missing keyword becomes an error
    naming the config section."""
    cfg = config_section(cfg, where)
    builder = registry.get(cfg.pop("name"))
    return call_with_config(builder, where, *args, **cfg, **kwargs)


def call_with_config(builder: Callable, where: str, *args, **kwargs):
    """``builder(*args, **kwargs)``, turning a wrong or missing keyword into an error naming the config section
    (an unknown key also names the closest keyword the builder takes)."""
    params = list(inspect.signature(builder).parameters.values())
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        keywords = [p.name for p in params[len(args):] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                      inspect.Parameter.KEYWORD_ONLY)]
        check_keys(kwargs, keywords, where)
    try:
        return builder(*args, **kwargs)
    except TypeError as exc:
        if "argument" not in str(exc):  # a TypeError from inside the constructor, not from its signature
            raise
        raise ValueError(f"bad keys in config {where}: {exc}") from exc


def accepts_keyword(builder: Callable, name: str) -> bool:
    """True when ``builder`` takes a keyword argument ``name`` (or any keyword)."""
    params = inspect.signature(builder).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_backbone(cfg: Mapping, where: str = "model.backbone") -> nn.Module:
    """A registered backbone; ``pretrained: <path>`` initialises it from a converted checkpoint
    (:func:`normkit.models.checkpoint.load_pretrained_backbone`: strict; a missing file only warns)."""
    cfg = config_section(cfg, where)
    pretrained = cfg.pop("pretrained", None)
    backbone = build_from_cfg(BACKBONES, cfg, where)
    if pretrained:
        from normkit.models.checkpoint import load_pretrained_backbone
        backbone.pretrained_loaded = load_pretrained_backbone(backbone, pretrained)
    return backbone


def build_head(cfg: Mapping, in_channels: Sequence[int], num_classes: int, *, default_norm=None,
               default_norm_kwargs: Optional[Mapping] = None, where: str = "model.decode_head") -> nn.Module:
    """A registered segmentation head over features of ``in_channels``; ``norm``/``norm_kwargs`` default to
    the backbone's for heads that take a norm."""
    cfg = config_section(cfg, where)
    if "norm" not in cfg and default_norm is not None and accepts_keyword(SEG_HEADS.get(cfg["name"]), "norm"):
        cfg["norm"] = default_norm
        cfg.setdefault("norm_kwargs", dict(default_norm_kwargs or {}))
    return build_from_cfg(SEG_HEADS, cfg, where, tuple(in_channels), num_classes)
