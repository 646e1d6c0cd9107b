"""Backend "triton": Triton kernels for every op, one file per kernel family.

- ``select_threshold``: exact radix select of the k-th largest magnitude (histogram passes on
  the device).
- ``compress``: single-pass, index-ordered compaction into the wire buffer with the error-feedback
  residual update fused in (decoupled look-back across tiles).
- ``decompress``: decompress and the rank-ordered merge of decompress_many, with device-side
  payload checks.
- ``rows``: per-row top-k for compress_rows, decompress_rows and gather_rows.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (for tests).
"""

import torch
import triton  # noqa: F401  (ImportError here means "not installed")

from ..interpreter import triton_interpreting
# The backend functions shadow their modules' names here; tools that tune a module's tile sizes
# reach it with importlib.import_module("dct_kernels.backends.triton_kernels.<op>").
from .compress import compress, count_kept
from .decompress import decompress, decompress_many
from .rows import compress_rows, decompress_rows, gather_rows
from .select_threshold import select_threshold

NAME = "triton"

__all__ = ["compress", "count_kept", "compress_rows", "decompress", "decompress_many",
           "decompress_rows", "gather_rows", "select_threshold", "available", "NAME"]


def available() -> str:
    if torch.cuda.is_available() or triton_interpreting():
        return "available"
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
