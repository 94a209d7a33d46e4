"""normkit: fused Switchable Normalization, ROI and conditional-classifier ops, and the models built on them."""
from normkit._extension import has_extension
from normkit.io import list_configs

__version__ = "0.1.0"

__all__ = ["has_extension", "build_model", "list_configs", "__version__"]


def __getattr__(name):
    # Imported lazily so `import normkit` stays light (models pull in every head and backbone).
    if name == "build_model":
        from normkit.models.build import build_model
        return build_model
    raise AttributeError(f"module 'normkit' has no attribute {name!r}")
