"""What differs between tasks when training and testing: the loaders, the evaluator and the report.

A task is chosen from the config (`task_for(cfg)`); the trainer, the hooks and the command-line tools stay
the same for every task. Each task checks its `evaluation:` section and builds its val split when created;
`train_set()` builds (and checks) the training split.
"""
from __future__ import annotations

import math

from normkit.data import build_dataset, build_train_loader, build_val_loader
from normkit.data.detection import build_coco_dataset, build_coco_train_loader, build_coco_val_loader
from normkit.evaluation import evaluate, format_table, inference_on_dataset, results_to_json
from normkit.evaluation.coco import COCOEvaluator
from normkit.evaluation.sem_seg import check_eval_config
from normkit.schema import check_keys

__all__ = ["SegmentationTask", "DetectionTask", "TASKS", "task_for"]


class SegmentationTask:
    """Semantic segmentation: ADE20K, VOC, Pascal Context (the `data.dataset` names of normkit.data)."""

    name = "segmentation"

    def __init__(self, cfg: dict, *, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.cfg, self.rank, self.world_size, self.num_workers = cfg, rank, world_size, num_workers
        self.check_eval_config(cfg.get("evaluation"))
        self._train_set = None
        self.val_loader = build_val_loader(cfg["data"], rank=rank, world_size=world_size, num_workers=num_workers)
        model_classes, data_classes = (cfg.get("model") or {}).get("num_classes"), cfg["data"]["num_classes"]
        if model_classes is not None and model_classes != data_classes:
            raise ValueError(f"model.num_classes ({model_classes}) differs from data.num_classes ({data_classes}): "
                             "the model must predict exactly the dataset's classes")
        self.class_names = tuple(self.val_loader.dataset.class_names)

    @staticmethod
    def check_eval_config(eval_cfg: dict | None) -> None:
        check_eval_config(eval_cfg)

    def train_set(self):
        """The training split, built (and its files checked) on first use."""
        if self._train_set is None:
            self._train_set = build_dataset(self.cfg["data"], "train")
        return self._train_set

    def train_batches(self, start_batch: int, *, batch_size: int, seed: int):
        """The rank's training batches from micro-batch `start_batch` on (deterministic in seed and position)."""
        return build_train_loader(self.cfg["data"], batch_size, rank=self.rank, world_size=self.world_size,
                                  seed=seed, start_iter=start_batch, num_workers=self.num_workers,
                                  dataset=self.train_set())

    def evaluate(self, model, eval_cfg: dict | None = None) -> dict:
        """Dataset-wide metrics of `model` on the val split (collective under torch.distributed)."""
        return evaluate(model, self.val_loader, self.cfg["evaluation"] if eval_cfg is None else eval_cfg)

    def report(self, results: dict) -> str:
        """The per-class table and the summary line."""
        return (f"{format_table(results, self.class_names)}\n"
                f"mIoU {results['mean_iou']:.4f}  pixel acc {results['pixel_acc']:.4f}  score {results['score']:.4f}")

    @staticmethod
    def to_json(results: dict) -> dict:
        return results_to_json(results)



class DetectionTask:
    """Object detection and instance segmentation on COCO-format data (`data.dataset: coco`).

    `evaluation:` keys: `tasks` (default bbox, plus segm when `data.mask_on`) and `output_dir` (where the
    COCO results JSON files go; default: not written)."""

    name = "detection"
    EVAL_KEYS = ("tasks", "output_dir")

    def __init__(self, cfg: dict, *, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.cfg, self.rank, self.world_size, self.num_workers = cfg, rank, world_size, num_workers
        self.check_eval_config(cfg.get("evaluation"))
        self._train_set = None
        self.val_set = build_coco_dataset(cfg["data"], "val")
        self.val_loader = build_coco_val_loader(cfg["data"], rank=rank, world_size=world_size,
                                                num_workers=num_workers, dataset=self.val_set)
        self.class_names = tuple(self.val_set.class_names)

    @classmethod
    def check_eval_config(cls, eval_cfg: dict | None) -> None:
        """Segmentation options (scales, flip, sliding window: tools/test.py flags) have no detection meaning;
        ignoring them would report numbers of another setting than the one asked for."""
        check_keys(eval_cfg or {}, cls.EVAL_KEYS, "evaluation")

    def train_set(self):
        """The training split, built (and its files checked) on first use."""
        if self._train_set is None:
            self._train_set = build_coco_dataset(self.cfg["data"], "train")
        return self._train_set

    def train_batches(self, start_batch: int, *, batch_size: int, seed: int):
        return build_coco_train_loader(self.cfg["data"], batch_size, rank=self.rank, world_size=self.world_size,
                                       seed=seed, start_iter=start_batch, num_workers=self.num_workers,
                                       dataset=self.train_set())

    def evaluate(self, model, eval_cfg: dict | None = None) -> dict:
        eval_cfg = dict(self.cfg.get("evaluation") or {}) if eval_cfg is None else dict(eval_cfg)
        self.check_eval_config(eval_cfg)
        default_tasks = ("bbox", "segm") if self.cfg["data"].get("mask_on") else ("bbox",)
        evaluator = COCOEvaluator(self.val_set, tasks=eval_cfg.get("tasks", default_tasks),
                                  output_dir=eval_cfg.get("output_dir"))
        return inference_on_dataset(model, self.val_loader, evaluator)

    def report(self, results: dict) -> str:
        lines = []
        for kind in ("bbox", "segm"):
            if f"{kind}/AP" in results:
                lines.append(f"{kind}: AP {results[f'{kind}/AP']:.4f}  AP50 {results[f'{kind}/AP50']:.4f}  "
                             f"AP75 {results[f'{kind}/AP75']:.4f}")
        return "\n".join(lines)

    @staticmethod
    def to_json(results: dict) -> dict:
        return {k: (v if math.isfinite(v) else None) for k, v in results.items() if isinstance(v, (int, float))}


TASKS = {"segmentation": SegmentationTask, "detection": DetectionTask}
# Datasets of other tasks than segmentation (the default).
DATASET_TASKS = {"coco": "detection"}


def task_for(cfg: dict) -> type:
    """The task class of a config, from its `data.dataset`."""
    name = DATASET_TASKS.get((cfg.get("data") or {}).get("dataset"), "segmentation")
    if name not in TASKS:
        raise ValueError(f"data.dataset {cfg['data']['dataset']!r} needs the {name} task, which is not available")
    return TASKS[name]
