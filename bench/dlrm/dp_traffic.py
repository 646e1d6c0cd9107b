"""Bytes per rank on the data-parallel side, counted as docs/design.md counts them.

- ``DenseTraffic`` + ``dense_hook``: the baseline, DDP's plain all-reduce written as a comm
  hook (``torch.distributed.all_reduce``, then divide by W, as DDP's default) so that its bytes
  are counted the same way as DCT-DP's: an all-reduce of M bytes counts as a ring,
  2 (W - 1)/W x M sent and as much received.
- ``Bf16Traffic`` + ``bf16_hook``: the bf16 baseline, torch's ``bf16_compress_hook`` (cast to
  bfloat16, divide by W, all-reduce, cast back) with its bytes counted; see ``bf16_hook`` for
  why DDP is handed a wrapper of its own name.
- ``PowerSGDTraffic`` + ``powersgd_hook``: the PowerSGD baseline, torch's ``powerSGD_hook``
  with its bytes counted from the shapes of its P and Q matrices (``powersgd_sizes``).
- ``dp_totals(state, world)``: (bytes sent + received, bytes of a ring all-reduce of the same
  buckets) from a ``DCTState``'s ``stats()`` or one of the states above.

Every all-reduce counts as a ring all-reduce of the tensor it moves, whatever its dtype, and
``bytes_ring`` is the ring all-reduce of the bucket as DDP hands it over (fp32), so the
baselines' compression is measured against the same reference as DCT-DP's.
"""

import contextlib
import logging
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from dct_kernels.distributed.stand_in import StandInBucket


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


    def count_allreduce(self, world: int, nbytes: float, reference_bytes: float) -> None:
        """Count one ring all-reduce of ``nbytes`` (2 (W - 1)/W of it sent and as much
        received), and ``reference_bytes`` of the bucket as DDP hands it over into the ring
        reference (pass 0 for the second and later all-reduces of one bucket)."""
        self.bytes_sent += 2 * (world - 1) * nbytes / world
        self.bytes_received += 2 * (world - 1) * nbytes / world
        self.bytes_ring += 4 * (world - 1) * reference_bytes / world


def _group_and_world(state: DenseTraffic):
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


def dense_hook(state: DenseTraffic, bucket: dist.GradBucket):
    """DDP comm hook: the average of the bucket by one asynchronous all-reduce (what DDP does
    without a hook), counting ring bytes. Returns the future of the averaged bucket."""
    group, world = _group_and_world(state)
    buffer = bucket.buffer()
    nbytes = buffer.numel() * buffer.element_size()
    state.count_allreduce(world, nbytes, nbytes)
    buffer.div_(world)
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def _cast_allreduce(state: DenseTraffic, bucket: dist.GradBucket, dtype: torch.dtype,
                    torch_hook):
    """Count the ring bytes of an all-reduce of the bucket cast to ``dtype`` (against the
    bucket's own), then run torch's hook that does it."""
    _, world = _group_and_world(state)
    buffer = bucket.buffer()
    state.count_allreduce(world, buffer.numel() * torch.finfo(dtype).bits // 8,
                          buffer.numel() * buffer.element_size())
    return torch_hook(state.process_group, bucket)


class Fp16Traffic(DenseTraffic):
    """State of ``fp16_hook``: the process group and byte counters."""


def fp16_hook(state: Fp16Traffic, bucket: dist.GradBucket):
    """DDP comm hook of the fp16 baseline: torch's ``fp16_compress_hook`` (the bucket cast to
    float16 and divided by W, all-reduced, cast back), counting the fp16 all-reduce's ring
    bytes against the fp32 bucket's."""
    return _cast_allreduce(state, bucket, torch.float16, default_hooks.fp16_compress_hook)


class Bf16Traffic(DenseTraffic):
    """State of ``bf16_hook``: the process group and byte counters."""


def bf16_hook(state: Bf16Traffic, bucket: dist.GradBucket):
    """DDP comm hook of the bf16 baseline: torch's ``bf16_compress_hook`` (the bucket cast to
    bfloat16 and divided by W, all-reduced, cast back into the bucket), counting the bf16
    all-reduce's ring bytes against the fp32 bucket's.

    DDP refuses to register torch's function itself unless CUDA and NCCL >= 2.10 are there (it
    recognises the hook by its name, ``bf16_compress_hook``), although the function runs on
    gloo and CPU tensors as it is: gloo sums bfloat16. This wrapper has a name of its own, so
    DDP registers it on every backend, and the cast, the division, the all-reduce and the cast
    back are torch's own code on every backend (on NCCL exactly what torch's hook does)."""
    return _cast_allreduce(state, bucket, torch.bfloat16, default_hooks.bf16_compress_hook)


class PowerSGDTraffic(DenseTraffic):
    """State of ``powersgd_hook``: torch's ``PowerSGDState`` (``powersgd``) with the usual
    settings besides the rank and the warm-up (error feedback, warm start, minimum compression
    rate 2, no batching of same-shaped tensors), and byte counters.

    ``matrix_approximation_rank``: the rank of the P and Q factors; ``start_iter``: torch's
    ``start_powerSGD_iter``, the steps of plain fp32 all-reduces before compression starts;
    ``seed``: the seed of the random Q initialisation, the same on every rank."""

    def __init__(self, process_group=None, *, matrix_approximation_rank: int = 2,
                 start_iter: int = 1000, seed: int = 0):
        super().__init__(process_group)
        self.powersgd = powerSGD_hook.PowerSGDState(
            process_group, matrix_approximation_rank=matrix_approximation_rank,
            start_powerSGD_iter=start_iter, random_seed=seed)
        self.buckets_plain = 0
        self.buckets_compressed = 0
        # Parameter names (by id), the names of each bucket's parameters in the order the
        # hook last saw them (checkpointed: torch keeps its memories in that order), and the
        # orders of a loaded checkpoint, used on the first step after the load.
        self.names: Dict[int, str] = {}
        self.params: Dict[str, torch.Tensor] = {}
        self.bucket_orders: Dict[int, List[str]] = {}
        self.resume_orders: Dict[int, List[str]] = {}

    def name_parameters(self, module: torch.nn.Module) -> None:
        """Key the buckets' parameters by their names in ``module``."""
        for name, param in module.named_parameters():
            self.names[id(param)] = name
            self.params[name] = param

    def stats(self) -> Dict[str, float]:
        """The counters of ``DenseTraffic.stats()``, plus the buckets sent plain (warm-up)
        and compressed."""
        out = super().stats()
        out.update(buckets_plain=self.buckets_plain, buckets_compressed=self.buckets_compressed)
        return out


