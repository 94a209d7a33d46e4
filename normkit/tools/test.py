"""Evaluate a checkpoint on the val split and print the task's results (segmentation: per-class IoU table,
pixel accuracy, mIoU, score).

    normkit-test --config CFG --checkpoint CKPT [--scales 0.5 0.75 1.0 1.25 1.5 1.75] [--flip]
                         [--mode whole|slide --crop-size 512 512 --stride 341 341] [--show-dir DIR]
                         [--out results.json] [--data-dir DIR] [--set data.root=... ...]
    normkit-test --config CFG --watch WORK_DIR [--poll 30] [--idle-timeout 3600]
    torchrun --nproc_per_node N -m normkit.tools.test ...   (each rank evaluates a shard; counts are summed)

Command-line options override the config's `evaluation:` section (see normkit.evaluation.sem_seg).
`--watch` evaluates every `iter_*.pth` in WORK_DIR once, oldest first, then keeps polling for new ones
(until --idle-timeout seconds pass without one, or Ctrl-C); results are appended to WORK_DIR/eval_watch.jsonl,
which also tells a restarted watcher what it has already done (an unreadable line in it is skipped with a
warning). A WORK_DIR that does not exist yet is waited for; a checkpoint that cannot be read yet is skipped
with a warning and retried at the next poll.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from pathlib import Path

from normkit.engine import (all_gather_objects, broadcast_object, destroy_distributed, init_distributed,
                            load_checkpoint, setup_logging)
from normkit.models import build_model
from normkit.tools.cli import add_config_arguments, load_run_config
from normkit.tools.tasks import task_for

logger = logging.getLogger("normkit.test")

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)\.pth$")
WATCH_LOG = "eval_watch.jsonl"


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", help="checkpoint to evaluate (training checkpoint or weights)")
    target.add_argument("--watch", metavar="DIR", help="evaluate each new iter_*.pth appearing in DIR")
    parser.add_argument("--scales", type=positive_float, nargs="+",
                        help="test scales (> 0), probabilities averaged: multipliers of the config's short_sides / "
                             "max_long_side (mmseg's img_ratios), else of the image size")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    parser.add_argument("--mode", choices=("whole", "slide"), help="whole-image or sliding-window inference")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="slide window size")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide window stride")
    parser.add_argument("--show-dir", help="write image | prediction | label panels here")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers per rank")
    parser.add_argument("--poll", type=positive_float, default=30.0,
                        help="--watch: seconds between directory scans (> 0)")
    parser.add_argument("--idle-timeout", type=positive_float, default=None,
                        help="--watch: stop after this many seconds (> 0) without a new checkpoint (default: never)")
    return parser.parse_args(argv)


def evaluation_config(cfg: dict, args: argparse.Namespace) -> dict:
    """The config's `evaluation:` section with the command-line options applied."""
    eval_cfg = dict(cfg.get("evaluation") or {})
    for key in ("scales", "mode", "crop_size", "stride", "show_dir"):
        value = getattr(args, key)
        if value is not None:
            eval_cfg[key] = value
    if args.flip:
        eval_cfg["flip"] = True
    return eval_cfg


class CheckpointEvaluator:
    """Builds the task's val loader once and evaluates checkpoints of the config's model with it."""

    def __init__(self, cfg: dict, eval_cfg: dict, info, num_workers: int = 0):
        self.cfg, self.eval_cfg, self.info = cfg, eval_cfg, info
        self.task = task_for(cfg)(cfg, rank=info.rank, world_size=info.world_size, num_workers=num_workers)
        self.task.check_eval_config(eval_cfg)

    def __call__(self, checkpoint) -> dict:
        model = build_model(self.cfg, checkpoint=checkpoint).to(self.info.device)
        return self.task.evaluate(model, self.eval_cfg)

    def report(self, results: dict, title: str) -> None:
        print(f"== {title}", flush=True)
        print(self.task.report(results), flush=True)


def pending_checkpoints(directory: Path, done: set[str]) -> list[Path]:
    """iter_*.pth files not evaluated yet, by iteration (temporary files of atomic writes never match)."""
    found = [(int(m.group(1)), p) for p in directory.glob("iter_*.pth")
             if (m := CHECKPOINT_PATTERN.match(p.name)) and p.name not in done]
    return [p for _, p in sorted(found)]


