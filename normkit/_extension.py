"""Loads the compiled operator library `normkit._C` and reports clearly when it is missing."""
from __future__ import annotations

from typing import Callable

import torch  # noqa: F401  (loads libtorch/libc10, which normkit._C links against)

# The ops are compiled at install time against the installed torch; no prebuilt library is shipped.
BUILD_COMMAND = ("`pip install --no-build-isolation normkit-<version>.tar.gz` (needs a C++ compiler; in a checkout: "
                 "`make build` or `pip install --no-build-isolation -e .`)")

try:
    from normkit import _C  # noqa: F401  (registers the torch.ops.normkit operators)
    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # the package stays importable; ops raise on use
    LOAD_ERROR = exc


def register_ops(register: Callable[[], None]) -> None:
    """Runs an ops module's dispatcher registrations (autograd, fake kernels) if the library loaded.

    A library built from older sources lacks the newer schemas; that gets an error saying to rebuild.
    """
    if LOAD_ERROR is not None:
        return
    try:
        register()
    except RuntimeError as exc:
        if "does not exist" in str(exc):
            raise RuntimeError(f"normkit._C is out of date ({exc}); rebuild it with {BUILD_COMMAND}") from exc
        raise


def register_no_double_backward(backward_qualname: str, op_name: str) -> None:
    """Makes differentiating a backward op (a gradient of a gradient) raise a clear error instead of failing
    inside the kernel; the first backward is unaffected."""
    def refuse(ctx, *grads):
        raise RuntimeError(f"normkit.ops.{op_name}: double backward (a gradient of its gradient, e.g. "
                           f"create_graph=True then backward) is not supported")

    torch.library.register_autograd(backward_qualname, refuse, setup_context=lambda ctx, inputs, output: None)


def has_extension() -> bool:
    return LOAD_ERROR is None


def require_extension(op_name: str) -> None:
    if LOAD_ERROR is not None:
        raise RuntimeError(f"normkit.ops.{op_name} needs the compiled library normkit._C, which failed to load "
                           f"({LOAD_ERROR}); build it with {BUILD_COMMAND}")
