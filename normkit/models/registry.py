"""Name -> builder registries for backbones, heads and whole models."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

__all__ = ["Registry", "BACKBONES", "HEADS", "MODELS"]


class Registry:
    """A mapping from names to builders whose lookup errors list the valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: Dict[str, Callable] = {}

    def register(self, name: str, builder: Optional[Callable] = None):
        """``register(name, fn)`` or ``@register(name)``; a name can be registered once."""
        def add(fn: Callable) -> Callable:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
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
HEADS = Registry("head")
MODELS = Registry("model")
