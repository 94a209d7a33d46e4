"""Functional operators: input checks, autograd and fake registrations, and pure-PyTorch references."""
import torch

# -- Switchable Normalization --
from normkit.ops.switch_norm import switch_norm, switch_norm_reference  # noqa: F401

# -- ROI ops --
from normkit.ops.nms import batched_nms, nms, nms_reference  # noqa: F401
from normkit.ops.roi_align import roi_align, roi_align_reference  # noqa: F401
from normkit.ops.roi_pool import roi_pool, roi_pool_reference  # noqa: F401

# FX leaves also when called as normkit.ops.<name>(...) (torch.fx.wrap patches the names of one module's globals).
for _name in ("batched_nms", "nms", "roi_align", "roi_pool"):
    torch.fx.wrap(_name)

# -- Conditional classifier --
from normkit.ops.cond_classifier import (  # noqa: F401
    class_embedding, class_embedding_reference, dynamic_classify, dynamic_classify_reference)

