"""The DCT-MP exchange across ranks: ``sparse_all_to_all``, its byte count and module form.

Forward, each row's k largest magnitudes (``compress_rows``) cross the model-parallel boundary
in one fixed-size all-to-all and are rebuilt dense on the far side (``decompress_rows``);
backward, only the gradient at those positions (``gather_rows``) crosses back, in one more
all-to-all. Sizes depend on (W, B, D, k, dtypes) alone: no size exchange, no host sync.

Wire rows. Every row of x becomes one uint8 row, so that a single ``all_to_all_single`` carries
values and indices together (one latency instead of two)::

    [ wider field: k elements | narrower field: k elements | pad to the wider element size ]

The wider of (values, indices) comes first so that both fields and every row start aligned to
their element size (the narrower field starts at k x the wider size, a multiple of its own).
Padding appears only when the two sizes differ and k is odd (2 bytes a row: bf16 or fp16 values
with int32 indices, fp32 values with int16 indices); pad bytes are sent as zeros. The backward
rows are the ``[W*B, k]`` gradient values alone (value_dtype), sent as their bytes.
"""

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import backends, ops
from .. import payload as wire
from ..payload import RowPayload
from .agreement import agree_once
from .rows import to_wire

__all__ = ["sparse_all_to_all", "all_to_all_bytes", "SparseAllToAll"]


@dataclass(frozen=True)
class ExchangeLayout:
    """Sizes of one exchange, the same on every rank (a function of W, B, D, k and dtypes)."""

    world: int
    rows: int                 # W * B
    columns: int              # D
    k: int
    dtype: torch.dtype        # of x and of the result
    value_dtype: torch.dtype  # of the values on the wire, both directions
    index_dtype: torch.dtype  # int16 when D <= 32768, else int32
    values_offset: int        # byte offset of the values in a wire row
    indices_offset: int       # byte offset of the indices in a wire row
    row_bytes: int            # forward bytes per row (values, indices, pad)

    @property
    def block_rows(self) -> int:
        """B: the rows that go to (and come from) each rank."""
        return self.rows // self.world

    @property
    def used_bytes(self) -> int:
        """Bytes of one row's entries (values and indices, without the row's padding)."""
        return self.k * (_size(self.value_dtype) + _size(self.index_dtype))


def _size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _make_layout(world: int, rows: int, columns: int, k: int, dtype: torch.dtype,
                 value_dtype: torch.dtype) -> ExchangeLayout:
    index_dtype = wire.row_index_dtype(columns)
    vsize, isize = _size(value_dtype), _size(index_dtype)
    if isize > vsize:
        indices_offset, values_offset = 0, k * isize
    else:
        values_offset, indices_offset = 0, k * vsize
    wider = max(vsize, isize)
    row_bytes = (k * (vsize + isize) + wider - 1) // wider * wider
    return ExchangeLayout(world, rows, columns, k, dtype, value_dtype, index_dtype,
                          values_offset, indices_offset, row_bytes)


