"""Build of the optional C kernels; everything else about the package is in pyproject.toml.

The extension is ``optional``: where no C compiler is at hand the install still succeeds and the model
uses its PyTorch implementation of the same descriptor (slower at inference, identical numbers).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("driver.models._gm_kernels", ["driver/models/_gm_kernels.c"],
                             extra_compile_args=["-O3", "-std=c99", "-fopenmp-simd"], optional=True)])
