"""tools/test.py (single, watch, distributed) and tools/demo.py on the mini set with a tiny stand-in model.

A 1x1-conv model registered as "tiny" stands in for the model zoo, so these tests exercise the tools' own logic
(config handling, checkpoints, sharding, outputs); expected metrics are computed here from the files on disk.
"""
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image
from torch import nn

from normkit.data import MINI_ADE_CLASSES, build_val_loader, generate_mini_ade
from normkit.models import MODELS

TOOLS = Path(__file__).resolve().parents[1] / "tools"
NUM_CLASSES = len(MINI_ADE_CLASSES)


def load_tool(name):
    """The tool's module: tools/<name>.py in a checkout is a thin wrapper over normkit.tools.<name>."""
    return importlib.import_module(f"normkit.tools.{name}")


def tiny_model():
    return TinySegmenter(3, NUM_CLASSES, 1)


class TinySegmenter(nn.Conv2d):
    """The segmentation model contract in one conv: model(images or {"images": ...}) -> logits."""

    def forward(self, batch):
        return super().forward(batch if torch.is_tensor(batch) else batch["images"])


if "tiny" not in MODELS:
    MODELS.register("tiny", lambda cfg: TinySegmenter(3, NUM_CLASSES, 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A mini set, a config and two checkpoints of the tiny model."""
    tmp = tmp_path_factory.mktemp("tools")
    root = generate_mini_ade(tmp / "mini", num_train=2, num_val=5, size=40)
    cfg = {"model": {"name": "tiny", "num_classes": NUM_CLASSES},
           "data": {"dataset": "ade20k", "root": str(root), "num_classes": NUM_CLASSES},
           "train": {"device": "cpu"}, "evaluation": {"mode": "whole"}}
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = tmp / "work"
    work.mkdir()
    models = []
    for i, iteration in enumerate((10, 20)):
        torch.manual_seed(i)
        model = tiny_model()
        torch.save({"iteration": iteration, "model": model.state_dict()}, work / f"iter_{iteration:07d}.pth")
        models.append(model)
    return {"cfg": cfg, "config": config, "work": work, "models": models, "root": root}


def reference_metrics(model, root) -> dict:
    """Pixel accuracy and per-class IoU of `model` on the mini val split, read straight from the files
    (ADE20K labels: 0 ignored, k -> class k-1; ImageNet normalisation of 0..1 RGB)."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    inter, union = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    correct = labelled = 0
    val = Path(root) / "ADEChallengeData2016"
    for image_file in sorted((val / "images" / "validation").glob("*.jpg")):
        image = (np.asarray(Image.open(image_file).convert("RGB"), dtype=np.float64) / 255 - mean) / std
        label = np.asarray(Image.open(val / "annotations" / "validation" / f"{image_file.stem}.png")).astype(int) - 1
        with torch.no_grad():
            logits = model(torch.from_numpy(image).permute(2, 0, 1)[None].float())
        pred = logits[0].argmax(0).numpy()
        valid = label >= 0
        correct += int((pred == label)[valid].sum())
        labelled += int(valid.sum())
        for k in range(NUM_CLASSES):
            p, g = (pred == k) & valid, label == k
            inter[k] += (p & g).sum()
            union[k] += (p | g).sum()
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return {"pixel_acc": correct / labelled, "per_class_iou": iou.tolist(), "mean_iou": float(np.nanmean(iou))}


def test_test_tool_metrics_equal_an_independent_computation(setup, tmp_path, capsys):
    tool = load_tool("test")
    out = tmp_path / "results.json"
    results = tool.main(["--config", str(setup["config"]), "--checkpoint", str(setup["work"] / "iter_0000010.pth"),
                         "--show-dir", str(tmp_path / "show"), "--out", str(out)])
    expected = reference_metrics(setup["models"][0], setup["root"])
    assert results["per_class_iou"] == pytest.approx(expected["per_class_iou"], nan_ok=True)
    assert results["mean_iou"] == pytest.approx(expected["mean_iou"])
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "ball" in printed and f"{100 * expected['pixel_acc']:.2f}" in printed
    saved = json.loads(out.read_text())
    assert saved["mean_iou"] == pytest.approx(expected["mean_iou"]) and len(saved["per_class_iou"]) == NUM_CLASSES
    assert len(list((tmp_path / "show").glob("ADE_val_*.png"))) == 5
    multi = tool.main(["--config", str(setup["config"]), "--checkpoint", str(setup["work"] / "iter_0000010.pth"),
                       "--scales", "0.75", "1.0", "--flip"])
    assert 0 < multi["mean_iou"] <= 1 and multi["per_class_iou"] != results["per_class_iou"]


def test_test_tool_slide_mode_and_errors(setup):
    tool = load_tool("test")
    args = tool.parse_args(["--config", "c.yaml", "--checkpoint", "x.pth", "--mode", "slide", "--crop-size", "32",
                            "24", "--stride", "16", "16"])
    cfg = tool.evaluation_config({"evaluation": {"mode": "whole", "scales": [1.0]}}, args)
    assert cfg == {"mode": "slide", "scales": [1.0], "crop_size": [32, 24], "stride": [16, 16]}
    # --scales multiplies a config's short sides (mmseg img_ratios over img_scale) instead of being ignored
    args = tool.parse_args(["--config", "c.yaml", "--checkpoint", "x.pth", "--scales", "0.5", "1.0"])
    cfg = tool.evaluation_config({"evaluation": {"short_sides": [450], "max_long_side": 1000}}, args)
    assert cfg == {"scales": [0.5, 1.0], "short_sides": [450], "max_long_side": 1000}
    with pytest.raises(SystemExit):  # --checkpoint and --watch are exclusive
        tool.parse_args(["--config", "c.yaml", "--checkpoint", "x.pth", "--watch", "dir"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tool.main(["--config", str(setup["config"]), "--checkpoint", str(setup["work"] / "missing.pth")])


def test_watch_evaluates_each_new_checkpoint_once(setup, tmp_path):
    tool = load_tool("test")
    work = tmp_path / "watched"
    work.mkdir()
    for name in ("iter_0000010.pth", "iter_0000020.pth"):
        (work / name).write_bytes((setup["work"] / name).read_bytes())
    os.link(work / "iter_0000020.pth", work / "latest.pth")  # the trainer's alias: not evaluated twice
    (work / ".iter_0000030.pth.tmp-123").write_bytes(b"half written")  # an atomic write in progress
    argv = ["--config", str(setup["config"]), "--watch", str(work), "--poll", "0.01", "--idle-timeout", "0.05"]
    records = tool.main(argv)
    assert [r["checkpoint"] for r in records] == ["iter_0000010.pth", "iter_0000020.pth"]
    assert records[1]["iteration"] == 20
    expected = reference_metrics(setup["models"][1], setup["root"])
    assert records[1]["mean_iou"] == pytest.approx(expected["mean_iou"])
    # a restarted watcher skips what the log says is done and picks up only the new checkpoint
    (work / "iter_0000030.pth").write_bytes((setup["work"] / "iter_0000010.pth").read_bytes())
    assert [r["checkpoint"] for r in tool.main(argv)] == ["iter_0000030.pth"]
    assert len((work / "eval_watch.jsonl").read_text().splitlines()) == 3


def test_a_watcher_evaluates_a_new_run_whose_checkpoints_reuse_the_names(setup, tmp_path, monkeypatch):
    tool = load_tool("test")
    work = tmp_path / "watched"
    work.mkdir()
    (work / "iter_0000010.pth").write_bytes((setup["work"] / "iter_0000010.pth").read_bytes())
    sleep = tool.time.sleep
    polls = []

    def new_run_after_the_first_evaluation(seconds):
        polls.append(seconds)
        if len(polls) == 1:  # tools/train.py --new-run: the old files move away, the new run writes iter 10
            (work / "previous").mkdir()
            for name in ("iter_0000010.pth", "eval_watch.jsonl"):
                (work / name).rename(work / "previous" / name)
            (work / "iter_0000010.pth").write_bytes((setup["work"] / "iter_0000020.pth").read_bytes())
        sleep(seconds)

    monkeypatch.setattr(tool.time, "sleep", new_run_after_the_first_evaluation)
    records = tool.main(["--config", str(setup["config"]), "--watch", str(work), "--poll", "0.01",
                         "--idle-timeout", "0.2"])
    assert [r["checkpoint"] for r in records] == ["iter_0000010.pth", "iter_0000010.pth"]
    expected = reference_metrics(setup["models"][1], setup["root"])  # the new run's weights
    assert records[1]["mean_iou"] == pytest.approx(expected["mean_iou"])


def _distributed_worker(rank, config, checkpoint, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.stdout = open(os.devnull, "w")  # rank 0 prints the table; the parent checks the numbers
    results = load_tool("test").main(["--config", config, "--checkpoint", checkpoint])
    queue.put((rank, results["per_class_iou"], results["pixel_acc"]))


def test_distributed_evaluation_equals_single_process(setup):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    checkpoint = str(setup["work"] / "iter_0000020.pth")
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_distributed_worker, args=(str(setup["config"]), checkpoint, port, queue), nprocs=2)
    expected = reference_metrics(setup["models"][1], setup["root"])
    for _ in range(2):
        _, ious, acc = queue.get()
        assert ious == pytest.approx(expected["per_class_iou"], nan_ok=True)
        assert acc == pytest.approx(expected["pixel_acc"])


def _watch_worker(rank, config, work, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.stdout = open(os.devnull, "w")
    if rank == 1:  # the trainer's max_keep deletes iter_10 after rank 0 read it and before rank 1 does
        load = torch.load

        def deleted_meanwhile(path, *args, **kwargs):
            if str(path).endswith("iter_0000010.pth"):
                raise FileNotFoundError(path)
            return load(path, *args, **kwargs)

        torch.load = deleted_meanwhile
    records = load_tool("test").main(["--config", config, "--watch", work, "--poll", "0.01", "--idle-timeout", "0.5"])
    queue.put((rank, [r["checkpoint"] for r in records]))


def test_distributed_watch_skips_a_checkpoint_some_rank_could_not_read(setup, tmp_path):
    work = tmp_path / "watched"
    work.mkdir()
    for name in ("iter_0000010.pth", "iter_0000020.pth"):
        (work / name).write_bytes((setup["work"] / name).read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(_watch_worker, args=(str(setup["config"]), str(work), port, queue), nprocs=2,
                                 join=False, start_method="spawn")
    for _ in range(240):  # ranks that disagree would wait in a collective until the process-group timeout
        if context.join(timeout=0.5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the watchers hung")
    assert sorted(queue.get() for _ in range(2)) == [(0, ["iter_0000020.pth"]), (1, [])]


def test_demo_on_a_folder_and_a_file(setup, tmp_path, capsys):
    demo = load_tool("demo")
    images = setup["root"] / "ADEChallengeData2016" / "images" / "validation"
    preds = demo.main(["--config", str(setup["config"]), "--checkpoint", str(setup["work"] / "iter_0000010.pth"),
                       "--image", str(images), "--out", str(tmp_path / "folder")])
    assert len(preds) == 5 and len(list((tmp_path / "folder").glob("*.png"))) == 5
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[0].startswith("ADE_val_00000001.jpg: ")

    single = images / "ADE_val_00000002.jpg"
    out = tmp_path / "one.png"
    pred = demo.main(["--config", str(setup["config"]), "--checkpoint", str(setup["work"] / "iter_0000010.pth"),
                      "--image", str(single), "--out", str(out)])["ADE_val_00000002.jpg"]
    with Image.open(single) as im, Image.open(out) as written:
        assert written.size == im.size
    x = next(b["images"] for b in build_val_loader(setup["cfg"]["data"]) if b["meta"]["names"] == ["ADE_val_00000002"])
    with torch.no_grad():
        np.testing.assert_array_equal(pred, setup["models"][0](x).argmax(1)[0].numpy())
    # the printed classes are the predicted ones with their area share
    line = capsys.readouterr().out
    counts = np.bincount(pred.ravel(), minlength=NUM_CLASSES)
    top = int(counts.argmax())
    assert f"{MINI_ADE_CLASSES[top]} {100 * counts[top] / pred.size:.1f}%" in line
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        demo.main(["--config", str(setup["config"]), "--checkpoint", "x", "--image", str(tmp_path / "nothing_here")])


def test_demo_overlays_of_images_sharing_a_stem_do_not_replace_each_other(tmp_path):
    demo = load_tool("demo")
    images = [tmp_path / "in" / name for name in ("a.jpg", "a.png", "b.jpg")]
    assert demo.output_paths(images, tmp_path / "out") == [tmp_path / "out" / name
                                                           for name in ("a.jpg.png", "a.png.png", "b.png")]
    assert demo.output_paths(images[:1], tmp_path / "one.png") == [tmp_path / "one.png"]
    # several images and an image-like --out: a folder of that name, not one file written over and over
    assert demo.output_paths(images[1:], tmp_path / "x.png") == [tmp_path / "x.png" / name
                                                                 for name in ("a.png", "b.png")]


def test_watch_survives_missing_folders_unreadable_checkpoints_and_log_lines(setup, tmp_path, capsys):
    tool = load_tool("test")
    base = ["--config", str(setup["config"]), "--poll", "0.01", "--idle-timeout", "0.1"]
    assert tool.main([*base, "--watch", str(tmp_path / "not_yet")]) == []
    assert "not_yet does not exist (yet); waiting" in capsys.readouterr().out
    work = tmp_path / "watched"
    work.mkdir()
    good = (setup["work"] / "iter_0000010.pth").read_bytes()
    (work / "iter_0000010.pth").write_bytes(good[:len(good) // 2])  # still being copied
    (work / "iter_0000020.pth").write_bytes((setup["work"] / "iter_0000020.pth").read_bytes())
    (work / "eval_watch.jsonl").write_text('{"checkpoint": "iter_0000005.pth", "iteration": 5}\n{"checkp\n')
    records = tool.main([*base, "--watch", str(work)])
    assert [r["checkpoint"] for r in records] == ["iter_0000020.pth"]  # the torn file does not block newer ones
    out = capsys.readouterr().out
    assert "skipping iter_0000010.pth for now" in out and "eval_watch.jsonl:2: unreadable record skipped" in out
    (work / "iter_0000010.pth").write_bytes(good)  # the copy completed: evaluated by the next watcher
    assert [r["checkpoint"] for r in tool.main([*base, "--watch", str(work)])] == ["iter_0000010.pth"]


@pytest.mark.parametrize("option", [["--poll", "-1"], ["--poll", "0"], ["--scales", "0"], ["--scales", "1", "-1"],
                                    ["--scales", "inf"],
                                    ["--idle-timeout", "nan"], ["--idle-timeout", "-5"]])
def test_test_tool_rejects_non_positive_numbers(option, capsys):
    with pytest.raises(SystemExit):
        load_tool("test").parse_args(["--config", "c.yaml", "--watch", "dir", *option])
    assert "must be a finite number > 0" in capsys.readouterr().err


def test_test_tool_rejects_a_non_positive_slide_stride_before_evaluating(setup):
    with pytest.raises(ValueError, match=r"evaluation.stride must be a positive int or \[height, width\], "
                                         r"got \[0, 8\]"):
        load_tool("test").main(["--config", str(setup["config"]), "--checkpoint", str(setup["work"] / "missing.pth"),
                                "--mode", "slide", "--crop-size", "8", "8", "--stride", "0", "8"])


def test_demo_never_overwrites_its_inputs(setup, tmp_path):
    demo = load_tool("demo")
    folder = tmp_path / "images"
    folder.mkdir()
    image = folder / "photo.png"
    with Image.open(setup["root"] / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.jpg") as im:
        im.save(image)
    original = image.read_bytes()
    common = ["--config", str(setup["config"]), "--checkpoint", str(setup["work"] / "iter_0000010.pth")]
    for image_arg, out in ((image, image), (folder, folder), (image, folder)):
        with pytest.raises(ValueError, match="would overwrite or mix with the input images"):
            demo.main([*common, "--image", str(image_arg), "--out", str(out)])
    assert image.read_bytes() == original and sorted(p.name for p in folder.iterdir()) == ["photo.png"]


@pytest.mark.parametrize("option", [["--scales", "0"], ["--alpha", "5"], ["--alpha", "nan"], ["--alpha", "-0.1"]])
def test_demo_rejects_meaningless_numbers(option, capsys):
    with pytest.raises(SystemExit):
        load_tool("demo").parse_args(["--config", "c", "--checkpoint", "k", "--image", "i", *option])
    assert "must" in capsys.readouterr().err


def test_demo_output_never_lands_in_the_input_folder(tmp_path):
    demo = load_tool("demo")
    folder = tmp_path / "images"
    folder.mkdir()
    with pytest.raises(ValueError, match="input folder"):  # photo.jpg -> photo.png: no clash, but the same folder
        demo.refuse_overwriting_inputs([folder / "photo.jpg"], [folder / "photo.png"], folder, folder)
    demo.refuse_overwriting_inputs([folder / "photo.jpg"], [tmp_path / "out" / "photo.png"], folder, tmp_path / "out")


def test_demo_accepts_the_ends_of_the_opacity_range_and_lists_classes_by_area():
    demo = load_tool("demo")
    for alpha in ("0", "1"):
        assert demo.parse_args(["--config", "c", "--checkpoint", "k", "--image", "i", "--alpha", alpha]).alpha == \
            float(alpha)
    pred = np.array([[0, 1, 1, 2], [2, 2, 2, 2]], np.uint8)
    assert demo.describe(pred, ["sky", "tree", "road", "car"]) == "road 62.5%, tree 25.0%, sky 12.5%"


def test_test_tool_options_override_the_evaluation_section():
    tool = load_tool("test")
    cfg = {"evaluation": {"mode": "whole", "scales": [1.0], "flip": False}}
    args = tool.parse_args(["--config", "c", "--checkpoint", "k", "--flip", "--scales", "0.5", "1.5", "--mode", "slide",
                            "--crop-size", "8", "8", "--stride", "4", "6"])
    assert tool.evaluation_config(cfg, args) == {"mode": "slide", "scales": [0.5, 1.5], "flip": True,
                                                 "crop_size": [8, 8], "stride": [4, 6]}
    assert tool.evaluation_config(cfg, tool.parse_args(["--config", "c", "--checkpoint", "k"])) == cfg["evaluation"]


def test_watched_checkpoints_go_by_iteration_number(tmp_path):
    tool = load_tool("test")
    for name in ("iter_10.pth", "iter_5.pth", "iter_0000007.pth", "latest.pth", ".iter_12.pth.tmp-1", "iter_x.pth"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in tool.pending_checkpoints(tmp_path, set())] == ["iter_5.pth", "iter_0000007.pth",
                                                                          "iter_10.pth"]
    assert [p.name for p in tool.pending_checkpoints(tmp_path, {"iter_5.pth"})] == ["iter_0000007.pth", "iter_10.pth"]


def test_watch_idle_timeout_counts_from_the_newest_checkpoint(setup, tmp_path, monkeypatch):
    # poll 1 s, idle timeout 10 s on a clock of our own: checkpoints at t = 0, 8 and 15 keep the watcher going
    tool = load_tool("test")
    work = tmp_path / "watched"
    work.mkdir()
    source = setup["work"] / "iter_0000010.pth"
    (work / "iter_0000010.pth").write_bytes(source.read_bytes())
    arrivals = {8.0: "iter_0000020.pth", 15.0: "iter_0000030.pth"}
    clock = [0.0]

    class Clock:
        @staticmethod
        def monotonic():
            return clock[0]

        @staticmethod
        def sleep(seconds):
            clock[0] += seconds
            if clock[0] in arrivals:
                (work / arrivals[clock[0]]).write_bytes(source.read_bytes())

    monkeypatch.setattr(tool, "time", Clock)
    records = tool.main(["--config", str(setup["config"]), "--watch", str(work), "--poll", "1", "--idle-timeout", "10"])
    assert [r["iteration"] for r in records] == [10, 20, 30]
    assert clock[0] == 25.0
