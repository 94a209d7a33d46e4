"""normkit-demo runs the inference normkit-test evaluates with: the `evaluation:` section's test sizes
(short_sides, max_long_side, size_multiple), image_resize, flip and pad_to reach the model, and the demo's
prediction for an image equals SegmentationInference's on the val-loader batch of that image.

A strided conv registered as "size_recorder" stands in for the model zoo and records the input sizes it sees.
"""
import importlib

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from normkit.data import MINI_ADE_CLASSES, build_val_loader, generate_mini_ade
from normkit.evaluation import SegmentationInference
from normkit.models import MODELS

NUM_CLASSES = len(MINI_ADE_CLASSES)
IMAGE = "ADE_val_00000002"  # 40 high x 32 wide: a portrait scene, so short and long side differ


class SizeRecorder(nn.Conv2d):
    """Logits at half the input size (a decode head's stride, so they are resized as the zoo's are), from forward
    or, as the zoo's segmenters offer for logits_resize: direct, head_logits; each pass appends the input's (h, w)
    to `seen`."""

    seen: list = []

    def head_logits(self, images):
        SizeRecorder.seen.append(tuple(images.shape[-2:]))
        return super().forward(images)

    def forward(self, batch):
        return self.head_logits(batch if torch.is_tensor(batch) else batch["images"])


def size_recorder():
    return SizeRecorder(3, NUM_CLASSES, 3, stride=2, padding=1)


if "size_recorder" not in MODELS:
    MODELS.register("size_recorder", lambda cfg: size_recorder())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A two-image mini val split and one checkpoint of the recording model."""
    tmp = tmp_path_factory.mktemp("demo_recipe")
    root = generate_mini_ade(tmp / "mini", num_train=1, num_val=2, size=32)
    torch.manual_seed(0)
    model = size_recorder()
    checkpoint = tmp / "model.pth"
    torch.save({"iteration": 1, "model": model.state_dict()}, checkpoint)
    return {"tmp": tmp, "root": root, "checkpoint": checkpoint, "model": model}


# Expected sizes worked out by hand for the 40 x 32 (h x w) image:
#   short side 24: scale min(24 / 32, 50 / 40) = 0.75 -> 30 x 24, rounded up to multiples of 8 -> 32 x 24
#   short side 48: scale min(48 / 32, 50 / 40) = 1.25 (long side capped at 50) -> 50 x 40 -> 56 x 40
#   short side 24 without size_multiple: 30 x 24, zero-padded to at least 48 x 16 -> 48 x 24
RECIPES = {
    "csail": ({"short_sides": [24, 48], "max_long_side": 50, "size_multiple": 8, "image_resize": "pil",
               "logits_resize": "direct", "flip": True},
              [(32, 24), (32, 24), (56, 40), (56, 40)]),
    "canvas": ({"short_sides": [24], "max_long_side": 1000, "pad_to": [48, 16]}, [(48, 24)]),
}


def write_config(setup, name: str, eval_cfg: dict):
    cfg = {"model": {"name": "size_recorder", "num_classes": NUM_CLASSES},
           "data": {"dataset": "ade20k", "root": str(setup["root"]), "num_classes": NUM_CLASSES},
           "train": {"device": "cpu"}, "evaluation": eval_cfg}
    path = setup["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def run_demo(setup, config, tmp_path, *options) -> np.ndarray:
    demo = importlib.import_module("normkit.tools.demo")
    image = setup["root"] / "ADEChallengeData2016" / "images" / "validation" / f"{IMAGE}.jpg"
    SizeRecorder.seen.clear()
    preds = demo.main(["--config", str(config), "--checkpoint", str(setup["checkpoint"]), "--image", str(image),
                       "--out", str(tmp_path / "out.png"), "--device", "cpu", *options])
    return preds[f"{IMAGE}.jpg"]


def evaluation_prediction(setup, cfg: dict, eval_cfg: dict) -> np.ndarray:
    """What evaluation predicts for IMAGE: sem_seg.evaluate's wrapper on the val loader's batch of it."""
    loader = build_val_loader(cfg["data"])
    batch = next(b for b in loader if b["meta"]["names"] == [IMAGE])
    wrapper = SegmentationInference(setup["model"].eval(), eval_cfg, normalizer=loader.dataset.normalizer)
    with torch.no_grad():
        return wrapper(batch).argmax(1)[0].numpy()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_demo_runs_the_evaluation_recipe(setup, tmp_path, recipe):
    eval_cfg, sizes = RECIPES[recipe]
    cfg, config = write_config(setup, recipe, eval_cfg)
    pred = run_demo(setup, config, tmp_path)
    assert SizeRecorder.seen == sizes  # not the image's own 40 x 32
    assert pred.shape == (40, 32)
    expected = evaluation_prediction(setup, cfg, eval_cfg)
    assert len(np.unique(expected)) > 1  # a prediction that can tell one recipe from another
    np.testing.assert_array_equal(pred, expected)


def test_demo_options_override_the_config_as_normkit_test_does(setup, tmp_path):
    eval_cfg, _ = RECIPES["csail"]
    cfg, config = write_config(setup, "csail", eval_cfg)
    # --scales multiplies the config's short sides and long-side cap (size_multiple still applies): with 0.5,
    # short side 12 (cap 25): scale 0.375 -> 15 x 12 -> 16 x 16; short side 24 (cap 25): 0.625 -> 25 x 20 -> 32 x 24
    pred = run_demo(setup, config, tmp_path, "--scales", "0.5")
    assert SizeRecorder.seen == [(16, 16), (16, 16), (32, 24), (32, 24)]  # the config's flip still applies
    np.testing.assert_array_equal(pred, evaluation_prediction(setup, cfg, {**eval_cfg, "scales": [0.5]}))
    # --flip adds the mirrored pass to a config without it
    _, config = write_config(setup, "canvas", RECIPES["canvas"][0])
    run_demo(setup, config, tmp_path, "--flip")
    assert SizeRecorder.seen == [(48, 24), (48, 24)]


def test_demo_rejects_a_bad_evaluation_section_before_loading_the_checkpoint(setup, tmp_path):
    _, config = write_config(setup, "bad", {"short_sides": [24], "pad_to": [0, 8]})
    demo = importlib.import_module("normkit.tools.demo")
    image = setup["root"] / "ADEChallengeData2016" / "images" / "validation" / f"{IMAGE}.jpg"
    with pytest.raises(ValueError, match="evaluation.pad_to must be a positive int"):
        demo.main(["--config", str(config), "--checkpoint", str(tmp_path / "missing.pth"), "--image", str(image),
                   "--out", str(tmp_path / "out.png"), "--device", "cpu"])
