"""``dct_hook``: the DDP communication hook of DCT-DP."""

import torch
import torch.distributed as dist

from .. import ops
from . import collectives
from .layout import BucketLayout
from .state import DCTState

__all__ = ["dct_hook"]


def _completed(tensor: torch.Tensor):
    """A completed future holding ``tensor``. On CUDA it records the current stream, so DDP's
    wait makes its stream wait for our kernels (no host sync)."""
    if tensor.is_cuda:
        future = torch.futures.Future(devices=[tensor.device])
    else:
        future = torch.futures.Future()
    future.set_result(tensor)
    return future


def _dense(state: DCTState, buffer: torch.Tensor, group, world: int) -> None:
    dist.all_reduce(buffer, group=group)
    buffer.div_(world)
    state._stats.buckets_dense += 1
    nbytes = buffer.numel() * buffer.element_size()
    state._stats.bytes_sent += nbytes
    state._stats.bytes_dense += nbytes


def _refresh(state: DCTState, layout: BucketLayout, buffer: torch.Tensor, early: bool) -> None:
    """Exact layer-wise τ for every parameter of the bucket, from (gradient + residual), with
    one segmented selection. Dense segments get +inf (they never enter the payload), segments
    with k = numel get -inf (everything passes, at every step)."""
    acc = buffer.to(torch.float32) + layout.residual
    taus = ops.select_threshold(acc, layout.ks_host, segments=layout.offsets,
                                backend=state.backend)
    taus = torch.where(layout.keep_all_mask, float("-inf"), taus.to(torch.float32))
    layout.thresholds.copy_(torch.where(layout.sparse_mask, taus, float("inf")))
    for s in layout.states:
        if s is not None:
            s.refreshed_at = state.step
    stats = state._stats
    stats.refreshes += layout.owned
    stats.bucket_refreshes += 1
    stats.early_refreshes += int(early)


def _needs_refresh(state: DCTState, layout: BucketLayout):
    """(refresh, early): whether to recompute the bucket's τ now. Scheduled when a parameter's
    τ was never computed or is ``refresh_every`` steps old; early when the last step's kept
    counts (staged on the device one step ago) left the band or the payload overflowed."""
    for s in layout.states:
        if s is not None and (s.refreshed_at < 0 or
                              state.step - s.refreshed_at >= state.refresh_every):
            return True, False
    if layout.any_flag():
        return True, True
    return False, False


def _sparse(state: DCTState, layout: BucketLayout, buffer: torch.Tensor, group,
            world: int) -> None:
    refresh, early = _needs_refresh(state, layout)
    if refresh:
        _refresh(state, layout, buffer, early)
    dense_values = None
    if layout.dense_index is not None:
        # Small parameters leave the compress (zeroed, with τ = +inf) and go in one all-reduce.
        dense_values = buffer.index_select(0, layout.dense_index)
        buffer.index_fill_(0, layout.dense_index, 0)
    payload = ops.compress(buffer, layout.thresholds, segments=layout.offsets,
                           residual=layout.residual, capacity=layout.capacity,
                           value_dtype=state.value_dtype, backend=state.backend)
    gathered = collectives.all_gather_rows(payload.buffer, group)
    if dense_values is not None:
        dist.all_reduce(dense_values, group=group)
        dense_values.div_(world)
    ops.decompress_many(gathered, out=buffer, average=True, validate=state.validate,
                        capacity=payload.capacity, value_dtype=payload.value_dtype,
                        errors=state._error_counter(buffer.device), backend=state.backend)
    if dense_values is not None:
        buffer.index_copy_(0, layout.dense_index, dense_values)
    layout.stage_flags(payload)
    stats = state._stats
    stats.add_payload(payload.count, payload.overflow)
    stats.buckets_sparse += 1
    stats.elements_sparse += layout.sparse_numel
    stats.bytes_sent += payload.nbytes + layout.dense_numel * buffer.element_size()
    stats.bytes_dense += buffer.numel() * buffer.element_size()


def dct_hook(state: DCTState, bucket: dist.GradBucket):
    """DDP communication hook of DCT-DP: sparse gradients with layer-wise thresholds and
    error feedback, exchanged with one all-gather per bucket.

    Register with ``ddp.register_comm_hook(DCTState(...), dct_hook)``. Per bucket:

    1. The first time a bucket layout is seen (the first step, and after DDP rebuilds its
       buckets), every rank gathers every rank's fingerprint of the configuration and the
       layout, and all raise ValueError when they differ (no hang).
    2. During the first ``warmup_steps`` steps, or when no parameter has ``min_numel``
       elements: a dense all-reduce, divided by the world size.
    3. Otherwise, when a τ is due (never computed, ``refresh_every`` steps old, or the last
       step's kept counts left the band or overflowed — a decision staged on the device one
       step earlier): τ_p = exact k_p-th largest |gradient + residual| of every parameter, in
       one segmented ``select_threshold``.
    4. Small parameters are taken out for one dense all-reduce; ``compress`` packs the entries
       with |gradient + residual| >= τ_p into one wire buffer of fixed capacity and updates the
       residuals (what does not fit stays there); one all-gather of the wire buffers;
       ``decompress_many(average=True)`` writes the average into the bucket, bitwise identical
       on every rank; the small parameters' average is put back.
    5. Each parameter's kept count is compared with its band on the device and staged to the
       host for the next step's decision; statistics accumulate on the device.

    No host synchronization on the per-step path: everything is sized from host-known k, and
    the only wait is for the one-step-old event of the staged flags (refresh steps add the
    segmented ``select_threshold``, which does not synchronize on the GPU backends). The first
    step of each bucket layout (the cross-rank check) does synchronize.

    Args:
        state: a ``DCTState``.
        bucket: DDP's ``GradBucket`` (uses ``buffer()``, ``parameters()`` and ``is_last()``).

    Returns:
        A completed ``torch.futures.Future`` holding the bucket's averaged flat gradient (the
        bucket buffer itself, in its dtype).

    Example::

        >>> state = DCTState(ratio=0.01, module=model)
        >>> ddp = DistributedDataParallel(model, device_ids=[rank])
        >>> ddp.register_comm_hook(state, dct_hook)
        >>> # train as usual; log state.stats() now and then; checkpoint state.state_dict()
    """
    buffer = bucket.buffer()
    params = list(bucket.parameters())
    layout = state._layout(buffer, params)
    group = state._group()
    world = dist.get_world_size(group)
    if state.step < state.warmup_steps or not layout.has_sparse:
        _dense(state, buffer, group, world)
    else:
        _sparse(state, layout, buffer, group, world)
    if bucket.is_last():
        state.step += 1
    return _completed(buffer)
