"""The ``"allgather"`` exchange: one fixed-capacity wire buffer per rank, one all-gather,
``decompress_many(average=True)`` in the collective's callback.

Per rank and step it sends its buffer (N bytes) and receives the W - 1 others': the bytes it
receives grow with W.
"""

import torch

from .. import ops
from . import collectives
from .futures import after


class AllGatherExchange:
    """Sized once from a bucket layout; ``start`` once per sparse step.

    ``start(buffer, order, refresh_due)`` (the interface it shares with
    ``ReduceScatterExchange``; this exchange has no later stage, so it uses neither ``order``
    nor ``refresh_due``) compresses ``buffer`` (the bucket, dense positions already zeroed)
    against the layout's per-parameter thresholds with its error-feedback residual, issues the
    all-gather (async) and returns the future that completes, in the all-gather's callback,
    once the bucket holds the average, with this rank's payload (for the band check and
    statistics).
    """

    name = "allgather"

    def __init__(self, layout, *, group, value_dtype, backend, validate, errors):
        self.layout = layout
        self.group = group
        self.value_dtype = value_dtype
        self.backend = backend
        self.validate = validate
        self.errors = errors
        self.capacity = layout.capacity
        self.send = torch.zeros(layout.plan.allgather_row_bytes, dtype=torch.uint8,
                                device=layout.device)

    def traffic(self):
        """(sent, received) bytes per rank of one step (without the dense part)."""
        n = self.send.numel()
        return n, (self.layout.world - 1) * n

    def start(self, buffer: torch.Tensor, order, refresh_due):
        """Returns (future, payload): the future of the bucket's average, and this rank's
        payload (read by the band check after this call; its buffer is not reused until the
        next step)."""
        layout = self.layout
        payload = ops.compress(buffer, layout.thresholds, segments=layout.segments,
                               residual=layout.residual, capacity=self.capacity,
                               value_dtype=self.value_dtype,
                               index_encoding=layout.index_encoding, out=self.send,
                               backend=self.backend)
        rows, gathered = collectives.all_gather_rows_async(self.send, self.group)

        def finish():
            ops.decompress_many(rows, out=buffer, average=True, validate=self.validate,
                                capacity=self.capacity, value_dtype=payload.value_dtype,
                                index_encoding=payload.index_encoding,
                                num_scales=payload.num_scales or None, errors=self.errors,
                                backend=self.backend)
            return buffer

        return after([gathered], finish, buffer.device), payload
