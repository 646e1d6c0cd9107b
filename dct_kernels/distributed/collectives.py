"""Collectives for sparse payloads: the all-gather of fixed-size wire buffers and
``sparse_all_reduce`` (compress, all-gather, ``decompress_many``)."""

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import ops
from ..payload import SparsePayload

__all__ = ["all_gather_rows", "sparse_all_reduce"]

# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single, which older
# releases (2.11 on the GPU machines) lack; both take (output, input, group, async_op).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_rows(buffer: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``buffer`` stacked in rank order: a ``[W, buffer.numel()]`` tensor.

    One ``all_gather_single`` (or ``all_gather_into_tensor`` on torch releases without it) into
    a flat output, viewed as rows (gloo accepts only the flat form). Every rank must pass a
    1-D contiguous buffer of the same size and dtype (gloo raises otherwise; NCCL may hang or
    read garbage, which is why the wire buffers here always have a fixed capacity).

    Sync: none on the host; on NCCL the current stream waits for the collective.
    """
    world = dist.get_world_size(group)
    gathered = torch.empty(world * buffer.numel(), dtype=buffer.dtype, device=buffer.device)
    _all_gather_flat(gathered, buffer.contiguous(), group=group)
    return gathered.view(world, buffer.numel())


def sparse_all_reduce(tensor: torch.Tensor, threshold: Union[float, torch.Tensor], *,
                      capacity: int, residual: Optional[torch.Tensor] = None,
                      segments: Optional[torch.Tensor] = None,
                      value_dtype: Optional[torch.dtype] = None, group=None,
                      out: Optional[torch.Tensor] = None, average: bool = True,
                      validate: bool = False,
                      errors: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None
                      ) -> Tuple[torch.Tensor, SparsePayload]:
    """Average (or sum) a tensor across ranks, sending only its entries above a threshold.

    1. ``compress(tensor, threshold, segments=, residual=, capacity=, value_dtype=)``: the
       entries with ``|tensor + residual| >= threshold`` (first ``capacity`` in index order)
       go into one fixed-size wire buffer; the residual keeps everything else.
    2. One all-gather of the wire buffers (``all_gather_rows``): ``[W, nbytes]`` uint8.
    3. ``decompress_many(..., average=average)`` into ``out``: the sum over ranks in rank order
       (divided by W with ``average``), bitwise identical on every rank.

    Args:
        tensor: fp32, fp16 or bf16, any shape, on the device of the process group's backend
            (CUDA for NCCL, CPU for gloo); fewer than 2^31 elements.
        threshold: a float, a 0-d tensor, or with ``segments`` a tensor of S thresholds (on
            tensor's device or the CPU), as ``dct_kernels.compress`` takes it.
        capacity: entries per wire buffer, an int >= 0, the same on every rank (required: a
            fixed size is what lets the buffers be gathered with no size exchange and no host
            synchronization). Entries past it stay in the residual and are counted in the
            returned payload's ``overflow``.
        residual: optional fp32 error-feedback buffer with tensor.numel() elements, updated in
            place so that sent + residual == tensor + residual_before.
        segments: optional int64 offsets for per-segment thresholds (best kept on the CPU: the
            op layer reads them on the host).
        value_dtype: wire dtype of the values (default tensor.dtype); the same on every rank.
        group: the process group (default: the world).
        out: optional contiguous tensor with tensor.numel() elements on tensor's device,
            overwritten; it may be ``tensor`` itself. Default: a new tensor like ``tensor``.
        average: divide the sum by the world size.
        validate: check every received buffer on the host first (synchronizes) and raise
            ValueError on a bad one; by default bad buffers or entries are skipped and counted in
            ``errors`` (default ``dct_kernels.payload_errors(device)``) without synchronizing.
        backend: the kernel backend for compress and decompress_many (default: chosen as the
            ops choose it, see ``dct_kernels.available_backends``).

    Returns:
        ``(out, payload)``: the reduced tensor and this rank's payload (its ``count`` and
        ``overflow`` are 0-d device tensors; reading them synchronizes).

    Raises:
        TypeError/ValueError from the ops for bad arguments (naming them); ValueError when
        ``capacity`` is None.

    Sync: none on the host when ``validate`` is False (the default), on every backend that
    does not synchronize in ``compress`` with a capacity.
    """
    if capacity is None:
        raise ValueError("capacity: required; a fixed capacity keeps every rank's buffer the "
                         "same size and avoids a host synchronization")
    payload = ops.compress(tensor, threshold, segments=segments, residual=residual,
                           capacity=capacity, value_dtype=value_dtype, backend=backend)
    gathered = all_gather_rows(payload.buffer, group)
    if out is None:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    ops.decompress_many(gathered, out=out, average=average, validate=validate,
                        capacity=payload.capacity, value_dtype=payload.value_dtype,
                        errors=errors, backend=backend)
    return out, payload