def _check_arguments(x, k, world: int, value_dtype) -> ExchangeLayout:
    """Validate (x, k, value_dtype) for a group of ``world`` ranks; the exchange's layout."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in wire.VALUE_DTYPES:
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [W*B, D] tensor, got shape {tuple(x.shape)}")
    rows, columns = x.shape
    if rows % world:
        raise ValueError(f"x: {rows} rows do not split into {world} equal blocks (one per "
                         f"rank); expected [W*B, D] with W = {world}")
    if columns < 1:
        raise ValueError(f"x: expected D >= 1 columns, got shape {tuple(x.shape)}")
    if x.numel() > wire.MAX_NUMEL:
        raise ValueError(f"x: {x.numel()} elements; at most 2^31 - 1 are supported")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= columns:
        raise ValueError(f"k: must satisfy 1 <= k <= D ({columns}), got {k}")
    if value_dtype is None:
        value_dtype = x.dtype
    elif value_dtype not in wire.VALUE_DTYPES:
        raise TypeError(f"value_dtype: expected torch.float32, torch.float16 or "
                        f"torch.bfloat16, got {value_dtype}")
    return _make_layout(world, rows, columns, k, x.dtype, value_dtype)


def all_to_all_bytes(x: torch.Tensor, k: int, world: int, *,
                     value_dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    """Bytes one rank sends in one ``sparse_all_to_all(x, k)``, forward plus backward, and what
    the dense all-to-all of x would send, forward plus backward.

    Counting convention (docs/design.md#traffic-statistics): an all-to-all counts the
    chunks sent to the *other* ranks. The rank's own block never crosses the network, so a
    rank sends (W - 1)/W of each tensor it passes to the collective, and at W = 1 both numbers
    are 0. Per rank, with B = x.shape[0] / world:

    - sparse = (W - 1) * B * (row_bytes + k * size(value_dtype)): forward, one wire row per
      row (k values, k indices, int16 when D <= 32768 else int32, padded to the wider element
      size; see the module docstring); backward, the k gradient values of each row.
    - dense = 2 * (W - 1) * B * D * size(x.dtype): the rows of x forward and their gradient
      (in x.dtype) backward.

    What a rank receives is the same (every rank sends the same sizes). Not counted: the
    one-time agreement check of a new (shape, k, dtypes, group), one all-gather of 10 int64
    per rank (see ``sparse_all_to_all``).

    Args:
        x: the ``[W*B, D]`` fp32/fp16/bf16 tensor that would be exchanged (only its shape and
            dtype are read; any device). k: entries kept per row, 1 <= k <= D.
        world: W, an int >= 1 that divides x.shape[0]. value_dtype: as in sparse_all_to_all.

    Returns:
        ``(sparse, dense)`` in bytes (ints). Their ratio is the saving: with k = 5% of D, bf16
        values, int16 indices and fp32 x it is 8 D / (0.3 D) = 26.7x.

    Raises:
        TypeError / ValueError naming the argument, as sparse_all_to_all. No sync (host only).
    """
    if isinstance(world, bool) or not isinstance(world, numbers.Integral):
        raise TypeError(f"world: expected an int, got {type(world).__name__}")
    world = int(world)
    if world < 1:
        raise ValueError(f"world: expected an int >= 1, got {world}")
    layout = _check_arguments(x, k, world, value_dtype)
    others = (world - 1) * layout.block_rows
    sparse = others * (layout.row_bytes + layout.k * _size(layout.value_dtype))
    dense = 2 * others * layout.columns * _size(layout.dtype)
    return sparse, dense


def _field(rows: torch.Tensor, offset: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The [rows, k] view of one field of uint8 wire rows (no copy)."""
    return rows[:, offset:offset + k * _size(dtype)].view(dtype)


def _exchange(tensor: torch.Tensor, group) -> torch.Tensor:
    """One all_to_all_single of a [W*B, n] uint8 tensor: block j to rank j, block j of the
    result from rank j. The process-group collective (not a traced functional one), so a caller
    can count or profile it by wrapping ``torch.distributed.all_to_all_single``."""
    received = torch.empty_like(tensor)
    dist.all_to_all_single(received, tensor, group=group)
    return received


class _SparseAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout: ExchangeLayout, group, backend):
        p = ops.compress_rows(x, layout.k, value_dtype=layout.value_dtype, backend=backend)
        send = torch.empty((layout.rows, layout.row_bytes), dtype=torch.uint8, device=x.device)
        if layout.row_bytes > layout.used_bytes:
            send[:, layout.used_bytes:].zero_()  # deterministic bytes on the wire
        _field(send, layout.values_offset, layout.k, layout.value_dtype).copy_(p.values)
        _field(send, layout.indices_offset, layout.k, layout.index_dtype).copy_(p.indices)
        received = _exchange(send, group)
        got_indices = _field(received, layout.indices_offset, layout.k,
                             layout.index_dtype).contiguous()
        got_values = _field(received, layout.values_offset, layout.k, layout.value_dtype)
        # Received indices are untrusted: decompress_rows and gather_rows never touch a column
        # outside [0, D).
        out = ops.decompress_rows(RowPayload(got_indices, got_values.contiguous(),
                                             (layout.rows, layout.columns), layout.dtype),
                                  backend=backend)
        ctx.save_for_backward(p.indices, got_indices)
        ctx.layout, ctx.group, ctx.backend = layout, group, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        sent_indices, got_indices = ctx.saved_tensors
        layout, group, backend = ctx.layout, ctx.group, ctx.backend
        shape = (layout.rows, layout.columns)
        if grad_out.dtype not in wire.VALUE_DTYPES:
            grad_out = grad_out.to(layout.dtype)
        # gather_rows reads only the payload's indices; its values just give the [B, k] shape.
        at_kept = RowPayload(got_indices, got_indices.new_empty(got_indices.shape,
                                                               dtype=layout.value_dtype),
                             shape, layout.dtype)
        grad_kept = ops.gather_rows(grad_out, at_kept, backend=backend)
        grad_kept = to_wire(grad_kept, layout.value_dtype).contiguous()
        returned = _exchange(grad_kept.view(torch.uint8), group).view(layout.value_dtype)
        grad_x = ops.decompress_rows(RowPayload(sent_indices, returned, shape, layout.dtype),
                                     backend=backend)
        return grad_x, None, None, None


