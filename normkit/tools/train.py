"""Train a config, then evaluate it on the val split and print the results.

    normkit-train --config configs/mini/r18d8_sn_c1_deepsup.yaml [--work-dir DIR] [--resume]
                          [--set train.max_iter=100 train.amp=bf16 ...]
    torchrun --nproc_per_node N -m normkit.tools.train --config ...        (same command, DDP; NCCL on GPU, gloo on CPU)

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
                                 # + reference_batch: N scales lr, max_iter and the schedule's steps and warmup
                                 # to the total batch (normkit.engine.scale_to_total_batch)
      lr_schedule: {policy: poly, power: 0.9, min_lr: 0.0}                               # normkit.engine.build_lr_scheduler
      checkpoint_period: 0       # iterations between checkpoints (0: only at the end)
      max_keep: 3                # iteration checkpoints kept; latest.pth always names the newest
      eval_period: 0             # iterations between evaluations on val (0: only at the end)
      log_period: 20             # iterations between metrics.jsonl / tensorboard records
      tensorboard: true

The task (segmentation, or detection for COCO data) follows from `data.dataset`.
The work dir receives config.yaml, iter_*.pth, latest.pth, metrics.jsonl, tensorboard/ and eval_results.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP workers sleep instead of spinning. On a CPU shared with other jobs,
# spinning workers wait for descheduled peers at every parallel op (measured here on 2 busy cores: a ResNet-18
# step 4.5 s spinning vs 0.6 s sleeping, eval 1.0 s vs 0.04 s per image); on an idle machine it costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import yaml  # noqa: E402

from normkit.engine import (Checkpointer, EvalHook, MetricsWriter, PeriodicCheckpointer, ProgressBar,  # noqa: E402
                            Trainer, apply_overrides, build_lr_scheduler, build_optimizer, convert_sync_norm,
                            destroy_distributed, init_distributed, load_config, scale_to_total_batch, seed_all,
                            setup_logging, wrap_ddp)
from normkit.io import atomic_write_text  # noqa: E402
from normkit.models import build_model  # noqa: E402
from normkit.tools.tasks import task_for  # noqa: E402

__all__ = ["TRAIN_KEYS", "parse_args", "build_trainer", "train", "main"]

logger = logging.getLogger("normkit.train")

TRAIN_KEYS = {"device", "seed", "max_iter", "batch_size", "iter_size", "num_workers", "amp", "sync_norm",
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


def build_trainer(cfg: dict, work_dir: Path, info, *, resume: bool = False):
    """Everything a run needs, built from the config on every rank: ``(trainer, task, eval_hook)``.

    The model (with SyncBN/SyncSN under DDP when `train.sync_norm`), optimizer, LR schedule, the task's
    loaders and evaluation, the checkpointer (resumed from `work_dir/latest.pth` with `resume`) and the hooks
    (checkpoints, evaluation, metrics, progress bar on rank 0)."""
    train_cfg = cfg["train"]
    unknown = set(train_cfg) - TRAIN_KEYS
    if unknown:
        raise ValueError(f"unknown train keys {sorted(unknown)}; allowed: {sorted(TRAIN_KEYS)}")
    if "optimizer" not in train_cfg:
        raise ValueError("the config needs train.optimizer (at least {name: sgd, lr: ...})")
    batch_size = int(train_cfg.get("batch_size", 8))
    train_cfg = scale_to_total_batch(train_cfg, batch_size * int(train_cfg.get("iter_size", 1)) * info.world_size)
    seed = int(train_cfg.get("seed", 0))
    max_iter = int(train_cfg.get("max_iter", 1000))
    num_workers = int(train_cfg.get("num_workers", 0))

    seed_all(seed)  # the same initial weights on every rank
    model = build_model(cfg).to(info.device)
    if info.distributed and train_cfg.get("sync_norm", False):
        model = convert_sync_norm(model)
    optimizer = build_optimizer(model, train_cfg["optimizer"])
    scheduler = build_lr_scheduler(optimizer, train_cfg.get("lr_schedule", {}), max_iter)
    ddp_model = wrap_ddp(model, info, find_unused_parameters=bool(train_cfg.get("find_unused_parameters", False)))
    task = task_for(cfg)(cfg, rank=info.rank, world_size=info.world_size, num_workers=num_workers)

    trainer = Trainer(ddp_model, optimizer, scheduler,
                      lambda start_batch: task.train_batches(start_batch, batch_size=batch_size, seed=seed),
                      max_iter=max_iter, iter_size=int(train_cfg.get("iter_size", 1)), amp=train_cfg.get("amp"),
                      device=info.device)
    checkpointer = Checkpointer(work_dir, max_keep=train_cfg.get("max_keep", 3), enabled=info.is_main)
    seed_all(seed + info.rank)  # per-rank random streams (dropout); a resumed run restores its saved ones
    if resume and checkpointer.has_checkpoint():
        trainer.load_state_dict(checkpointer.load())
        logger.info("resumed from %s at iteration %d", checkpointer.latest_path, trainer.iter)
    elif resume:
        logger.info("--resume: no checkpoint in %s, starting from scratch", work_dir)

    eval_hook = EvalHook(lambda: task.evaluate(model), int(train_cfg.get("eval_period", 0)))
    trainer.register_hooks([
        PeriodicCheckpointer(checkpointer, int(train_cfg.get("checkpoint_period", 0))),
        eval_hook,
        MetricsWriter(work_dir, int(train_cfg.get("log_period", 20)), tensorboard=bool(train_cfg.get("tensorboard", True)))
        if info.is_main else None,
        ProgressBar() if info.is_main else None,
    ])
    return trainer, task, eval_hook


def train(cfg: dict, work_dir: Path, resume: bool, info):
    """Trains on every rank; returns the final evaluation results and the task."""
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    trainer, task, eval_hook = build_trainer(cfg, work_dir, info, resume=resume)
    trainer.train()
    # None: a resumed run that had already finished
    results = eval_hook.latest if eval_hook.latest is not None else task.evaluate(trainer.model)
    return results, task


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = apply_overrides(load_config(args.config), args.set)
    info = init_distributed(str(cfg["train"].get("device", "auto")))
    setup_logging(info.rank)
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    try:
        results, task = train(cfg, work_dir, args.resume, info)
    except BaseException:
        destroy_distributed(wait_for_others=False)
        raise
    destroy_distributed()
    if info.is_main:
        print(task.report(results), flush=True)
        atomic_write_text(work_dir / "eval_results.json", json.dumps(task.to_json(results), indent=2))
    return results


if __name__ == "__main__":
    main()
