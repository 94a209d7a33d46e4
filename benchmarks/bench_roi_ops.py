"""ROI ops on detector-shaped workloads: normkit vs the pure-PyTorch references and torchvision (when importable).

Workloads (GPU sizes; docs/design.md, "ROI ops"):
  FPN  - 2 images of 800x1216, 256 channels at strides 4, 8, 16, 32; 1000 and 4000 RoIs spread over the levels
         by the FPN rule; RoIAlign 7x7 (box head) and 14x14 (mask head), sampling_ratio 2, aligned.
  C4   - stride 16 (C4 and the dilated DC5 variant pool from a stride-16 map), 1024 channels, 1000 RoIs,
         RoIAlign 14x14 and RoIPool 14x14.
  NMS  - 500, 4000 and 20000 clustered RPN-like boxes at IoU 0.7; batched NMS (detection post-processing, IoU 0.5)
         of the same boxes in 3 and in 80 categories. Scores are distinct, so the kept indices are defined
         without ties and are checked equal to torchvision's.
Forward and forward+backward medians of interleaved repeats (benchmarks/common.py), one table per intra-op thread
count (default on CPU: 1 and torch's default). On CPU the sizes are reduced so that a run takes minutes on 2
cores: 64 channels for FPN and 256 for C4, 1/4 of the RoIs (250 and 1000).
With torchvision importable (a CUDA build of torch runs its CPU kernels too) the tables compare normkit with it
and go to results/roi_ops_peers_<device>.md; without it normkit is compared with the slow references only
(run on up to 250 RoIs on CPU) in results/roi_ops_<device>.md. --reference adds them to a peer run.
Usage: python benchmarks/bench_roi_ops.py [--device cuda] [--dtype float16] [--repeats N] [--threads 1,2]
       [--reference auto|on|off] [--full]
main() returns {"path", "headers", "sections": [{"threads", "rows"}]} (tools/gpu_check.py reads the ratios).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_kernel_benchmark_arguments, markdown_table, steady_cpu_allocator,  # noqa: E402
                    time_interleaved, write_results)

from normkit.nn import assign_boxes_to_levels  # noqa: E402
from normkit.ops import (batched_nms, nms, nms_reference, roi_align, roi_align_reference, roi_pool,  # noqa: E402
                         roi_pool_reference)

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


def timed(fns: dict, device, repeats: int, min_time: float = 0.0) -> dict:
    return time_interleaved(fns, device=device, repeats=repeats, warmup=1, min_time=min_time)


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
        # On a GPU each sample is at least 20 ms of back-to-back calls, so launch and synchronization latency
        # do not pull the ratios towards 1 (as for the NMS rows)
        min_time = 0.02 if torch.device(device).type == "cuda" else 0.0
        rows.append(times_row(label, "fwd+bwd" if backward else "fwd", timed(fns, device, repeats, min_time)))
    return rows


IMPLS = ("normkit", "torchvision", "reference")


def times_row(label: str, pass_: str, times: dict, note: str = "") -> list:
    """workload, pass, ms of each implementation, normkit / torchvision, reference / normkit, note."""
    def ratio(numerator, denominator):
        return times[numerator] / times[denominator] if numerator in times and denominator in times else "-"

    return ([label, pass_] + [times[name] * 1e3 if name in times else "-" for name in IMPLS]
            + [ratio("normkit", "torchvision"), ratio("reference", "normkit"), note])


def clustered_boxes(num: int, generator: torch.Generator) -> torch.Tensor:
    """RPN-like proposals: 20 jittered copies of num / 20 boxes, so suppression does real work."""
    centres = random_boxes(-(-num // 20), generator, 32, 400).repeat(20, 1)[:num]
    return centres + torch.randn(num, 4, generator=generator) * 8


def nms_rows(tv, device, dtype, repeats, reference_max_boxes, generator) -> list:
    rows = []
    for num_boxes in (500, 4000, 20000):
        boxes = clustered_boxes(num_boxes, generator).to(device=device, dtype=dtype)
        # Distinct scores: torchvision's per-category batched NMS orders equal scores arbitrarily.
        scores = (torch.randperm(num_boxes, generator=generator).float() / num_boxes).to(device=device, dtype=dtype)
        cases = [(f"NMS {num_boxes} boxes, IoU 0.7", None)]
        cases += [(f"batched NMS {num_boxes} boxes, {c} classes, IoU 0.5", c) for c in (3, 80)]
        for label, classes in cases:
            if classes is None:
                impls = {"normkit": lambda: nms(boxes, scores, 0.7)}
                if tv is not None:
                    impls["torchvision"] = lambda: tv.nms(boxes, scores, 0.7)
                if num_boxes <= reference_max_boxes:
                    impls["reference"] = lambda: nms_reference(boxes, scores, 0.7)
            else:
                idxs = torch.randint(0, classes, (num_boxes,), generator=generator).to(device)
                impls = {"normkit": lambda idxs=idxs: batched_nms(boxes, scores, idxs, 0.5)}
                if tv is not None:
                    impls["torchvision"] = lambda idxs=idxs: tv.batched_nms(boxes, scores, idxs, 0.5)
            print(label, flush=True)
            kept = {name: fn() for name, fn in impls.items()}
            note = f"{len(kept['normkit'])} kept"
            if "torchvision" in kept:
                same = torch.equal(kept["normkit"], kept["torchvision"])
                note += ", same indices as torchvision" if same else ", INDICES DIFFER FROM TORCHVISION"
            rows.append(times_row(label, "fwd", timed(impls, device, repeats, min_time=0.02), note))
    return rows


def run_workloads(tv, device, dtype, repeats, full, with_reference) -> list:
    fpn_channels, c4_channels = (256, 1024) if full else (64, 256)
    roi_counts = (1000, 4000) if full else (250, 1000)
    # The references build geometry box by box in Python: on CPU only the smaller RoI count keeps the run short.
    reference_max_rois = (1000 if full else 250) if with_reference else 0
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
    # The O(N^2)-memory NMS reference only up to 4000 boxes.
    return rows + nms_rows(tv, device, dtype, repeats, 4000 if with_reference else 0, generator)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_kernel_benchmark_arguments(parser)
    parser.add_argument("--reference", default="auto", choices=["auto", "on", "off"],
                        help="time the slow references: auto = only when torchvision is not importable")
    parser.add_argument("--full", action="store_true", help="GPU-sized workloads even on CPU (slow)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    full = args.full or on_gpu
    steady = not on_gpu and steady_cpu_allocator()
    repeats = args.repeats or (25 if on_gpu else 7)
    default_threads = torch.get_num_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = [default_threads] if on_gpu else sorted({1, default_threads})
    tv = load_torchvision(device)
    with_reference = args.reference == "on" or (args.reference == "auto" and tv is None)
    sections, results = [], []
    headers = ["workload", "pass", "normkit ms", "torchvision ms", "reference ms", "normkit / torchvision",
               "reference / normkit", "note"]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"-- {threads} intra-op thread(s)", flush=True)
        rows = run_workloads(tv, device, dtype, repeats, full, with_reference)
        table = markdown_table(headers, rows)
        results.append({"threads": threads, "rows": rows})
        print(table, flush=True)
        sections.append(f"### {threads} intra-op thread(s)\n\n{table}\n")
    torch.set_num_threads(default_threads)
    notes = [f"{args.dtype}, median of {repeats} interleaved repeats (NMS rows: each repeat at least 20 ms of "
             "calls); RoIAlign sampling_ratio 2, aligned=True; RoIs with log-uniform sides 8-600 px, FPN levels by "
             "floor(4 + log2(sqrt(area) / 224)). Lower ratios of normkit / torchvision are better for normkit.",
             "torchvision: " + ("measured in the same process on the same inputs." if tv is not None else
                                "not importable with working ops here, so no column (see results/roi_ops_peers_*)."),
             "reference = normkit.ops.*_reference (pure PyTorch, loops over boxes): " +
             ("run up to 250 RoIs and 4000 NMS boxes." if with_reference and not full else
              "run up to 1000 RoIs and 4000 NMS boxes." if with_reference else "not run."),
             "" if full else "CPU run with reduced sizes (64 FPN / 256 C4 channels, 250 and 1000 RoIs); "
                             "pass --full for the GPU sizes.",
             "Freed memory is kept in the heap (common.steady_cpu_allocator), so no side pays page faults."
             if steady else ""]
    markdown = "\n".join(n for n in notes if n) + "\n\n" + "\n".join(sections)
    path = write_results("roi_ops_peers" if tv is not None else "roi_ops", device, markdown, "bench_roi_ops.py")
    print(f"wrote {path}")
    return {"path": path, "headers": headers, "sections": results}


if __name__ == "__main__":
    main()
