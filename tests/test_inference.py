"""Multi-scale / flip / sliding-window inference on models whose outputs are known, and evaluate()."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from normkit.evaluation import evaluate, inference
from normkit.evaluation.sem_seg import image_sizes


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


class RampModel(nn.Module):
    """Two-class logits: class 0 = red channel + slope * (column index within the model's input),
    class 1 = 0. So P(class 0) = sigmoid(red + slope * column)."""

    def __init__(self, slope=0.0):
        super().__init__()
        self.slope = slope
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x):
        cols = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, 0])
        return torch.stack([x[:, 0] + self.slope * cols, torch.zeros_like(x[:, 0])], 1)


def image_with_red(row):
    red = torch.tensor(row, dtype=torch.float32).expand(2, len(row))  # two identical rows
    return torch.stack([red, torch.zeros_like(red), torch.zeros_like(red)])[None]


def test_single_scale_is_softmax():
    probs = inference(RampModel(), image_with_red([0, 2, 4, 6]))
    assert probs.shape == (1, 2, 2, 4)
    np.testing.assert_allclose(probs[0, 0, 0], sigmoid([0, 2, 4, 6]), rtol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-6)


def test_probabilities_keep_float64_and_raise_half_precision():
    image = image_with_red([0, 2, 4, 6])
    probs = inference(RampModel(), image.double())
    assert probs.dtype == torch.float64
    np.testing.assert_allclose(probs[0, 0, 0], sigmoid([0, 2, 4, 6]), rtol=1e-15)  # float32 is good to 1e-7
    assert inference(RampModel(), image.bfloat16()).dtype == torch.float32


def test_two_scales_average_softmax_of_resized_logits():
    probs = inference(RampModel(), image_with_red([0, 2, 4, 6]), scales=(1.0, 0.5))
    # x0.5 (bilinear, half-pixel centres): columns sample at 0.5 and 2.5 -> red 1 and 5; the logits back to 4
    # columns sample at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped) between those two values; softmax after that.
    half = sigmoid([1, 0.75 * 1 + 0.25 * 5, 0.25 * 1 + 0.75 * 5, 5])
    expected = (sigmoid([0, 2, 4, 6]) + half) / 2
    np.testing.assert_allclose(probs[0, 0, 1], expected, rtol=1e-6)


def test_flip_averages_the_mirrored_prediction():
    red = [0.5, -1.0, 2.0, 0.0]
    probs = inference(RampModel(slope=1.0), image_with_red(red), flip=True)
    cols = np.arange(4)
    # mirrored pass: column c of the flipped input is column 3 - c of the image
    expected = (sigmoid(np.array(red) + cols) + sigmoid(np.array(red) + (3 - cols))) / 2
    np.testing.assert_allclose(probs[0, 0, 0], expected, rtol=1e-6)


def test_flip_and_scales_combined():
    red = [1.0, 3.0, -1.0, 1.0]
    probs = inference(RampModel(slope=0.5), image_with_red(red), scales=(1.0, 0.5), flip=True)
    r = np.array(red)
    cols = np.arange(4)
    full = (sigmoid(r + 0.5 * cols) + sigmoid(r + 0.5 * (3 - cols))) / 2
    small_red = np.array([(r[0] + r[1]) / 2, (r[2] + r[3]) / 2])

    def upsampled(two):  # 2 -> 4 columns, bilinear with half-pixel centres
        return np.array([two[0], 0.75 * two[0] + 0.25 * two[1], 0.25 * two[0] + 0.75 * two[1], two[1]])

    # the half-size logits (the mirrored pass: ramp reversed, mirrored back after the resize) upsampled, then softmax
    small = (sigmoid(upsampled(small_red + 0.5 * np.arange(2)))
             + sigmoid(upsampled(small_red[::-1] + 0.5 * np.arange(2))[::-1])) / 2
    np.testing.assert_allclose(probs[0, 0, 0], (full + small) / 2, rtol=1e-6)


def test_slide_averages_overlapping_window_logits():
    red = np.array([0.0, 1.0, -2.0, 0.5, 1.5, -0.5])
    probs = inference(RampModel(slope=1.0), image_with_red(red.tolist()), mode="slide", crop_size=(2, 4),
                      stride=(2, 2))
    # windows cover columns 0-3 and 2-5; inside a window the ramp restarts at 0
    cols = np.arange(6)
    ramp = np.where(cols < 2, cols, np.where(cols < 4, ((cols) + (cols - 2)) / 2, cols - 2))
    np.testing.assert_allclose(probs[0, 0, 0], sigmoid(red + ramp), rtol=1e-6)
    # a window larger than the image runs it whole
    whole = inference(RampModel(slope=1.0), image_with_red(red.tolist()), mode="slide", crop_size=8, stride=4)
    np.testing.assert_allclose(whole[0, 0, 0], sigmoid(red + cols), rtol=1e-6)


def test_slide_shifts_the_last_window_back_inside_the_image_with_separate_row_and_column_strides():
    # width 9, crop 4, stride 3: windows at columns 0, 3 and 5 (ceil(5 / 3) + 1 = 3, the last one shifted back to
    # end at the border, as mmseg's slide_inference); height 2, crop 2, row stride 1: one row of windows
    red = np.array([0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.25, 1.5, -2.0])
    probs = inference(RampModel(slope=1.0), image_with_red(red.tolist()), mode="slide", crop_size=(2, 4),
                      stride=(1, 3))
    ramp = np.zeros(9)
    hits = np.zeros(9)
    for x1 in (0, 3, 5):  # the ramp restarts at 0 in every window; logits are averaged where windows overlap
        ramp[x1:x1 + 4] += np.arange(4)
        hits[x1:x1 + 4] += 1
    np.testing.assert_allclose(probs[0, 0, 0], sigmoid(red + ramp / hits), rtol=1e-6)

    class RowRamp(RampModel):  # the ramp down the rows of the model's input
        def forward(self, x):
            return super().forward(x.transpose(-1, -2)).transpose(-1, -2)

    # the same geometry turned by 90 degrees: height 9, row crop 4, row stride 3; one column of windows
    probs = inference(RowRamp(slope=1.0), image_with_red(red.tolist()).transpose(-1, -2), mode="slide",
                      crop_size=(4, 2), stride=(3, 1))
    np.testing.assert_allclose(probs[0, 0, :, 0], sigmoid(red + ramp / hits), rtol=1e-6)


def test_scaled_sizes_round_half_up():
    # int(s * H + 0.5): 0.75 x (2, 6) -> (2, 5) (1.5 -> 2, 4.5 -> 5), not the truncated (1, 4)
    seen = []

    class Recorder(RampModel):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    inference(Recorder(), image_with_red([0, 1, 2, 3, 4, 5]), scales=(1.0, 0.75))
    assert seen == [(2, 6), (2, 5)]


def test_out_size_and_errors():
    probs = inference(RampModel(), image_with_red([0, 2, 4, 6]), out_size=(4, 8))
    assert probs.shape == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="unknown inference mode 'tile'"):
        inference(RampModel(), image_with_red([0, 1]), mode="tile")
    with pytest.raises(ValueError, match="needs `crop_size`"):
        inference(RampModel(), image_with_red([0, 1]), mode="slide")
    with pytest.raises(ValueError, match=r"Tensor\[B, 3, H, W\]"):
        inference(RampModel(), torch.zeros(1, 2, 4, 4))


def test_slide_windows_must_cover_the_image():
    # a stride longer than the crop leaves columns no window sees (their probabilities would be 0/0)
    with pytest.raises(ValueError, match=r"stride \[16, 26\] exceeds crop_size \[21, 25\]"):
        inference(RampModel(), image_with_red([0] * 60), mode="slide", crop_size=[21, 25], stride=[16, 26])
    probs = inference(RampModel(), image_with_red([0] * 60), mode="slide", crop_size=[2, 25], stride=[2, 25])
    assert torch.isfinite(probs).all()  # stride == crop tiles the image exactly


@pytest.mark.parametrize("section, message", [
    ({"mode": "slide", "crop_size": [21, 25], "stride": [16, 26]}, r"stride \[16, 26\] exceeds crop_size"),
    ({"mode": "slide", "stride": 8}, "needs `crop_size`"),
    ({"mode": "slide", "crop_size": [16], "stride": 8}, r"evaluation.crop_size must be a positive int or \[height"),
    ({"pad_to": [40]}, r"evaluation.pad_to must be a positive int or \[height, width\], got \[40\]"),
    ({"max_long_side": None}, "evaluation.max_long_side must be a positive number, got None"),
    ({"short_sides": [512], "max_long_side": float("inf")}, "evaluation.max_long_side must be a positive number"),
    ({"scales": [1.0, float("nan")]}, "evaluation.scales must be a non-empty list of positive numbers"),
])
def test_evaluate_rejects_a_bad_section_before_running_the_model(section, message):
    class Untouchable(nn.Module):
        def forward(self, images):
            raise AssertionError("the section must be checked before any inference")

    with pytest.raises(ValueError, match=message):
        evaluate(Untouchable(), [{"images": image_with_red([0, 1]), "labels": torch.zeros(1, 2, 2, dtype=torch.long),
                                  "meta": {"names": ["a"]}}], section, num_classes=2)


def test_evaluate_on_known_predictions():
    # predicted class = 0 where red > 0 else 1; labels chosen so that the metrics are easy to count
    batches = [
        {"images": image_with_red([1, 1, -1, -1]), "labels": torch.tensor([[[0, 1, 1, 255], [0, 0, 1, 1]]]),
         "meta": {"names": ["a"]}},
        {"images": image_with_red([-1, 1]), "labels": torch.tensor([[[1, 1], [1, 1]]]), "meta": {"names": ["b"]}},
    ]
    model = RampModel().train()
    r = evaluate(model, batches, {"flip": True}, num_classes=2)
    assert model.training  # the mode is restored
    # a: class 0 I=3 (cols 0,1 of row 1 and col 0 of row 0), pred0 count 4, label0 3 -> U=4; class 1: I=3, U=4
    # b: pred [1,0],[1,0]; class 1: I=2, label 4, pred 2 -> U=4; class 0: I=0, pred 2 -> U=2
    assert r["per_class_iou"] == pytest.approx([3 / 6, 5 / 8])
    assert r["pixel_acc"] == pytest.approx(8 / 11)
    assert not math.isnan(r["score"])
    with pytest.raises(ValueError, match=r"unknown config key evaluation.scale \(did you mean evaluation.scales\?\)"):
        evaluate(model, batches, {"scale": [1.0]}, num_classes=2)


def test_evaluate_short_sides_and_show_dir(tmp_path):
    # 100 x 400 to short sides 150 and 300: x1.5, and x2.5 where the long side reaches 1000
    assert image_sizes({"short_sides": [150, 300], "max_long_side": 1000}, 100, 400) == [(150, 600), (250, 1000)]
    # 300 x 401 to short side 450 (x1.5, 601.5 wide): mmcv rounds to 602; CSAIL's ValDataset takes int() = 601,
    # then the next multiple of 8 (padding_constant): 456 x 608
    assert image_sizes({"short_sides": [450]}, 300, 401) == [(450, 602)]
    assert image_sizes({"short_sides": [450], "size_multiple": 8}, 300, 401) == [(456, 608)]
    # the long side is capped at 1000 unless max_long_side says otherwise (CSAIL's imgMaxSize)
    assert image_sizes({"short_sides": [600]}, 300, 1200) == [(250, 1000)]
    batches = [{"images": image_with_red([1, -1, 1, -1]), "labels": torch.tensor([[[0, 1, 0, 1], [0, 1, 0, 1]]]),
                "meta": {"names": ["scene"]}}]
    r = evaluate(RampModel(), batches, {"show_dir": str(tmp_path)}, num_classes=2)
    assert r["mean_iou"] == 1.0
    from PIL import Image
    with Image.open(tmp_path / "scene.png") as im:
        assert im.size == (12, 2)  # image | prediction | label


def test_pad_to_runs_the_model_on_a_zero_canvas_and_crops_its_logits():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, images):
            seen.append(images)
            # class 1 scores the column index: the crop must keep the image's own columns
            cols = torch.arange(images.shape[-1], dtype=images.dtype).expand(images.shape[-2:])
            return torch.stack([torch.zeros_like(cols), cols])[None]

    image = torch.randn(1, 3, 2, 3)
    probs = inference(Recorder(), image, pad_to=(4, 5))
    (canvas,) = seen
    assert canvas.shape == (1, 3, 4, 5) and torch.equal(canvas[..., :2, :3], image)
    assert canvas[..., 2:, :].abs().sum() == 0 and canvas[..., :, 3:].abs().sum() == 0
    np.testing.assert_allclose(probs[0, 1, 0], sigmoid([0, 1, 2]), rtol=1e-6)
    inference(Recorder(), torch.randn(1, 3, 2, 3), pad_to=(5, 9))  # 3 rows and 6 columns of zeros
    assert seen[-1].shape == (1, 3, 5, 9)
    inference(Recorder(), torch.randn(1, 3, 6, 6), pad_to=(4, 5))  # larger images are not cropped
    assert seen[-1].shape == (1, 3, 6, 6)
    with pytest.raises(ValueError, match="pad_to applies to whole-image inference"):
        evaluate(Recorder(), [], {"pad_to": [4, 5], "mode": "slide", "crop_size": 2, "stride": 2}, num_classes=2)


class StrideTwoModel(nn.Module):
    """head_logits: class 0 = the red channel of every second column (a stride-2 head), class 1 = 0."""

    def head_logits(self, x):
        red = x[:, 0, ::2, ::2]
        return torch.stack([red, torch.zeros_like(red)], 1)

    def forward(self, x):
        raise AssertionError("logits_resize 'direct' must not ask for input-size logits")


def test_direct_resizes_the_head_logits_straight_to_the_output_size():
    probs = inference(StrideTwoModel(), image_with_red([1.0, 0.0, 5.0, 0.0]).repeat(1, 1, 2, 1),
                      out_size=(4, 8), logits_resize="direct")
    # head columns red 1 and 5 -> 8 columns in one bilinear step (half-pixel centres: 1/4 source pixel per column)
    cols = np.clip((np.arange(8) + 0.5) / 4 - 0.5, 0, 1)
    np.testing.assert_allclose(probs[0, 0, 0], sigmoid(1 + 4 * cols), rtol=1e-6)
    with pytest.raises(TypeError, match="head_logits"):
        inference(RampModel(), image_with_red([0, 1]), logits_resize="direct")
    with pytest.raises(ValueError, match="direct applies to whole-image inference"):
        evaluate(RampModel(), [], {"logits_resize": "direct", "pad_to": [4, 4]}, num_classes=2)


@pytest.mark.parametrize("image_resize", ["cv2", "pil"])
def test_test_sizes_resize_the_uint8_image_before_normalising(image_resize):
    import cv2
    from PIL import Image

    from normkit.data.pixels import PixelNormalizer
    from normkit.evaluation import SegmentationInference

    image = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    normalizer = PixelNormalizer("rgb", 255, (128.0, 0.0, 0.0), (64.0, 1.0, 1.0))
    batch = {"images": normalizer.to_tensor(image)[None], "images_uint8": torch.from_numpy(image)[None],
             "labels": torch.zeros(1, 3, 5, dtype=torch.int64)}  # the labels at the test size: no logits resize
    wrapper = SegmentationInference(RampModel(), {"scales": [0.5], "image_resize": image_resize}, normalizer)
    resized = (cv2.resize(image, (5, 3), interpolation=cv2.INTER_LINEAR) if image_resize == "cv2" else
               np.asarray(Image.fromarray(image).resize((5, 3), Image.BILINEAR)))
    np.testing.assert_allclose(wrapper(batch)[0, 0], sigmoid((resized[..., 0] - 128.0) / 64.0), rtol=1e-6)


def test_scales_multiply_the_configured_test_size_as_mmseg_img_ratios():
    # mmseg: Resize(img_scale=(2048, 512), keep_ratio) under MultiScaleFlipAug(img_ratios): each ratio r rescales
    # to (int(2048 r), int(512 r)), i.e. factor min(long / max(h, w), short / min(h, w)), sides int(x + 0.5).
    def mmseg(h, w, r):
        factor = min(int(2048 * r) / max(h, w), int(512 * r) / min(h, w))
        return int(h * factor + 0.5), int(w * factor + 0.5)

    cfg = {"short_sides": [512], "max_long_side": 2048, "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]}
    for h, w in ((500, 700), (375, 1500), (683, 512)):
        assert image_sizes(cfg, h, w) == [mmseg(h, w, r) for r in cfg["scales"]]
    assert image_sizes({"short_sides": [450]}, 300, 401) == image_sizes({"short_sides": [450], "scales": [1.0]},
                                                                         300, 401)
