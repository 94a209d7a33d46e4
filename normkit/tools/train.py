"""Train a config, then evaluate it on the val split and print the results.

    normkit-train --config mini/r18d8_sn_c1_deepsup [--work-dir DIR] [--data-dir DIR] [--resume | --new-run]
                          [--set train.max_iter=100 train.amp=bf16 ...]
    normkit-train --list-configs
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
      optimizer: {name: sgd, lr: 0.02, momentum: 0.9, weight_decay: 1.0e-4, lr_mult: {}}
                                 # normkit.engine.build_optimizer
                                 # + reference_batch: N scales lr, max_iter and the schedule's steps and warmup
                                 # to the total batch (normkit.engine.scale_to_total_batch)
      lr_schedule: {policy: poly, power: 0.9, min_lr: 0.0}  # normkit.engine.build_lr_scheduler
      checkpoint_period: 0       # iterations between checkpoints (0: only at the end)
      max_keep: 3                # iteration checkpoints kept; latest.pth always names the newest
      eval_period: 0             # iterations between evaluations on val (0: only at the end)
      log_period: 20             # iterations between metrics.jsonl / tensorboard records
      tensorboard: true

The task (segmentation, or detection for COCO data) follows from `data.dataset`. A relative `data.root` is
taken from --data-dir (see normkit.tools.cli); the mini configs generate their data set there on first use.
The work dir receives config.yaml, iter_*.pth, latest.pth, metrics.jsonl, tensorboard/ and eval_results.json.
The whole config (every section, with the closest valid key named for a typo) and the data files of both
splits are checked before the work dir is touched. A work dir that is not empty is never reused silently:
`--resume` continues the run in it from its newest readable checkpoint (with the config's hyperparameters,
e.g. a new `train.optimizer.lr`, applied and logged), `--new-run` starts over after moving its files into
`previous/<n>/`.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import yaml

from normkit.engine import (Checkpointer, EvalHook, MetricsWriter, PeriodicCheckpointer, ProgressBar,
                            Trainer, all_gather_objects, broadcast_object, build_lr_scheduler, build_optimizer,
                            convert_sync_norm, destroy_distributed, has_evaluation_record, init_distributed,
                            scale_to_total_batch, seed_all, setup_logging, wrap_ddp)
from normkit.io import atomic_write_text
from normkit.models import build_model
from normkit.schema import check_keys, config_bool, config_int, config_mapping
from normkit.tools.cli import add_config_arguments, load_run_config
from normkit.tools.tasks import task_for

__all__ = ["TRAIN_KEYS", "PREVIOUS_RUNS", "parse_args", "check_train_config", "check_pretrained", "build_trainer",
           "move_previous_run", "train", "main"]

logger = logging.getLogger("normkit.train")

TRAIN_KEYS = {"device", "seed", "max_iter", "batch_size", "iter_size", "num_workers", "amp", "sync_norm",
              "find_unused_parameters", "optimizer", "lr_schedule", "checkpoint_period", "max_keep", "eval_period",
              "log_period", "tensorboard"}
# (default, minimum) of the integer entries of `train:`; max_keep may also be null (keep every checkpoint).
_TRAIN_INTS = {"seed": (0, 0), "max_iter": (1000, 1), "batch_size": (8, 1), "iter_size": (1, 1),
               "num_workers": (0, 0), "checkpoint_period": (0, 0), "max_keep": (3, 1), "eval_period": (0, 0),
               "log_period": (20, 0)}
_TRAIN_BOOLS = {"sync_norm": False, "find_unused_parameters": False, "tensorboard": True}
# Where --new-run moves the files of the run it replaces.
PREVIOUS_RUNS = "previous"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    reuse = parser.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true",
                       help="continue the run in --work-dir from its newest readable checkpoint (from scratch when "
                            "it has none); config changes such as train.optimizer.lr apply from there on")
    reuse.add_argument("--new-run", action="store_true",
                       help="start from scratch although --work-dir is not empty: its files are first moved into "
                            f"<work-dir>/{PREVIOUS_RUNS}/<n>/ (nothing is deleted); without --resume or --new-run "
                            "a non-empty work dir is refused")
    return parser.parse_args(argv)


def check_train_config(train_cfg: dict) -> dict:
    """The `train:` section with its defaults filled in and every key and value checked."""
    check_keys(train_cfg, TRAIN_KEYS, "train")
    if "optimizer" not in train_cfg:
        raise ValueError("the config needs train.optimizer (at least {name: sgd, lr: ...})")
    checked = dict(train_cfg)
    for key, (default, minimum) in _TRAIN_INTS.items():
        checked[key] = config_int(train_cfg, key, default, "train", minimum=minimum)
    for key, default in _TRAIN_BOOLS.items():
        checked[key] = config_bool(train_cfg, key, default, "train")
    checked["optimizer"] = config_mapping(train_cfg, "optimizer", "train")
    checked["lr_schedule"] = config_mapping(train_cfg, "lr_schedule", "train")
    return checked


def check_pretrained(cfg: dict) -> None:
    """A run starts from the backbone checkpoint its config names (`model.backbone.pretrained`, converted with
    normkit-convert): a named file that is missing is an error before anything is built; a config that names none
    trains from random weights, which is said with a warning (every published recipe starts from ImageNet or
    COCO weights)."""
    backbone = (cfg.get("model") or {}).get("backbone") or {}
    pretrained = backbone.get("pretrained")
    if not pretrained:
        logger.warning("model.backbone.pretrained is not set: the backbone starts from random weights, not from "
                       "the ImageNet/COCO weights the published recipes start from")
    elif not Path(pretrained).is_file():
        raise FileNotFoundError(
            f"model.backbone.pretrained: {pretrained} does not exist (relative paths are taken from the current "
            f"folder). Convert the original's ImageNet/COCO weights to it with normkit-convert (the config's comment "
            f"names the source file and format), point --set model.backbone.pretrained=PATH at your copy, or pass "
            f"--set model.backbone.pretrained=null to train from random weights")


def check_running_statistics(model) -> None:
    """The tool evaluates and saves the running statistics as training leaves them, so it refuses SN's batch-average
    mode (`using_moving_average: false`), whose buffers hold sums until `normkit.nn.recompute_batch_stats` turns
    them into statistics: its evaluations would silently use the sums."""
    layers = [name for name, m in model.named_modules()
              if getattr(m, "using_moving_average", True) is False and getattr(m, "using_bn", False)]
    if layers:
        raise ValueError(f"{len(layers)} SN layer(s) ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}) "
                         f"have using_moving_average: false, whose running buffers accumulate sums that only "
                         f"normkit.nn.recompute_batch_stats turns into statistics; the training tool does not run "
                         f"it, so train them with the Python API or use moving averages (the published recipes do)")


def build_trainer(cfg: dict, work_dir: Path, info, *, resume: bool = False):
    """Everything a run needs, built from the config on every rank: ``(trainer, task, eval_hook)``.

    The model (with SyncBN/SyncSN under DDP when `train.sync_norm`), optimizer, LR schedule, the task's
    loaders and evaluation (both splits' data checked), the checkpointer (with `resume`, the trainer continues
    from the newest readable checkpoint in `work_dir`) and the hooks (checkpoints, evaluation, metrics,
    progress bar on rank 0). A recipe stated for `train.optimizer.reference_batch` images is first scaled to
    the run's total batch (`scale_to_total_batch`)."""
    train_cfg = check_train_config(cfg["train"])
    train_cfg = scale_to_total_batch(train_cfg, train_cfg["batch_size"] * train_cfg["iter_size"] * info.world_size)
    seed, max_iter, batch_size = train_cfg["seed"], train_cfg["max_iter"], train_cfg["batch_size"]

    check_pretrained(cfg)
    seed_all(seed)  # the same initial weights on every rank
    model = build_model(cfg).to(info.device)
    check_running_statistics(model)
    if info.distributed and train_cfg["sync_norm"]:
        model = convert_sync_norm(model)
    optimizer = build_optimizer(model, train_cfg["optimizer"])
    scheduler = build_lr_scheduler(optimizer, train_cfg["lr_schedule"], max_iter)
    ddp_model = wrap_ddp(model, info, find_unused_parameters=train_cfg["find_unused_parameters"])
    task = task_for(cfg)(cfg, rank=info.rank, world_size=info.world_size, num_workers=train_cfg["num_workers"])
    task.train_set()  # both splits' files are checked before anything is written or trained

    trainer = Trainer(ddp_model, optimizer, scheduler,
                      lambda start_batch: task.train_batches(start_batch, batch_size=batch_size, seed=seed),
                      max_iter=max_iter, iter_size=train_cfg["iter_size"], amp=train_cfg.get("amp"),
                      device=info.device)
    checkpointer = Checkpointer(work_dir, max_keep=train_cfg["max_keep"], enabled=info.is_main)
    if info.is_main and work_dir.is_dir():
        checkpointer.remove_stale_temporaries()
    seed_all(seed + info.rank)  # per-rank random streams (dropout); a resumed run restores its saved ones
    found = checkpointer.resume() if resume else None
    if found is not None:
        path, state = found
        trainer.load_state_dict(state)
        logger.info("resumed from %s at iteration %d", path, trainer.iter)
    elif resume:
        logger.info("--resume: no checkpoint in %s, starting from scratch", work_dir)
    starts = all_gather_objects(trainer.iter)  # every rank reads the work dir itself
    if len(set(starts)) > 1:
        raise RuntimeError(f"ranks resumed from different iterations {starts}: every rank must see the same "
                           f"checkpoints in {work_dir} (a shared file system)")

    # A run killed while evaluating resumes from the checkpoint saved just before: rank 0 reads from metrics.jsonl
    # whether that evaluation was recorded, and every rank runs it again if not.
    eval_hook = EvalHook(lambda: task.evaluate(model), train_cfg["eval_period"], missed=lambda iteration: (
        broadcast_object(not has_evaluation_record(work_dir, iteration) if info.is_main else None)))
    trainer.register_hooks([
        PeriodicCheckpointer(checkpointer, train_cfg["checkpoint_period"]),
        eval_hook,
        MetricsWriter(work_dir, train_cfg["log_period"], tensorboard=train_cfg["tensorboard"])
        if info.is_main else None,
        ProgressBar() if info.is_main else None,
    ])
    return trainer, task, eval_hook


