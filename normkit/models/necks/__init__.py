"""Necks: feature pyramids built on a backbone's named features."""
from normkit.models.necks.fpn import FPN  # noqa: F401
