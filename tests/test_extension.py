"""The compiled library's loading errors say what to do."""
import pytest
import torch

import normkit._extension as ext


def test_stale_library_names_the_missing_operator_and_the_rebuild_command():
    with pytest.raises(RuntimeError, match=r"out of date \(operator normkit::not_an_op does not exist\); rebuild it "
                                           r"with `pip install --no-build-isolation normkit-<version>\.tar\.gz`.*"
                                           r"`pip install --no-build-isolation -e \.`"):
        ext.register_ops(lambda: torch.library.register_fake("normkit::not_an_op")(lambda x: x))


def test_missing_library_error_names_the_op_and_the_build_command(monkeypatch):
    monkeypatch.setattr(ext, "LOAD_ERROR", ImportError("no _C"))
    with pytest.raises(RuntimeError, match=r"normkit.ops.switch_norm needs the compiled library normkit._C.*no _C.*"
                                           r"build it with `pip install"):
        ext.require_extension("switch_norm")
    ext.register_ops(lambda: pytest.fail("registrations must not run without the library"))
