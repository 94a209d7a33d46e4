"""tools/train.py end to end on a tiny generated mini set: train, checkpoint, evaluate, resume exactly."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from normkit.engine import Trainer, load_checkpoint
from normkit.tools.tasks import SegmentationTask

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


def _evaluations(work_dir):
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["val/mean_iou"] for r in map(json.loads, lines) if "val/mean_iou" in r}


def test_a_run_killed_while_evaluating_evaluates_that_iteration_on_resume(tmp_path, monkeypatch):
    tool = _load_tool()
    tool.main(_args(tmp_path, tmp_path / "full", "train.eval_period=2"))
    reference = _evaluations(tmp_path / "full")
    assert sorted(reference) == [2, 4]

    task_class = SegmentationTask
    evaluate = task_class.evaluate

    def killed_while_evaluating(self, model, eval_cfg=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(task_class, "evaluate", killed_while_evaluating)
    with pytest.raises(KeyboardInterrupt):  # at iteration 2, after its checkpoint was saved
        tool.main(_args(tmp_path, tmp_path / "killed", "train.eval_period=2"))
    assert load_checkpoint(tmp_path / "killed" / "latest.pth")["iteration"] == 2
    monkeypatch.setattr(task_class, "evaluate", evaluate)
    tool.main(_args(tmp_path, tmp_path / "killed", "train.eval_period=2", "--resume"))
    assert _evaluations(tmp_path / "killed") == reference
    # a resume after a recorded evaluation does not repeat it
    calls = []
    monkeypatch.setattr(task_class, "evaluate", lambda self, model, eval_cfg=None: calls.append(1) or
                        evaluate(self, model, eval_cfg))
    tool.main(_args(tmp_path, tmp_path / "killed", "train.eval_period=2", "train.max_iter=6", "--resume"))
    assert len(calls) == 1  # iteration 6 only: the resume at 4 found its evaluation recorded
    assert sorted(_evaluations(tmp_path / "killed")) == [2, 4, 6]


def test_unknown_train_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key train.max_iters \(did you mean train.max_iter\?\)"):
        _load_tool().main(_args(tmp_path, tmp_path / "w", "train.max_iters=3"))


def test_sn_batch_average_mode_is_refused_before_anything_is_written(tmp_path):
    # its buffers hold sums until recompute_batch_stats; evaluating them gave an mIoU near 0
    with pytest.raises(ValueError, match=r"SN layer\(s\) \(backbone.bn1, .*using_moving_average: false"):
        _load_tool().main(_args(tmp_path, tmp_path / "w", "model.backbone.norm_kwargs={using_moving_average: false}"))
    assert not (tmp_path / "w").exists()


def _files(directory):
    return {p.name: p.read_bytes() for p in Path(directory).glob("*.pth")}


def test_a_used_work_dir_is_never_overwritten_silently(tmp_path):
    tool = _load_tool()
    work_dir = tmp_path / "w"
    tool.main(_args(tmp_path, work_dir))
    first_run = _files(work_dir)
    assert {"iter_0000002.pth", "iter_0000004.pth", "latest.pth"} <= set(first_run)
    with pytest.raises(FileExistsError, match="is not empty .*--resume.*--new-run"):
        tool.main(_args(tmp_path, work_dir, "train.max_iter=2"))
    assert _files(work_dir) == first_run
    tool.main(_args(tmp_path, work_dir, "train.max_iter=2", "--new-run"))
    assert _files(work_dir / "previous" / "1") == first_run  # every earlier checkpoint kept, byte for byte
    assert load_checkpoint(work_dir / "latest.pth")["iteration"] == 2
    assert sorted(_losses(work_dir)) == [1, 2]


def test_resume_uses_the_newest_readable_checkpoint(tmp_path, capsys):
    tool = _load_tool()
    work_dir = tmp_path / "w"
    tool.main(_args(tmp_path, work_dir))
    reference = _losses(work_dir)
    # the state after a kill while iteration 4 was written: no latest.pth, a torn iter_4 and its temporary file
    (work_dir / "latest.pth").unlink()
    newest = work_dir / "iter_0000004.pth"
    newest.write_bytes(newest.read_bytes()[:300])
    (work_dir / ".iter_0000004.pth.tmp-99999").write_bytes(b"partial")
    capsys.readouterr()
    tool.main(_args(tmp_path, work_dir, "--resume"))
    log = capsys.readouterr().out  # the tool logs to stdout
    assert "cannot resume from" in log and "iter_0000002.pth at iteration 2" in log
    assert not (work_dir / ".iter_0000004.pth.tmp-99999").exists()
    assert load_checkpoint(work_dir / "latest.pth")["iteration"] == 4
    assert _losses(work_dir) == reference  # iterations 3 and 4 once each, with the uninterrupted run's values
    assert len((work_dir / "metrics.jsonl").read_text().splitlines()) == 4


def _no_step(self):
    raise AssertionError("a training step ran before the config and data were checked")


@pytest.mark.parametrize("override, message", [
    ("data.meen=[0.5, 0.5, 0.5]", r"data.meen \(did you mean data.mean\?\)"),
    ("data.train.short_side=[32]", r"data.train.short_side \(did you mean data.train.short_sides\?\)"),
    ("data.train.lst=x.odgt", r"data.train.lst \(did you mean data.train.list\?\)"),
    ("evaluation.scale=[1.0]", r"evaluation.scale \(did you mean evaluation.scales\?\)"),
    ("evaluation.scales=[0]", r"evaluation.scales must be a non-empty list of positive numbers"),
    ("model.backbone.ouput_stride=8", r"model.backbone.ouput_stride \(did you mean model.backbone.output_stride\?\)"),
    ("train.optimizer.lr_mul={}", r"train.optimizer.lr_mul \(did you mean train.optimizer.lr_mult\?\)"),
    ("train.max_iter=2.9", r"train.max_iter must be an integer, got 2.9"),
    ("train.max_iter=four", r"train.max_iter must be an integer, got 'four'"),
    ("train.checkpoint_period=-1", r"train.checkpoint_period must be >= 0, got -1"),
    ("train.tensorboard=maybe", r"train.tensorboard must be true or false, got 'maybe'"),
    ("train=null", r"override 'train=null': train is a config section, a mapping"),
    ("data.root=", r"override 'data.root=' has no value"),
    ("data.root=null", r"data.root must be the path of the dataset folder, got None"),
    ("data.num_classes=300", r"data.num_classes must be at most 255"),
    ("model.num_classes=300", r"model.num_classes \(300\) differs from data.num_classes \(7\)"),
])
def test_config_errors_stop_the_run_before_anything_is_written(tmp_path, monkeypatch, override, message):
    monkeypatch.setattr(Trainer, "run_step", _no_step)
    with pytest.raises(ValueError, match=message):
        _load_tool().main(_args(tmp_path, tmp_path / "w", override))
    assert not (tmp_path / "w").exists()


def test_missing_data_files_of_either_split_stop_the_run_before_training(tmp_path, monkeypatch):
    from normkit.data.synthetic import generate_mini_ade
    root = generate_mini_ade(tmp_path / "data", num_train=6, num_val=2, size=32, seed=0)
    monkeypatch.setattr(Trainer, "run_step", _no_step)
    for split in ("validation", "training"):
        image = sorted((root / "ADEChallengeData2016" / "images" / split).glob("*.jpg"))[-1]
        image.rename(image.with_suffix(".moved"))
        with pytest.raises(FileNotFoundError, match=f"listed by ADE20K .*{split}.odgt not found: .*{image.name}"):
            _load_tool().main(_args(tmp_path, tmp_path / "w", "data.synthetic=null"))
        image.with_suffix(".moved").rename(image)
    assert not (tmp_path / "w").exists()


def test_latest_as_a_folder_is_reported_before_training(tmp_path, monkeypatch):
    (tmp_path / "w" / "latest.pth").mkdir(parents=True)
    monkeypatch.setattr(Trainer, "run_step", _no_step)
    with pytest.raises(IsADirectoryError, match="latest.pth exists but is not a file"):
        _load_tool().main(_args(tmp_path, tmp_path / "w", "--resume"))


def _built(tmp_path, monkeypatch, rank, *extra):
    """build_trainer as rank `rank` of 2 processes (DDP wrapping left out: no process group here)."""
    import normkit.tools.train as train_module
    from normkit.engine.distributed import DistInfo
    from normkit.tools.cli import load_run_config
    monkeypatch.setattr(train_module, "wrap_ddp", lambda model, info, **kwargs: model)
    cfg = load_run_config(train_module.parse_args(_args(tmp_path, tmp_path / f"w{rank}", *extra)))
    info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    trainer, _, _ = train_module.build_trainer(cfg, tmp_path / f"w{rank}", info)
    return trainer, torch.rand(4)


def test_the_recipe_is_scaled_to_the_total_batch_of_every_process_and_micro_batch(tmp_path, monkeypatch):
    # 2 images x iter_size 2 x 2 processes = 8 images per step; the recipe's lr 0.02 and 4 iterations are for 16
    trainer, _ = _built(tmp_path, monkeypatch, 0, "train.iter_size=2", "train.optimizer.reference_batch=16")
    assert trainer.max_iter == 8 and trainer.iter_size == 2
    assert trainer.scheduler.base_lrs and all(lr == pytest.approx(0.01) for lr in trainer.scheduler.base_lrs)


def test_ranks_start_from_the_same_weights_with_their_own_random_streams(tmp_path, monkeypatch):
    ranks = [_built(tmp_path, monkeypatch, rank) for rank in range(2)]
    for a, b in zip(ranks[0][0].model.state_dict().values(), ranks[1][0].model.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(ranks[0][1], ranks[1][1])  # dropout, sampling: a stream per rank


def test_ranks_that_resumed_from_different_iterations_are_refused(tmp_path, monkeypatch):
    import normkit.tools.train as train_module
    monkeypatch.setattr(train_module, "all_gather_objects", lambda obj: [2, 4])
    with pytest.raises(RuntimeError, match=r"ranks resumed from different iterations \[2, 4\]"):
        _built(tmp_path, monkeypatch, 0)


def test_new_run_archives_take_the_next_free_number(tmp_path):
    import normkit.tools.train as train_module
    work_dir = tmp_path / "w"
    for name in ("1", "3", "notes", "old"):  # an archive deleted by hand, folders of the user's
        (work_dir / "previous" / name).mkdir(parents=True)
    (work_dir / "latest.pth").write_text("x")
    assert train_module.move_previous_run(work_dir) == work_dir / "previous" / "4"
    assert (work_dir / "previous" / "4" / "latest.pth").read_text() == "x"
    assert sorted(p.name for p in work_dir.iterdir()) == ["previous"]
    # a work dir holding only earlier runs is free for a fresh run
    assert train_module._reuse_problem(work_dir, resume=False, new_run=False) is None
    (work_dir / "metrics.jsonl").write_text("")
    assert "is not empty (metrics.jsonl)" in train_module._reuse_problem(work_dir, resume=False, new_run=False)
