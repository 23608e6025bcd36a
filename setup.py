"""Builds pbp_fast._C against the torch that is already installed.

    pip install --no-build-isolation -e .      (or without -e)

A CppExtension (OpenMP) is always built from csrc/*.cpp and csrc/cpu/*.cpp; the CUDA sources in
csrc/cuda are added when a CUDA toolkit and a CUDA build of torch are both present.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("pbp_fast: torch must be installed before building (e.g. `pip install torch`), "
             "then run `pip install --no-build-isolation .`")

here = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, pattern)))


sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
cuda_sources = rel("csrc/cuda/*.cu")
with_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None \
    and os.environ.get("PBP_FAST_NO_CUDA", "0") != "1"

openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
# -fno-trapping-math lets the compiler vectorise the clamps of the sigmoid; results are unchanged.
cxx_flags = ["-O3", "-std=c++17", "-fno-trapping-math", "-fno-math-errno", *openmp]


def host_has(*flags):
    """Whether this (the building) x86-64 CPU has all the given /proc/cpuinfo flags."""
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":", 1)[1].split() for line in f
                         if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in have for flag in flags)


# The extension is compiled on the machine that runs it: use AVX2 + FMA when this CPU has them
# (the kernels' loops are written for the compiler to vectorise). PBP_FAST_PORTABLE=1 builds for
# baseline x86-64 (e.g. a wheel for other machines); PBP_FAST_NATIVE=1 for -march=native.
if os.environ.get("PBP_FAST_NATIVE", "0") == "1":
    cxx_flags.append("-march=native")
elif os.environ.get("PBP_FAST_PORTABLE", "0") != "1" and host_has("avx2", "fma"):
    cxx_flags += ["-mavx2", "-mfma"]
ext_kwargs = dict(
    name="pbp_fast._C",
    sources=sources + (cuda_sources if with_cuda else []),
    extra_compile_args={"cxx": cxx_flags + (["-DPBP_WITH_CUDA"] if with_cuda else []),
                        "nvcc": ["-O3", "--use_fast_math"]},
    extra_link_args=openmp,
    py_limited_api=False,
)
ext = CUDAExtension(**ext_kwargs) if with_cuda else CppExtension(**ext_kwargs)

setup(
    packages=["pbp_fast", "pbp_fast.kernels"],
    package_dir={"pbp_fast": "pbp_fast", "pbp_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
