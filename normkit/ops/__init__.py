"""Functional operators: input checks, autograd and fake registrations, and pure-PyTorch references."""

# -- Switchable Normalization --
from normkit.ops.switch_norm import switch_norm, switch_norm_reference  # noqa: F401

# -- ROI ops --

# -- Conditional classifier --

