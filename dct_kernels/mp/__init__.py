"""DCT-MP: per-sample activation sparsity across a model-parallel boundary, with autograd.

- ``sparsify_rows``, ``pack_rows``, ``unpack_rows`` (``rows.py``): the local pieces, dense in
  and out or the (values, indices) halves of an exchange.
- ``sparse_all_to_all``, ``SparseAllToAll``, ``all_to_all_bytes`` (``exchange.py``): the
  differentiable all-to-all across ranks that sends only each row's k largest activations
  forward and the gradient at those positions backward, and its byte count.

See docs/mp.md.
"""

from .exchange import SparseAllToAll, all_to_all_bytes, sparse_all_to_all
from .rows import pack_rows, sparsify_rows, unpack_rows

__all__ = ["sparsify_rows", "pack_rows", "unpack_rows", "sparse_all_to_all",
           "all_to_all_bytes", "SparseAllToAll"]
