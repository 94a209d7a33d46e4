"""MultiScaleRoIAlign: FPN level assignment from the formula, per-level pooling, scale inference, modules."""
import math

import pytest
import torch

from normkit.nn import MultiScaleRoIAlign, RoIAlign, RoIPool, assign_boxes_to_levels
from normkit.ops import roi_align_reference, roi_pool_reference

IMAGE_H, IMAGE_W = 800, 1216
STRIDES = (4, 8, 16, 32)


def fpn_features(batch=2, channels=3):
    return {f"p{int(math.log2(s))}": torch.randn(batch, channels, IMAGE_H // s, IMAGE_W // s) for s in STRIDES}


def square(cx, cy, side):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def test_level_assignment_hand_computed():
    # sqrt(area) = 224 -> level 4; halving/doubling the side moves one level; clamped to [2, 5].
    boxes = torch.tensor([square(400, 400, s) for s in (224, 112, 448, 56, 10, 2000, 223.9, 0)])
    expected = torch.tensor([4, 3, 5, 2, 2, 5, 3, 2]) - 2
    assert torch.equal(assign_boxes_to_levels(boxes, 2, 5), expected)
    inverted_and_nan = torch.tensor([[10.0, 10, 0, 30], [float("nan"), 0, 5, 5]])
    assert assign_boxes_to_levels(inverted_and_nan, 2, 5).tolist() == [0, 0]


@pytest.mark.parametrize("aligned", [False, True])
def test_matches_per_level_reference(aligned):
    features = fpn_features()
    sides = [20, 60, 100, 150, 230, 300, 500, 700, 900]
    boxes = [torch.tensor([square(300 + 40 * i, 350, s) for i, s in enumerate(sides)]),
             torch.tensor([square(600, 200 + 30 * i, s) for i, s in enumerate(sides[::-1])])]
    pooler = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 5, 2, aligned=aligned)
    out = pooler({**features, "pool": torch.randn(2, 3, 13, 19)}, boxes, [(IMAGE_H, IMAGE_W), (780, 1200)])
    assert out.shape == (18, 3, 5, 5)
    for row, (image, box) in enumerate((i, b) for i in range(2) for b in boxes[i]):
        side = math.sqrt(float((box[2] - box[0]) * (box[3] - box[1])))
        level = min(max(math.floor(4 + math.log2(side / 224) + 1e-6), 2), 5)
        roi = torch.cat([torch.tensor([float(image)]), box])[None]
        expected = roi_align_reference(features[f"p{level}"], roi, 5, 2.0 ** -level, 2, aligned)
        torch.testing.assert_close(out[row:row + 1], expected, atol=1e-5, rtol=1e-5)


def test_level_boundary_tolerance_is_the_documented_eps():
    # floor(4 + log2(sqrt(area) / 224) + 1e-6): a side a hair under 224 * 2^j (rounding) keeps its level, a
    # side clearly under it does not.
    sides = [224 * (1 - 1e-9), 112 * (1 - 1e-9), 224 * (1 - 1e-4), 448 * (1 - 1e-4)]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides], dtype=torch.float64)
    assert (assign_boxes_to_levels(boxes, 2, 5) + 2).tolist() == [4, 3, 3, 4]


