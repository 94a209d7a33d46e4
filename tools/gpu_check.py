"""`make gpu-check`: one-shot check of the CUDA kernels on a machine with a GPU and a CUDA build of torch.

Builds the extension in place for the local GPU, runs the CUDA tests and the GPU benchmarks (their tables go to
benchmarks/results/*_<gpu>.md) and ends with a pass/fail summary of the GPU targets (docs/design.md, "Targets").
Needs no network: it uses the installed torch, nvcc, pytest and the packages normkit imports (PyYAML, numpy; the
CUDA test files need no pycocotools, OpenCV or Pillow). Each step has a time limit so that the whole check stays
under 8 minutes; a step that fails or runs out of time is reported and the next one still runs. Exit status 0
only when every step and every target passed.

    python tools/gpu_check.py             # the check
    python tools/gpu_check.py --dry-run   # on any machine: the plan, the commands, and that every piece imports
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_test_files() -> list[str]:
    """The test files with CUDA cases: those marking tests `cuda` or parametrizing over conftest's DEVICES (whose
    "cuda" entry carries the mark). Collecting only these keeps the run independent of what the other files import
    (pycocotools, for one, is missing from the GPU machine's image)."""
    tests = os.path.join(ROOT, "tests")
    found = []
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests, name), encoding="utf-8") as f:
                text = f.read()
            if "mark.cuda" in text or re.search(r"\bDEVICES\b", text):
                found.append(os.path.join("tests", name))
    return found


# (benchmark, arguments, time limit in s). Repeats are lowered from the GPU defaults to fit the time budget;
# interleaved medians of 10 are still stable on an idle GPU.
# bench_roi_ops skips the slow Python-loop references (timed in the CPU tables); torchvision, when installed, is
# the comparison that counts.
BENCHMARKS = [("bench_switch_norm.py", ["--device", "cuda", "--repeats", "10"], 60),
              ("bench_roi_ops.py", ["--device", "cuda", "--repeats", "10", "--reference", "off"], 70),
              ("bench_cond_classifier.py", ["--device", "cuda", "--repeats", "10"], 50)]
# Limits add up to 470 s (7.8 minutes) with the 20 s registration check.
# The build compiles for the local GPU only (one arch, every core); 288 cuda-marked tests need the larger share.
BUILD_LIMIT_S, REGISTER_LIMIT_S, TEST_LIMIT_S = 160, 20, 110

# Runs one benchmark's main() in a child process and writes what it returns as JSON (the tables' rows).
DRIVER = ("import json, runpy, sys; sys.path.insert(0, sys.argv[1]); "
          "result = runpy.run_path(sys.argv[2])['main'](sys.argv[4:]); "
          "json.dump(result, open(sys.argv[3], 'w'))")


def run(cmd: list[str], limit: float, env: dict | None = None, shown: int = 3000) -> tuple[bool, str]:
    """Runs `cmd` in the repository root, printing the last `shown` characters of its output (and, when it fails,
    first its lines that report errors: a compiler's message can sit far above the tail); (succeeded, its last
    line)."""
    print("$", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=limit, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out[-shown:])
        return False, f"timed out after {limit:.0f} s"
    if proc.returncode != 0:
        errors = [line for line in proc.stdout.splitlines() if "error" in line.lower()][:40]
        if errors:
            print("lines reporting errors:\n" + "\n".join(line[:400] for line in errors) + "\n(end of them)")
    print(proc.stdout[-shown:], flush=True)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return proc.returncode == 0, tail[0] if proc.returncode == 0 else f"exit {proc.returncode}: {tail[0]}"


