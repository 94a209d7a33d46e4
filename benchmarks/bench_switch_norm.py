"""Switchable Normalization: normkit's fused op vs the pure-PyTorch official formulation, BatchNorm2d and GroupNorm.

Times forward and forward+backward in training mode (interleaved medians), reports the ratios to BatchNorm2d and
to the reference, the bytes autograd saves beyond the input, and on GPU the achieved bandwidth against the
traffic model (forward reads x twice and writes y: 3x the tensor's bytes; backward 5x).
Usage: python benchmarks/bench_switch_norm.py [--device cuda] [--dtype float32] [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_kernel_benchmark_arguments, markdown_table, steady_cpu_allocator,  # noqa: E402
                    time_interleaved, write_results)

from normkit.nn import SwitchNorm2d  # noqa: E402

SHAPES = [(8, 64, 56, 56), (2, 256, 128, 128), (32, 256, 14, 14)]
# On GPU also a tensor (268 MB in float32) larger than the L2 cache (50 MB on H100/H200), where the bandwidth
# target measures HBM traffic rather than L2 hits.
GPU_SHAPES = SHAPES + [(16, 256, 128, 128)]


def build_layers(channels: int, device, dtype) -> dict[str, nn.Module]:
    fused = SwitchNorm2d(channels)
    reference = SwitchNorm2d(channels)
    reference.implementation = "reference"
    layers = {"normkit SN": fused, "reference SN": reference, "BatchNorm2d": nn.BatchNorm2d(channels),
              "GroupNorm(32)": nn.GroupNorm(32, channels)}
    return {k: m.to(device=device, dtype=dtype).train() for k, m in layers.items()}


def saved_bytes_beyond_input(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of tensors autograd keeps for backward, excluding the input itself and parameters."""
    seen: dict[int, int] = {}
    params = {p.data_ptr() for p in layer.parameters()}

    def pack(t):
        if t.data_ptr() != x.data_ptr() and t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def run_table(device, dtype, repeats) -> tuple[list[str], list[list], list]:
    rows, plot = [], []
    for shape in GPU_SHAPES if device.type == "cuda" else SHAPES:
        x = torch.randn(shape, device=device, dtype=dtype)
        grad = torch.randn_like(x)
        layers = build_layers(shape[1], device, dtype)
        xg = x.clone().requires_grad_()

        def forward(m=None):
            with torch.no_grad():
                m(x)

        def forward_backward(m=None):
            xg.grad = None
            m(xg).backward(grad)

        # Each sample averages back-to-back calls: over 50 ms on CPU, where whether a call's 6-64 MB output lands on
        # fresh pages (the allocator's choice, ~1,600 page faults per 6 MB) varies from call to call and would
        # otherwise decide single-call samples; over 20 ms on CUDA, so a sample is the GPU's time rather than one
        # launch and sync.
        min_time = 0.02 if device.type == "cuda" else 0.05
        fwd = time_interleaved({k: (lambda m=m: forward(m)) for k, m in layers.items()}, device=device,
                               repeats=repeats, warmup=2, min_time=min_time)
        fwd_bwd = time_interleaved({k: (lambda m=m: forward_backward(m)) for k, m in layers.items()}, device=device,
                                   repeats=repeats, warmup=2, min_time=min_time)
        nbytes = x.numel() * x.element_size()
        for name, m in layers.items():
            row = [str(shape), name, fwd[name] * 1e3, fwd_bwd[name] * 1e3,
                   fwd_bwd[name] / fwd_bwd["BatchNorm2d"], fwd_bwd[name] / fwd_bwd["GroupNorm(32)"],
                   fwd_bwd["reference SN"] / fwd_bwd[name], saved_bytes_beyond_input(m, xg) / 2 ** 20]
            if device.type == "cuda":
                bwd = max(fwd_bwd[name] - fwd[name], 1e-9)
                row += [3 * nbytes / fwd[name] / 1e9, 5 * nbytes / bwd / 1e9]
            rows.append(row)
        plot.append((str(shape), {k: fwd_bwd[k] * 1e3 for k in layers}))
    headers = ["shape", "layer", "fwd ms", "fwd+bwd ms", "fwd+bwd / BN", "fwd+bwd / GN(32)",
               "reference / this (fwd+bwd)", "saved MiB beyond x"]
    if device.type == "cuda":
        headers += ["fwd GB/s (3x model)", "bwd GB/s (5x model)"]
    return headers, rows, plot


def main(argv: list[str] | None = None) -> dict:
    """Returns {"path", "headers", "sections": [{"threads", "rows"}]} (tools/gpu_check.py reads the ratios)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_kernel_benchmark_arguments(parser)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    steady = not on_gpu and steady_cpu_allocator()
    repeats = args.repeats or (30 if on_gpu else 11)
    default_threads = torch.get_num_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = [default_threads] if on_gpu else sorted({1, default_threads})
    sections, results = [], []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        headers, rows, plot = run_table(device, dtype, repeats)
        table = markdown_table(headers, rows)
        print(f"-- {threads} intra-op thread(s)\n{table}", flush=True)
        sections.append(f"### {threads} intra-op thread(s)\n\n{table}\n")
        results.append({"threads": threads, "rows": rows})
    torch.set_num_threads(default_threads)
    steady_note = "; freed memory kept in the heap (common.steady_cpu_allocator), so no layer pays page faults"
    notes = (f"Training mode, {args.dtype}, NCHW, median of {repeats} interleaved repeats (each the mean over "
             f"{20 if on_gpu else 50} ms of back-to-back calls){steady_note if steady else ''}. Targets: CPU fwd+bwd "
             "within 1.2x of GroupNorm(32) (the same backward traffic; GN's forward reads x once, SN's training "
             "forward twice, as the BN statistics need the whole batch first), <= 1.0x BatchNorm2d and >= 3x faster "
             "than the reference; GPU fwd >= 80% of HBM roofline (for tensors larger than the L2 cache), fwd+bwd "
             "within 1.2x of cuDNN BatchNorm2d, >= 5x faster than the reference.\n")
    path = write_results("switch_norm", device, notes + "\n" + "\n".join(sections))
    _plot(plot, path.replace(".md", ".png"), f"SN fwd+bwd, {args.dtype}, {device.type}, {thread_counts[-1]} threads")
    print(f"wrote {path}")
    return {"path": path, "headers": headers, "sections": results}


def _plot(plot, path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(plot[0][1])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(plot))], [p[1][name] for p in plot], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(plot))], [p[0] for p in plot])
    ax.set_ylabel("ms (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
