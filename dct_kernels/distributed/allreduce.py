"""``sparse_all_reduce``: the standalone sparse all-reduce (one tensor, one threshold), with
either exchange, built from the ops, the collectives and the reduce_scatter wire helpers."""

from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import ops
from .. import payload as wire
from ..payload import SparsePayload
from . import collectives, sizing
from .reduce_scatter import write_empty

__all__ = ["sparse_all_reduce"]


def _check_exchange(exchange) -> str:
    if exchange not in sizing.EXCHANGES:
        raise ValueError(f"exchange: expected one of {sizing.EXCHANGES}, got {exchange!r}")
    return exchange


def sparse_all_reduce(tensor: torch.Tensor, threshold: Union[float, torch.Tensor], *,
                      capacity: int, residual: Optional[torch.Tensor] = None,
                      segments: Optional[torch.Tensor] = None,
                      value_dtype: Optional[torch.dtype] = None, group=None,
                      out: Optional[torch.Tensor] = None, average: bool = True,
                      validate: bool = False,
                      errors: Optional[torch.Tensor] = None,
                      exchange: str = "allgather",
                      shard_threshold: Union[float, torch.Tensor, None] = None,
                      shard_residual: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None
                      ) -> Tuple[torch.Tensor, SparsePayload]:
    """Average (or sum) a tensor across ranks, sending only its entries above a threshold.

    ``exchange="allgather"`` (the default here):

    1. ``compress(tensor, threshold, segments=, residual=, capacity=, value_dtype=)``: the
       entries with ``|tensor + residual| >= threshold`` (first ``capacity`` in index order)
       go into one fixed-size wire buffer; the residual keeps everything else.
    2. One all-gather of the wire buffers: ``[W, nbytes]`` uint8.
    3. ``decompress_many(..., average=average)`` into ``out``: the sum over ranks in rank order
       (divided by W with ``average``), bitwise identical on every rank.

    ``exchange="reduce_scatter"``: the element range is cut into W equal contiguous shards
    (``numel * s // W``); each rank compresses shard s (against ``threshold``, with
    ``residual``) into row s of a ``[W, nbytes]`` send tensor of ``ceil(capacity / W)`` slots
    per row, and one all-to-all sends row s to rank s; rank s sums its shard over the ranks in
    rank order, adds its slice of ``shard_residual`` (fp32, numel elements; only this rank's
    shard is read and updated) and keeps the entries whose |sum| reaches ``shard_threshold``
    (a float or 0-d tensor, default ``threshold``), at most ``ceil(capacity / W)``; one
    all-gather of the W shard payloads gives every rank the whole result (divided by W with
    ``average``). Bytes per rank then do not grow with W. ``segments`` is not supported there
    (ValueError). ``"auto"``: reduce_scatter when it moves at most ``sizing.AUTO_MARGIN`` of
    allgather's bytes per rank, else allgather.

    Args:
        tensor: fp32, fp16 or bf16, any shape, on the device of the process group's backend
            (CUDA for NCCL, CPU for gloo); fewer than 2^31 elements.
        threshold: a float, a 0-d tensor, or with ``segments`` (allgather only) a tensor of S
            thresholds, as ``dct_kernels.compress`` takes it.
        capacity: entries per rank, an int >= 0, the same on every rank (required: a fixed
            size is what lets the buffers be exchanged with no size exchange and no host
            synchronization). Entries past it stay in the residual and are counted in the
            returned payload's ``overflow``.
        residual: optional fp32 error-feedback buffer with tensor.numel() elements, updated in
            place so that sent + residual == tensor + residual_before.
        segments: optional int64 offsets (or ``dct_kernels.ops.Segments``) for per-segment
            thresholds.
        value_dtype: wire dtype of the values (default tensor.dtype); the same on every rank.
        group: the process group (default: the world).
        out: optional contiguous tensor with tensor.numel() elements on tensor's device,
            overwritten; it may be ``tensor`` itself. Default: a new tensor like ``tensor``.
        average: divide the sum by the world size.
        validate: check every received buffer on the host first (synchronizes) and raise
            ValueError on a bad one; by default bad buffers or entries are skipped and counted in
            ``errors`` (default ``dct_kernels.payload_errors(device)``) without synchronizing.
        exchange: "allgather", "reduce_scatter" or "auto" (ValueError naming ``exchange``
            otherwise); the same on every rank.
        shard_threshold, shard_residual: the second level of "reduce_scatter" (see above).
        backend: the kernel backend (default: chosen as the ops choose it).

    Returns:
        ``(out, payload)``: the reduced tensor and this rank's payload — with allgather its
        wire buffer, with reduce_scatter the shard payload it broadcast in the last stage (its
        ``count`` and ``overflow`` are 0-d device tensors; reading them synchronizes).

    Raises:
        TypeError/ValueError naming the argument, before anything is written or sent: a bad
        ``tensor``, ``capacity`` (None, not an int in [0, 2^31 - 1]), ``value_dtype``,
        ``out`` (not a contiguous float tensor of tensor.numel() elements on its device),
        ``average``/``validate`` (not bools), ``shard_threshold``/``shard_residual`` (checked
        whatever the exchange, so a call does not start failing when "auto" changes its
        choice at another world size), ``exchange``; and ``shard_residual`` missing with
        ``exchange="reduce_scatter"`` and a ``residual`` (stage 2 would drop what every
        rank's residual counts as sent; "auto" takes allgather then). Other argument errors
        come from the ops, naming them. A payload refused in stage 2 (``validate=True``)
        raises on the rank that received it after it has taken part in the last collective,
        so no rank is left waiting.

    Sync: none on the host when ``validate`` is False (the default), on every backend that
    does not synchronize in ``compress`` with a capacity.

    Agreement: like torch.distributed's own collectives, a call does not check that the ranks
    agree. Ranks that pass different ``exchange``, ``capacity``, ``value_dtype``, segment
    counts or tensor sizes fail in the collective or wait in it until the group's timeout;
    an argument error raised on one rank only leaves the others waiting likewise. ``dct_hook``
    checks its ranks' agreement once per bucket layout (see ``DCTState``); a caller of this
    function who cannot guarantee it should compare its arguments across ranks first.
    """
    _check_exchange(exchange)
    capacity = _check_arguments(tensor, capacity, value_dtype, out, average, validate,
                                shard_threshold, shard_residual)
    if exchange == "reduce_scatter" and residual is not None and shard_residual is None:
        raise ValueError("shard_residual: required with exchange='reduce_scatter' and a "
                         "residual: stage 2 keeps only the sums that reach shard_threshold, "
                         "and the rest, which every rank's residual counts as sent, would be "
                         "lost")
    world = dist.get_world_size(group)
    if out is None:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    chosen = exchange
    if exchange == "auto":
        # reduce_scatter here takes neither segments nor fp8 values (its shards would need
        # their own scale segments), nor error feedback without its second residual: those
        # go by allgather.
        simple = segments is None and value_dtype is not wire.FLOAT8 and \
            (residual is None or shard_residual is not None)
        chosen = _choose_plain(tensor, capacity, value_dtype, world) if simple \
            else "allgather"
    if chosen == "allgather":
        payload = ops.compress(tensor, threshold, segments=segments, residual=residual,
                               capacity=capacity, value_dtype=value_dtype, backend=backend)
        gathered = collectives.all_gather_rows(payload.buffer, group)
        ops.decompress_many(gathered, out=out, average=average, validate=validate,
                            capacity=payload.capacity, value_dtype=payload.value_dtype,
                            index_encoding=payload.index_encoding,
                            num_scales=payload.num_scales, errors=errors, backend=backend)
        return out, payload
    return _reduce_scatter(tensor, threshold, capacity=capacity, residual=residual,
                                segments=segments, value_dtype=value_dtype, group=group,
                                out=out, average=average, validate=validate, errors=errors,
                                shard_threshold=shard_threshold,
                                shard_residual=shard_residual, backend=backend)


