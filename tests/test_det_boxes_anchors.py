"""Boxes, box coder and anchors against hand-computed values."""
import math

import pytest
import torch

from normkit.models.detection import AnchorGenerator, BoxCoder, box_area, box_iou, clip_boxes, smooth_l1_loss
from normkit.models.detection.anchors import d2_cell_anchors, detectron_cell_anchors
from normkit.models.detection.boxes import check_boxes


def test_area_and_iou_in_both_conventions():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[5.0, 5.0, 14.0, 14.0]])
    assert box_area(a, legacy_plus_one=True).item() == 100
    assert box_area(a, legacy_plus_one=False).item() == 81
    # legacy: intersection 5x5 = 25, union 175
    assert box_iou(a, b, legacy_plus_one=True).item() == pytest.approx(25 / 175)
    # no +1: intersection 4x4 = 16, union 81 + 81 - 16
    assert box_iou(a, b, legacy_plus_one=False).item() == pytest.approx(16 / 146)
    # touching boxes overlap by one pixel only in the legacy convention
    c = torch.tensor([[9.0, 0.0, 18.0, 9.0]])
    assert box_iou(a, c, legacy_plus_one=True).item() == pytest.approx(10 / 190)
    assert box_iou(a, c, legacy_plus_one=False).item() == 0


def test_clip_both_conventions_and_tiled():
    boxes = torch.tensor([[-5.0, -1.0, 120.0, 70.0, 3.0, 4.0, 200.0, 10.0]])
    assert clip_boxes(boxes, (60, 100), legacy_plus_one=True).tolist() == [[0, 0, 99, 59, 3, 4, 99, 10]]
    assert clip_boxes(boxes, (60, 100), legacy_plus_one=False).tolist() == [[0, 0, 100, 60, 3, 4, 100, 10]]


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(legacy, weights):
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(50, 2, generator=gen) * 100
    ref = torch.cat((ref, ref + 5 + torch.rand(50, 2, generator=gen) * 80), dim=1).double()
    tgt = torch.rand(50, 2, generator=gen) * 100
    tgt = torch.cat((tgt, tgt + 5 + torch.rand(50, 2, generator=gen) * 80), dim=1).double()
    coder = BoxCoder(weights, legacy_plus_one=legacy)
    assert torch.allclose(coder.decode(ref, coder.encode(ref, tgt)), tgt, atol=1e-9)


def test_legacy_decode_by_hand():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0), legacy_plus_one=True)
    ref = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w 10, h 20, centre (5, 10)
    deltas = torch.tensor([[10.0, 0.0, 5 * math.log(2.0), 0.0]])  # dx 1 -> centre 15; w x2 -> 20
    assert coder.decode(ref, deltas).tolist() == [[5.0, 0.0, 24.0, 19.0]]  # x2 = 15 + 10 - 1
    plain = BoxCoder((10.0, 10.0, 5.0, 5.0), legacy_plus_one=False)
    assert plain.decode(ref, deltas)[0].tolist() == pytest.approx([4.5, 0.0, 22.5, 19.0])  # w 9 -> 18, centre 13.5


def test_decode_clamps_log_scale():
    coder = BoxCoder(legacy_plus_one=False)
    out = coder.decode(torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([[0.0, 0.0, 100.0, 100.0]]))
    assert (out[0, 2] - out[0, 0]).item() == pytest.approx(1000.0, rel=1e-5)


def test_decode_of_mixed_precision_deltas_is_float32():
    # Under autocast the heads' deltas are bf16/fp16; boxes at 1000-px coordinates need float32 (bf16 steps by 8 px).
    coder = BoxCoder(legacy_plus_one=False)
    reference = torch.tensor([[1000.5, 700.25, 1234.5, 900.75]])
    deltas = torch.tensor([[0.1, -0.2, 0.05, 0.3]]).to(torch.bfloat16)
    out = coder.decode(reference, deltas)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, coder.decode(reference, deltas.float()), rtol=0, atol=0)


def test_smooth_l1():
    x = torch.tensor([0.05, 0.5, -2.0])
    assert smooth_l1_loss(x, torch.zeros(3), 1.0 / 9).tolist() == pytest.approx(
        [0.5 * 0.05 ** 2 * 9, 0.5 - 0.5 / 9, 2.0 - 0.5 / 9])
    assert smooth_l1_loss(x, torch.zeros(3), 0.0).tolist() == pytest.approx([0.05, 0.5, 2.0])


