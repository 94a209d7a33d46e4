"""SegmentationMetric against hand-computed values (ignore pixels, absent classes, dataset-wide sums)."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from normkit.evaluation import SegmentationEvaluator, SegmentationMetric, format_table

# Image A: the ignored pixel (label 255) is predicted 2 and must not count anywhere.
LABEL_A = torch.tensor([[0, 0, 1], [1, 255, 2]])
PRED_A = torch.tensor([[0, 1, 1], [1, 2, 0]])
LABEL_B = torch.tensor([[2, 2], [2, 2]])
PRED_B = torch.tensor([[2, 2], [2, 0]])
# By hand: class 0: I = 1 + 0, U = 3 + 1; class 1: I = 2, U = 3; class 2: I = 0 + 3, U = 1 + 4.
IOU = [1 / 4, 2 / 3, 3 / 5]
PIXEL_ACC = 6 / 9  # correct 3 + 3 of labelled 5 + 4
MIOU = sum(IOU) / 3


def filled(num_classes=3):
    metric = SegmentationMetric(num_classes)
    metric.update(PRED_A, LABEL_A)
    metric.update(PRED_B.unsqueeze(0), LABEL_B.unsqueeze(0))  # batched input works the same
    return metric


def test_hand_computed_values():
    r = filled().compute()
    assert r["per_class_iou"] == pytest.approx(IOU)
    assert r["pixel_acc"] == pytest.approx(PIXEL_ACC)
    assert r["mean_iou"] == pytest.approx(MIOU)
    assert r["score"] == pytest.approx((PIXEL_ACC + MIOU) / 2)
    assert r["num_pixels"] == 9
    # per-image IoUs averaged would give class 0: (1/3 + 0)/2, class 2: (0 + 3/4)/2 — not what we report
    per_image_mean = ((1 / 3 + 0) / 2 + 2 / 3 + (0 + 3 / 4) / 2) / 3
    assert abs(r["mean_iou"] - per_image_mean) > 0.05


def test_absent_class_is_excluded_from_the_mean():
    r = filled(num_classes=5).compute()
    assert math.isnan(r["per_class_iou"][3]) and math.isnan(r["per_class_iou"][4])
    assert r["mean_iou"] == pytest.approx(MIOU)


def test_class_only_predicted_counts_with_iou_zero():
    metric = SegmentationMetric(3)
    metric.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    r = metric.compute()
    assert r["per_class_iou"][0] == pytest.approx(0.5) and r["per_class_iou"][2] == 0
    assert math.isnan(r["per_class_iou"][1]) and r["mean_iou"] == pytest.approx(0.25)


def test_reset_and_empty():
    metric = filled()
    metric.reset()
    metric.update(torch.tensor([1]), torch.tensor([255]))
    r = metric.compute()
    assert math.isnan(r["mean_iou"]) and math.isnan(r["pixel_acc"]) and r["num_pixels"] == 0


def test_bad_input():
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="shapes differ"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"label values must be in 0..2 or 255, got \[7\]"):
        metric.update(torch.zeros(2), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="predicted classes must be in 0..2"):
        metric.update(torch.tensor([0, 3]), torch.zeros(2))


def test_format_table():
    r = filled(num_classes=4).compute()
    table = format_table(r, ["wall", "floor", "ball", "box"])
    lines = table.splitlines()
    assert any(line.split() == ["floor", "66.67"] for line in lines)
    assert any(line.split() == ["box", "n/a"] for line in lines)
    assert any(line.split() == ["mIoU", f"{100 * MIOU:.2f}"] for line in lines)
    assert any(line.split() == ["pixel", "acc", f"{100 * PIXEL_ACC:.2f}"] for line in lines)
    with pytest.raises(ValueError, match="2 class names for 4 classes"):
        format_table(r, ["a", "b"])


def _all_reduce_worker(rank, init_file, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    metric = SegmentationMetric(3)
    if rank == 0:
        metric.update(PRED_A, LABEL_A)
    else:
        metric.update(PRED_B, LABEL_B)
    metric.all_reduce()
    evaluator = SegmentationEvaluator(3)
    evaluator.metric.update(PRED_A if rank == 0 else PRED_B, LABEL_A if rank == 0 else LABEL_B)
    first, second = evaluator.evaluate(), evaluator.evaluate()  # the second must not sum the ranks again
    queue.put((rank, (metric.compute(), first, second)))
    torch.distributed.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_all_reduce_worker, args=(os.fspath(tmp_path / "init"), queue), nprocs=2)
    results = dict(queue.get() for _ in range(2))
    for r, first, second in results.values():
        assert r["per_class_iou"] == pytest.approx(IOU) and r["pixel_acc"] == pytest.approx(PIXEL_ACC)
        assert first == r and second == r