def child_env(**variables: str) -> dict:
    """The environment of the steps: ours with `variables`, and the repository first on PYTHONPATH (packages
    carried to the machine through PYTHONPATH stay visible)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, **variables, PYTHONPATH=path)


def peak_bandwidth_gbs() -> float | None:
    """HBM peak of GPU 0 from its memory clock and bus width (double data rate), when torch reports them."""
    import torch
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def toolkit_root(nvcc: str) -> str | None:
    """The CUDA toolkit holding libcudart. torch guesses dirname(dirname(nvcc)), which is wrong when nvcc on PATH is
    a wrapper script (e.g. /usr/local/bin/nvcc): the link then fails with "cannot find -lcudart"."""
    for root in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if any(name.startswith("libcudart.so") for name in _listdir(os.path.join(root, lib))):
                return root
    return None


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def column(result: dict, name: str) -> int:
    return result["headers"].index(name)


def rows_of(result: dict) -> list[list]:
    return [row for section in result["sections"] for row in section["rows"]]


def switch_norm_targets(result: dict, peak: float | None, l2_bytes: int = 0) -> list[tuple[str, bool | None, str]]:
    """GPU SN targets per shape: fwd >= 80% of the HBM peak (float32 tensors larger than the L2 cache only: a
    smaller one is partly read from L2), fwd+bwd within 1.2x of cuDNN BatchNorm2d, >= 5x faster than the reference."""
    checks = []
    layer, shape = column(result, "layer"), column(result, "shape")
    to_bn, speedup = column(result, "fwd+bwd / BN"), column(result, "reference / this (fwd+bwd)")
    bandwidth = column(result, "fwd GB/s (3x model)")
    for row in rows_of(result):
        if row[layer] != "normkit SN":
            continue
        nbytes = 4 * math.prod(int(d) for d in row[shape].strip("()").split(","))
        if nbytes <= l2_bytes:
            checks.append((f"SN {row[shape]} fwd >= 80% of HBM peak", None,
                           f"{nbytes / 2 ** 20:.0f} MiB fits in the {l2_bytes / 2 ** 20:.0f} MiB L2"))
        elif peak is None:
            checks.append((f"SN {row[shape]} fwd >= 80% of HBM peak", None, "peak bandwidth unknown"))
        else:
            share = row[bandwidth] / peak
            checks.append((f"SN {row[shape]} fwd >= 80% of HBM peak", share >= 0.8, f"{share:.0%} of {peak:.0f} GB/s"))
        checks.append((f"SN {row[shape]} fwd+bwd <= 1.2x BatchNorm2d", row[to_bn] <= 1.2, f"{row[to_bn]:.2f}x"))
        checks.append((f"SN {row[shape]} >= 5x reference", row[speedup] >= 5, f"{row[speedup]:.1f}x"))
    return checks


def roi_targets(result: dict) -> list[tuple[str, bool | None, str]]:
    """ROI ops and NMS at least as fast as torchvision's CUDA kernels (when torchvision is installed)."""
    ratio, note = column(result, "normkit / torchvision"), column(result, "note")
    checks = []
    for row in rows_of(result):
        label = f"{row[0]} {row[1]} <= 1.0x torchvision"
        if isinstance(row[ratio], (int, float)):
            checks.append((label, row[ratio] <= 1.0, f"{row[ratio]:.2f}x"))
        else:
            checks.append((label, None, "torchvision not installed"))
        if "same indices" in row[note] or "INDICES DIFFER" in row[note]:  # NMS rows, with torchvision
            checks.append((f"{row[0]} keeps torchvision's indices", "INDICES DIFFER" not in row[note], row[note]))
    return checks


def cond_classifier_targets(result: dict) -> list[tuple[str, bool | None, str]]:
    """The fused ops >= 1.5x the official formulation forward+backward; the whole head at least as fast."""
    problem, op, speedup = column(result, "problem"), column(result, "op"), column(result, "fwd+bwd speedup")
    checks = []
    for row in rows_of(result):
        need = 1.0 if row[op] == "head" else 1.5
        checks.append((f"CondNet {row[problem]} {row[op]} fwd+bwd >= {need}x official", row[speedup] >= need,
                       f"{row[speedup]:.2f}x"))
    return checks


