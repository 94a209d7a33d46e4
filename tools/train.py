#!/usr/bin/env python
"""Train a segmentation config, then evaluate it on the val split and print the metrics table.

    python tools/train.py --config configs/mini/r18d8_sn_c1_deepsup.yaml [--work-dir DIR] [--resume]
                          [--set train.max_iter=100 train.amp=bf16 ...]
    torchrun --nproc_per_node N tools/train.py --config ...        (same command, DDP; NCCL on GPU, gloo on CPU)

The `train:` section (defaults shown)::

    train:
      device: auto               # auto | cpu | cuda
      seed: 0
      max_iter: 1000             # optimizer steps
      batch_size: 8              # images per process per micro-batch
      iter_size: 1               # micro-batches accumulated per optimizer step
      num_workers: 0             # data-loader worker processes per rank
      amp: null                  # null | bf16 | fp16 (fp16 adds a GradScaler)
      sync_norm: false           # under DDP: BatchNorm -> SyncBatchNorm, SwitchNorm -> SyncSwitchNorm
      find_unused_parameters: false
      optimizer: {name: sgd, lr: 0.02, momentum: 0.9, weight_decay: 1.0e-4, lr_mult: {}}   # normkit.engine.build_optimizer
      lr_schedule: {policy: poly, power: 0.9, min_lr: 0.0}                               # normkit.engine.build_lr_scheduler
      checkpoint_period: 0       # iterations between checkpoints (0: only at the end)
      max_keep: 3                # iteration checkpoints kept; latest.pth always names the newest
      eval_period: 0             # iterations between evaluations on val (0: only at the end)
      log_period: 20             # iterations between metrics.jsonl / tensorboard records
      tensorboard: true

The work dir receives config.yaml, iter_*.pth, latest.pth, metrics.jsonl, tensorboard/ and eval_results.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP workers sleep instead of spinning. On a CPU shared with other jobs,
# spinning workers wait for descheduled peers at every parallel op (measured here on 2 busy cores: a ResNet-18
# step 4.5 s spinning vs 0.6 s sleeping, eval 1.0 s vs 0.04 s per image); on an idle machine it costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from normkit.models import build_model  # noqa: E402
from normkit.data import build_dataset, build_train_loader, build_val_loader  # noqa: E402
from normkit.engine import (Checkpointer, EvalHook, MetricsWriter, PeriodicCheckpointer, ProgressBar,  # noqa: E402
                            Trainer, apply_overrides, build_lr_scheduler, build_optimizer, convert_sync_norm,
                            destroy_distributed, init_distributed, load_config, seed_all, setup_logging,
                            wrap_ddp)
from normkit.evaluation import evaluate, format_table  # noqa: E402

logger = logging.getLogger("normkit.train")

_TRAIN_KEYS = {"device", "seed", "max_iter", "batch_size", "iter_size", "num_workers", "amp", "sync_norm",
               "find_unused_parameters", "optimizer", "lr_schedule", "checkpoint_period", "max_keep", "eval_period",
               "log_period", "tensorboard"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (model, data, train, evaluation)")
    parser.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from <work-dir>/latest.pth if it exists")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config entries, e.g. train.max_iter=100 train.optimizer.lr=0.01")
    return parser.parse_args(argv)


def train(cfg: dict, work_dir: Path, resume: bool, info) -> tuple[dict, tuple[str, ...]]:
    """Trains on every rank; returns the final evaluation results and the class names."""
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    unknown = set(train_cfg) - _TRAIN_KEYS
    if unknown:
        raise ValueError(f"unknown train keys {sorted(unknown)}; allowed: {sorted(_TRAIN_KEYS)}")
    if "optimizer" not in train_cfg:
        raise ValueError("the config needs train.optimizer (at least {name: sgd, lr: ...})")
    seed = int(train_cfg.get("seed", 0))
    max_iter = int(train_cfg.get("max_iter", 1000))
    iter_size = int(train_cfg.get("iter_size", 1))
    num_workers = int(train_cfg.get("num_workers", 0))
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    seed_all(seed)  # the same initial weights on every rank
    model = build_model(cfg).to(info.device)
    if info.distributed and train_cfg.get("sync_norm", False):
        model = convert_sync_norm(model)
    optimizer = build_optimizer(model, train_cfg["optimizer"])
    scheduler = build_lr_scheduler(optimizer, train_cfg.get("lr_schedule", {}), max_iter)
    ddp_model = wrap_ddp(model, info, find_unused_parameters=bool(train_cfg.get("find_unused_parameters", False)))

    train_set = build_dataset(data_cfg, "train")
    val_loader = build_val_loader(data_cfg, rank=info.rank, world_size=info.world_size, num_workers=num_workers)

    def train_batches(start_batch: int):
        return build_train_loader(data_cfg, int(train_cfg.get("batch_size", 8)), rank=info.rank,
                                  world_size=info.world_size, seed=seed, start_iter=start_batch,
                                  num_workers=num_workers, dataset=train_set)

    def run_evaluation() -> dict:
        model.eval()
        with torch.no_grad():
            return evaluate(model, val_loader, cfg["evaluation"])

    trainer = Trainer(ddp_model, optimizer, scheduler, train_batches, max_iter=max_iter, iter_size=iter_size,
                      amp=train_cfg.get("amp"), device=info.device)
    checkpointer = Checkpointer(work_dir, max_keep=train_cfg.get("max_keep", 3), enabled=info.is_main)
    seed_all(seed + info.rank)  # per-rank random streams (dropout); a resumed run restores its saved ones
    if resume and checkpointer.has_checkpoint():
        trainer.load_state_dict(checkpointer.load())
        logger.info("resumed from %s at iteration %d", checkpointer.latest_path, trainer.iter)
    elif resume:
        logger.info("--resume: no checkpoint in %s, starting from scratch", work_dir)

    eval_hook = EvalHook(run_evaluation, int(train_cfg.get("eval_period", 0)))
    trainer.register_hooks([
        PeriodicCheckpointer(checkpointer, int(train_cfg.get("checkpoint_period", 0))),
        eval_hook,
        MetricsWriter(work_dir, int(train_cfg.get("log_period", 20)), tensorboard=bool(train_cfg.get("tensorboard", True)))
        if info.is_main else None,
        ProgressBar() if info.is_main else None,
    ])
    trainer.train()
    results = eval_hook.latest if eval_hook.latest is not None else run_evaluation()  # None: resumed a finished run
    return results, val_loader.dataset.dataset.class_names


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = apply_overrides(load_config(args.config), args.set)
    info = init_distributed(str(cfg["train"].get("device", "auto")))
    setup_logging(info.rank)
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    try:
        results, class_names = train(cfg, work_dir, args.resume, info)
    except BaseException:
        destroy_distributed(wait_for_others=False)
        raise
    destroy_distributed()
    if info.is_main:
        print(format_table(results, class_names), flush=True)
        serialisable = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in results.items()
                        if isinstance(v, (int, float))}
        serialisable["per_class_iou"] = [None if math.isnan(v) else v for v in results["per_class_iou"]]
        (work_dir / "eval_results.json").write_text(json.dumps(serialisable, indent=2))
        print(f"mIoU {results['mean_iou']:.4f}  pixel acc {results['pixel_acc']:.4f}  score {results['score']:.4f}")
    return results


if __name__ == "__main__":
    main()