def _reuse_problem(work_dir: Path, resume: bool, new_run: bool) -> str | None:
    """Why a run may not start in `work_dir` (None: it may): a fresh run needs a work dir that is empty (but for
    the `previous/` runs) or `new_run`."""
    if resume or new_run or not work_dir.is_dir():
        return None
    entries = sorted(p.name for p in work_dir.iterdir() if p.name != PREVIOUS_RUNS)
    if not entries:
        return None
    shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "")
    return (f"work dir {work_dir} is not empty ({shown}): pass --resume to continue the run in it, --new-run to "
            f"start over (its files are moved into {work_dir / PREVIOUS_RUNS}/<n>/ first), or choose another "
            "--work-dir")


def move_previous_run(work_dir: Path) -> Path | None:
    """Moves every entry of `work_dir` but the `previous/` folder into `previous/<n>/` (n = 1, 2, ...)."""
    entries = [p for p in work_dir.iterdir() if p.name != PREVIOUS_RUNS] if work_dir.is_dir() else []
    if not entries:
        return None
    archive_root = work_dir / PREVIOUS_RUNS
    taken = {int(p.name) for p in archive_root.iterdir() if p.name.isdigit()} if archive_root.is_dir() else set()
    archive = archive_root / str(max(taken, default=0) + 1)
    archive.mkdir(parents=True)
    for entry in entries:
        entry.rename(archive / entry.name)
    logger.warning("--new-run: moved the files of the previous run in %s into %s", work_dir, archive)
    return archive


def train(cfg: dict, work_dir: Path, resume: bool, info, *, new_run: bool = False):
    """Trains on every rank; returns the final evaluation results and the task.

    Nothing is written to `work_dir` before the config and data are checked (`build_trainer`); a fresh run
    refuses a non-empty work dir unless `new_run` (see `move_previous_run`)."""
    problem = broadcast_object(_reuse_problem(work_dir, resume, new_run) if info.is_main else None)
    if problem:
        raise FileExistsError(problem)
    trainer, task, eval_hook = build_trainer(cfg, work_dir, info, resume=resume)
    if info.is_main:
        if new_run:
            move_previous_run(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    trainer.train()
    # None: a resumed run that had already finished. eval_fn evaluates the bare model, as the hook does (a DDP
    # forward would broadcast buffers, a collective per batch that a rank with no batch left would not join).
    results = eval_hook.latest if eval_hook.latest is not None else eval_hook.eval_fn()
    return results, task


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_run_config(args)
    info = init_distributed(str(cfg["train"].get("device", "auto")))
    setup_logging(info.rank)
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    try:
        results, task = train(cfg, work_dir, args.resume, info, new_run=args.new_run)
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
