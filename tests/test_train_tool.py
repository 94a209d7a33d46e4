"""tools/train.py end to end on a tiny generated mini set: train, checkpoint, evaluate, resume exactly."""
import importlib.util
import json
from pathlib import Path

import pytest

from normkit.engine import Trainer, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mini" / "r18d8_sn_c1_deepsup.yaml"


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_tool", ROOT / "tools" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(tmp_path, work_dir, *extra):
    # The default config shrunk to seconds: 6 tiny scenes, 32-pixel crops, 4 iterations of 2 images.
    return ["--config", str(CONFIG), "--work-dir", str(work_dir), "--set",
            f"data.root={tmp_path / 'data'}", "data.synthetic={num_train: 6, num_val: 2, size: 32, seed: 0}",
            "data.train.short_sides=[32]", "data.train.max_long_side=48", "train.batch_size=2", "train.max_iter=4",
            "train.checkpoint_period=2", "train.log_period=1", "train.tensorboard=false", *extra]


def _losses(work_dir):
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["total_loss"] for r in map(json.loads, lines)}


def test_train_evaluates_and_a_killed_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    tool = _load_tool()
    results = tool.main(_args(tmp_path, tmp_path / "full"))
    out = capsys.readouterr().out
    assert "mIoU" in out and "pixel acc" in out and "wall" in out  # the table with the mini set's class names
    assert 0.0 <= results["mean_iou"] <= 1.0
    saved = json.loads((tmp_path / "full" / "eval_results.json").read_text())
    assert saved["mean_iou"] == pytest.approx(results["mean_iou"])
    assert load_checkpoint(tmp_path / "full" / "latest.pth")["iteration"] == 4
    reference = _losses(tmp_path / "full")
    assert sorted(reference) == [1, 2, 3, 4]

    run_step = Trainer.run_step

    def killed_at_iteration_3(self):
        if self.iter == 3:
            raise KeyboardInterrupt
        run_step(self)

    monkeypatch.setattr(Trainer, "run_step", killed_at_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        tool.main(_args(tmp_path, tmp_path / "killed"))
    assert load_checkpoint(tmp_path / "killed" / "latest.pth")["iteration"] == 2
    monkeypatch.setattr(Trainer, "run_step", run_step)
    resumed = tool.main(_args(tmp_path, tmp_path / "killed", "--resume"))
    assert "resumed from" in capsys.readouterr().out
    assert _losses(tmp_path / "killed") == reference  # iterations 1-3 before the kill, 3-4 after: same values
    assert resumed["mean_iou"] == results["mean_iou"]


def test_unknown_train_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown train keys \['max_iters'\]"):
        _load_tool().main(_args(tmp_path, tmp_path / "w", "train.max_iters=3"))
