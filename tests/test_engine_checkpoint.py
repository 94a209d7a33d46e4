import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from normkit.engine import Checkpointer, atomic_save, capture_rng_state, load_checkpoint, restore_rng_state
from normkit.engine import checkpoint as checkpoint_module

ROOT = Path(__file__).resolve().parents[1]


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


def test_interrupted_write_removes_its_temporary_file(tmp_path):
    # Ctrl-C (KeyboardInterrupt, not an Exception) in the middle of a write must clean up too.
    from normkit.io import atomic_write
    path = tmp_path / "ckpt.pth"
    atomic_save(_state(1.0), path)

    def interrupted(f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert os.listdir(tmp_path) == ["ckpt.pth"] and load_checkpoint(path)["iteration"] == 1


# Child process: starts saving iteration 2 and dies abruptly (no cleanup, like SIGKILL) at the given stage. A fresh
# interpreter, not a fork: forking this multi-threaded process (torch's thread pools) can deadlock the child.
_KILLED_WHILE_SAVING = """
import os, sys
import torch
from normkit.engine import atomic_save

path, stage = sys.argv[1:]
if stage == "mid-write":
    def dying_save(obj, f):
        f.write(b"PK\\x03\\x04 partial")
        f.flush()
        os._exit(3)
    torch.save = dying_save
else:  # the temporary file is complete, the process dies before the rename
    def dying_replace(src, dst):
        os._exit(3)
    os.replace = dying_replace
atomic_save({"iteration": 2, "model": {"w": torch.full((64, 64), 2.0)}}, path)
"""


@pytest.mark.parametrize("stage", ["mid-write", "before-rename"])
def test_killed_save_keeps_the_previous_checkpoint(tmp_path, stage):
    path = tmp_path / "ckpt.pth"
    atomic_save(_state(1.0), path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", _KILLED_WHILE_SAVING, str(path), stage], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 3, child.stderr
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


def test_iteration_files_are_ordered_by_iteration_not_by_name(tmp_path):
    # Past 9,999,999 iterations the names grow a digit: "iter_10000000" sorts before "iter_9999999" as text.
    checkpointer = Checkpointer(tmp_path, max_keep=2)
    for iteration in (9_999_998, 9_999_999, 10_000_000):
        checkpointer.save(_state(float(iteration % 1000)), iteration)
    assert [p.name for p in checkpointer.iteration_files()] == ["iter_9999999.pth", "iter_10000000.pth"]
    path, _ = Checkpointer(tmp_path).resume()
    assert path.name == "iter_10000000.pth"


def test_saving_the_same_iteration_twice_keeps_it(tmp_path):
    # e.g. the final save of a run resumed at its last iteration: the file just written must survive pruning
    checkpointer = Checkpointer(tmp_path, max_keep=1)
    checkpointer.save(_state(1.0), 1)
    checkpointer.save(_state(2.0), 2)
    checkpointer.save(_state(2.0), 2)
    assert [p.name for p in checkpointer.iteration_files()] == ["iter_0000002.pth"]
    keep_two = Checkpointer(tmp_path / "two", max_keep=2)
    for iteration in (1, 2, 2, 3):
        keep_two.save(_state(float(iteration)), iteration)
    assert [p.name for p in keep_two.iteration_files()] == ["iter_0000002.pth", "iter_0000003.pth"]


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
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_rng_state_survives_a_file_round_trip(tmp_path):
    np.random.randn(1)  # leave numpy with a cached gaussian and python with gauss_next set
    random.gauss(0, 1)
    atomic_save({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = _draws()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert _draws() == expected


def _saved(directory, *iterations, max_keep=None):
    checkpointer = Checkpointer(directory, max_keep=max_keep)
    for iteration in iterations:
        checkpointer.save(_state(float(iteration)), iteration)
    return checkpointer


def test_pruning_touches_only_this_runs_files(tmp_path):
    _saved(tmp_path, 10, 20, 30)  # an earlier run's checkpoints, numbered higher than the new run's
    _saved(tmp_path, 1, 2, 3, max_keep=2)
    names = sorted(p.name for p in tmp_path.glob("iter_*.pth"))
    assert names == ["iter_0000002.pth", "iter_0000003.pth", "iter_0000010.pth", "iter_0000020.pth",
                     "iter_0000030.pth"]
    assert load_checkpoint(tmp_path / "latest.pth")["iteration"] == 3


def test_a_resumed_run_prunes_the_files_it_continues(tmp_path):
    _saved(tmp_path, 1, 2, 3)
    checkpointer = Checkpointer(tmp_path, max_keep=2)
    path, state = checkpointer.resume()
    assert (path.name, state["iteration"]) == ("iter_0000003.pth", 3)
    checkpointer.save(_state(4.0), 4)
    assert [p.name for p in checkpointer.iteration_files()] == ["iter_0000003.pth", "iter_0000004.pth"]


def test_resume_falls_back_past_a_truncated_newest_checkpoint(tmp_path, caplog):
    _saved(tmp_path, 1, 2)
    (tmp_path / "latest.pth").unlink()  # iteration files without latest.pth still resume
    newest = tmp_path / "iter_0000002.pth"
    newest.write_bytes(newest.read_bytes()[:200])
    with caplog.at_level("WARNING"):
        path, state = Checkpointer(tmp_path).resume()
    assert (path.name, state["iteration"]) == ("iter_0000001.pth", 1)
    assert "cannot resume from" in caplog.text and "iter_0000002.pth" in caplog.text
    assert Checkpointer(tmp_path / "empty").resume() is None
    (tmp_path / "iter_0000001.pth").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no checkpoint in .* can be read"):
        Checkpointer(tmp_path).resume()


def test_stale_temporaries_are_removed_and_latest_as_a_folder_is_refused(tmp_path):
    _saved(tmp_path, 1)
    stale = [tmp_path / ".iter_0000002.pth.tmp-4242", tmp_path / ".latest.pth.tmp-4242"]
    for path in stale:
        path.write_bytes(b"partial")
    unrelated = tmp_path / ".notes.tmp-1"
    unrelated.write_text("mine")
    assert sorted(Checkpointer(tmp_path).remove_stale_temporaries()) == sorted(stale)
    assert not any(p.exists() for p in stale) and unrelated.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "latest.pth").mkdir()
    with pytest.raises(IsADirectoryError, match="latest.pth exists but is not a file"):
        Checkpointer(tmp_path / "other")


def test_non_finite_states_are_never_written(tmp_path):
    checkpointer = _saved(tmp_path, 1)
    state = _state(2.0)
    state["optimizer"] = {"state": {0: {"momentum_buffer": torch.tensor([1.0, float("inf")])}}}
    with pytest.raises(FloatingPointError, match=r"iteration 2: non-finite values in optimizer\.state\.0\."
                                                 r"momentum_buffer; .*latest.pth still holds the last good one"):
        checkpointer.save(state, 2)
    assert [p.name for p in checkpointer.iteration_files()] == ["iter_0000001.pth"]
    assert checkpointer.load()["iteration"] == 1


def test_numpy_scalars_in_the_metadata_load(tmp_path):
    # training scripts store e.g. best_prec1 = np.float64(...) beside the weights
    path = tmp_path / "meta.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "best_prec1": np.float64(77.49), "epoch": np.int64(99)}, path)
    state = load_checkpoint(path)
    assert state["best_prec1"] == 77.49 and state["epoch"] == 99 and torch.equal(state["state_dict"]["w"],
                                                                                 torch.ones(2))
    # a file written under numpy 1 names the scalar constructor numpy.core.multiarray.scalar
    old_numpy = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old_numpy, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(info, data)
    assert load_checkpoint(old_numpy)["best_prec1"] == 77.49