def _resolve_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first")
    if group is None:
        group = dist.group.WORLD
    return group, dist.get_world_size(group)


def sparse_all_to_all(x: torch.Tensor, k: int, *, group=None,
                      value_dtype: Optional[torch.dtype] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """The DCT-MP all-to-all: block j of x goes to rank j, only each row's k largest
    magnitudes cross, and the gradient flows back at the same positions. Differentiable.

    Forward: ``compress_rows(x, k)`` (ties to the lower column, NaN above +inf), then one
    ``torch.distributed.all_to_all_single`` of fixed-size uint8 wire rows carrying each row's k
    values (value_dtype; fp16/bf16 saturate finite values) and k column indices (int16 when
    D <= 32768, else int32), then ``decompress_rows``. The result equals
    ``all_to_all(sparsify_rows(x, k))`` with the kept values rounded to value_dtype.

    Backward: ``gather_rows`` of the output gradient at the received positions, rounded to
    value_dtype (saturating like the forward values), crosses back in one more
    all_to_all_single (``[W*B, k]`` values, no indices: each rank kept the indices it sent);
    x's gradient is that, scattered to the kept positions, 0 elsewhere, in x.dtype. So the
    gradient crosses in value_dtype too: bf16 values mean a bf16 gradient on the wire.

    Every rank must call it with the same (B, D, k, x.dtype, value_dtype), and, when it
    needs a gradient, run the backward too: both directions are collectives.

    Args:
        x: ``[W*B, D]`` fp32/fp16/bf16 on the group's device (CUDA for NCCL, CPU for gloo);
            rows ``j*B .. (j+1)*B - 1`` are for rank j.
        k: entries kept per row, 1 <= k <= D (k = D sends every entry, with its index).
        group: the process group (default: the world). W = its size; at W = 1 the collectives
            still run (a local copy) and the result is sparsify_rows(x, k) in value_dtype.
        value_dtype: dtype of the values and gradients on the wire (default x.dtype).
        backend: kernel backend of compress_rows / decompress_rows / gather_rows.

    Returns:
        ``[W*B, D]`` in x.dtype: block j holds rank j's block for this rank, zeros except
        the k kept entries of each row.

    Raises:
        TypeError / ValueError naming the argument: x not a float tensor, not 2-D, or its rows
        not W equal blocks; k not an int in [1, D]; value_dtype not fp32/fp16/bf16; group when
        torch.distributed is not initialized; x not on CUDA for an NCCL group. Except for the
        last three (and x not a tensor at all), these are raised after the ranks have compared
        their arguments, on every rank: ValueError naming what differs when the ranks disagree
        on the rows, D, k or the dtypes, else the argument error, which they then share. No
        rank is left waiting in a collective.

    Sync and cost: the first call for a new (shape, k, dtypes, group) runs the agreement check:
    one all-gather of 10 int64 per rank and a host read of the result (synchronizes, once per
    key; results are cached per process). Later calls never synchronize with the host: two
    all_to_all_single per step (forward, backward) of sizes that depend on the shapes alone
    (see ``all_to_all_bytes``). The check compares ranks that meet a new key at the same call;
    a rank that changes its shape while the others reuse an agreed one is not caught (the
    collectives then mismatch: a timeout, or a gloo abort, see docs/mp.md). Deterministic:
    the same inputs give bitwise the same result on every run. Not traceable by torch.compile
    (it calls process-group collectives).

    Example (two ranks, B = 4 rows for each, D = 256, 5% kept, bf16 on the wire)::

        y = sparse_all_to_all(x, k=13, value_dtype=torch.bfloat16)  # x: [2 * 4, 256]
        y[4 * j:4 * (j + 1)]  # rank j's rows for this rank, 13 non-zeros each
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    group, world = _resolve_group(group)
    if dist.get_backend(group) == "nccl" and x.device.type != "cuda":
        raise ValueError(f"x: an NCCL group exchanges CUDA tensors, got a tensor on {x.device}")
    try:
        layout, problem = _check_arguments(x, k, world, value_dtype), None
        backends.resolve(backend, x.device)  # a backend only this rank cannot run, too
    except (TypeError, ValueError) as error:
        layout, problem = None, error
    # The ranks compare what they were given before any rank raises for its own arguments: a
    # rank alone with a bad batch size (or k) then fails together with the others instead of
    # leaving them waiting in a collective.
    agree_once(group, world, x, k, value_dtype, problem)
    return _SparseAllToAll.apply(x, layout, group, backend)


class SparseAllToAll(torch.nn.Module):
    """``sparse_all_to_all`` as a module: the boundary between a model-parallel part (each rank
    holding its own shard) and a data-parallel part (each rank holding its own samples).

    Args:
        k: entries kept per row (for a ReLU tower of width D, e.g. ``max(1, D // 20)``).
        group, value_dtype, backend: as in ``sparse_all_to_all``.

    Example, a table-wise sharded embedding boundary in a DLRM-style model. Each of W ranks
    holds some embedding tables and a ReLU tower over their pooled embeddings; every rank
    computes its tables' features for the global batch of W*B samples, ordered by the rank
    that owns the samples, and the exchange hands every rank its own B samples' features from
    every shard (block j from rank j); the data-parallel part (DDP, e.g. with
    ``dct_kernels.distributed.dct_hook``) continues from there::

        class ShardedFeatures(torch.nn.Module):
            def __init__(self, my_tables, dim, width, group):
                super().__init__()
                self.tables = torch.nn.ModuleList(
                    torch.nn.EmbeddingBag(rows, dim, mode="sum") for rows in my_tables)
                self.tower = torch.nn.Sequential(
                    torch.nn.Linear(len(my_tables) * dim, width), torch.nn.ReLU())
                self.exchange = SparseAllToAll(max(1, width // 20), group=group,
                                               value_dtype=torch.bfloat16)

            def forward(self, ids, offsets):           # global batch, W*B samples
                pooled = torch.cat([t(i, o) for t, i, o in zip(self.tables, ids, offsets)], 1)
                return self.exchange(self.tower(pooled))  # [W*B, width]: W blocks of my B

        feats = ShardedFeatures(...)(ids, offsets)     # block j: shard j's features
        mine = feats.view(W, B, width).transpose(0, 1).reshape(B, W * width)
        out = ddp_top(torch.cat([ddp_bottom(dense_x), mine], 1))

    The ReLU matters: thresholding raw pooled embeddings destroys them; a ReLU layer's
    activations are the per-sample "neurons" DCT-MP keeps.
    """

    def __init__(self, k: int, group=None, value_dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k: expected an int, got {type(k).__name__}")
        k = int(k)
        if k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k}")
        if value_dtype is not None and value_dtype not in wire.VALUE_DTYPES:
            raise TypeError(f"value_dtype: expected torch.float32, torch.float16 or "
                            f"torch.bfloat16, got {value_dtype}")
        self.k, self.group, self.value_dtype, self.backend = k, group, value_dtype, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_all_to_all(x, self.k, group=self.group, value_dtype=self.value_dtype,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        """The module's settings, for its repr."""
        return f"k={self.k}, value_dtype={self.value_dtype}"
