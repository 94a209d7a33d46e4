"""COCOEvaluator: ground truth scores AP 1.0, results files round-trip, crowd regions ignored, edge cases."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools.cocoeval import COCOeval

import normkit.evaluation.coco as coco_eval
from normkit.data.detection import build_coco_val_loader
from normkit.engine.distributed import destroy_distributed, init_distributed
from normkit.evaluation.coco import COCO_METRICS, COCOEvaluator
from normkit.evaluation.det_visualize import draw_detections

from coco_helpers import PYCOCOTOOLS_NUMPY2_WARNING, batch_of, gt_prediction, mini_coco, val_dataset

pytestmark = pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2_WARNING)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return mini_coco(tmp_path_factory.mktemp("coco") / "mini", num_train=8, num_val=40, size=96)


def run(evaluator, dataset, predict, batch=2):
    evaluator.reset()
    for start in range(0, len(dataset), batch):
        indices = list(range(start, min(start + batch, len(dataset))))
        evaluator.process(batch_of(dataset, indices), [predict(i) for i in indices])
    return evaluator.evaluate()


@pytest.mark.parametrize("legacy", [True, False])
def test_ground_truth_as_predictions_scores_one(root, legacy, capsys):
    ds = val_dataset(root, legacy)
    assert ds.records and any(r["iscrowd"].any() for r in ds.records)  # crowd regions are part of the test
    results = run(COCOEvaluator(ds), ds, lambda i: gt_prediction(ds, i))
    assert set(results) == {f"{t}/{m}" for t in ("bbox", "segm") for m in COCO_METRICS}
    for task in ("bbox", "segm"):
        assert results[f"{task}/AP"] == pytest.approx(1.0)
        assert results[f"{task}/AP50"] == pytest.approx(1.0) and results[f"{task}/AR100"] == pytest.approx(1.0)
    assert np.isnan(results["bbox/APl"])  # no large objects: COCOeval's -1 is reported as NaN
    printed = capsys.readouterr().out
    assert printed.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000") == 2


def test_results_file_round_trips_through_pycocotools(root, tmp_path):
    ds = val_dataset(root, legacy_plus_one=True)
    rng = np.random.default_rng(0)

    def noisy(i):  # imperfect predictions so the round trip is checked on non-trivial numbers
        p = gt_prediction(ds, i, score=0.9)
        p["boxes"] = p["boxes"] + torch.from_numpy(rng.normal(0, 1.5, p["boxes"].shape).astype(np.float32))
        p["scores"] = torch.from_numpy(rng.uniform(0.1, 1.0, len(p["scores"])).astype(np.float32))
        return p

    results = run(COCOEvaluator(ds, output_dir=tmp_path), ds, noisy)
    assert 0.2 < results["bbox/AP"] < 1.0
    bbox_file = tmp_path / "bbox_instances_val2017_results.json"
    segm_file = tmp_path / "segmentations_instances_val2017_results.json"
    dets = json.loads(bbox_file.read_text())
    assert dets and {"image_id", "category_id", "bbox", "score"} == set(dets[0])
    assert {d["category_id"] for d in dets} <= {1, 2, 4, 7}  # COCO ids, not contiguous labels
    for task, path in (("bbox", bbox_file), ("segm", segm_file)):
        coco_dt = ds.coco.loadRes(str(path))
        ev = COCOeval(ds.coco, coco_dt, task)
        ev.params.imgIds = sorted(r["image_id"] for r in ds.records)
        ev.evaluate(), ev.accumulate(), ev.summarize()
        for key, value in zip(COCO_METRICS, ev.stats):
            expected = results[f"{task}/{key}"]
            assert (np.isnan(expected) and value == -1) or value == pytest.approx(expected)


def test_legacy_width_convention(root):
    ds = val_dataset(root)
    pred = {"boxes": torch.tensor([[10.0, 20.0, 29.0, 49.0]]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([3]), "masks": torch.zeros(1, 4, 5, dtype=torch.uint8)}
    legacy = coco_eval.predictions_to_coco_results(7, pred, ds.contiguous_to_cat_id, legacy_plus_one=True)
    plain = coco_eval.predictions_to_coco_results(7, pred, ds.contiguous_to_cat_id, legacy_plus_one=False,
                                                  with_masks=True)
    assert legacy[0]["bbox"] == [10.0, 20.0, 20.0, 30.0] and legacy[0]["category_id"] == 7
    assert plain[0]["bbox"] == [10.0, 20.0, 19.0, 29.0]
    assert plain[0]["segmentation"]["size"] == [4, 5] and isinstance(plain[0]["segmentation"]["counts"], str)


def test_crowd_regions_are_ignored(root):
    ds = val_dataset(root)
    crowd = {i: r["boxes"][r["iscrowd"]] for i, r in enumerate(ds.records) if r["iscrowd"].any()}
    assert crowd

    def with_extra(i, on_crowd):
        p = gt_prediction(ds, i, score=0.5)
        if i not in crowd:
            return p
        r = ds.records[i]
        box = crowd[i][:1] if on_crowd else torch.tensor([[0.0, 0.0, 6.0, 6.0]]).numpy()  # crowd / background
        m = np.zeros((1, r["height"], r["width"]), np.uint8)
        if on_crowd:  # the crowd's own pixels: a detection there is matched to the ignore region at every IoU
            ann = next(a for a in ds.coco.imgToAnns[r["image_id"]] if a["iscrowd"])
            m[0] = ds.coco.annToMask(ann)
        else:
            x1, y1, x2, y2 = box[0].astype(int)
            m[0, y1:y2 + 1, x1:x2 + 1] = 1
        return {"boxes": torch.cat([torch.from_numpy(box), p["boxes"]]),
                "scores": torch.cat([torch.tensor([0.99]), p["scores"]]),
                "labels": torch.cat([torch.tensor([1]), p["labels"]]),  # the crowd's class (ellipse)
                "masks": torch.cat([torch.from_numpy(m), p["masks"]])}

    ignored = run(COCOEvaluator(ds), ds, lambda i: with_extra(i, True))
    assert ignored["bbox/AP"] == pytest.approx(1.0) and ignored["segm/AP"] == pytest.approx(1.0)
    # The same high-scoring extra detections on background are false positives and cost AP.
    counted = run(COCOEvaluator(ds), ds, lambda i: with_extra(i, False))
    assert counted["bbox/AP"] < 0.995 and counted["segm/AP"] < 0.995, counted


def empty_prediction(ds, i):
    r = ds.records[i]
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, r["height"], r["width"], dtype=torch.uint8)}


def test_empty_predictions_give_zero(root, tmp_path):
    ds = val_dataset(root)
    results = run(COCOEvaluator(ds, output_dir=tmp_path), ds, lambda i: empty_prediction(ds, i))
    # 0 where there is ground truth; NaN (COCOeval's -1) where a size range has none, as for any other results
    undefined = {k for k, v in run(COCOEvaluator(ds), ds, lambda i: gt_prediction(ds, i)).items() if np.isnan(v)}
    assert undefined and {k for k, v in results.items() if np.isnan(v)} == undefined
    assert all(v == 0.0 for k, v in results.items() if k not in undefined)
    assert json.loads((tmp_path / "bbox_instances_val2017_results.json").read_text()) == []
    # Empty predictions on some images only: evaluated as misses there.
    half = run(COCOEvaluator(ds), ds, lambda i: empty_prediction(ds, i) if i % 2 else gt_prediction(ds, i))
    assert 0.2 < half["bbox/AR100"] < 0.8


def test_bad_predictions_and_misuse_give_clear_errors(root):
    ds = val_dataset(root)
    ev = COCOEvaluator(ds)
    with pytest.raises(RuntimeError, match="no image was processed"):
        ev.evaluate()
    bad = gt_prediction(ds, 0)
    bad["labels"] = torch.full_like(bad["labels"], 4)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.3"):
        ev.process(batch_of(ds, [0]), [bad])
    no_masks = {k: v for k, v in gt_prediction(ds, 0).items() if k != "masks"}
    with pytest.raises(ValueError, match="segm evaluation needs 'masks'"):
        ev.process(batch_of(ds, [0]), [no_masks])
    COCOEvaluator(ds, tasks=("bbox",)).process(batch_of(ds, [0]), [no_masks])  # fine for box-only models
    wrong_size = gt_prediction(ds, 0)
    wrong_size["masks"] = wrong_size["masks"][:, :-1]
    with pytest.raises(ValueError, match="original image size"):
        ev.process(batch_of(ds, [0]), [wrong_size])
    with pytest.raises(KeyError, match="not in"):
        ev.process({"image_ids": torch.tensor([123456789])}, [bad])
    with pytest.raises(ValueError, match="tasks must be among"):
        COCOEvaluator(ds, tasks=("keypoints",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world_size: int, port: int, root: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed("cpu")
    ds = val_dataset(root)
    loader = build_coco_val_loader({"root": root, "mask_on": True, "val": {"short_side": 96, "max_size": 200}},
                                   rank=rank, world_size=world_size, dataset=ds)
    index = {r["image_id"]: i for i, r in enumerate(ds.records)}
    ev = COCOEvaluator(ds, tasks=("bbox",), output_dir=out_dir)
    results = {}
    for scenario in ("all", "rank0"):  # every rank finds its ground truth / only rank 0 does
        ev.reset()
        for batch in loader:
            i = index[int(batch["image_ids"][0])]
            ev.process(batch, [gt_prediction(ds, i) if scenario == "all" or rank == 0 else empty_prediction(ds, i)])
        results[scenario] = ev.evaluate()
    # COCOeval failing on rank 0 must reach every rank as an error, not leave them waiting for its numbers
    ev._evaluate_task = lambda *args: (_ for _ in ()).throw(OSError("disk full"))
    try:
        ev.evaluate()
    except (OSError, RuntimeError) as exc:
        results["failure"] = f"{type(exc).__name__}: {exc}"
    destroy_distributed()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_distributed_evaluation_gathers_the_shards(root, tmp_path):
    """Two gloo processes each evaluate their shard; both return the dataset-wide numbers."""
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["failure"] == "OSError: disk full"
    assert ranks[1]["failure"] == "RuntimeError: COCO evaluation failed on rank 0: OSError('disk full')"
    assert {k: v for k, v in ranks[0].items() if k != "failure"} == {k: v for k, v in ranks[1].items()
                                                                     if k != "failure"}
    assert ranks[0]["all"]["bbox/AP"] == pytest.approx(1.0)
    assert 0.2 < ranks[0]["rank0"]["bbox/AR100"] < 0.8  # rank 1's images count as misses
    written = json.loads((tmp_path / "bbox_instances_val2017_results.json").read_text())
    assert {d["image_id"] for d in written} < {r["image_id"] for r in val_dataset(root).records}  # last: rank 0 only


def test_draw_detections(root):
    ds = val_dataset(root)
    i = next(i for i, r in enumerate(ds.records) if (~r["iscrowd"]).sum() >= 1)
    image = ds[i]["image"]
    pred = gt_prediction(ds, i)
    pred["scores"] = torch.linspace(0.9, 0.6, len(pred["scores"]))
    out = draw_detections(image, pred, ds.class_names, score_threshold=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8 and (out != image).any()
    assert (image == ds[i]["image"]).all()  # the input is not modified
    x1, y1, x2, y2 = pred["boxes"][0].round().int().tolist()
    assert (out[y1, x1:x2 + 1] != image[y1, x1:x2 + 1]).any()  # the box outline
    silent = draw_detections(image, pred, ds.class_names, score_threshold=0.95)
    assert (silent == image).all()
    with pytest.raises(ValueError, match="uint8 RGB"):
        draw_detections(image.astype(np.float32), pred, ds.class_names)


class _Oracle(torch.nn.Module):
    """Returns the batch's own non-crowd targets as predictions, mapped back to original pixels."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        out = []
        for target, scale in zip(batch["targets"], batch["scales"]):
            keep = ~target["iscrowd"]
            out.append({"boxes": target["boxes"][keep] / scale, "scores": torch.ones(int(keep.sum())),
                        "labels": target["labels"][keep]})
        return out


def test_val_loader_and_inference_on_dataset(root):
    from normkit.evaluation import inference_on_dataset
    cfg = {"root": str(root), "val": {"short_side": 150, "max_size": 300, "batch_size": 3}}
    loader = build_coco_val_loader(cfg)
    results = inference_on_dataset(_Oracle(), loader, COCOEvaluator(loader.dataset.dataset, tasks=("bbox",)))
    assert results["bbox/AP"] == pytest.approx(1.0)


def test_a_subset_of_the_images_is_evaluated_as_that_subset(root):
    # the ground truth of images never processed (a val shard, a truncated run) must not count as missed
    ds = val_dataset(root, legacy_plus_one=True)
    evaluator = COCOEvaluator(ds, tasks=("bbox",))
    indices = list(range(10))
    evaluator.process(batch_of(ds, indices), [gt_prediction(ds, i) for i in indices])
    results = evaluator.evaluate()
    assert results["bbox/AP"] == pytest.approx(1.0) and results["bbox/AR100"] == pytest.approx(1.0)
