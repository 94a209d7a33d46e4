"""normkit: fused Switchable Normalization, ROI and conditional-classifier ops, and the models built on them."""
from normkit._extension import has_extension

__version__ = "0.1.0"

__all__ = ["has_extension", "__version__"]
