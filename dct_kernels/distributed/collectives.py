"""The collectives the sparse exchanges use, as thin wrappers.

Every byte moves through torch.distributed's process-group collectives (``all_gather_single``
or ``all_gather_into_tensor``, ``all_to_all_single``, ``all_reduce``), looked up on the module
at call time, so a wrapper installed on ``torch.distributed`` sees everything we send.
"""

from typing import Optional, Tuple

import torch
import torch.distributed as dist


__all__ = ["all_gather_rows", "all_gather_rows_async", "all_to_all_rows_async",
           "all_reduce_async"]


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
