"""dct_kernels: GPU kernels for Dynamic Communication Thresholding (DCT).

Hard thresholding of gradients (with error feedback) and activations, packed into compact
wire buffers for torch.distributed. See README.md, and docs/design.md for the contract.
"""

from .ops import (available_backends, compress, compress_rows, compress_shards, decompress,
                  decompress_many, decompress_rows, gather_rows, payload_errors,
                  reset_payload_errors, select_threshold)
from .payload import RowPayload, SparsePayload
from .mp import (SparseAllToAll, all_to_all_bytes, pack_rows, sparse_all_to_all, sparsify_rows,
                 unpack_rows)

__version__ = "0.1.0"

__all__ = ["available_backends", "select_threshold", "compress", "compress_shards", "decompress",
           "decompress_many", "compress_rows", "decompress_rows", "gather_rows",
           "payload_errors", "reset_payload_errors", "SparsePayload", "RowPayload",
           "sparsify_rows", "pack_rows", "unpack_rows", "sparse_all_to_all", "all_to_all_bytes",
           "SparseAllToAll", "__version__"]
