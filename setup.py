"""Builds normkit._C against the installed torch: CPU kernels always, CUDA kernels when torch has CUDA and the
CUDA toolkit (nvcc) is found.

Install from a checkout (`pip install --no-build-isolation -e .`) or from a source archive
(`pip install --no-build-isolation normkit-<version>.tar.gz`); without --no-build-isolation pip would build
against a freshly downloaded torch instead of the installed one. Environment:

    NORMKIT_WITH_CUDA=0|1   force the CUDA kernels off or on (default: on when torch has CUDA and nvcc is found)
    TORCH_CUDA_ARCH_LIST    compute capabilities to build for, e.g. "8.0 9.0+PTX" (default: the visible GPUs',
                            else every capability this torch supports)
    MAX_JOBS                parallel compile jobs
    CUDA_HOME               the CUDA toolkit, when nvcc is not on PATH
"""
import glob
import os
import re
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, _get_cuda_arch_flags

ROOT = os.path.dirname(os.path.abspath(__file__))


def with_cuda() -> bool:
    forced = os.environ.get("NORMKIT_WITH_CUDA")
    if forced == "1" and (torch.version.cuda is None or CUDA_HOME is None):
        raise SystemExit(f"normkit: NORMKIT_WITH_CUDA=1 needs a CUDA build of torch (this torch {torch.__version__} "
                         f"has CUDA {torch.version.cuda}) and the CUDA toolkit (found: {CUDA_HOME}; set CUDA_HOME)")
    if forced is not None:
        return forced == "1"
    if torch.version.cuda is not None and CUDA_HOME is None:
        print(f"normkit: torch {torch.__version__} has CUDA {torch.version.cuda} but no CUDA toolkit was found "
              f"(nvcc on PATH or CUDA_HOME): building the CPU kernels only")
    return torch.version.cuda is not None and CUDA_HOME is not None


def make_extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/autograd/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fno-wrapv undoes the -fwrapv that Python's own build flags add to every extension: with wrapping signed
    # overflow GCC cannot bound the kernels' int64 loop counters, and leaves their reductions unvectorized
    # (3-5x slower SN statistics). No normkit code relies on signed overflow. -fno-math-errno and -fno-trapping-math
    # (PyTorch's own flags) let sqrt inline as one instruction and branches on floats become selects, so the SN
    # coefficient loops vectorize; no normkit code reads errno or floating-point exception flags.
    cxx_flags = ["-O3", "-fno-wrapv", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not with_cuda():
        return CppExtension("normkit._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # torch's choice of -gencode flags (TORCH_CUDA_ARCH_LIST or its defaults), given explicitly so that the same
    # list is recorded in the library for collect_env (torch adds none of its own once any is given).
    arch_flags = _get_cuda_arch_flags()
    targets = ",".join(re.findall(r",code=(\w+)", " ".join(arch_flags)))  # of -gencode=arch=compute_80,code=sm_80
    print(f"normkit: building CPU and CUDA kernels for {targets}")
    return CUDAExtension(
        "normkit._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DNORMKIT_WITH_CUDA", f"-DNORMKIT_CUDA_ARCHS={targets}"],
                            "nvcc": ["-O3", "-lineinfo", "-DNORMKIT_WITH_CUDA"] + arch_flags},
        extra_link_args=link_flags)


class BuildOps(BuildExtension.with_options(no_python_abi_suffix=False)):
    """Stops early, with what to do, when the C++ compiler is missing (the ops have no prebuilt fallback)."""

    def build_extensions(self):
        compiler = self.compiler.compiler_cxx[0]  # the one torch checks and builds C++ with
        if shutil.which(compiler) is None:
            raise SystemExit(f"normkit: the C++ compiler {compiler!r} was not found. normkit compiles its operators "
                             f"(normkit._C) at install time against the installed torch and ships no prebuilt ones: "
                             f"install a C++ compiler with OpenMP (e.g. g++), or point CXX at one, and reinstall")
        super().build_extensions()


setup(ext_modules=[make_extension()], cmdclass={"build_ext": BuildOps})