TARGETS = {"bench_switch_norm.py": lambda r, gpu: switch_norm_targets(r, gpu["peak"], gpu["l2"]),
           "bench_roi_ops.py": lambda r, gpu: roi_targets(r),
           "bench_cond_classifier.py": lambda r, gpu: cond_classifier_targets(r)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and check that the tests and benchmarks import, without a GPU")
    args = parser.parse_args(argv)
    python = sys.executable
    import torch

    if args.dry_run:
        return dry_run(python)
    start = time.time()
    steps: list[tuple[str, bool, str]] = []
    if not torch.cuda.is_available() or torch.version.cuda is None:
        print(f"gpu-check FAILED: no CUDA device visible to torch {torch.__version__}")
        return 2
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    major, minor = torch.cuda.get_device_capability(0)
    print(f"GPU {torch.cuda.get_device_name(0)} (sm_{major}{minor}), torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, nvcc {nvcc if os.path.exists(nvcc) else 'NOT FOUND'}", flush=True)

    if shutil.which("ninja") is None:
        print("warning: ninja not found: torch compiles the sources one after the other and the build may run past "
              f"its {BUILD_LIMIT_S} s limit", flush=True)
    # All cores: make's MAX_JOBS=2 default (for small CI machines) would double the build's time.
    env = child_env(TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", NORMKIT_WITH_CUDA="1",
                    MAX_JOBS=os.environ.get("NORMKIT_GPU_CHECK_JOBS", str(os.cpu_count() or 4)))
    cuda_home = toolkit_root(nvcc)
    if cuda_home and "CUDA_HOME" not in env:
        env["CUDA_HOME"] = cuda_home
    print(f"CUDA_HOME {env.get('CUDA_HOME', 'unset (torch guesses from nvcc)')}, {env['MAX_JOBS']} compile jobs",
          flush=True)
    ok, note = run([python, "setup.py", "build_ext", "--inplace"], BUILD_LIMIT_S, env)
    steps.append(("build (CUDA kernels for this GPU)", ok, note))
    if ok:
        ok, note = run([python, "-c", "import normkit._C, torch; assert torch.ops.normkit.nms.default.has_kernel_for_"
                        "dispatch_key(torch._C.DispatchKey.CUDA), 'no CUDA kernels in the build'; print('CUDA kernels "
                        "registered')"], REGISTER_LIMIT_S, env)
        steps.append(("CUDA kernels registered", ok, note))
    if ok:
        # The slowest tests are listed and failures kept whole: the first GPU run is also the first timing.
        ok, note = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15", "-m", "cuda",
                        *cuda_test_files()], TEST_LIMIT_S, env, shown=30000)
        steps.append(("CUDA tests (pytest -m cuda)", ok, note))

    targets: list[tuple[str, bool | None, str]] = []
    if steps[0][1]:
        gpu = {"peak": peak_bandwidth_gbs(), "l2": getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)}
        with tempfile.TemporaryDirectory() as tmp:
            for script, script_args, limit in BENCHMARKS:
                out = os.path.join(tmp, script + ".json")
                ok, note = run([python, "-c", DRIVER, os.path.join(ROOT, "benchmarks"),
                                os.path.join(ROOT, "benchmarks", script), out, *script_args], limit, env)
                if ok:
                    with open(out) as f:
                        result = json.load(f)
                    note = os.path.relpath(result["path"], ROOT)
                    targets += TARGETS[script](result, gpu)
                steps.append((f"benchmark {script}", ok, note))

    print("\n==== gpu-check summary ====")
    for name, ok, note in steps:
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {note}")
    print("\nGPU targets (docs/design.md, Targets):")
    for name, ok, note in targets:
        print(f"[{'PASS' if ok else 'FAIL' if ok is not None else 'n/a '}] {name}: {note}")
    failed = [s for s in steps if not s[1]] + [t for t in targets if t[1] is False]
    print(f"\ngpu-check {'PASSED' if not failed else f'FAILED ({len(failed)} failing)'} in {time.time() - start:.0f} s")
    return 0 if not failed else 1


def dry_run(python: str) -> int:
    """Everything that does not need a GPU: the benchmark entry points exist and take the arguments used here,
    and the CUDA tests are collected (tests/test_gpu_check.py checks the target checks against result rows)."""
    env = child_env()
    results = []
    for script, script_args, limit in BENCHMARKS:
        results.append(run([python, os.path.join(ROOT, "benchmarks", script), *script_args, "--help"], 60, env))
    results.append(run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "-qq", "-m", "cuda",
                        *cuda_test_files()], 120, env))
    print(f"plan: build with TORCH_CUDA_ARCH_LIST=<local GPU> (limit {BUILD_LIMIT_S} s), pytest -m cuda on "
          f"{' '.join(cuda_test_files())} (limit {TEST_LIMIT_S} s), then " +
          ", ".join(f"{s} ({limit} s)" for s, _, limit in BENCHMARKS) +
          f"; total limit {BUILD_LIMIT_S + REGISTER_LIMIT_S + TEST_LIMIT_S + sum(b[2] for b in BENCHMARKS)} s")
    ok = all(r[0] for r in results)
    print(f"gpu-check dry run {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
