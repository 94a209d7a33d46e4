"""Compile every csrc/cuda/*.cu to object files (sm_80 and sm_90) with the local nvcc.

CPU-only machines cannot run the CUDA kernels, but they can still compile them, so CUDA code never rots
unseen. The CPU torch wheel ships the CUDA headers except the generated `c10/cuda/impl/cuda_cmake_macros.h`;
an empty stand-in is supplied in a temporary include directory. Objects are cached under build/cuda_check
and recompiled only when a source or header under csrc/ changed.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("80", "90")


def newest_header_mtime() -> float:
    headers = glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
    headers += glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True)
    return max((os.path.getmtime(h) for h in headers), default=0.0)


def compile_one(nvcc: str, source: str, out_dir: str, stub_dir: str) -> tuple[str, int, str, float]:
    obj = os.path.join(out_dir, os.path.basename(source) + ".o")
    cmd = [nvcc, "-c", source, "-o", obj, "-std=c++20", "-O2", "-Xcompiler", "-fPIC", "-DNORMKIT_WITH_CUDA",
           "-I", os.path.join(ROOT, "csrc"), "-I", stub_dir, "-I", sysconfig.get_paths()["include"]]
    for path in include_paths():
        cmd += ["-I", path]
    cmd += list(COMMON_NVCC_FLAGS)
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, proc.returncode, proc.stdout + proc.stderr, time.time() - start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")),
                        help="parallel nvcc processes (default: $MAX_JOBS or 2)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: skipping the CUDA compile check")
        return 0
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    out_dir = os.path.join(ROOT, "build", "cuda_check")
    os.makedirs(out_dir, exist_ok=True)
    header_time = newest_header_mtime()
    stale = []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        if not os.path.exists(obj) or os.path.getmtime(obj) < max(os.path.getmtime(src), header_time):
            stale.append(src)
    print(f"CUDA compile check: {len(sources)} sources, {len(stale)} to (re)compile for sm_{', sm_'.join(ARCHS)}")
    failures = 0
    with tempfile.TemporaryDirectory() as stub_dir:
        os.makedirs(os.path.join(stub_dir, "c10", "cuda", "impl"))
        open(os.path.join(stub_dir, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w").close()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for src, rc, log, secs in pool.map(lambda s: compile_one(nvcc, s, out_dir, stub_dir), stale):
                name = os.path.relpath(src, ROOT)
                if rc != 0:
                    failures += 1
                    print(f"FAILED {name}\n{log}")
                else:
                    print(f"ok     {name} ({secs:.0f}s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
