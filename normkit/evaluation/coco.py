"""COCO detection evaluation: model predictions -> COCO results JSON -> pycocotools COCOeval (bbox, segm).

`COCOEvaluator` implements `DatasetEvaluator` for the detection prediction contract: per image a dict with
"boxes" float32 [N, 4] xyxy in original-image pixels, "scores" [N], "labels" int64 [N] (0..K-1) and, for
mask models, "masks" uint8 [N, H, W] at the original image size. It

- maps labels back to COCO category ids through the dataset (`contiguous_to_cat_id`);
- writes boxes as x, y, w, h with w = x2 - x1 + 1 under the legacy (Detectron-1) convention and
  w = x2 - x1 otherwise; masks as compressed RLE;
- in a torch.distributed run gathers every rank's results (each rank evaluates its shard); the main
  process runs COCOeval and every rank returns its numbers;
- writes `bbox_<name>_results.json` and `segmentations_<name>_results.json` (Detectron-1's names) to
  `output_dir` when given;
- runs COCOeval on the images processed (a subset of the annotation file is evaluated as that subset),
  prints the standard 12-number table per task and returns {"bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs",
  "bbox/APm", "bbox/APl", "bbox/AR1", "bbox/AR10", "bbox/AR100", "bbox/ARs", "bbox/ARm", "bbox/ARl",
  "segm/AP", ...} in 0..1 (as COCOeval prints them).

Edge cases: a metric COCOeval cannot compute (-1, e.g. APl when the split has no large object) is reported as
NaN; no detection at all is evaluated like any other result set (0.0 where there is ground truth: nothing is
recalled), with a warning; evaluating without any processed image is an error.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from normkit.engine.distributed import all_gather_objects, is_main_process
from normkit.evaluation.evaluator import DatasetEvaluator

__all__ = ["COCOEvaluator", "COCO_METRICS", "predictions_to_coco_results"]

logger = logging.getLogger(__name__)

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
TASKS = ("bbox", "segm")


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def predictions_to_coco_results(image_id: int, prediction: dict, contiguous_to_cat_id, *,
                                legacy_plus_one: bool = True, with_masks: bool = False,
                                image_size: tuple[int, int] | None = None) -> list[dict]:
    """COCO result dicts ({"image_id", "category_id", "bbox", "score"[, "segmentation"]}) of one image's
    prediction (see the module docstring). `image_size` (h, w), when given, is checked against the masks."""
    boxes = _numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _numpy(prediction["scores"]).astype(np.float64).reshape(-1)
    labels = _numpy(prediction["labels"]).astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: prediction has {len(boxes)} boxes, {len(scores)} scores and "
                         f"{len(labels)} labels; they must match")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(contiguous_to_cat_id)):
        raise ValueError(f"image {image_id}: predicted labels must be in 0..{len(contiguous_to_cat_id) - 1} "
                         f"(contiguous foreground indices), got {labels.min()}..{labels.max()}")
    rles = None
    if with_masks:
        if "masks" not in prediction:
            raise ValueError(f"image {image_id}: segm evaluation needs 'masks' in the predictions; the model "
                             f"gives none (evaluate tasks=('bbox',) for box-only models)")
        masks = _numpy(prediction["masks"])
        if masks.ndim != 3 or masks.shape[0] != len(boxes) or (image_size and masks.shape[1:] != tuple(image_size)):
            raise ValueError(f"image {image_id}: masks must be uint8 [N, H, W] with N = {len(boxes)} and (H, W) the "
                             f"original image size {tuple(image_size) if image_size else ''}, got {list(masks.shape)}")
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
    off = 1.0 if legacy_plus_one else 0.0
    results = []
    for i in range(len(boxes)):
        x1, y1, x2, y2 = boxes[i].tolist()
        result = {"image_id": int(image_id), "category_id": int(contiguous_to_cat_id[labels[i]]),
                  "bbox": [x1, y1, x2 - x1 + off, y2 - y1 + off], "score": float(scores[i])}
        if rles is not None:
            rle = rles[i]
            result["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.append(result)
    return results


class COCOEvaluator(DatasetEvaluator):
    """Box and mask AP of detection predictions against a `COCODetection`'s annotation file.

    Args:
        dataset: the evaluated `normkit.data.coco.COCODetection` (its `coco` index, category mapping and
            conventions are used).
        tasks: any of "bbox", "segm".
        output_dir: where the results JSON files are written (main process), or None.
        legacy_plus_one: result box width convention; default: the dataset's.
        name: the dataset name in the results file names (default: the annotation file's stem).
    """

    def __init__(self, dataset, tasks=("bbox", "segm"), output_dir=None, legacy_plus_one: bool | None = None,
                 name: str | None = None):
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if not tasks or unknown:
            raise ValueError(f"COCOEvaluator tasks must be among {TASKS}, got {tasks}")
        self.dataset = dataset
        self.coco = dataset.coco
        self.tasks = tasks
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.legacy_plus_one = dataset.legacy_plus_one if legacy_plus_one is None else bool(legacy_plus_one)
        self.name = name or Path(str(getattr(dataset, "ann_file", "coco"))).stem
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []
        self._image_ids: list[int] = []

    def process(self, inputs, outputs) -> None:
        image_ids = _numpy(inputs["image_ids"]).reshape(-1).tolist()
        orig_sizes = _numpy(inputs["orig_sizes"]).reshape(-1, 2).tolist() if "orig_sizes" in inputs else None
        if len(outputs) != len(image_ids):
            raise ValueError(f"the model returned {len(outputs)} predictions for a batch of {len(image_ids)} images")
        for i, (image_id, prediction) in enumerate(zip(image_ids, outputs)):
            if image_id not in self.coco.imgs:
                raise KeyError(f"image id {image_id} is not in {self.dataset.ann_file}")
            self._image_ids.append(int(image_id))
            self._results.extend(predictions_to_coco_results(
                image_id, prediction, self.dataset.contiguous_to_cat_id, legacy_plus_one=self.legacy_plus_one,
                with_masks="segm" in self.tasks, image_size=orig_sizes[i] if orig_sizes else None))

    def evaluate(self) -> dict:
        gathered = all_gather_objects((self._image_ids, self._results))
        image_ids = sorted({i for ids, _ in gathered for i in ids})
        results = [r for _, res in gathered for r in res]
        if not image_ids:
            raise RuntimeError("COCOEvaluator.evaluate: no image was processed (is the val loader empty?)")
        metrics, failure = None, None
        if is_main_process():  # one COCOeval run; the other ranks receive its numbers
            try:
                metrics = self._evaluate_on_main(results, image_ids)
            except Exception as exc:  # the other ranks are waiting in the gather below: tell them, then raise
                failure = exc
        metrics, message = all_gather_objects((metrics, None if failure is None else repr(failure)))[0]
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"COCO evaluation failed on rank 0: {message}")
        return metrics

    def _evaluate_on_main(self, results: list[dict], image_ids: list[int]) -> dict:
        if self.output_dir is not None:
            self._write(results)
        metrics, tables = {}, []
        for task in self.tasks:
            stats, table = self._evaluate_task(task, results, image_ids)
            tables.append(table)
            for key, value in zip(COCO_METRICS, stats):
                metrics[f"{task}/{key}"] = float("nan") if value < 0 else float(value)
        # The tables go to stdout once; the log only says what was evaluated (the tools log to stdout
        # too, where both printed every table twice).
        logger.info("COCO evaluation on %d images of %s", len(image_ids), self.name)
        print("\n".join(tables), flush=True)
        return metrics

    def _write(self, results: list[dict]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        files = {"bbox": f"bbox_{self.name}_results.json", "segm": f"segmentations_{self.name}_results.json"}
        for task in self.tasks:
            if task == "segm":
                payload = results
            else:
                payload = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
            path = self.output_dir / files[task]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(payload))
            os.replace(tmp, path)
            logger.info("wrote %d %s results to %s", len(payload), task, path)

    def _evaluate_task(self, task: str, results: list[dict], image_ids: list[int]):
        header = f"{task}: COCOeval on {len(image_ids)} images, {len(results)} detections"
        if not results:
            logger.warning("COCOEvaluator: no detection on %d images", len(image_ids))
        if task == "segm":  # the area used for the size ranges must be the mask's, not the box's
            dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        else:
            dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            coco_dt = self.coco.loadRes(copy.deepcopy(dets)) if dets else self._no_detections()
            evaluator = COCOeval(self.coco, coco_dt, task)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        table = "\n".join(line for line in out.getvalue().splitlines() if line.lstrip().startswith("Average"))
        return [float(s) for s in evaluator.stats], f"{header}\n{table}\n{self._per_class(evaluator)}"

    def _no_detections(self) -> COCO:
        """An empty result index (loadRes refuses an empty list): COCOeval then gives 0 where there is ground
        truth and -1 (NaN here) where a size range has none, as for any other result set."""
        empty = COCO()
        empty.dataset = {"images": self.coco.dataset["images"], "categories": self.coco.dataset["categories"],
                         "annotations": []}
        empty.createIndex()
        return empty

    def _per_class(self, evaluator: COCOeval) -> str:
        """AP per category (IoU .5:.95, all areas, 100 detections), NaN for categories without ground truth."""
        precision = evaluator.eval["precision"]  # [T, R, K, A, M]
        parts = []
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            ap = float(np.mean(p)) if p.size else math.nan
            name = self.dataset.class_names[self.dataset.cat_id_to_contiguous[cat_id]]
            parts.append(f"{name}: {ap:.3f}")
        return "per-class AP: " + ", ".join(parts)
