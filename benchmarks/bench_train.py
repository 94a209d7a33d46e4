"""Training and evaluation throughput (images/s) of the mini defaults (segmentation and detection) and of
R50-D8 + C1DeepSup.

Three numbers per model, each measured on its own so they can be compared:
  loader  images/s of the training data pipeline alone (decode, augment, collate; mini set, no model),
  train   images/s of `Trainer.run_step` (forward, backward, optimizer step) on ready tensors,
  eval    images/s of single-scale whole-image inference (`normkit.evaluation.inference`), batch 1.

Sizes: the mini configs at their own resolution and batch (segmentation 112x112, batch 8; detection: mini COCO
images resized to short side 96, batch 8, real batches with targets from the loader, evaluation with the val
batch of the config and mask pasting). R50-D8 + C1DeepSup (SN) at 512x512, batch 8 on GPU; on CPU batch 2 and
only 2 timed steps after 1 warm-up step (about 9 s each on two cores), so that the whole benchmark ends in about
a minute and a half there.
OpenMP workers sleep when idle (OMP_WAIT_POLICY=PASSIVE, as in tools/train.py) unless the environment says otherwise.
Run: `python benchmarks/bench_train.py [--device cpu|cuda] [--amp bf16]`; writes benchmarks/results/train_<device>.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tools/train.py does: see the note there
                                                     # (set before torch loads)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from common import markdown_table, time_interleaved, write_results  # noqa: E402
from normkit.data import build_train_loader  # noqa: E402
from normkit.data.detection import build_coco_train_loader, build_coco_val_loader  # noqa: E402
from normkit.engine import (HookBase, PolyLR, Trainer, apply_overrides, build_optimizer, load_config,  # noqa: E402
                            move_to_device)
from normkit.evaluation import inference  # noqa: E402
from normkit.models import build_model  # noqa: E402

MINI = os.path.join(ROOT, "configs", "mini", "r18d8_sn_c1_deepsup.yaml")
R50 = os.path.join(ROOT, "configs", "sn", "r50d8_sn_c1_deepsup.yaml")
MINI_DET = os.path.join(ROOT, "configs", "mini", "mask_rcnn_r18_fpn_sn.yaml")


class StepTimes(HookBase):
    def __init__(self):
        self.seconds = []

    def after_step(self):
        self.seconds.append(self.trainer.scalars["time"])


def segmentation_batches(cfg: dict, size: int, batch: int, device):
    """`data_loader_fn` repeating one random batch of images and labels (ready tensors)."""
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, cfg["model"]["num_classes"], (batch, size, size), device=device)

    def batches(_start):
        while True:
            yield {"images": images, "labels": labels}
    return batches


def train_images_per_s(cfg: dict, batches, batch: int, warmup: int, iters: int, device, amp) -> float:
    """Median images/s of `Trainer.run_step` on the batches of `batches(start)` after `warmup` steps."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
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


def loader_images_per_s(loader, batch: int, batches: int) -> float:
    next(loader)  # dataset indexing and the first decode are one-off costs
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batch * batches / (time.perf_counter() - start)


def detection_eval_images_per_s(cfg: dict, num_batches: int, device) -> float:
    """Images/s of the model on the first val batches (inference, box and mask post-processing, pasting),
    after one warm-up batch."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    val = build_coco_val_loader(cfg["data"])
    batches = [move_to_device(b, device) for _, b in zip(range(num_batches + 1), val)]
    with torch.no_grad():
        model(batches[0])
        start = time.perf_counter()
        for b in batches[1:]:
            model(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return sum(len(b["image_ids"]) for b in batches[1:]) / (time.perf_counter() - start)


def detection_row(cfg: dict, warmup: int, iters: int, device, amp) -> list:
    batch = int(cfg["train"]["batch_size"])
    loader = loader_images_per_s(build_coco_train_loader(cfg["data"], batch, seed=0), batch, 20)
    ready = [move_to_device(b, device)
             for _, b in zip(range(warmup + iters), build_coco_train_loader(cfg["data"], batch, seed=0))]
    train = train_images_per_s(cfg, lambda start: iter(ready[start:]), batch, warmup, iters, device, amp)
    evaluation = detection_eval_images_per_s(cfg, iters, device)
    return [f"short side {cfg['data']['train']['short_sides'][0]}", batch, loader, train, evaluation]


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
        loader = loader_images_per_s(build_train_loader(data_cfg, batch, seed=0), batch, 20)
        train = train_images_per_s(cfg, segmentation_batches(cfg, size, batch, device), batch, warmup, iters,
                                   device, args.amp)
        evaluation = eval_images_per_s(cfg, size, iters, device)
        rows.append([name, f"{size}x{size}", batch, args.amp or "fp32", loader, train, evaluation])
    mini_det = load_config(MINI_DET)
    mini_det["data"]["root"] = os.path.join(ROOT, "data", "mini_coco")
    size, batch, loader, train, evaluation = detection_row(mini_det, *((3, 20) if gpu else (2, 8)), device, args.amp)
    rows.insert(1, ["mini Mask R-CNN R18-FPN SN", size, batch, args.amp or "fp32", loader, train, evaluation])
    for name, _, _, _, loader, train, evaluation in rows:
        print(f"{name}: loader {loader:.3g} img/s, train {train:.3g} img/s, eval {evaluation:.3g} img/s", flush=True)
    table = markdown_table(["model", "input", "batch", "precision", "loader img/s", "train step img/s",
                            "eval img/s"], rows)
    note = ("\n\nloader: the config's training pipeline on its mini set (CSAIL for segmentation, the COCO "
            "detection pipeline for Mask R-CNN), 1 process, no workers, no model. train: median "
            "`Trainer.run_step` (SGD) on ready tensors, after warm-up. eval: segmentation single-scale whole-image "
            "inference, batch 1; detection the model on val batches of the config (4 images), masks pasted. "
            "The mini set's images are upscaled by the pipeline for the 512x512 loader row. "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; 1-minute load average at the end "
            f"{os.getloadavg()[0]:.1f} (other jobs share this machine).")
    print(table)
    print("wrote", write_results("train", device, table + note))


if __name__ == "__main__":
    main(sys.argv[1:])
