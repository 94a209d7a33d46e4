"""Timing helpers shared by the benchmarks.

Timings on a noisy shared machine: every alternative is warmed up, then the alternatives are run in an
interleaved round-robin so drifts in machine load hit them alike, and the median of the repeats is reported.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def add_kernel_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every kernel benchmark takes: --device, --dtype, --repeats, --threads."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", default=None,
                        help="comma-separated intra-op CPU thread counts, one table each (default on CPU: 1 and "
                             "torch's default)")


def steady_cpu_allocator() -> bool:
    """Keeps freed CPU tensors in glibc's heap instead of returning them to the OS; True when it could.

    Tensors of a few MB and more come from mmap, and a freed heap top is trimmed: whether the next layer's output
    lands on fresh pages (a page fault per 4 KB, ~1,600 for a 6 MB tensor) then depends on the order of earlier
    allocations, and decides single-layer times on CPU (swings of 0.6-1.6x between runs of the same code). With
    mmap off and trimming off every alternative reuses warm memory, as it would under a caching allocator, and
    the timings compare kernels rather than allocator luck. A no-op outside glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))  # a C int


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], Any]], *, device: torch.device | str = "cpu",
                     warmup: int = 3, repeats: int = 15, min_time: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds.

    A round runs each function `n` times back to back and synchronizes once: on CUDA the launches then queue
    while the host prepares the next call, as in a training loop, and one sync's latency is shared by n calls.
    n is 1, or with `min_time` the number of calls that takes about that long (from the fastest warm-up call).
    """
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        fastest = float("inf")
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            fn()
            synchronize(device)
            fastest = min(fastest, time.perf_counter() - start)
        calls[name] = max(1, math.ceil(min_time / fastest)) if min_time > 0 and fastest > 0 else 1
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return "cpu"


def peer_versions() -> str:
    """torchvision's version when it imports (the peer of the ROI ops), else an empty string."""
    try:
        import torchvision
    except Exception:  # not installed, or built for another torch
        return ""
    return f", torchvision {torchvision.__version__}"


def machine_summary(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}{peer_versions()}, "
                f"CUDA {torch.version.cuda}")
    # Shared machines: the load average says how far the absolute times can be trusted (the ratios, measured
    # interleaved, much further).
    load_average = os.getloadavg()
    load = ", ".join(f"{v:.1f}" for v in load_average)
    shared = (" The machine was loaded by other work (load above its core count): absolute times are noisy, the "
              "ratios of interleaved runs much less so." if load_average[1] > (os.cpu_count() or 1) else "")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average {load}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}{peer_versions()}.{shared}")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, device: torch.device | str, markdown: str, script: str | None = None) -> str:
    """Writes benchmarks/results/<name>_<device>.md (atomically) and returns its path; `script` (the generating
    benchmark) defaults to bench_<name>.py."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}_{device_label(device)}.md")
    header = (f"<!-- generated by benchmarks/{script or f'bench_{name}.py'} on "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} -->\n"
              f"Machine: {machine_summary(device)}\n\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(header + markdown.rstrip() + "\n")
    os.replace(tmp, path)
    return path