def _check_arguments(tensor, capacity, value_dtype, out, average, validate,
                     shard_threshold, shard_residual) -> int:
    """The checks of ``sparse_all_reduce`` made before anything is written or sent (see its
    Raises); returns the capacity as an int."""
    ops._check_float_tensor(tensor, "tensor")
    ops._check_numel(tensor, "tensor")
    if capacity is None:
        raise ValueError("capacity: required; a fixed capacity keeps every rank's buffer the "
                         "same size and avoids a host synchronization")
    capacity = ops._check_capacity(capacity)
    ops._check_value_dtype(value_dtype, tensor.dtype, fp8=True)
    if out is not None:
        ops._check_out(out, tensor.numel(), tensor.device)
    for name, flag in (("average", average), ("validate", validate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if shard_threshold is not None and not (
            (isinstance(shard_threshold, (int, float)) and not isinstance(shard_threshold, bool))
            or (isinstance(shard_threshold, torch.Tensor) and shard_threshold.numel() == 1
                and shard_threshold.dtype.is_floating_point)):
        raise TypeError(f"shard_threshold: expected a float or a one-element float tensor, "
                        f"got {shard_threshold!r}")
    numel = tensor.numel()
    if shard_residual is not None and (not isinstance(shard_residual, torch.Tensor) or
                                       shard_residual.dtype != torch.float32 or
                                       shard_residual.numel() != numel or
                                       shard_residual.device != tensor.device or
                                       not shard_residual.is_contiguous()):
        raise ValueError(f"shard_residual: expected a contiguous fp32 tensor of {numel} "
                         f"elements on {tensor.device}")
    return capacity


def _choose_plain(tensor, capacity, value_dtype, world) -> str:
    value_dtype = value_dtype or tensor.dtype
    n = sizing.wire_bytes(capacity, value_dtype)
    r = sizing.wire_bytes(-(-capacity // world), value_dtype)
    allgather = world * n
    reduce_scatter = (3 * world - 2) * r
    return "reduce_scatter" if reduce_scatter <= sizing.AUTO_MARGIN * allgather \
        else "allgather"


def sparse_shards(numel: int, world: int) -> List[int]:
    """Equal-length cuts of [0, numel) into W shards (for ``sparse_all_reduce``)."""
    return [numel * s // world for s in range(world)] + [numel]


def _reduce_scatter(tensor, threshold, *, capacity, residual, segments, value_dtype,
                         group, out, average, validate, errors, shard_threshold,
                         shard_residual, backend):
    """``sparse_all_reduce(exchange="reduce_scatter")`` (see its docstring), synchronous."""
    if segments is not None:
        raise ValueError("segments: not supported with exchange='reduce_scatter' in "
                         "sparse_all_reduce (use DCTState for layer-wise thresholds)")
    if value_dtype is wire.FLOAT8:
        raise ValueError("value_dtype: fp8 values are not supported with "
                         "exchange='reduce_scatter' in sparse_all_reduce (DCTState's "
                         "reduce_scatter takes them)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    numel = tensor.numel()
    device = tensor.device
    value_dtype = value_dtype or tensor.dtype
    row_capacity = -(-capacity // world)
    cuts = sparse_shards(numel, world)
    row = wire.layout(row_capacity, value_dtype)[1]
    send = torch.zeros(world, row, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    flat = tensor.detach().contiguous().view(-1)
    res = residual.view(-1) if residual is not None else None
    ops.compress_shards(flat, threshold, cuts=cuts, segments=[None] * world,
                        capacity=row_capacity, residual=res, value_dtype=value_dtype,
                        out=send, backend=backend)
    collectives.all_to_all_rows_async(send, recv, group).wait()
    lo, hi = cuts[rank], cuts[rank + 1]
    own = torch.zeros(row, dtype=torch.uint8, device=device)
    refused = None
    if lo == hi:
        write_empty(own, numel, row_capacity, value_dtype)
    else:
        try:
            total = torch.zeros(hi - lo, dtype=torch.float32, device=device)
            ops.decompress_many(recv, out=total, validate=validate, capacity=row_capacity,
                                value_dtype=value_dtype, errors=errors, backend=backend)
            level2 = threshold if shard_threshold is None else shard_threshold
            ops.compress(total, level2,
                         residual=None if shard_residual is None
                         else shard_residual.view(-1)[lo:hi],
                         capacity=row_capacity, value_dtype=value_dtype,
                         position_offset=lo, total_numel=numel, out=own, backend=backend)
        except (TypeError, ValueError) as error:
            # Only this rank saw it (a bad row it received, with validate=True): it still
            # takes part in the all-gather, with an empty row, then raises.
            refused = error
            write_empty(own, numel, row_capacity, value_dtype)
    payload = wire.SparsePayload(own, numel=numel, capacity=row_capacity,
                                 value_dtype=value_dtype, shape=(numel,), dtype=tensor.dtype)
    gathered, future = collectives.all_gather_rows_async(own, group)
    future.wait()
    if refused is not None:
        raise refused
    ops.decompress_many(gathered, out=out.view(-1), average=average, validate=validate,
                        capacity=row_capacity, value_dtype=value_dtype, errors=errors,
                        backend=backend)
    return out, payload
