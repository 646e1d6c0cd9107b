"""Bytes per rank on the data-parallel side, counted as docs/design.md counts them.

- ``DenseTraffic`` + ``dense_hook``: the baseline, DDP's plain all-reduce written as a comm
  hook (``torch.distributed.all_reduce``, then divide by W, as DDP's default) so that its bytes
  are counted the same way as DCT-DP's: an all-reduce of M bytes counts as a ring,
  2 (W - 1)/W x M sent and as much received.
- ``dp_totals(state, world)``: (bytes sent + received, bytes of a ring all-reduce of the same
  buckets) from a ``DCTState``'s ``stats()`` or a ``DenseTraffic``.
"""

from typing import Dict, Tuple

import torch
import torch.distributed as dist


class DenseTraffic:
    """State of ``dense_hook``: the process group and byte counters (host ints, no sync)."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bytes_ring = 0

    def stats(self) -> Dict[str, float]:
        """The counters under the names of ``DCTState.stats()`` (compression is 1)."""
        total = self.bytes_sent + self.bytes_received
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "bytes_ring": self.bytes_ring,
                "compression": self.bytes_ring / total if total else 0.0}


def dense_hook(state: DenseTraffic, bucket: dist.GradBucket):
    """DDP comm hook: the average of the bucket by one asynchronous all-reduce (what DDP does
    without a hook), counting ring bytes. Returns the future of the averaged bucket."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    nbytes = buffer.numel() * buffer.element_size()
    state.bytes_sent += 2 * (world - 1) * nbytes / world
    state.bytes_received += 2 * (world - 1) * nbytes / world
    state.bytes_ring += 4 * (world - 1) * nbytes / world
    buffer.div_(world)
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def dp_totals(state, world: int) -> Tuple[float, float]:
    """(bytes this rank sent plus received in the gradient exchange, bytes a ring all-reduce
    of the same buckets would send plus receive), totals since the state was made.

    With the traffic statistics of docs/design.md (``bytes_sent``, ``bytes_received``,
    ``bytes_ring``) these are read as they are. A ``DCTState`` from before them reports
    ``bytes_sent`` as the bytes a rank contributed (wire buffers, and dense all-reduces at
    their size) and ``bytes_dense`` as the buckets' size; at W = 2 an all-gather of N bytes
    and a ring all-reduce of N bytes both move N out and N in, so there the contract's totals
    are exactly twice those, and only there (a ValueError otherwise).
    """
    stats = state.stats()
    if "bytes_received" in stats and "bytes_ring" in stats:
        return stats["bytes_sent"] + stats["bytes_received"], stats["bytes_ring"]
    if world != 2:
        raise ValueError(f"world: this DCTState's statistics have no bytes_received/"
                         f"bytes_ring; they convert to docs/design.md's terms only at "
                         f"W = 2, not {world}")
    return 2 * int(stats["bytes_sent"]), 2 * int(stats["bytes_dense"])


def overflow_counts(state) -> Dict[str, int]:
    """(sparse bucket exchanges, of those that overflowed, entries that overflowed) from a
    DCTState (zeros for the dense baseline)."""
    if isinstance(state, DenseTraffic):
        return {"buckets_sparse": 0, "overflowed_buckets": 0, "overflow": 0}
    stats = state.stats()
    return {"buckets_sparse": int(stats.get("buckets_sparse", 0)),
            "overflowed_buckets": int(stats.get("overflowed_buckets", 0)),
            "overflow": int(stats.get("overflow", 0))}
