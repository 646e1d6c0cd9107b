"""Build script.

The package is pure Python plus Triton kernels today. The CUDA C++ core (csrc/, described by
CMakeLists.txt) is not part of the build yet: CUDA tensors use the Triton backend, and
``dct_kernels.available_backends()["cuda"]`` says so.
"""

from setuptools import setup

setup()
