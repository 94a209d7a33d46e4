"""Registries of the detection parts, shared with :mod:`normkit.models.registry` when it defines them."""
from __future__ import annotations

from normkit.models import registry as _registry

__all__ = ["NECKS", "PROPOSAL_GENERATORS", "ROI_HEADS", "BOX_HEADS"]


def _get(name: str, kind: str) -> _registry.Registry:
    existing = getattr(_registry, name, None)
    return existing if existing is not None else _registry.Registry(kind)


NECKS = _get("NECKS", "neck")
PROPOSAL_GENERATORS = _get("PROPOSAL_GENERATORS", "proposal generator")
ROI_HEADS = _get("ROI_HEADS", "ROI heads")
BOX_HEADS = _get("BOX_HEADS", "box head")
