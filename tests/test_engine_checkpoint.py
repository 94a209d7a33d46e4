import multiprocessing
import os
import random

import numpy as np
import pytest
import torch

from normkit.engine import Checkpointer, atomic_save, capture_rng_state, load_checkpoint, restore_rng_state
from normkit.engine import checkpoint as checkpoint_module


def _state(value: float) -> dict:
    return {"iteration": int(value), "model": {"w": torch.full((64, 64), value)}, "rng": capture_rng_state()}


def test_round_trip_loads_with_weights_only(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save(_state(3.0), path)
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 3 and torch.equal(loaded["model"]["w"], torch.full((64, 64), 3.0))
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary file left behind


def test_write_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_save(_state(1.0), path)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 partial")  # half a zip, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save(_state(2.0), path)
    assert load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def _killed_while_saving(path: str, stage: str) -> None:
    """Child process: starts saving iteration 2 and dies abruptly (no cleanup, like SIGKILL) at `stage`."""
    if stage == "mid-write":
        def dying_save(obj, f):
            f.write(b"PK\x03\x04 partial")
            f.flush()
            os._exit(3)
        checkpoint_module.torch.save = dying_save
    else:  # the temporary file is complete, the process dies before the rename
        def dying_replace(src, dst):
            os._exit(3)
        checkpoint_module.os.replace = dying_replace
    atomic_save(_state(2.0), path)


@pytest.mark.parametrize("stage", ["mid-write", "before-rename"])
def test_killed_save_keeps_the_previous_checkpoint(tmp_path, stage):
    path = tmp_path / "ckpt.pth"
    atomic_save(_state(1.0), path)
    child = multiprocessing.get_context("fork").Process(target=_killed_while_saving, args=(str(path), stage))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    assert load_checkpoint(path)["iteration"] == 1
    atomic_save(_state(4.0), path)  # a later save still works next to the dead process's temporary file
    assert load_checkpoint(path)["iteration"] == 4


def test_checkpointer_keeps_latest_and_prunes(tmp_path):
    checkpointer = Checkpointer(tmp_path / "run", max_keep=2)
    assert not checkpointer.has_checkpoint()
    for iteration in (5, 10, 15):
        checkpointer.save(_state(float(iteration)), iteration)
    assert [p.name for p in checkpointer.iteration_files()] == ["iter_0000010.pth", "iter_0000015.pth"]
    assert checkpointer.load()["iteration"] == 15
    assert load_checkpoint(tmp_path / "run" / "latest.pth")["iteration"] == 15
    assert Checkpointer(tmp_path / "other", enabled=False).save(_state(1.0), 1) is None
    assert not (tmp_path / "other").exists()


class _Arbitrary:
    pass


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    truncated = tmp_path / "truncated.pth"
    atomic_save(_state(1.0), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*truncated.pth"):
        load_checkpoint(truncated)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"obj": _Arbitrary()}, unsafe)
    with pytest.raises(RuntimeError, match="weights_only"):
        load_checkpoint(unsafe)
    not_dict = tmp_path / "list.pth"
    torch.save([1, 2], not_dict)
    with pytest.raises(RuntimeError, match="holds a list, expected a dict"):
        load_checkpoint(not_dict)


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1)


def test_rng_state_survives_a_file_round_trip(tmp_path):
    np.random.randn(1)  # leave numpy with a cached gaussian and python with gauss_next set
    random.gauss(0, 1)
    atomic_save({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = _draws()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert _draws() == expected