def test_check_boxes_rejects_degenerate_and_nan():
    with pytest.raises(ValueError, match="degenerate"):
        check_boxes(torch.tensor([[5.0, 5.0, 4.0, 9.0]]), "gt")
    with pytest.raises(ValueError, match="non-finite"):
        check_boxes(torch.tensor([[float("nan"), 5.0, 4.0, 9.0]]), "gt")
    with pytest.raises(ValueError, match=r"Tensor\[K, 4\]"):
        check_boxes(torch.zeros(3, 5), "gt")


def test_detectron_fpn_p2_anchors():
    assert detectron_cell_anchors(4, (32,), (0.5, 1.0, 2.0)).tolist() == [
        [-22, -10, 25, 13], [-14, -14, 17, 17], [-10, -22, 13, 25]]


def test_detectron_c4_anchors_ratio_major():
    cell = detectron_cell_anchors(16, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    assert cell.shape == (15, 4)
    # index r * 5 + s: the classic py-faster-rcnn table
    assert cell[0].tolist() == [-15, -4, 30, 19]       # ratio 0.5, size 32
    assert cell[2].tolist() == [-84, -40, 99, 55]      # ratio 0.5, size 128
    assert cell[7].tolist() == [-56, -56, 71, 71]      # ratio 1, size 128
    assert cell[12].tolist() == [-36, -80, 51, 95]     # ratio 2, size 128
    assert cell[9].tolist() == [-248, -248, 263, 263]  # ratio 1, size 512


def test_d2_anchors_size_major_exact():
    cell = d2_cell_anchors((32, 64), (0.5, 1.0, 2.0))
    w = math.sqrt(32 * 32 / 0.5)
    assert cell[0].tolist() == pytest.approx([-w / 2, -w * 0.25, w / 2, w * 0.25])
    assert cell[1].tolist() == pytest.approx([-16, -16, 16, 16])
    assert cell[4].tolist() == pytest.approx([-32, -32, 32, 32])  # size 64 after the 3 ratios of 32


def test_generator_grid_order_and_offset():
    gen = AnchorGenerator((4, 8), ((32,), (64,)))
    p2, p3 = gen([(2, 3), (1, 2)])
    assert p2.shape == (2 * 3 * 3, 4) and p3.shape == (1 * 2 * 3, 4)
    # (H, W, A) order: second position is x + stride
    assert (p2[3] - p2[0]).tolist() == [4, 0, 4, 0]
    assert (p2[9] - p2[0]).tolist() == [0, 4, 0, 4]
    d2 = AnchorGenerator((16,), ((32,),), (1.0,), style="d2", offset=0.5)
    assert d2([(1, 1)])[0].tolist() == [[-8, -8, 24, 24]]
    with pytest.raises(ValueError, match="offset"):
        AnchorGenerator((16,), ((32,),), style="detectron", offset=0.5)


def test_decode_clamps_the_log_height_too():
    coder = BoxCoder(legacy_plus_one=False)
    out = coder.decode(torch.tensor([[0.0, 0.0, 16.0, 32.0]]), torch.tensor([[0.0, 0.0, 0.0, 100.0]]))
    assert (out[0, 3] - out[0, 1]).item() == pytest.approx(32 * 1000 / 16, rel=1e-5)  # exp(log(1000 / 16)) * 32
    assert (out[0, 2] - out[0, 0]).item() == pytest.approx(16.0)


def test_encode_by_hand_with_distinct_weights():
    # each weight multiplies its own delta: (wx, wy, ww, wh) = (1, 2, 3, 4)
    coder = BoxCoder((1.0, 2.0, 3.0, 4.0), legacy_plus_one=True)
    ref = torch.tensor([[0.0, 0.0, 9.0, 19.0]], dtype=torch.float64)     # w 10, h 20, centre (5, 10)
    tgt = torch.tensor([[5.0, 0.0, 24.0, 79.0]], dtype=torch.float64)    # w 20, h 80, centre (15, 40)
    assert coder.encode(ref, tgt)[0].tolist() == pytest.approx([1 * 10 / 10, 2 * 30 / 20, 3 * math.log(2),
                                                                4 * math.log(4)])
    assert coder.decode(ref, coder.encode(ref, tgt))[0].tolist() == pytest.approx(tgt[0].tolist())


def test_smooth_l1_with_beta_zero_is_l1_with_finite_gradients():
    # detectron2 uses beta 0: the loss and its gradient are those of |x|, without 0 / 0 from the quadratic branch
    x = torch.tensor([0.05, -0.5, 2.0, 0.0], requires_grad=True)
    loss = smooth_l1_loss(x, torch.zeros(4), 0.0)
    loss.sum().backward()
    assert loss.tolist() == pytest.approx([0.05, 0.5, 2.0, 0.0])
    assert x.grad.tolist() == [1.0, -1.0, 1.0, 0.0]
