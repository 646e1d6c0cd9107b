"""DCT-MP: per-sample activation sparsity across a model-parallel boundary, with autograd.

Forward, each sample (row) keeps only its k largest-magnitude activations; backward, the
gradient flows only at those same positions, like a data-dependent dropout (Gupta et al.,
KDD 2021, section on model parallelism). Three differentiable functions over
``compress_rows`` / ``decompress_rows`` / ``gather_rows``:

- ``sparsify_rows(x, k)``: dense in, dense out (zeros except each row's top k), for a model
  that keeps the boundary on one device.
- ``pack_rows(x, k)`` -> ``(values, indices)`` and ``unpack_rows(values, indices, columns)``:
  the two halves, for an exchange between devices. ``values`` ([B, k]) is what crosses the
  boundary forward and its gradient ([B, k]) what crosses it backward; ``indices`` ([B, k],
  int16 when D <= 32768) is sent once forward and reused backward. Both have a size fixed by
  (B, k), so an all-to-all or send/recv needs no size exchange. Put the transfer between them
  with any autograd-aware collective (e.g. ``torch.distributed.nn.functional.all_to_all``);
  for an all-to-all, ``sparse_all_to_all`` (exchange.py) does all of it in one collective
  each way.

With k = 5% of D, int16 indices and 16-bit values, the boundary carries 20x fewer bytes than
dense fp32. Nothing here synchronizes with the host.
"""

import math
from typing import Optional, Tuple

import torch

from .. import ops
from ..magnitude import saturating_cast, widen
from ..payload import RowPayload

__all__ = ["sparsify_rows", "pack_rows", "unpack_rows"]


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected a tensor of shape [..., D], got a 0-d tensor")
    # Not reshape(-1, D): with D = 0 the row count would be ambiguous.
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() != 2 else x


def to_wire(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in the wire dtype as compress_rows puts the forward values there (``saturating_cast``:
    a finite value saturates at the wire's largest, inf passes, NaN is the canonical one), for
    the gradients that go back across the boundary (here and in ``sparse_all_to_all``)."""
    return saturating_cast(widen(t), dtype)


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, k, value_dtype, backend):
        p = ops.compress_rows(x2d, k, value_dtype=value_dtype, backend=backend)
        ctx.save_for_backward(p.indices)
        ctx.meta = (tuple(x2d.shape), x2d.dtype, backend)
        ctx.mark_non_differentiable(p.indices)
        return p.values, p.indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        (indices,) = ctx.saved_tensors
        shape, dtype, backend = ctx.meta
        if grad_values is None:
            return None, None, None, None
        payload = RowPayload(indices, grad_values.contiguous(), shape, dtype)
        return ops.decompress_rows(payload, backend=backend), None, None, None


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, columns, dtype, backend):
        payload = RowPayload(indices, values, (values.shape[0], columns), dtype)
        ctx.save_for_backward(indices)
        ctx.meta = (columns, values.dtype, backend)
        return ops.decompress_rows(payload, backend=backend)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        columns, values_dtype, backend = ctx.meta
        grad_out = grad_out.contiguous()
        payload = RowPayload(indices, torch.empty(indices.shape, dtype=grad_out.dtype,
                                                  device=grad_out.device),
                             (indices.shape[0], columns), grad_out.dtype)
        grad_values = to_wire(ops.gather_rows(grad_out, payload, backend=backend), values_dtype)
        return grad_values, None, None, None, None


def pack_rows(x: torch.Tensor, k: int, *, value_dtype: Optional[torch.dtype] = None,
              backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k largest-magnitude entries of each row of x, as (values, indices), differentiable
    in x.

    Args:
        x: ``[..., D]`` fp32/fp16/bf16; leading dimensions are flattened into rows.
        k: entries kept per row, 1 <= k <= D.
        value_dtype: dtype of ``values`` (default x.dtype; fp16/bf16 saturate finite values).

    Returns:
        ``values`` ``[B, k]`` (value_dtype) and ``indices`` ``[B, k]`` (int16 when D <= 32768,
        else int32; ascending in each row; ties to the lower column, NaN above +inf). The
        gradient of ``values`` flows back to x at the kept positions only (0 elsewhere).

    Raises:
        TypeError / ValueError naming the argument (as ``compress_rows``). No host sync.
    """
    x2d = _as_rows(x, "x")
    return _Pack.apply(x2d, k, value_dtype, backend)


def unpack_rows(values: torch.Tensor, indices: torch.Tensor, columns: int, *,
                dtype: Optional[torch.dtype] = None,
                backend: Optional[str] = None) -> torch.Tensor:
    """Dense ``[B, columns]`` activations from ``pack_rows``' (values, indices) on the far side
    of the boundary, differentiable in ``values`` (the gradient is the dense gradient gathered
    at ``indices``).

    Args:
        values: ``[B, k]`` fp32/fp16/bf16. indices: ``[B, k]`` of ``row_index_dtype(columns)``.
        columns: D. dtype: dtype of the result (default values.dtype).

    Raises:
        ValueError naming the argument for a bad ``columns`` or ``values``, or (from
        ``decompress_rows``) indices that do not match values and D. No host sync.
    """
    # Shapes and dtypes of the pair are checked by decompress_rows (the op layer); here only
    # what it takes to form the payload.
    if not isinstance(columns, int) or isinstance(columns, bool) or columns < 1:
        raise ValueError(f"columns: expected an int >= 1, got {columns!r}")
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError("values: expected a [B, k] tensor")
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected None, torch.float32, torch.float16 or "
                         f"torch.bfloat16, got {dtype!r}")
    return _Unpack.apply(values.contiguous(), indices.contiguous(), columns,
                         dtype or values.dtype, backend)


def sparsify_rows(x: torch.Tensor, k: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """Keep each row's k largest-magnitude entries of x (zeros elsewhere); the backward pass
    passes gradients only at the kept positions.

    Args:
        x: ``[..., D]`` fp32/fp16/bf16 (leading dimensions are rows). k: 1 <= k <= D.

    Returns:
        A tensor shaped and typed like x. Ties go to the lower column; NaN ranks above +inf.

    Raises:
        TypeError / ValueError naming the argument (as ``compress_rows``). No host sync.
    """
    x2d = _as_rows(x, "x")
    values, indices = _Pack.apply(x2d, k, None, backend)
    dense = _Unpack.apply(values, indices, x2d.shape[1], x2d.dtype, backend)
    return dense.reshape(x.shape)
