"""The detection main job through the tools: tools/train.py on the mini detection config shrunk to seconds
(train, checkpoint, COCO evaluation, exact resume of a killed run), tools/test.py on its checkpoint and
tools/demo.py drawing detections."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import normkit.tools.test
from normkit.engine import Trainer, load_checkpoint

pytest.importorskip("pycocotools")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mini" / "mask_rcnn_r18_fpn_sn.yaml"
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"det_{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _overrides(data_root):
    # The mini detection config shrunk to seconds: 8 scenes of 64 pixels, 4 iterations of 2 images.
    return [f"data.root={data_root}", "data.synthetic={num_train: 8, num_val: 3, size: 64, seed: 0}",
            "data.train.short_sides=[64]", "data.train.max_size=80", "data.val.short_side=64",
            "data.val.max_size=80", "train.batch_size=2", "train.max_iter=4", "train.checkpoint_period=2",
            "train.log_period=1", "train.tensorboard=false"]


def _train_args(tmp_path, work_dir, *extra):
    return ["--config", str(CONFIG), "--work-dir", str(work_dir), *extra, "--set", *_overrides(tmp_path / "data")]


def _assert_same_metrics(a: dict, b: dict):
    """Equal metrics, NaN (a metric COCOeval cannot compute on 3 images) matching NaN."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), (key, a[key], b[key])


def _losses(work_dir):
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A full 4-iteration run, and one killed before iteration 3 then resumed."""
    tmp = tmp_path_factory.mktemp("det_tools")
    tool = _load_tool("train")
    results = tool.main(_train_args(tmp, tmp / "full"))

    run_step = Trainer.run_step

    def killed_at_iteration_3(self):
        if self.iter == 3:
            raise KeyboardInterrupt
        run_step(self)

    Trainer.run_step = killed_at_iteration_3
    try:
        with pytest.raises(KeyboardInterrupt):
            tool.main(_train_args(tmp, tmp / "killed"))
    finally:
        Trainer.run_step = run_step
    killed_at = load_checkpoint(tmp / "killed" / "latest.pth")["iteration"]
    resumed = tool.main(_train_args(tmp, tmp / "killed", "--resume"))
    return {"tmp": tmp, "results": results, "resumed": resumed, "killed_at": killed_at}


def test_detection_training_evaluates_with_coco_metrics(trained):
    results = trained["results"]
    assert {"bbox/AP", "bbox/AP50", "segm/AP", "segm/AR100"} <= set(results)
    saved = json.loads((trained["tmp"] / "full" / "eval_results.json").read_text())
    assert saved["bbox/AP"] == pytest.approx(results["bbox/AP"])
    assert load_checkpoint(trained["tmp"] / "full" / "latest.pth")["iteration"] == 4
    losses = _losses(trained["tmp"] / "full")
    assert sorted(losses) == [1, 2, 3, 4]
    assert set(losses[1]) >= {"rpn_cls_loss", "rpn_bbox_loss", "cls_loss", "box_reg_loss", "mask_loss", "total_loss"}


def test_killed_detection_run_resumes_with_identical_losses_and_weights(trained):
    tmp = trained["tmp"]
    assert trained["killed_at"] == 2
    assert _losses(tmp / "killed") == _losses(tmp / "full")  # iterations 1-2 before the kill, 3-4 after
    full = load_checkpoint(tmp / "full" / "latest.pth")["model"]
    resumed = load_checkpoint(tmp / "killed" / "latest.pth")["model"]
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    _assert_same_metrics(trained["resumed"], trained["results"])


def test_test_tool_evaluates_a_detection_checkpoint(trained, capsys):
    """tools/test.py dispatches on data.dataset: the trained weights score what training's final evaluation
    scored, and the COCO tables are printed."""
    tmp = trained["tmp"]
    capsys.readouterr()
    results = normkit.tools.test.main(["--config", str(CONFIG), "--checkpoint", str(tmp / "full" / "latest.pth"),
                                       "--out", str(tmp / "test.json"), "--set", *_overrides(tmp / "data")])
    out = capsys.readouterr().out
    assert "bbox: COCOeval on 3 images" in out and "segm: COCOeval on 3 images" in out
    assert "bbox: AP" in out and "segm: AP" in out
    _assert_same_metrics(results, trained["results"])
    assert json.loads((tmp / "test.json").read_text())["segm/AP"] == pytest.approx(results["segm/AP"])


def test_demo_draws_detections(trained, capsys):
    tmp = trained["tmp"]
    weights = load_checkpoint(tmp / "full" / "latest.pth")["model"]
    # A confident "triangle" everywhere (class 2; index 0 is the background under Detectron-1's convention),
    # so that there is something to draw whatever four iterations learnt.
    weights["roi_heads.box_predictor.cls_score.bias"][3] = 50.0
    torch.save(weights, tmp / "confident.pth")
    image_dir = tmp / "data" / "images" / "val2017"
    image = sorted(image_dir.iterdir())[0]
    out = tmp / "demo" / "drawn.png"
    predictions = _load_tool("demo").main(["--config", str(CONFIG), "--checkpoint", str(tmp / "confident.pth"),
                                           "--image", str(image), "--out", str(out), "--device", "cpu",
                                           "--set", *_overrides(tmp / "data")])
    printed = capsys.readouterr().out
    prediction = predictions[image.name]
    assert len(prediction["scores"]) > 0 and (prediction["labels"] == 2).all()
    assert f"{image.name}: triangle 1.00" in printed
    original = np.asarray(Image.open(image).convert("RGB"))
    drawn = np.asarray(Image.open(out))
    assert drawn.shape == original.shape and prediction["masks"].shape[1:] == original.shape[:2]
    assert (drawn != original).any(axis=2).mean() > 0.05  # boxes, labels and mask overlays changed the pixels


def test_test_tool_rejects_segmentation_options_for_detection(trained):
    tmp = trained["tmp"]
    with pytest.raises(ValueError,
                       match=r"unknown config key evaluation.flip; the keys of evaluation are: output_dir, tasks"):
        normkit.tools.test.main(["--config", str(CONFIG), "--checkpoint", str(tmp / "full" / "latest.pth"),
                                 "--flip", "--set", *_overrides(tmp / "data")])


@pytest.mark.parametrize("option", [["--flip"], ["--scales", "0.5"]])
def test_demo_rejects_segmentation_options_for_detection(trained, option):
    tmp = trained["tmp"]
    with pytest.raises(ValueError, match=r"unknown config key evaluation.(flip|scales); the keys of evaluation are"):
        _load_tool("demo").main(["--config", str(CONFIG), "--checkpoint", str(tmp / "full" / "latest.pth"),
                                 "--image", str(tmp / "data" / "images" / "val2017"), "--out", str(tmp / "d2"),
                                 *option, "--set", *_overrides(tmp / "data")])
    assert not (tmp / "d2").exists()