@contextlib.contextmanager
def _quiet_powersgd_notes():
    """torch's PowerSGD logs a note about the process group at every (un)pickling: keep it out
    of every checkpoint's output."""
    logger = logging.getLogger(powerSGD_hook.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def powersgd_state_dict(state: powerSGD_hook.PowerSGDState) -> dict:
    """torch's own pickling state of a ``PowerSGDState`` (``__getstate__``: every slot but the
    process group: the error and P/Q memories per bucket index, the iteration, the RNG of the
    Q initialisation), its tensors copied to the CPU; torch's note that the process group is
    left out is not logged at every checkpoint."""
    with _quiet_powersgd_notes():
        saved = state.__getstate__()
    return {k: ({i: t.detach().cpu().clone() for i, t in v.items()}
                if isinstance(v, dict) else v) for k, v in saved.items()}


def load_powersgd_state(state: powerSGD_hook.PowerSGDState, saved: dict,
                        device: torch.device) -> None:
    """Restore ``powersgd_state_dict`` into ``state`` through torch's ``__setstate__``,
    keeping ``state``'s process group, with the memories on ``device``."""
    group = state.process_group
    with _quiet_powersgd_notes():
        state.__setstate__(saved)
    state.process_group = group
    for memories in (state.error_dict, state.p_memory_dict, state.q_memory_dict):
        for i in list(memories):
            memories[i] = memories[i].to(device)


def powersgd_sizes(gradients: Sequence[torch.Tensor], rank: int,
                   min_compression_rate: float = 2) -> Tuple[int, int, int]:
    """Elements that torch's ``powerSGD_hook`` all-reduces for a bucket of these gradients once
    it compresses: (uncompressed, P, Q). Each gradient is viewed as a matrix of n = its first
    dimension rows and m = the rest; with r = min(n, m, rank) it is compressed (P: n x r, Q:
    m x r) when (n + m) r x ``min_compression_rate`` < n m (torch's documented rule), else
    all-reduced as it is, as are vectors (biases)."""
    uncompressed = ps = qs = 0
    for g in gradients:
        n = g.shape[0] if g.dim() else 1
        m = g.numel() // n if n else 0
        r = min(n, m, rank)
        if (n + m) * r * min_compression_rate < n * m:
            ps += n * r
            qs += m * r
        else:
            uncompressed += g.numel()
    return uncompressed, ps, qs


def powersgd_hook(state: PowerSGDTraffic, bucket: dist.GradBucket):
    """DDP comm hook of the PowerSGD baseline: torch's ``powerSGD_hook`` on ``state.powersgd``,
    counting ring bytes: the whole bucket during torch's warm-up (one plain all-reduce), then
    its three all-reduces (the uncompressed tensors, the Ps, the Qs; ``powersgd_sizes``)."""
    _, world = _group_and_world(state)
    buffer = bucket.buffer()
    size = buffer.element_size()
    reference = buffer.numel() * size
    ps = state.powersgd
    # The hook itself decides by the same counter, read before it advances it.
    if ps.iter < ps.start_powerSGD_iter:
        state.buckets_plain += 1
        state.count_allreduce(world, reference, reference)
    else:
        state.buckets_compressed += 1
        parts = powersgd_sizes(bucket.gradients(), ps.matrix_approximation_rank,
                               ps.min_compression_rate)
        for i, numel in enumerate(parts):
            state.count_allreduce(world, numel * size, reference if i == 0 else 0)
    order = [state.names.get(id(p)) for p in bucket.parameters()]
    saved = state.resume_orders.pop(bucket.index(), None)
    state.bucket_orders[bucket.index()] = order
    if saved is None or saved == order or None in order or sorted(saved) != sorted(order):
        return powerSGD_hook.powerSGD_hook(ps, bucket)
    # The first step after a checkpoint load: a fresh DDP's first iteration holds the
    # parameters in registration order, the checkpointed run (past DDP's rebuild) in gradient
    # order, and torch's error and P/Q memories are laid out in that one. Run the hook on the
    # bucket permuted into the saved order, then put the result back.
    state.bucket_orders[bucket.index()] = saved
    views = dict(zip(order, bucket.gradients()))
    stand_in = StandInBucket([state.params[n] for n in saved],
                             torch.cat([views[n].reshape(-1) for n in saved]),
                             last=bucket.is_last(), index=bucket.index())

    def put_back(future):
        flat = future.value()
        flat = flat[0] if isinstance(flat, (list, tuple)) else flat
        for name, part in zip(saved, flat.split([views[n].numel() for n in saved])):
            views[name].copy_(part.view_as(views[name]))
        return bucket.buffer()

    return powerSGD_hook.powerSGD_hook(ps, stand_in).then(put_back)


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
