"""Builds normkit._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is available.

Build with `pip install --no-build-isolation -e .` so the extension compiles against the installed torch
(build isolation would download a fresh CUDA torch). Set NORMKIT_WITH_CUDA=0/1 to force either way.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def with_cuda() -> bool:
    forced = os.environ.get("NORMKIT_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def make_extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if with_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "-lineinfo"]
        return CUDAExtension(
            "normkit._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DNORMKIT_WITH_CUDA"], "nvcc": nvcc_flags + ["-DNORMKIT_WITH_CUDA"]},
            extra_link_args=link_flags)
    return CppExtension("normkit._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(ext_modules=[make_extension()], cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)})
