"""Training and evaluation throughput (images/s) of the mini default and of R50-D8 + C1DeepSup.

Three numbers per model, each measured on its own so they can be compared:
  loader  images/s of the training data pipeline alone (decode, augment, collate; mini set, no model),
  train   images/s of `Trainer.run_step` (forward, backward, optimizer step) on ready tensors,
  eval    images/s of single-scale whole-image inference (`normkit.evaluation.inference`), batch 1.

Sizes: the mini config at its own resolution (112x112, batch 8). R50-D8 + C1DeepSup (SN) at 512x512, batch 8
on GPU; on CPU batch 2 and only 2 timed steps after 1 warm-up step (about 9 s each on two cores), so that the
whole benchmark ends in about a minute there.
OpenMP workers sleep when idle (OMP_WAIT_POLICY=PASSIVE, as in tools/train.py) unless the environment says otherwise.
Run: `python benchmarks/bench_train.py [--device cpu|cuda] [--amp bf16]`; writes benchmarks/results/train_<device>.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tools/train.py does: see the note there (set before torch loads)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from common import markdown_table, time_interleaved, write_results  # noqa: E402
from normkit.data import build_train_loader  # noqa: E402
from normkit.engine import HookBase, PolyLR, Trainer, apply_overrides, build_optimizer, load_config  # noqa: E402
from normkit.evaluation import inference  # noqa: E402
from normkit.models import build_model  # noqa: E402

MINI = os.path.join(ROOT, "configs", "mini", "r18d8_sn_c1_deepsup.yaml")
R50 = os.path.join(ROOT, "configs", "sn", "r50d8_sn_c1_deepsup.yaml")


class StepTimes(HookBase):
    def __init__(self):
        self.seconds = []

    def after_step(self):
        self.seconds.append(self.trainer.scalars["time"])


def train_images_per_s(cfg: dict, size: int, batch: int, warmup: int, iters: int, device, amp) -> float:
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    num_classes = cfg["model"]["num_classes"]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, num_classes, (batch, size, size), device=device)

    def batches(_start):
        while True:
            yield {"images": images, "labels": labels}

    optimizer = build_optimizer(model, {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4})
    trainer = Trainer(model, optimizer, PolyLR(optimizer, warmup + iters), batches, max_iter=warmup + iters,
                      amp=amp, device=device)
    times = StepTimes()
    trainer.register_hooks([times])
    trainer.train()
    return batch / statistics.median(times.seconds[warmup:])


def eval_images_per_s(cfg: dict, size: int, repeats: int, device) -> float:
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    image = torch.randn(1, 3, size, size, device=device)
    seconds = time_interleaved({"eval": lambda: inference(model, image)}, device=device, warmup=1, repeats=repeats)
    return 1.0 / seconds["eval"]


def loader_images_per_s(data_cfg: dict, batch: int, batches: int) -> float:
    loader = build_train_loader(data_cfg, batch, seed=0)
    next(loader)  # dataset indexing and the first decode are one-off costs
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batch * batches / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast for the training step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    mini = load_config(MINI)
    mini["data"]["root"] = os.path.join(ROOT, "data", "mini_ade")
    # The R50 model on the mini set's images, resized by its CSAIL pipeline to the benchmark size.
    r50_size, r50_batch = 512, (8 if gpu else 2)
    r50 = apply_overrides(load_config(R50), [f"model.num_classes={mini['model']['num_classes']}"])
    r50_data = apply_overrides(mini["data"], [f"train.short_sides=[{r50_size}]",
                                              f"train.max_long_side={int(r50_size * 1.25)}"])
    runs = [("mini R18-D8 SN C1DeepSup", mini, mini["data"], 112, 8, (3, 20) if gpu else (2, 8)),
            ("R50-D8 SN C1DeepSup", r50, r50_data, r50_size, r50_batch, (3, 20) if gpu else (1, 2))]
    rows = []
    for name, cfg, data_cfg, size, batch, (warmup, iters) in runs:
        loader = loader_images_per_s(data_cfg, batch, 20)
        train = train_images_per_s(cfg, size, batch, warmup, iters, device, args.amp)
        evaluation = eval_images_per_s(cfg, size, iters, device)
        rows.append([name, f"{size}x{size}", batch, args.amp or "fp32", loader, train, evaluation])
        print(f"{name}: loader {loader:.3g} img/s, train {train:.3g} img/s, eval {evaluation:.3g} img/s", flush=True)
    table = markdown_table(["model", "input", "batch", "precision", "loader img/s", "train step img/s",
                            "eval img/s"], rows)
    note = ("\n\nloader: CSAIL training pipeline on the mini set, 1 process, no workers, no model. train: median "
            "`Trainer.run_step` (SGD) on ready tensors, after warm-up. eval: single-scale whole-image inference, "
            "batch 1. The mini set's images are upscaled by the pipeline for the 512x512 loader row. "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; 1-minute load average at the end "
            f"{os.getloadavg()[0]:.1f} (other jobs share this machine).")
    print(table)
    print("wrote", write_results("train", device, table + note))


if __name__ == "__main__":
    main(sys.argv[1:])
