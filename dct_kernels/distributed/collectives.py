"""Collectives for sparse payloads and ``sparse_all_reduce``.

Every byte moves through torch.distributed's process-group collectives (``all_gather_single``
or ``all_gather_into_tensor``, ``all_to_all_single``, ``all_reduce``), looked up on the module
at call time, so a wrapper installed on ``torch.distributed`` sees everything we send.
"""

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import ops
from ..payload import SparsePayload
from . import sizing

__all__ = ["all_gather_rows", "all_gather_rows_async", "all_to_all_rows_async",
           "all_reduce_async", "sparse_all_reduce"]


def _all_gather_flat():
    # torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single, which older
    # releases (2.11 on the GPU machines) lack; both take (output, input, group, async_op).
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_rows(buffer: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``buffer`` stacked in rank order: a ``[W, buffer.numel()]`` tensor.

    One ``all_gather_single`` (or ``all_gather_into_tensor``) into a flat output, viewed as rows
    (gloo accepts only the flat form). Every rank must pass a 1-D contiguous buffer of the same
    size and dtype (gloo raises otherwise; NCCL may hang or read garbage, which is why the wire
    buffers here always have a fixed capacity).

    Sync: none on the host; on NCCL the current stream waits for the collective.
    """
    rows, future = all_gather_rows_async(buffer, group)
    future.wait()
    return rows


def all_gather_rows_async(buffer: torch.Tensor, group=None,
                          out: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.futures.Future]:
    """``all_gather_rows`` issued with ``async_op=True``: (rows, future). The rows (``out``
    when given, a ``[W, n]`` tensor) are valid once the future completes (on NCCL: for work
    ordered after ``future.wait()`` on the current stream)."""
    world = dist.get_world_size(group)
    if out is None:
        out = torch.empty(world, buffer.numel(), dtype=buffer.dtype, device=buffer.device)
    work = _all_gather_flat()(out.view(-1), buffer.contiguous(), group=group, async_op=True)
    return out, work.get_future()


def all_to_all_rows_async(send: torch.Tensor, recv: torch.Tensor,
                          group=None) -> torch.futures.Future:
    """Row s of ``send`` ([W, n]) to rank s; row r of ``recv`` from rank r. One
    ``all_to_all_single`` with ``async_op=True``; returns its future."""
    work = dist.all_to_all_single(recv.view(-1), send.view(-1), group=group, async_op=True)
    return work.get_future()


def all_reduce_async(tensor: torch.Tensor, group=None) -> torch.futures.Future:
    """Sum ``tensor`` in place across ranks (``all_reduce`` with ``async_op=True``)."""
    return dist.all_reduce(tensor, group=group, async_op=True).get_future()


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
        TypeError/ValueError from the ops for bad arguments (naming them); ValueError when
        ``capacity`` is None or ``exchange`` is unknown.

    Sync: none on the host when ``validate`` is False (the default), on every backend that
    does not synchronize in ``compress`` with a capacity.
    """
    _check_exchange(exchange)
    if capacity is None:
        raise ValueError("capacity: required; a fixed capacity keeps every rank's buffer the "
                         "same size and avoids a host synchronization")
    world = dist.get_world_size(group)
    if out is None:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    chosen = exchange
    if exchange == "auto":
        chosen = _choose_plain(tensor, capacity, value_dtype, world)
    if chosen == "allgather":
        payload = ops.compress(tensor, threshold, segments=segments, residual=residual,
                               capacity=capacity, value_dtype=value_dtype, backend=backend)
        gathered = all_gather_rows(payload.buffer, group)
        ops.decompress_many(gathered, out=out, average=average, validate=validate,
                            capacity=payload.capacity, value_dtype=payload.value_dtype,
                            errors=errors, backend=backend)
        return out, payload
    from .reduce_scatter import plain_reduce_scatter
    return plain_reduce_scatter(tensor, threshold, capacity=capacity, residual=residual,
                                segments=segments, value_dtype=value_dtype, group=group,
                                out=out, average=average, validate=validate, errors=errors,
                                shard_threshold=shard_threshold,
                                shard_residual=shard_residual, backend=backend)


def _choose_plain(tensor, capacity, value_dtype, world) -> str:
    value_dtype = value_dtype or tensor.dtype
    n = sizing.wire_bytes(capacity, value_dtype)
    r = sizing.wire_bytes(-(-capacity // world), value_dtype)
    allgather = world * n
    reduce_scatter = (3 * world - 2) * r
    return "reduce_scatter" if reduce_scatter <= sizing.AUTO_MARGIN * allgather \
        else "allgather"
