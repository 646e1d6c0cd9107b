"""Backend "cuda": the compiled CUDA C++ core in csrc/, bound with pybind11.

The compiled module ``dct_kernels._cuda`` is built by setup.py through CMake when nvcc is found.
Until the core's kernels exist this backend reports itself unavailable, and ops on CUDA tensors
use the Triton backend.
"""

try:
    from .. import _cuda  # noqa: F401  (the compiled extension)
except ImportError as exc:  # not built on this machine
    raise ImportError(f"dct_kernels._cuda not found: {exc}") from exc


def available() -> str:
    return "extension built without kernels"
