"""Backend "cpu": the host C++ core in csrc/cpu/, bound with pybind11 as ``dct_kernels._cpu``.

The core knows nothing of torch: this module passes it data pointers, sizes, dtype codes and
the number of threads it may use (``torch.get_num_threads()``, so ``torch.set_num_threads``
governs it too), and receives inputs the op layer has already validated (see
``dct_kernels/backends/__init__.py`` for the contract). Kernels run with the GIL released on
a small persistent pool of std::threads (no second OpenMP runtime beside torch's); results
are bitwise the same for every thread count, and bitwise those of the torch reference. A
failure raises RuntimeError naming the kernel. Everything here is synchronous.
"""

from functools import lru_cache
from typing import List

import torch

from .. import payload as wire

try:
    from .. import _cpu  # the compiled extension
except ImportError as exc:  # not built on this machine
    raise ImportError(f"dct_kernels._cpu not found: {exc}") from exc

NAME = "cpu"

_CODE = wire.value_code  # the wire codes double as the core's dtype codes


def available() -> str:
    """Always "available" once the extension imported (this module raises ImportError otherwise)."""
    return "available"


def _threads() -> int:
    return torch.get_num_threads()


@lru_cache(maxsize=256)
def _header(numel: int, capacity: int, value_dtype: torch.dtype) -> List[int]:
    return wire.header_words(numel, capacity, value_dtype)[:4]


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def select_threshold(x: torch.Tensor, ks: List[int], offsets: List[int]) -> torch.Tensor:
    """Per segment, the k-th largest magnitude (see the backends' contract)."""
    out = torch.empty(len(ks), dtype=x.dtype)
    _cpu.select_threshold(x.data_ptr(), _CODE(x.dtype), offsets, ks, out.data_ptr(), _threads())
    return out


def _segments(offsets: List[int], seg_dev) -> tuple:
    """(offsets pointer, S): the core reads host offsets, or none for one segment."""
    if seg_dev is None:
        return 0, len(offsets) - 1
    return seg_dev.data_ptr(), seg_dev.numel() - 1


def count_kept(x, thresholds, offsets, seg_dev, residual) -> torch.Tensor:
    """How many entries of x (+ residual) reach their segment's threshold."""
    seg_ptr, segments = _segments(offsets, seg_dev)
    count = _cpu.count_kept(x.data_ptr(), _CODE(x.dtype), x.numel(), _ptr(residual),
                            thresholds.data_ptr(), seg_ptr, segments, _threads())
    return torch.tensor(count, dtype=torch.int64)


def compress(x, thresholds, offsets, seg_dev, residual, payload: wire.SparsePayload) -> None:
    """A version-1 payload of the kept entries in index order; residual updated."""
    seg_ptr, segments = _segments(offsets, seg_dev)
    _cpu.compress(x.data_ptr(), _CODE(x.dtype), x.numel(), _ptr(residual),
                  thresholds.data_ptr(), seg_ptr, segments, payload.buffer.data_ptr(),
                  payload.capacity, _CODE(payload.value_dtype), _threads())


def decompress(out: torch.Tensor, buffer: torch.Tensor, numel: int, capacity: int,
               value_dtype: torch.dtype, accumulate: bool, errors: torch.Tensor) -> None:
    """One version-1 payload into out (overwritten or added to); bad entries counted."""
    buffer = buffer.contiguous()
    _cpu.decompress(buffer.data_ptr(), buffer.numel(), numel, capacity, _CODE(value_dtype),
                    _header(numel, capacity, value_dtype), out.data_ptr(), _CODE(out.dtype),
                    accumulate, errors.data_ptr(), _threads())


def decompress_many(out: torch.Tensor, buffers: torch.Tensor, capacity: int,
                    value_dtype: torch.dtype, accumulate: bool, average: bool,
                    errors: torch.Tensor) -> None:
    """W version-1 rows summed into out in rank order (fp32); bad ones counted."""
    buffers = buffers.contiguous()
    numel = out.numel()
    _cpu.decompress_many(buffers.data_ptr(), buffers.shape[0], buffers.shape[1], numel,
                         capacity, _CODE(value_dtype), _header(numel, capacity, value_dtype),
                         out.data_ptr(), _CODE(out.dtype), accumulate, average,
                         errors.data_ptr(), _threads())


def _where(where: wire.WireLayout) -> tuple:
    return (where.capacity, wire.value_code(where.value_dtype), where.index_encoding == "delta",
            where.num_scales, [where.bounds_offset, where.scales_offset, where.indices_offset,
                               where.values_offset])


def encode_v2(candidates: wire.SparsePayload, payload: wire.SparsePayload, scale_offsets,
              residual, position_offset: int) -> None:
    """The core's version-2 encoder (csrc/cpu/codec.cpp; bitwise codec.encode)."""
    count = int(candidates.count)  # host memory: no synchronization
    _cpu.encode_v2(payload.buffer.data_ptr(), *_where(payload.layout),
                   candidates.indices.data_ptr(), candidates.values.data_ptr(),
                   _CODE(candidates.value_dtype), count, int(candidates.overflow),
                   position_offset, list(scale_offsets or []), _ptr(residual))


