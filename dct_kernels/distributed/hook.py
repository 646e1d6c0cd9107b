"""``dct_hook``: the DDP communication hook of DCT-DP.

The step lives here, stage by stage, in the order ``dct_hook``'s docstring lists them; the
``DCTState`` it is given only holds what survives between steps (configuration, parameter
keys, bucket layouts with their residuals and thresholds, statistics, checkpoints).
"""

from typing import Optional

import torch
import torch.distributed as dist

from .. import codec, ops
from .. import payload as wire
from . import collectives, fingerprint
from .allgather import AllGatherExchange
from .futures import StepOrder, after, new_future
from .layout import BucketLayout
from .reduce_scatter import ReduceScatterExchange
from .stand_in import StandInBucket
from .state import DCTState
from .threshold_rule import Kept

__all__ = ["dct_hook"]


def dct_hook(state: DCTState, bucket: dist.GradBucket):
    """DDP communication hook of DCT-DP: sparse gradients with layer-wise thresholds and
    error feedback, exchanged asynchronously.

    Register with ``ddp.register_comm_hook(DCTState(...), dct_hook)``. Per bucket:

    1. The first time a bucket layout is seen (the first step, after DDP rebuilds its
       buckets, and at each stage of ``ramp_steps``, which sizes layouts of its own) it is
       sized for the world size — which exchange, wire capacities, the reduce_scatter
       shards — and every rank gathers every rank's fingerprint of the
       configuration and the layout; all raise ValueError when they differ (no hang).
    2. During the first ``warmup_steps`` steps, or when no parameter of the bucket is sent
       sparse (``DCTState.sends_sparse``: ``min_numel`` elements, not a table of at most
       ``dense_rows`` rows): a dense all-reduce (async), divided by the world size in its
       callback.
    3. Otherwise, when an exact τ is due (never computed, ``refresh_every`` steps old, the
       first step of a ramp stage or of the steady ratio after it, or the bucket's summed
       kept counts have been out of band, or its payload overflowing, for
       ``refresh_patience`` consecutive steps — decided on the device one step earlier):
       τ_p = max(exact k_p-th largest |gradient + residual|, 2^-149) for every parameter, in
       one segmented ``select_threshold``; else τ_p = max(ρ_p x q_p, 2^-149), q_p the same
       order statistic estimated on a fixed sample of about 32 / ratio entries (one segmented
       ``select_threshold`` over the gathered sample). Exact zeros never pass.
    4. Small parameters are taken out for one dense all-reduce (async). The bucket's exchange
       starts: with "allgather", ``compress`` packs the entries with |gradient + residual| >=
       τ_p into one fixed-capacity wire buffer (the rest stays in the residual) and one
       all-gather is issued; with "reduce_scatter", the same shard by shard into W rows and
       one all-to-all is issued, and the rest is queued: at the step's last bucket, on this
       thread and in bucket order (so every rank issues its collectives in the same order),
       the shard owner's rank-order sum, second threshold τ' and shard residual, and one
       all-gather of the shard payloads.
    5. The threshold rule, on the device, from each parameter's kept count (first stage):
       the scale ρ_p moves toward the target k_p (at most a factor 2^(1/4) per step) for the
       next step, and the streaks of out-of-band steps advance; the early-refresh flags are
       staged to the host for the next step's decision (the same for τ' at the second stage of
       reduce_scatter). Statistics accumulate (bytes on the host, counts on the device).
    6. In the last collective's callback, ``decompress_many(average=True)`` writes the
       average into the bucket, bitwise identical on every rank; the small parameters'
       average is put back; the returned future completes.

    On the first sparse step after ``state.load_state_dict``, buckets that group parameters
    otherwise than the checkpoint's layouts (a fresh DDP's first iteration) are held and the
    saved layouts stepped instead, so the resumed run continues bit for bit (``regroup``).

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
        if buffer.numel() == 0:  # only parameters of no elements: nothing to exchange
            future = new_future(buffer.device)
            future.set_result(buffer)
        else:
            future = _regrouped(state, bucket)
        if future is None:
            future = _step(state, _layout_of(state, bucket), buffer)  # 1; 2-5 (6 in callbacks)
    except Exception as error:
        _end_bucket(state, bucket, error)
        raise
    _end_bucket(state, bucket)
    return future


def _step(state: DCTState, layout: BucketLayout, buffer: torch.Tensor):
    """Stage 2 (warm-up, or a bucket with no sparse parameter) or stages 3-5 on ``buffer``;
    the future of its average (stage 6 completes it)."""
    if state.step < state.warmup_steps or not layout.has_sparse:
        return _dense(state, layout, buffer)                       # 2
    _thresholds(state, layout, buffer)                             # 3
    return _sparse(state, layout, buffer)                          # 4, 5


# ------------------------------------------------ the first steps after a checkpoint load

def _regrouped(state: DCTState, bucket):
    """On the first sparse steps after ``load_state_dict`` (see ``regroup_for_step``), a
    bucket that is not one of the saved layouts (same parameters in the same order) but holds
    parameters of saved layouts (a fresh DDP's first-iteration buckets: other sets, or the
    same set in another order) is held (see ``regroup``); each saved layout it completes is
    stepped now, on a stand-in bucket, as the checkpointed run stepped it, and so are, first,
    its parameters that no saved layout has (the model gained them), as a layout of their
    own. Returns the bucket's future, or None when the bucket takes the usual path.

    Raises:
        ValueError at the step's last bucket when a held bucket's saved layouts were never
        completed by this step's buckets (the model's parameters differ from the
        checkpoint's).
    """
    regroup = state.regroup_for_step()
    if regroup is None:
        return None
    params = _parameters(bucket)
    keys = [state.key_of(p) for p in params]
    if state.is_saved_layout(keys) or not regroup.touches(keys):
        _check_regroup_complete(regroup, bucket)
        if bucket.is_last() and not regroup.views:  # nothing held: DDP has rebuilt
            state.end_regroup()
        return None
    held, ready, new = regroup.hold(params, keys, bucket.buffer())
    for saved in ([new] if new else []) + ready:
        saved_params, flat = regroup.gather(saved)
        stand_in = StandInBucket(saved_params, flat, last=False)
        layout = _layout_of(state, stand_in)
        future = _step(state, layout, flat)

        def release(done, saved=saved, flat=flat):
            try:
                done.wait()
                regroup.release(saved, flat)
            except Exception as error:  # every held bucket fails with it: nothing waits
                regroup.fail(error)

        future.then(release)
    _check_regroup_complete(regroup, bucket)
    return held.future


def _check_regroup_complete(regroup, bucket) -> None:
    if bucket.is_last() and regroup.incomplete():
        error = ValueError(
            f"load_state_dict: the checkpoint's bucket layouts {regroup.incomplete()} were "
            f"not completed by this step's buckets; the model's parameters differ from the "
            f"checkpoint's")
        regroup.fail(error)
        raise error


# ---------------------------------------------------------------- 1. the bucket's layout

def _parameters(bucket) -> list:
    """The bucket's parameters that hold elements: one of none takes no room in the buffer
    and has nothing to send, so it has no segment (and no state)."""
    return [p for p in bucket.parameters() if p.numel() > 0]


def _layout_of(state: DCTState, bucket) -> BucketLayout:
    """The layout of a DDP ``GradBucket``: created (and checked across ranks: a collective,
    so every rank must call it) at its first sight, made the owner of its parameters' states,
    with the band flags of its last step collected.

    Raises:
        ValueError when the buffer is not the parameters back to back, a parameter is not
        among the named ones, or the ranks disagree on the configuration or the layout.
    """
    buffer = bucket.buffer()
    params = _parameters(bucket)
    keys = [state.key_of(p) for p in params]
    # A ramp stage has layouts of its own; a bucket of dense parameters does not depend on it
    # (its layout is kept under the ratio None). Which it is, is decided once, at creation.
    ratio = state.ratio_at(state.step)
    base = (tuple(keys), buffer.dtype, buffer.device)
    layout = state.layouts.get(base + (ratio,))
    if layout is None:
        layout = state.layouts.get(base + (None,))
    if layout is None:
        sparse = [state.sends_sparse(p) for p in params]
        ident = base + (ratio if any(sparse) else None,)
        numel_of = {key: p.numel() for key, p in zip(keys, params)}
        if sum(numel_of.values()) != buffer.numel():
            raise ValueError(f"bucket: its buffer has {buffer.numel()} elements but its "
                             f"parameters {sum(numel_of.values())}; dct_hook expects DDP's "
                             f"flat bucket layout (parameters back to back)")
        numels = [numel_of[key] for key in keys]
        group = state.group()
        world = dist.get_world_size(group)
        state.statistics.set_world(world)
        layout = BucketLayout(keys, numels, sparse,
                              ratio=ratio, capacity_factor=state.capacity_factor,
                              band=state.refresh_band, patience=state.refresh_patience,
                              dtype=buffer.dtype,
                              device=buffer.device, world=world, rank=dist.get_rank(group),
                              value_dtype=state.value_dtype,
                              index_encoding=state.index_encoding, exchange=state.exchange,
                              min_k=state.min_k)
        fingerprint.verify_across_ranks(
            state.fingerprint(layout), group, buffer.device,
            f"bucket of {len(params)} parameters, {buffer.numel()} elements")
        state.add_layout(ident, layout)
    layout.collect_flags()
    state.adopt(layout)
    return layout


# ------------------------------------------------------------------- 2. a dense step

def _dense(state: DCTState, layout: BucketLayout, buffer: torch.Tensor):
    world = dist.get_world_size(state.group())
    reduced = collectives.all_reduce_async(buffer, state.group())
    sent, received = layout.plan.dense()
    state.statistics.add_bytes(sent, received, layout.plan.ring())
    state.statistics.add(buckets_dense=1)
    return after([reduced], lambda: buffer.div_(world), buffer.device)


# ----------------------------------------------------------------- 3. this step's τ

def _thresholds(state: DCTState, layout: BucketLayout, buffer: torch.Tensor) -> bool:
    """This step's τ_p of the bucket: recomputed exactly when due — scheduled (never
    computed in this stage of the ratio's schedule, or ``refresh_every`` steps old) or early
    (a pending flag: the bucket's kept counts have been out of the band, or its payload
    overflowing, for ``refresh_patience`` steps) — and otherwise the threshold rule's
    sampled estimate times each parameter's scale. With reduce_scatter, stage 1 has one τ per
    piece of a parameter in a shard (the piece's own k-th magnitude, exact or estimated), so
    that a shard holding a parameter's hot rows does not overflow its row while others go
    short. Dense segments keep +inf. Returns whether it refreshed."""
    states = [s for s in layout.states if s is not None]
    start = state.stage_start(state.step)  # a ramp stage's k are new: exact τ at its start
    scheduled = any(s.refreshed_at < start or
                    state.step - s.refreshed_at >= state.refresh_every for s in states)
    early = not scheduled and any(s.pending for s in states)
    shard = layout.shard  # reduce_scatter: stage 1 has one τ per piece of a shard
    if not (scheduled or early):
        layout.rule.estimate(layout.thresholds if shard is None else shard.stage1_thresholds,
                             buffer, layout.residual, state.backend)
        if shard is not None:
            layout.thresholds_from_pieces()
        return False
    acc = buffer.to(torch.float32) + layout.residual
    if shard is None:
        layout.rule.refresh(layout.thresholds,
                            ops.select_threshold(acc, layout.ks, segments=layout.segments,
                                                 backend=state.backend))
    else:
        shard.refresh_stage1(ops.select_threshold(acc, shard.stage1_ks,
                                                  segments=shard.stage1_segments,
                                                  backend=state.backend))
        layout.rule.restart()
        layout.thresholds_from_pieces()
    for s in states:
        s.refreshed_at, s.pending = state.step, False
    state.statistics.add(refreshes=layout.owned, bucket_refreshes=1,
                         early_refreshes=int(early))
    return True


def _shard_refresh_due(state: DCTState, layout: BucketLayout, step: int) -> bool:
    """Whether this rank's τ' of a reduce_scatter bucket are due at ``step`` (scheduled or
    pending, as for τ_p); when they are, they count as refreshed at ``step``. Called from
    stage 2 of the exchange (at the step's last bucket)."""
    layout.collect_shard_flags()
    pieces = [p for p in layout.shard.states if p is not None]
    start = state.stage_start(step)
    due = any(p.refreshed_at < start or step - p.refreshed_at >= state.refresh_every or
              p.pending for p in pieces)
    if due:
        for p in pieces:
            p.refreshed_at, p.pending = step, False
        state.statistics.add(shard_refreshes=1)
    return due


# ------------------------------------------------------ 4. the exchange; 5. band, statistics

def _sparse(state: DCTState, layout: BucketLayout, buffer: torch.Tensor):
    exchange = _exchange_of(state, layout)
    futures, small = [], None
    if layout.dense_index is not None:
        # Small parameters leave the compress (zeroed, with τ = +inf) for one all-reduce.
        small = buffer.index_select(0, layout.dense_index)
        buffer.index_fill_(0, layout.dense_index, 0)
        futures.append(collectives.all_reduce_async(small, state.group()))
    step = state.step
    future, sent = exchange.start(buffer, _step_order(state),
                                  lambda: _shard_refresh_due(state, layout, step))
    _record_sparse(state, layout, exchange, sent)
    if small is None:
        return future
    world = dist.get_world_size(state.group())

    def put_back():
        buffer.index_copy_(0, layout.dense_index, small.div_(world))
        return buffer

    return after([future] + futures, put_back, buffer.device)


def _exchange_of(state: DCTState, layout: BucketLayout):
    """The exchange object of a sparse bucket (``AllGatherExchange`` or
    ``ReduceScatterExchange``), created once per layout and kept in ``state.exchanges``."""
    exchange = state.exchanges.get(id(layout))
    if exchange is None:
        # The configured group, None for the world: an exchange object must not keep the
        # world's group alive past destroy_process_group (its destructor then ran at the
        # interpreter's exit, on threads already gone, and aborted the process).
        common = dict(group=state.process_group, value_dtype=layout.value_dtype,
                      backend=state.backend, validate=state.validate,
                      errors=ops.payload_errors(layout.device))
        if layout.exchange == "reduce_scatter":
            exchange = ReduceScatterExchange(
                layout, on_shard=lambda p, refreshed: _record_shard(state, layout, p),
                **common)
        else:
            exchange = AllGatherExchange(layout, **common)
        state.exchanges[id(layout)] = exchange
    return exchange


def _record_sparse(state: DCTState, layout: BucketLayout, exchange, sent) -> None:
    """After stage 1 of a sparse step: the threshold rule on what this rank sent (``sent``:
    its payload, or with reduce_scatter its send rows) corrects τ_p and stages the
    early-refresh flags; the step is counted."""
    capped = None
    if layout.exchange == "reduce_scatter":
        kept, count, overflow = exchange.stage1_kept()
        capped = exchange.capped_segments(overflow)
        count, overflow = count.sum(), overflow.sum()
        # Per-shard overflow alone says little about τ; an overflow that one buffer of the
        # allgather capacity (or the pieces' own, when their shares round up) would also have
        # had does.
        overflowed = count + overflow > layout.stage1_capacity
    else:
        kept = _kept_of(sent, layout.no_shift)
        overflow = sent.overflow
        overflowed = overflow > 0
    counts = layout.rule.step(layout.thresholds, kept, overflowed, capped, state.backend)
    stats = state.statistics
    stats.add_device(kept=counts.sum(), overflow=overflow,
                     overflowed_buckets=(overflow > 0).to(torch.int64))
    sent_bytes, received = exchange.traffic()
    dense_sent, dense_received = layout.plan.dense_part()
    stats.add_bytes(sent_bytes + dense_sent, received + dense_received, layout.plan.ring())
    stats.add(buckets_sparse=1, elements_sparse=layout.sparse_numel,
              **{f"buckets_{layout.exchange}": 1})


def _record_shard(state: DCTState, layout: BucketLayout, payload: wire.SparsePayload) -> None:
    """After stage 2 of reduce_scatter: the threshold rule on the shard payload corrects τ'
    and stages its flags; statistics."""
    shard = layout.shard
    kept = _kept_of(payload, shard.to_shard)  # bucket positions: the shard's from its start
    counts = shard.rule.step(shard.thresholds, kept, payload.overflow > 0,
                             backend=state.backend)
    state.statistics.add_device(shard_kept=counts.sum(), shard_overflow=payload.overflow)


def _kept_of(payload: wire.SparsePayload, shift: torch.Tensor) -> Kept:
    """Where a payload's entries are, ``shift`` (int64 [1]) added: its row itself (version
    1), or its decoded positions (version 2)."""
    if payload.version == 1:
        return Kept.of_rows(payload.buffer[None], payload.capacity, shift)
    positions, valid = codec.positions(payload)
    return Kept.of_positions(positions, valid, shift)


# ----------------------------------------------------------------- the step's issue order

def _step_order(state: DCTState) -> StepOrder:
    """The issue order of the current step (see ``futures.StepOrder``)."""
    if state.order is None:
        state.order = StepOrder()
    return state.order


def _end_bucket(state: DCTState, bucket, error: Optional[Exception] = None) -> None:
    """After the calling-thread work on a bucket: at the step's last bucket the queued
    second-stage collectives are issued (``StepOrder.close``) and the step counter advances;
    after an ``error`` the queue is abandoned (its results fail with it)."""
    if state.order is not None and (bucket.is_last() or error is not None):
        order, state.order = state.order, None
        if error is not None:
            order.abandon(error)
        else:
            order.close()
    if bucket.is_last() and error is None:
        state.step += 1
