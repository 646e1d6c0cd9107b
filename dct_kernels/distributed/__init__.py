"""DCT-DP over torch.distributed: sparse gradient exchange with error feedback.

- ``sparse_all_reduce``: compress a tensor against a threshold into a fixed-capacity wire
  buffer, all-gather the buffers, and average them with ``decompress_many``; usable alone.
- ``DCTState`` + ``dct_hook``: a DDP communication hook with layer-wise thresholds, error
  feedback keyed by parameter, dense warm-up, checkpointing and statistics::

      ddp.register_comm_hook(DCTState(ratio=0.01, module=model), dct_hook)

Works with NCCL (CUDA tensors) and gloo (CPU tensors). See docs/distributed.md.
"""

from .collectives import all_gather_rows, sparse_all_reduce
from .hook import dct_hook
from .state import DCTState

__all__ = ["DCTState", "dct_hook", "sparse_all_reduce", "all_gather_rows"]