def compress_ranges(x, thresholds, cuts: List[int], offsets: List[List[int]], residual,
                    out: torch.Tensor, where: wire.WireLayout, scale_offsets) -> None:
    """Optional: ops.compress_shards' rows in one call (bitwise compress of each range);
    ``scale_offsets``: each range's list (fp8 values), else None."""
    flat_offsets, starts = [], [0]
    for o in offsets:
        flat_offsets.extend(o)
        starts.append(len(flat_offsets))
    v2 = where.version != 1
    capacity, code, delta, num_scales, layout = _where(where)
    candidate = torch.float32 if where.value_dtype == wire.FLOAT8 else where.value_dtype
    if thresholds.numel() == 0:  # every range empty: none is read, but the core wants a pointer
        thresholds = torch.zeros(1, dtype=torch.float32)
    _cpu.compress_ranges(x.data_ptr(), _CODE(x.dtype), x.numel(), _ptr(residual),
                         thresholds.data_ptr(), cuts, flat_offsets, starts,
                         wire.header_words(0, capacity, where.value_dtype, where.index_encoding,
                                           num_scales), out.data_ptr(), out.shape[1], capacity,
                         code, v2, delta, num_scales, layout, _CODE(candidate),
                         [o for b in scale_offsets for o in b] if scale_offsets else [],
                         _threads())


@lru_cache(maxsize=256)
def _expected(numel: int, where: wire.WireLayout) -> List[int]:
    return wire.header_words(numel, where.capacity, where.value_dtype, where.index_encoding,
                             where.num_scales)


def decompress_v2(out: torch.Tensor, buffers: torch.Tensor, numel: int,
                  where: wire.WireLayout, accumulate: bool, average: bool, many: bool,
                  errors: torch.Tensor) -> None:
    """W version-2 rows decoded and summed into out by the core."""
    buffers = buffers.contiguous()
    _cpu.decompress_v2(buffers.data_ptr(), buffers.shape[0], buffers.shape[1], numel,
                       *_where(where), _expected(numel, where), out.data_ptr(),
                       _CODE(out.dtype), accumulate, average, many, errors.data_ptr(),
                       _threads())


def compress_rows(x: torch.Tensor, k: int, value_dtype: torch.dtype):
    """Per row, the k largest magnitudes (ties to the lower column), ascending."""
    rows, columns = x.shape
    indices = torch.empty(rows, k, dtype=wire.row_index_dtype(columns))
    values = torch.empty(rows, k, dtype=value_dtype)
    _cpu.compress_rows(x.data_ptr(), _CODE(x.dtype), rows, columns, k, indices.data_ptr(),
                       indices.element_size(), values.data_ptr(), _CODE(value_dtype),
                       _threads())
    return indices, values


def decompress_rows(indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    """Zeros except the entries whose column is inside [0, D)."""
    rows, columns = out.shape
    _cpu.decompress_rows(indices.data_ptr(), indices.element_size(), values.data_ptr(),
                         _CODE(values.dtype), rows, columns, indices.shape[1], out.data_ptr(),
                         _CODE(out.dtype), _threads())


def gather_rows(y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y at the given columns; 0 for a column outside [0, D)."""
    rows, columns = y.shape
    k = indices.shape[1]
    out = torch.empty(rows, k, dtype=y.dtype)
    _cpu.gather_rows(y.data_ptr(), _CODE(y.dtype), rows, columns, k, indices.data_ptr(),
                     indices.element_size(), out.data_ptr(), _threads())
    return out


# ------------------------------------------------------------------ the DDP hook's threshold rule
# Optional (dct_kernels/distributed/threshold_rule.py holds the reference composition): the
# rule's per-step work in one call each; ``rule`` is a ThresholdRule on the CPU.

def _writable(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous():  # written through its pointer
        raise ValueError(f"{name}: the threshold rule writes it in place; expected a "
                         f"contiguous tensor")
    return t


def rule_estimate(rule, thresholds: torch.Tensor, x: torch.Tensor,
                  residual: torch.Tensor) -> None:
    """The threshold rule's sampled estimate times the scales, into thresholds."""
    x, residual = x.contiguous(), residual.contiguous()
    _writable(thresholds, "thresholds")
    _cpu.rule_estimate(x.data_ptr(), _CODE(x.dtype), residual.data_ptr(),
                       rule.sample_index.data_ptr(), rule.sample_bounds, rule.sample_ks,
                       rule.sample_segment.data_ptr(), rule.sample_slots.data_ptr(),
                       rule.scales.data_ptr(), thresholds.data_ptr(), _threads())


_COUNT_OFFSET = 4 * wire.WORD_COUNT


def rule_step(rule, thresholds: torch.Tensor, kept, overflowed: torch.Tensor,
              capped) -> None:
    """The threshold rule's step from the kept counts: averages, scales, streaks."""
    if kept.rows is not None:
        rows = kept.rows.contiguous()
        source = (rows.data_ptr(), rows.shape[0], rows.shape[1], _COUNT_OFFSET,
                  wire.HEADER_BYTES, kept.capacity, kept.shift.data_ptr(), 0, 0, 0, 0)
    else:
        positions = kept.positions.reshape(-1).to(torch.int64)  # no copy when int64
        valid = kept.valid.reshape(-1).contiguous()
        source = (0, 0, 0, 0, 0, 0, 0, positions.data_ptr(), valid.data_ptr(),
                  positions.numel(), int(kept.shift))
    thresholds = thresholds.contiguous()  # read only
    _cpu.rule_step(rule.num_segments, rule.starts.data_ptr(), rule.ks_int.data_ptr(),
                   rule.low.data_ptr(), rule.sparse.data_ptr(), rule.adjustable.data_ptr(),
                   rule.high_total, rule.patience, rule.marks.data_ptr(),
                   rule.multipliers.data_ptr(), rule.scale_min, rule.scale_max,
                   thresholds.data_ptr(), overflowed.data_ptr(), _ptr(capped), *source,
                   rule.averages.data_ptr(), rule.scales.data_ptr(), rule.streaks.data_ptr(),
                   rule.host_flags.data_ptr(), rule.counts_out.data_ptr())
