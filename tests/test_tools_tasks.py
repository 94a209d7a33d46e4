"""normkit.tools.tasks: what the training and test tools get from a task (rank-sharded data, evaluation, JSON)."""
import math

import pytest

from coco_helpers import PYCOCOTOOLS_NUMPY2_WARNING, mini_coco
from normkit.data import MINI_ADE_CLASSES, generate_mini_ade
from normkit.tools import tasks
from normkit.tools.tasks import DetectionTask, SegmentationTask

pytestmark = pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2_WARNING)


@pytest.fixture(scope="module")
def seg_cfg(tmp_path_factory):
    root = generate_mini_ade(tmp_path_factory.mktemp("ade"), num_train=12, num_val=2, size=40)
    train = {"pipeline": "mmseg", "scale": [80, 40], "ratio_range": [0.5, 2.0], "crop_size": [32, 24]}
    return {"data": {"dataset": "ade20k", "root": str(root), "num_classes": len(MINI_ADE_CLASSES), "train": train}}


@pytest.fixture(scope="module")
def det_cfg(tmp_path_factory):
    root = mini_coco(tmp_path_factory.mktemp("coco") / "mini", num_train=12, num_val=2, size=64)
    return {"data": {"dataset": "coco", "root": str(root), "mask_on": True,
                     "train": {"short_sides": [48], "max_size": 64}, "val": {"short_side": 48, "max_size": 64}}}


def _take(batches, steps):
    return [next(batches) for _ in range(steps)]


def test_segmentation_ranks_train_on_their_own_slice_of_the_global_batch(seg_cfg):
    ranks = [[b["meta"]["indices"] for b in _take(SegmentationTask(seg_cfg, rank=r, world_size=2).train_batches(
        2, batch_size=2, seed=3), 3)] for r in range(2)]
    single = [b["meta"]["indices"] for b in _take(SegmentationTask(seg_cfg).train_batches(2, batch_size=4, seed=3), 3)]
    assert [a + b for a, b in zip(*ranks)] == single


def test_detection_ranks_never_train_on_the_same_images(det_cfg):
    ranks = [[b["image_ids"].tolist() for b in _take(DetectionTask(det_cfg, rank=r, world_size=2).train_batches(
        0, batch_size=2, seed=3), 6)] for r in range(2)]
    assert all(not set(a) & set(b) for a, b in zip(*ranks))


@pytest.mark.parametrize("mask_on, expected", [(True, ("bbox", "segm")), (False, ("bbox",))])
def test_detection_evaluates_masks_by_default_when_the_data_has_them(det_cfg, monkeypatch, mask_on, expected):
    monkeypatch.setattr(tasks, "inference_on_dataset", lambda model, loader, evaluator: evaluator.tasks)
    cfg = {**det_cfg, "data": {**det_cfg["data"], "mask_on": mask_on}}
    assert DetectionTask(cfg).evaluate(model=None) == expected
    assert DetectionTask(cfg).evaluate(model=None, eval_cfg={"tasks": ["segm"]}) == ("segm",)


def test_detection_results_json_has_null_for_metrics_cocoeval_cannot_compute():
    saved = DetectionTask.to_json({"bbox/AP": 0.5, "bbox/APl": math.nan, "bbox/count": 3, "note": "x"})
    assert saved == {"bbox/AP": 0.5, "bbox/APl": None, "bbox/count": 3}
