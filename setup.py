"""The package's one compiled part: the CPU kernels (caffelite/layers/*.c, see cpu_kernels.py).

A plain C library loaded with ctypes (no Python API). The build is optional: without
a C compiler caffelite still installs and runs the same layers as NumPy passes.
-ffp-contract=off: no fused multiply-adds the code does not ask for, so the solver steps
round as NumPy's and Caffe's do (the vector kernels call FMA instructions by name). No
-march: each vector kernel names its instruction set, and the CPU is asked at run time.
Everything else about the package is in pyproject.toml.
"""
from setuptools import Extension, setup

SOURCES = ("cpu_kernels", "cpu_vectors", "conv_direct", "pool_avx512")

setup(ext_modules=[Extension("caffelite.layers._cpu_kernels",
                             [f"caffelite/layers/{name}.c" for name in SOURCES],
                             depends=["caffelite/layers/conv_direct_body.h",
                                      "caffelite/layers/cpu_vectors.h"],
                             extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off"],
                             optional=True)])
