"""The package's one compiled part: the CPU kernels (caffelite/layers/cpu_kernels.c).

A plain C library loaded with ctypes (no Python API). The build is optional: without
a C compiler caffelite still installs and runs the same layers as NumPy passes.
-ffp-contract=off: no fused multiply-adds, so the solver steps round as NumPy's and
Caffe's do.
Everything else about the package is in pyproject.toml.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("caffelite.layers._cpu_kernels", [f"caffelite/layers/{name}.c" for name in
                              ("cpu_kernels", "cpu_vectors", "conv_direct", "pool_avx512")],
                             depends=["caffelite/layers/conv_direct_body.h",
                                      "caffelite/layers/cpu_vectors.h"],
                             extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off"],
                             optional=True)])
