"""Functional operators: input checks, autograd and fake registrations, and pure-PyTorch references."""

# -- Switchable Normalization --
from normkit.ops.switch_norm import switch_norm, switch_norm_reference  # noqa: F401

# -- ROI ops --
from normkit.ops.nms import batched_nms, nms, nms_reference  # noqa: F401
from normkit.ops.roi_align import roi_align, roi_align_reference  # noqa: F401
from normkit.ops.roi_pool import roi_pool, roi_pool_reference  # noqa: F401

# -- Conditional classifier --
from normkit.ops.cond_classifier import (  # noqa: F401
    class_embedding, class_embedding_reference, dynamic_classify, dynamic_classify_reference)