def read_watch_log(log: Path) -> set[str]:
    """The checkpoints eval_watch.jsonl records as evaluated; unreadable lines (a watcher killed mid-write) are
    skipped with a warning, so they never stop a restarted watcher."""
    done = set()
    if not log.is_file():
        return done
    for lineno, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(str(json.loads(line)["checkpoint"]))
        except (ValueError, TypeError, KeyError):
            logger.warning("%s:%d: unreadable record skipped: %.80s", log, lineno, line)
    return done


def watch(evaluator: CheckpointEvaluator, directory: Path, poll: float, idle_timeout: float | None) -> list[dict]:
    """Evaluate checkpoints in `directory` as they appear; returns the records written to eval_watch.jsonl.

    A folder that does not exist yet is waited for (said once). A checkpoint that cannot be read (still being
    copied, truncated) is skipped with a warning and tried again `poll` seconds later; newer ones go ahead."""
    if not poll > 0:
        raise ValueError(f"--poll must be a positive number of seconds, got {poll}")
    log = directory / WATCH_LOG
    main = evaluator.info.is_main
    done = read_watch_log(log) if main else set()
    log_seen = main and log.exists()  # the log this watcher has read or written
    retry_at: dict[str, float] = {}  # unreadable checkpoints -> when to try them again
    records = []
    last_new = time.monotonic()
    said_missing = False
    while True:
        path, state = None, None
        if main:
            if log_seen and not log.exists():
                # The run's files were moved away (`tools/train.py --new-run` moves eval_watch.jsonl with them):
                # the new run's checkpoints may take the same names.
                logger.warning("--watch: %s is gone (a new run?): checkpoints are evaluated again by name", log)
                done.clear()
                retry_at.clear()
                log_seen = False
            if not directory.is_dir() and not said_missing:
                logger.warning("--watch: %s does not exist (yet); waiting for checkpoints to appear in it", directory)
                said_missing = True
            now = time.monotonic()
            pending = [p for p in pending_checkpoints(directory, done) if retry_at.get(p.name, 0.0) <= now] \
                if directory.is_dir() else []
            for candidate in pending:
                try:
                    state = load_checkpoint(candidate)
                except FileNotFoundError:  # deleted by the trainer's max_keep before we got to it
                    done.add(candidate.name)
                    continue
                except RuntimeError as exc:
                    logger.warning("--watch: skipping %s for now, will retry in %gs: %s", candidate.name, poll, exc)
                    retry_at[candidate.name] = now + poll
                    continue
                path = str(candidate)
                break
            if path is None and idle_timeout is not None and time.monotonic() - last_new >= idle_timeout:
                path = ""  # tells every rank to stop
        path = broadcast_object(path)
        if path == "":
            return records
        if path is None:
            time.sleep(poll)
            continue
        name = Path(path).name
        if not main:  # read it here too, then agree: the trainer's max_keep may delete it meanwhile
            try:
                state = load_checkpoint(path)
            except (FileNotFoundError, RuntimeError):
                state = None
        if not all(all_gather_objects(state is not None)):
            logger.warning("--watch: %s went away before every rank had read it; skipped", name)
            done.add(name)
            continue
        results = evaluator(state)
        done.add(name)
        retry_at.pop(name, None)
        last_new = time.monotonic()
        if not main:
            continue
        evaluator.report(results, name)
        record = {"checkpoint": name, "iteration": int(CHECKPOINT_PATTERN.match(name).group(1)),
                  **evaluator.task.to_json(results)}
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
        log_seen = True
        records.append(record)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_run_config(args)
    info = init_distributed(str(cfg["train"].get("device", "auto")))
    setup_logging(info.rank)
    try:
        evaluator = CheckpointEvaluator(cfg, evaluation_config(cfg, args), info, args.num_workers)
        if args.watch:
            results = watch(evaluator, Path(args.watch), args.poll, args.idle_timeout)
        else:
            results = evaluator(args.checkpoint)
    except BaseException:
        # the other ranks may be inside a collective this one will never join: no barrier on the way out
        destroy_distributed(wait_for_others=False)
        raise
    destroy_distributed()
    if args.watch:
        return results
    if info.is_main:
        evaluator.report(results, args.checkpoint)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(evaluator.task.to_json(results), indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