def test_single_level_pools_at_that_level_scale():
    features = fpn_features()
    box = torch.tensor([square(400, 300, 90)])
    out = MultiScaleRoIAlign(["p3"], 5, 2)(features, [box], [(IMAGE_H, IMAGE_W)])
    roi = torch.cat([torch.zeros(1, 1), box], 1)
    torch.testing.assert_close(out, roi_align_reference(features["p3"], roi, 5, 1 / 8, 2, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,level", [({"canonical_scale": 112.0}, 4), ({"canonical_level": 5}, 4), ({}, 3)])
def test_canonical_scale_and_level_choose_the_level(kwargs, level):
    # A 160-pixel box: floor(4 + log2(160 / 224)) = 3 by default; with a canonical scale of 112 it is
    # floor(4 + log2(160 / 112)) = 4, and with canonical level 5 floor(5 + log2(160 / 224)) = 4.
    features = fpn_features()
    box = torch.tensor([square(500, 400, 160)])
    out = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 5, 2, **kwargs)(features, [box], [(IMAGE_H, IMAGE_W)])
    roi = torch.cat([torch.zeros(1, 1), box], 1)
    expected = roi_align_reference(features[f"p{level}"], roi, 5, 2.0 ** -level, 2, False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_scale_comes_from_the_largest_image_whatever_its_place_in_the_batch():
    # The batch is padded to the largest image (800 x 1216): a smaller first image must not set the scales.
    features = fpn_features()
    boxes = [torch.zeros(0, 4), torch.tensor([square(600, 400, 100)])]  # side 100: level 2, stride 4
    out = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 5, 2)(features, boxes, [(400, 600), (IMAGE_H, IMAGE_W)])
    roi = torch.cat([torch.ones(1, 1), boxes[1]], 1)
    torch.testing.assert_close(out, roi_align_reference(features["p2"], roi, 5, 1 / 4, 2, False), atol=1e-5, rtol=1e-5)


def test_very_wide_images_take_the_scale_from_their_longer_side():
    # 40 x 1000 padded to 64 x 1024: the height ratio 16 / 40 rounds to stride 2, not 4 (torchvision's choice)
    features = {f"p{int(math.log2(s))}": torch.randn(1, 3, 64 // s, 1024 // s) for s in STRIDES}
    box = torch.tensor([[100.0, 5.0, 400.0, 35.0]])  # sqrt(area) ~ 95: level 2
    out = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 5, 2)(features, [box], [(40, 1000)])
    roi = torch.cat([torch.zeros(1, 1), box], 1)
    torch.testing.assert_close(out, roi_align_reference(features["p2"], roi, 5, 0.25, 2, False), atol=1e-5, rtol=1e-5)


def test_list_features_and_backward():
    features = fpn_features()
    levels = [features[k].requires_grad_(True) for k in ("p2", "p3", "p4", "p5")]
    boxes = [torch.tensor([square(400, 400, 100), square(500, 300, 600)]), torch.zeros(0, 4)]
    pooler = MultiScaleRoIAlign(4, (7, 7), 2)
    out = pooler(levels, boxes, [(IMAGE_H, IMAGE_W)] * 2)
    assert out.shape == (2, 3, 7, 7)
    out.sum().backward()
    # Side 100 -> floor(4 + log2(100 / 224)) = 2, side 600 -> 5: only those levels receive gradient.
    assert levels[0].grad.abs().sum() > 0 and levels[3].grad.abs().sum() > 0
    assert not levels[1].grad.any() and not levels[2].grad.any()
    empty = pooler(levels, [torch.zeros(0, 4), torch.zeros(0, 4)], [(IMAGE_H, IMAGE_W)] * 2)
    assert empty.shape == (0, 3, 7, 7)


def test_bad_input():
    features = fpn_features()
    boxes = [torch.tensor([square(400, 400, 100)])]
    shapes = [(IMAGE_H, IMAGE_W)]
    with pytest.raises(ValueError, match=r"lack levels \['p6'\]"):
        MultiScaleRoIAlign(["p5", "p6"], 7, 2)(features, boxes, shapes)
    with pytest.raises(ValueError, match="consecutive powers of two"):
        MultiScaleRoIAlign(["p2", "p4"], 7, 2)(features, boxes, shapes)
    with pytest.raises(ValueError, match="cannot infer one power-of-two scale"):
        MultiScaleRoIAlign(1, 7, 2)([torch.randn(1, 3, 200, 38)], boxes, shapes)
    with pytest.raises(ValueError, match="expected 4 feature levels, got 2"):
        MultiScaleRoIAlign(4, 7, 2)([features["p2"], features["p3"]], boxes, shapes)
    with pytest.raises(ValueError, match=r"Tensor\[L, 4\]"):
        MultiScaleRoIAlign(["p2"], 7, 2)(features, [torch.zeros(3, 5)], shapes)


def test_modules():
    x = torch.randn(2, 3, 20, 24)
    rois = torch.tensor([[0, 2.0, 3.0, 30.0, 40.0], [1, 10.0, 0.0, 50.0, 60.0]])
    align = RoIAlign((3, 4), 0.5, 2, aligned=True)
    assert repr(align) == "RoIAlign(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=2, aligned=True)"
    torch.testing.assert_close(align(x, rois), roi_align_reference(x, rois, (3, 4), 0.5, 2, True))
    pool = RoIPool(3, 0.5)
    assert repr(pool) == "RoIPool(output_size=(3, 3), spatial_scale=0.5)"
    torch.testing.assert_close(pool(x, rois), roi_pool_reference(x, rois, 3, 0.5))
    # torchvision's repr (its MultiScaleRoIAlign prints exactly these fields).
    assert repr(MultiScaleRoIAlign(["p2"], 7, 2)) == (
        "MultiScaleRoIAlign(featmap_names=['p2'], output_size=(7, 7), sampling_ratio=2)")


def test_half_precision_boxes_get_the_levels_of_float32():
    # a 300 x 300 box has an area above fp16's largest value (65504): computed in fp16 it went to the coarsest level
    boxes = torch.tensor([[0.0, 0.0, 300.0, 300.0], [10.0, 10.0, 40.0, 50.0], [0.0, 0.0, 900.0, 700.0]])
    assert torch.equal(assign_boxes_to_levels(boxes.half(), 2, 5), assign_boxes_to_levels(boxes, 2, 5))
    assert assign_boxes_to_levels(boxes, 2, 5).tolist() == [2, 0, 3]  # levels 4, 2, 5 offset from level 2
