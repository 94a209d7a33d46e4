"""ROI ops on detector-shaped workloads: normkit vs the pure-PyTorch references and torchvision (when importable).

Workloads (GPU sizes; docs/design.md, "ROI ops"):
  FPN  - 2 images of 800x1216, 256 channels at strides 4, 8, 16, 32; 1000 and 4000 RoIs spread over the levels
         by the FPN rule; RoIAlign 7x7 (box head) and 14x14 (mask head), sampling_ratio 2, aligned.
  C4   - stride 16 (C4 and the dilated DC5 variant pool from a stride-16 map), 1024 channels, 1000 RoIs,
         RoIAlign 14x14 and RoIPool 14x14.
  NMS  - 1000 and 4000 RPN-like boxes at IoU 0.7.
Forward and forward+backward medians of interleaved repeats (benchmarks/common.py). On CPU the sizes are
reduced so the run takes about two minutes on 2 cores: 64 channels for FPN and 256 for C4, 1/4 of the RoIs
(250 and 1000), and the slow references run only on the 250-RoI workloads.
Usage: python benchmarks/bench_roi_ops.py [--device cuda] [--dtype float16] [--repeats N] [--full]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, time_interleaved, write_results  # noqa: E402

from normkit.nn import assign_boxes_to_levels  # noqa: E402
from normkit.ops import nms, nms_reference, roi_align, roi_align_reference, roi_pool, roi_pool_reference  # noqa: E402

IMAGE_H, IMAGE_W = 800, 1216
FPN_STRIDES = (4, 8, 16, 32)


def load_torchvision(device: torch.device):
    """torchvision.ops if it imports and its compiled ops run on `device`, else None."""
    try:
        import torchvision.ops as tv_ops
        x = torch.zeros(1, 1, 4, 4, device=device)
        tv_ops.roi_align(x, torch.zeros(1, 5, device=device), 2)
        tv_ops.nms(torch.zeros(1, 4, device=device), torch.zeros(1, device=device), 0.5)
        return tv_ops
    except Exception:  # not installed, or built without ops for this device
        return None


def random_boxes(num: int, generator: torch.Generator, min_side: float = 8, max_side: float = 600) -> torch.Tensor:
    """Boxes with log-uniform sides (as proposals are), inside the image."""
    sides = torch.exp(torch.empty(num, 2).uniform_(math.log(min_side), math.log(max_side), generator=generator))
    w, h = sides[:, 0], sides[:, 1]
    x1 = torch.rand(num, generator=generator) * (IMAGE_W - w)
    y1 = torch.rand(num, generator=generator) * (IMAGE_H - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1)


def make_rois(num: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    index = torch.arange(num) % batch
    return torch.cat([index[:, None].float(), random_boxes(num, generator)], 1)


def timed(fns: dict, device, repeats: int) -> dict:
    return time_interleaved(fns, device=device, repeats=repeats, warmup=1)


def roi_op_rows(label, levels, rois_per_level, output, impls, device, repeats):
    """Times an ROI op (RoIAlign or RoIPool) over all levels, forward and forward+backward, for every
    implementation `fn(feature, rois, output_size, spatial_scale)`."""
    def run(fn, backward):
        total = 0.0
        for feature, (rois, scale) in zip(levels, rois_per_level):
            if rois.shape[0] == 0:
                continue
            out = fn(feature, rois, output, scale)
            total = total + out.float().sum() if backward else total
        if backward:
            total.backward()

    rows = []
    for backward in (False, True):
        fns = {}
        for name, fn in impls.items():
            def call(fn=fn, backward=backward):
                if backward:
                    for f in levels:
                        f.grad = None
                    run(fn, True)
                else:
                    with torch.no_grad():
                        run(fn, False)
            fns[name] = call
        times = timed(fns, device, repeats)
        for name, t in times.items():
            rows.append([label, "fwd+bwd" if backward else "fwd", name, t * 1e3, ratio(times, "reference", name),
                         ratio(times, name, "torchvision")])
    return rows


def ratio(times: dict, numerator: str, denominator: str):
    if numerator not in times or denominator not in times:
        return "-"
    return times[numerator] / times[denominator]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="GPU-sized workloads even on CPU (slow)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    full = args.full or device.type == "cuda"
    repeats = args.repeats or (25 if device.type == "cuda" else 5)
    fpn_channels, c4_channels = (256, 1024) if full else (64, 256)
    roi_counts = (1000, 4000) if full else (250, 1000)
    # The references build geometry box by box in Python: on CPU only the smaller RoI count keeps the run short.
    reference_max_rois = 1000 if full else 250
    tv = load_torchvision(device)
    generator = torch.Generator().manual_seed(0)
    rows = []

    def align_impls(num_rois):
        impls = {"normkit": lambda f, r, o, s: roi_align(f, r, o, s, 2, True)}
        if tv is not None:
            impls["torchvision"] = lambda f, r, o, s: tv.roi_align(f, r, o, s, 2, True)
        if num_rois <= reference_max_rois:
            impls["reference"] = lambda f, r, o, s: roi_align_reference(f, r, o, s, 2, True)
        return impls

    # FPN box/mask heads.
    levels = [torch.randn(2, fpn_channels, IMAGE_H // s, IMAGE_W // s, device=device, dtype=dtype).requires_grad_()
              for s in FPN_STRIDES]
    for num_rois in roi_counts:
        rois = make_rois(num_rois, 2, generator)
        target = assign_boxes_to_levels(rois[:, 1:], 2, 5)
        per_level = [(rois[target == i].to(device=device, dtype=dtype), 1.0 / s) for i, s in enumerate(FPN_STRIDES)]
        for output in (7, 14):
            label = f"FPN RoIAlign {num_rois} RoIs, {fpn_channels} ch, {output}x{output}"
            print(label, flush=True)
            rows += roi_op_rows(label, levels, per_level, output, align_impls(num_rois), device, repeats)
    del levels

    # C4 / DC5 head: one stride-16 map.
    c4_rois = roi_counts[0]  # 1000 on GPU, 250 on CPU
    c4 = [torch.randn(2, c4_channels, IMAGE_H // 16, IMAGE_W // 16, device=device, dtype=dtype).requires_grad_()]
    rois = [(make_rois(c4_rois, 2, generator).to(device=device, dtype=dtype), 1 / 16)]
    label = f"C4/DC5 RoIAlign {c4_rois} RoIs, {c4_channels} ch, 14x14"
    print(label, flush=True)
    rows += roi_op_rows(label, c4, rois, 14, align_impls(c4_rois), device, repeats)
    pool_impls = {"normkit": lambda f, r, o, s: roi_pool(f, r, o, s)}
    if tv is not None:
        pool_impls["torchvision"] = lambda f, r, o, s: tv.roi_pool(f, r, o, s)
    if c4_rois <= reference_max_rois:
        pool_impls["reference"] = lambda f, r, o, s: roi_pool_reference(f, r, o, s)
    label = f"C4/DC5 RoIPool {c4_rois} RoIs, {c4_channels} ch, 14x14"
    print(label, flush=True)
    rows += roi_op_rows(label, c4, rois, 14, pool_impls, device, repeats)

    # NMS on RPN-like proposals (clustered, so suppression does real work).
    for num_boxes in (1000, 4000):
        centres = random_boxes(num_boxes // 20, generator, 32, 400).repeat(20, 1)
        boxes = (centres + torch.randn(num_boxes, 4, generator=generator) * 8).to(device=device, dtype=dtype)
        scores = torch.rand(num_boxes, generator=generator).to(device=device, dtype=dtype)
        impls = {"normkit": lambda: nms(boxes, scores, 0.7), "reference": lambda: nms_reference(boxes, scores, 0.7)}
        if tv is not None:
            impls["torchvision"] = lambda: tv.nms(boxes, scores, 0.7)
        times = timed(impls, device, repeats)
        for name, t in times.items():
            rows.append([f"NMS {num_boxes} boxes, IoU 0.7", "fwd", name, t * 1e3, ratio(times, "reference", name),
                         ratio(times, name, "torchvision")])

    table = markdown_table(["workload", "pass", "impl", "ms", "reference / this", "this / torchvision"], rows)
    print(table)
    notes = [f"{args.dtype}, median of {repeats} interleaved repeats; RoIAlign sampling_ratio 2, aligned=True; RoIs "
             f"with log-uniform sides 8-600 px, FPN levels by floor(4 + log2(sqrt(area) / 224)).",
             "reference = normkit.ops.*_reference (pure PyTorch, loops over boxes); run only up to "
             f"{reference_max_rois} RoIs here.",
             "torchvision: " + ("measured in the same run." if tv is not None else
                                "not importable with working ops on this machine, so no column."),
             "" if full else "CPU run with reduced sizes (64 FPN / 256 C4 channels, 250 and 1000 RoIs); "
                             "pass --full for the GPU sizes."]
    write_results("roi_ops", device, table + "\n\n" + "\n".join(n for n in notes if n))


if __name__ == "__main__":
    main()
