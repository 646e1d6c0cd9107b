"""DCT-DP over torch.distributed: sparse gradient exchange with error feedback.

- ``sparse_all_reduce``: compress a tensor against a threshold into fixed-capacity wire
  buffers and average them across ranks, with one all-gather ("allgather") or an all-to-all
  of W shards and an all-gather of the reduced shards ("reduce_scatter"); usable alone.
- ``DCTState`` + ``dct_hook``: an asynchronous DDP communication hook with layer-wise
  thresholds, error feedback keyed by parameter, both exchanges ("auto" picks per bucket),
  dense warm-up, checkpointing and traffic statistics::

      ddp.register_comm_hook(DCTState(ratio=0.01, module=model), dct_hook)

Works with NCCL (CUDA tensors) and gloo (CPU tensors). ``sizing`` holds the host arithmetic
(capacities, shards, bytes per rank) shared with the traffic benchmark. See docs/distributed.md.
"""

from .allreduce import sparse_all_reduce
from .collectives import all_gather_rows
from .hook import dct_hook
from .state import DCTState

__all__ = ["DCTState", "dct_hook", "sparse_all_reduce", "all_gather_rows"]
