"""What a bug report needs: ``python -m normkit.collect_env``.

Python, the platform, torch and its CUDA, normkit's version and location, the compiled library, which device
kernels each operator has (asked of torch's dispatcher, so it reports what is registered, not what was meant
to be built), the CUDA targets the kernels were compiled for, the visible GPUs and the CPU thread settings.
"""
from __future__ import annotations

import os
import platform
import sys

import torch

import normkit
from normkit import _extension

__all__ = ["DEVICE_KEYS", "op_devices", "collect_env", "main"]

DEVICE_KEYS = ("CPU", "CUDA")


def op_devices() -> dict[str, list[str]]:
    """Each normkit operator (private pieces included) and the devices of DEVICE_KEYS it has kernels for; empty
    for a composite operator, which runs wherever the operators it is built from do."""
    names = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("normkit::"))
    return {name.split("::", 1)[1]: [key for key in DEVICE_KEYS
                                     if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
            for name in names}


def collect_env() -> list[tuple[str, str]]:
    """(label, value) lines of the report."""
    import normkit.ops  # noqa: F401  (loads normkit._C, registering the operators)

    lines = [("Python", sys.version.replace("\n", " ")),
             ("Platform", platform.platform()),
             ("torch", f"{torch.__version__} ({os.path.dirname(torch.__file__)})"),
             ("torch CUDA", torch.version.cuda or "none (CPU-only build)"),
             ("CUDA available", str(torch.cuda.is_available()))]
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        lines.append((f"GPU {index}", f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"))
    lines += [("normkit", f"{normkit.__version__} ({os.path.dirname(normkit.__file__)})")]
    if _extension.LOAD_ERROR is not None:
        lines.append(("normkit._C", f"NOT LOADED: {_extension.LOAD_ERROR}"))
    else:
        from normkit import _C
        lines.append(("normkit._C", _C.__file__))
        lines.append(("CUDA kernels built for", _C.cuda_archs.replace(",", ", ") or "none (CPU-only build)"))
        lines.append(("CPU kernels in use", {"avx2": "AVX2+FMA build", "baseline": "x86-64 baseline build"}.get(
            _C.cpu_kernels, _C.cpu_kernels)))
        lines.append(("operator kernels", "device"))
        devices = op_devices()
        for op in sorted(op for op in devices if devices[op]):
            lines.append((f"  {op}", ", ".join(devices[op])))
        lines.append(("  composite (of the above)", ", ".join(sorted(op for op in devices if not devices[op]))))
    # The CPU kernels run on at::parallel_for, i.e. torch's intra-op pool (OpenMP in the standard wheels).
    backend = next((line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
                    if line.startswith("ATen parallel backend")), "unknown")
    lines += [("CPU threads", f"{torch.get_num_threads()} intra-op ({backend}), {torch.get_num_interop_threads()} "
                              f"inter-op, {os.cpu_count()} CPUs"),
              ("OpenMP environment", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(not set)')} "
                                     f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(not set)')}")]
    return lines


def main() -> None:
    lines = collect_env()
    width = max(len(label) for label, _ in lines)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in lines))


if __name__ == "__main__":
    main()
