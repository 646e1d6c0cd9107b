"""``dct_hook``: the DDP communication hook of DCT-DP."""

import torch
import torch.distributed as dist

from . import collectives
from .futures import after
from .state import DCTState

__all__ = ["dct_hook"]


def _dense(state: DCTState, layout, buffer: torch.Tensor):
    world = dist.get_world_size(state.group())
    reduced = collectives.all_reduce_async(buffer, state.group())
    state.record_dense(layout)
    return after([reduced], lambda: buffer.div_(world), buffer.device)


def _sparse(state: DCTState, layout, buffer: torch.Tensor):
    state.update_thresholds(layout, buffer)
    exchange = state.exchange_of(layout)
    futures, small = [], None
    if layout.dense_index is not None:
        # Small parameters leave the compress (zeroed, with τ = +inf) for one all-reduce.
        small = buffer.index_select(0, layout.dense_index)
        buffer.index_fill_(0, layout.dense_index, 0)
        futures.append(collectives.all_reduce_async(small, state.group()))
    if exchange.name == "reduce_scatter":
        step = state.step
        future, sent = exchange.start(buffer, state.step_order(),
                                      lambda: state.shard_refresh(layout, step))
    else:
        future, sent = exchange.start(buffer, state.step)
    state.record_sparse(layout, exchange, sent)
    if small is None:
        return future
    world = dist.get_world_size(state.group())

    def put_back():
        buffer.index_copy_(0, layout.dense_index, small.div_(world))
        return buffer

    return after([future] + futures, put_back, buffer.device)


def dct_hook(state: DCTState, bucket: dist.GradBucket):
    """DDP communication hook of DCT-DP: sparse gradients with layer-wise thresholds and
    error feedback, exchanged asynchronously.

    Register with ``ddp.register_comm_hook(DCTState(...), dct_hook)``. Per bucket:

    1. The first time a bucket layout is seen (the first step, and after DDP rebuilds its
       buckets) it is sized for the world size — which exchange, wire capacities, the
       reduce_scatter shards — and every rank gathers every rank's fingerprint of the
       configuration and the layout; all raise ValueError when they differ (no hang).
    2. During the first ``warmup_steps`` steps, or when no parameter has ``min_numel``
       elements: a dense all-reduce (async), divided by the world size in its callback.
    3. Otherwise, when a τ is due (never computed, ``refresh_every`` steps old, or the last
       step's kept counts left the band or overflowed — decided on the device one step
       earlier): τ_p = max(exact k_p-th largest |gradient + residual|, 2^-149) for every
       parameter, in one segmented ``select_threshold``; exact zeros never pass.
    4. Small parameters are taken out for one dense all-reduce (async). The bucket's exchange
       starts: with "allgather", ``compress`` packs the entries with |gradient + residual| >=
       τ_p into one fixed-capacity wire buffer (the rest stays in the residual) and one
       all-gather is issued; with "reduce_scatter", the same shard by shard into W rows and
       one all-to-all is issued, and the rest is queued: at the step's last bucket, on this
       thread and in bucket order (so every rank issues its collectives in the same order),
       the shard owner's rank-order sum, second threshold τ' and shard residual, and one
       all-gather of the shard payloads.
    5. Each parameter's kept count (first stage) is compared with its band on the device and staged to the
       host for the next step's decision; statistics accumulate (bytes on the host, counts on
       the device).
    6. In the last collective's callback, ``decompress_many(average=True)`` writes the
       average into the bucket, bitwise identical on every rank; the small parameters'
       average is put back; the returned future completes.

    No host synchronization on the per-step path: everything is sized from host-known k, and
    the only wait is for the one-step-old event of the staged flags. The first step of each
    bucket layout (the cross-rank check) does synchronize. The backward pass goes on while the
    collectives run (on NCCL the callbacks' kernels are ordered after the collectives by CUDA
    events, not by a host wait).

    Args:
        state: a ``DCTState``.
        bucket: DDP's ``GradBucket`` (uses ``buffer()``, ``parameters()`` and ``is_last()``).

    Returns:
        A ``torch.futures.Future`` that completes with the bucket's averaged flat gradient
        (the bucket buffer itself, in its dtype).

    Example::

        >>> state = DCTState(ratio=0.01, module=model)
        >>> ddp = DistributedDataParallel(model, device_ids=[rank])
        >>> ddp.register_comm_hook(state, dct_hook)
        >>> # train as usual; log state.stats() now and then; checkpoint state.state_dict()
    """
    buffer = bucket.buffer()
    try:
        layout = state.bucket_layout(bucket)
        if state.dense_now(layout):
            future = _dense(state, layout, buffer)
        else:
            future = _sparse(state, layout, buffer)
    except Exception as error:
        state.bucket_done(bucket, error)
        raise
    state.bucket_done(bucket)
    return future
