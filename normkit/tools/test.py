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
which also tells a restarted watcher what it has already done.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from normkit.engine import destroy_distributed, init_distributed
from normkit.models import build_model
from normkit.tools.cli import add_config_arguments, load_run_config
from normkit.tools.tasks import task_for

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)\.pth$")
WATCH_LOG = "eval_watch.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", help="checkpoint to evaluate (training checkpoint or weights)")
    target.add_argument("--watch", metavar="DIR", help="evaluate each new iter_*.pth appearing in DIR")
    parser.add_argument("--scales", type=float, nargs="+", help="test scales, probabilities averaged")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    parser.add_argument("--mode", choices=("whole", "slide"), help="whole-image or sliding-window inference")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="slide window size")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide window stride")
    parser.add_argument("--show-dir", help="write image | prediction | label panels here")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers per rank")
    parser.add_argument("--poll", type=float, default=30.0, help="--watch: seconds between directory scans")
    parser.add_argument("--idle-timeout", type=float, default=None,
                        help="--watch: stop after this many seconds without a new checkpoint (default: never)")
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


def _broadcast(obj):
    """Rank 0's value on every rank (the ranks must agree on which checkpoint to evaluate)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def watch(evaluator: CheckpointEvaluator, directory: Path, poll: float, idle_timeout: float | None) -> list[dict]:
    """Evaluate checkpoints in `directory` as they appear; returns the records written to eval_watch.jsonl."""
    log = directory / WATCH_LOG
    main = evaluator.info.is_main
    done = set()
    if main and log.is_file():
        done = {json.loads(line)["checkpoint"] for line in log.read_text().splitlines() if line.strip()}
    records = []
    last_new = time.monotonic()
    while True:
        path = None
        if main:
            pending = pending_checkpoints(directory, done) if directory.is_dir() else []
            path = str(pending[0]) if pending else None
            if path is None and idle_timeout is not None and time.monotonic() - last_new >= idle_timeout:
                path = ""  # tells every rank to stop
        path = _broadcast(path)
        if path == "":
            return records
        if path is None:
            time.sleep(poll)
            continue
        name = Path(path).name
        try:
            results = evaluator(path)
        except FileNotFoundError:  # deleted by the trainer's max_keep before we got to it
            results = None
        done.add(name)
        last_new = time.monotonic()
        if results is None or not main:
            continue
        evaluator.report(results, name)
        record = {"checkpoint": name, "iteration": int(CHECKPOINT_PATTERN.match(name).group(1)),
                  **evaluator.task.to_json(results)}
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_run_config(args)
    info = init_distributed(str(cfg.get("train", {}).get("device", "auto")))
    try:
        evaluator = CheckpointEvaluator(cfg, evaluation_config(cfg, args), info, args.num_workers)
        if args.watch:
            return watch(evaluator, Path(args.watch), args.poll, args.idle_timeout)
        results = evaluator(args.checkpoint)
    finally:
        destroy_distributed()
    if info.is_main:
        evaluator.report(results, args.checkpoint)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(evaluator.task.to_json(results), indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
