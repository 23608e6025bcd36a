"""Builds pbp_fast._C against the torch that is already installed.

    pip install --no-build-isolation -e .      (or without -e)

A CppExtension (OpenMP) is built from csrc/*.cpp and csrc/cpu/*.cpp, in the C++ standard that
the installed torch's headers require (C++17 up to torch 2.13, C++20 from 2.14).  The CUDA
kernels are Triton's (kernels/, installed as pbp_fast.kernels), compiled at run time.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths
except ImportError:
    sys.exit("pbp_fast: the build compiles against the torch already installed: install torch "
             "first (e.g. pip install torch==2.13.0), then pip install --no-build-isolation .")

here = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, pattern)))


def cxx_standard() -> str:
    """The standard the installed torch needs: ATen/ATen.h stops compilers whose __cplusplus is
    below it (201703L: C++17; 202002L: C++20)."""
    for inc in include_paths():
        header = os.path.join(inc, "ATen", "ATen.h")
        if os.path.isfile(header):
            with open(header) as f:
                found = re.search(r"__cplusplus\s*<\s*(\d{4})\d{2}L", f.read())
            if found:
                return "c++20" if int(found.group(1)) >= 2020 else "c++17"
    return "c++17"


openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
# -fno-trapping-math lets the compiler vectorise the clamps of the sigmoid; results are unchanged.
cxx_flags = ["-O3", f"-std={cxx_standard()}", "-fno-trapping-math", "-fno-math-errno", *openmp]


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

setup(
    packages=find_packages(include=["pbp_fast", "pbp_fast.*"]) + ["pbp_fast.kernels"],
    package_dir={"pbp_fast.kernels": "kernels"},
    ext_modules=[CppExtension(name="pbp_fast._C", sources=rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp"),
                              extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp,
                              py_limited_api=False)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
