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
    _cpu.select_threshold(x=x.data_ptr(), dtype=_CODE(x.dtype), offsets=offsets, ks=ks,
                          out=out.data_ptr(), threads=_threads())
    return out


def _segments(offsets: List[int], seg_dev) -> dict:
    """The offsets pointer and S: the core reads host offsets, or none for one segment."""
    if seg_dev is None:
        return dict(offsets=0, num_segments=len(offsets) - 1)
    return dict(offsets=seg_dev.data_ptr(), num_segments=seg_dev.numel() - 1)


def count_kept(x, thresholds, offsets, seg_dev, residual) -> torch.Tensor:
    """How many entries of x (+ residual) reach their segment's threshold."""
    count = _cpu.count_kept(x=x.data_ptr(), dtype=_CODE(x.dtype), n=x.numel(),
                            residual=_ptr(residual), thresholds=thresholds.data_ptr(),
                            **_segments(offsets, seg_dev), threads=_threads())
    return torch.tensor(count, dtype=torch.int64)


def compress(x, thresholds, offsets, seg_dev, residual, payload: wire.SparsePayload) -> None:
    """A version-1 payload of the kept entries in index order; residual updated."""
    _cpu.compress(x=x.data_ptr(), dtype=_CODE(x.dtype), n=x.numel(), residual=_ptr(residual),
                  thresholds=thresholds.data_ptr(), **_segments(offsets, seg_dev),
                  payload=payload.buffer.data_ptr(), capacity=payload.capacity,
                  value_dtype=_CODE(payload.value_dtype), threads=_threads())


def decompress(out: torch.Tensor, buffer: torch.Tensor, numel: int, capacity: int,
               value_dtype: torch.dtype, accumulate: bool, errors: torch.Tensor) -> None:
    """One version-1 payload into out (overwritten or added to); bad entries counted."""
    buffer = buffer.contiguous()
    _cpu.decompress(buffers=buffer.data_ptr(), row_bytes=buffer.numel(), numel=numel,
                    capacity=capacity, value_dtype=_CODE(value_dtype),
                    header=_header(numel, capacity, value_dtype), out=out.data_ptr(),
                    out_dtype=_CODE(out.dtype), accumulate=accumulate,
                    errors=errors.data_ptr(), threads=_threads())


def decompress_many(out: torch.Tensor, buffers: torch.Tensor, capacity: int,
                    value_dtype: torch.dtype, accumulate: bool, average: bool,
                    errors: torch.Tensor) -> None:
    """W version-1 rows summed into out in rank order (fp32); bad ones counted."""
    buffers = buffers.contiguous()
    numel = out.numel()
    _cpu.decompress_many(buffers=buffers.data_ptr(), num_rows=buffers.shape[0],
                         row_bytes=buffers.shape[1], numel=numel, capacity=capacity,
                         value_dtype=_CODE(value_dtype),
                         header=_header(numel, capacity, value_dtype), out=out.data_ptr(),
                         out_dtype=_CODE(out.dtype), accumulate=accumulate, average=average,
                         errors=errors.data_ptr(), threads=_threads())


def _where(where: wire.WireLayout) -> dict:
    """A version-2 layout as the core's keyword arguments."""
    return dict(capacity=where.capacity, value_code=wire.value_code(where.value_dtype),
                delta=where.index_encoding == "delta", num_scales=where.num_scales,
                layout_offsets=[where.bounds_offset, where.scales_offset,
                                where.indices_offset, where.values_offset])


def encode_v2(candidates: wire.SparsePayload, payload: wire.SparsePayload, scale_offsets,
              residual, position_offset: int) -> None:
    """The core's version-2 encoder (csrc/cpu/codec.cpp; bitwise codec.encode)."""
    count = int(candidates.count)  # host memory: no synchronization
    _cpu.encode_v2(out=payload.buffer.data_ptr(), **_where(payload.layout),
                   cand_index=candidates.indices.data_ptr(),
                   cand_values=candidates.values.data_ptr(),
                   cand_value_code=_CODE(candidates.value_dtype), cand_count=count,
                   cand_overflow=int(candidates.overflow), position_offset=position_offset,
                   scale_offsets=list(scale_offsets or []), residual=_ptr(residual))


def compress_ranges(x, thresholds, cuts: List[int], offsets: List[List[int]], residual,
                    out: torch.Tensor, where: wire.WireLayout, scale_offsets) -> None:
    """Optional: ops.compress_shards' rows in one call (bitwise compress of each range);
    ``scale_offsets``: each range's list (fp8 values), else None."""
    flat_offsets, starts = [], [0]
    for o in offsets:
        flat_offsets.extend(o)
        starts.append(len(flat_offsets))
    candidate = torch.float32 if where.value_dtype == wire.FLOAT8 else where.value_dtype
    if thresholds.numel() == 0:  # every range empty: none is read, but the core wants a pointer
        thresholds = torch.zeros(1, dtype=torch.float32)
    _cpu.compress_ranges(x=x.data_ptr(), dtype=_CODE(x.dtype), n=x.numel(),
                         residual=_ptr(residual), thresholds=thresholds.data_ptr(), cuts=cuts,
                         offsets=flat_offsets, offset_starts=starts,
                         header=wire.header_words(0, where.capacity, where.value_dtype,
                                                  where.index_encoding, where.num_scales),
                         rows=out.data_ptr(), row_bytes=out.shape[1], v2=where.version != 1,
                         **_where(where), cand_value_code=_CODE(candidate),
                         scale_offsets=([o for b in scale_offsets for o in b]
                                        if scale_offsets else []),
                         threads=_threads())


@lru_cache(maxsize=256)
def _expected(numel: int, where: wire.WireLayout) -> List[int]:
    return wire.header_words(numel, where.capacity, where.value_dtype, where.index_encoding,
                             where.num_scales)


def decompress_v2(out: torch.Tensor, buffers: torch.Tensor, numel: int,
                  where: wire.WireLayout, accumulate: bool, average: bool, many: bool,
                  errors: torch.Tensor) -> None:
    """W version-2 rows decoded and summed into out by the core."""
    buffers = buffers.contiguous()
    _cpu.decompress_v2(buffers=buffers.data_ptr(), num_rows=buffers.shape[0],
                       row_bytes=buffers.shape[1], numel=numel, **_where(where),
                       expected=_expected(numel, where), out=out.data_ptr(),
                       out_dtype=_CODE(out.dtype), accumulate=accumulate, average=average,
                       many=many, errors=errors.data_ptr(), threads=_threads())


def compress_rows(x: torch.Tensor, k: int, value_dtype: torch.dtype):
    """Per row, the k largest magnitudes (ties to the lower column), ascending."""
    rows, columns = x.shape
    indices = torch.empty(rows, k, dtype=wire.row_index_dtype(columns))
    values = torch.empty(rows, k, dtype=value_dtype)
    _cpu.compress_rows(x=x.data_ptr(), dtype=_CODE(x.dtype), rows=rows, columns=columns, k=k,
                       indices=indices.data_ptr(), index_bytes=indices.element_size(),
                       values=values.data_ptr(), value_dtype=_CODE(value_dtype),
                       threads=_threads())
    return indices, values


def decompress_rows(indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    """Zeros except the entries whose column is inside [0, D)."""
    rows, columns = out.shape
    _cpu.decompress_rows(indices=indices.data_ptr(), index_bytes=indices.element_size(),
                         values=values.data_ptr(), value_dtype=_CODE(values.dtype), rows=rows,
                         columns=columns, k=indices.shape[1], out=out.data_ptr(),
                         out_dtype=_CODE(out.dtype), threads=_threads())


def gather_rows(y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y at the given columns; 0 for a column outside [0, D)."""
    rows, columns = y.shape
    k = indices.shape[1]
    out = torch.empty(rows, k, dtype=y.dtype)
    _cpu.gather_rows(y=y.data_ptr(), dtype=_CODE(y.dtype), rows=rows, columns=columns, k=k,
                     indices=indices.data_ptr(), index_bytes=indices.element_size(),
                     out=out.data_ptr(), threads=_threads())
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
    _cpu.rule_estimate(x=x.data_ptr(), dtype=_CODE(x.dtype), residual=residual.data_ptr(),
                       index=rule.sample_index.data_ptr(), bounds=rule.sample_bounds,
                       ks=rule.sample_ks, unit_segment=rule.sample_segment.data_ptr(),
                       unit_slot=rule.sample_slots.data_ptr(), scales=rule.scales.data_ptr(),
                       thresholds=thresholds.data_ptr(), threads=_threads())


_COUNT_OFFSET = 4 * wire.WORD_COUNT


def rule_step(rule, thresholds: torch.Tensor, kept, overflowed: torch.Tensor,
              capped) -> None:
    """The threshold rule's step from the kept counts: averages, scales, streaks."""
    if kept.rows is not None:
        rows = kept.rows.contiguous()
        source = dict(rows=rows.data_ptr(), num_rows=rows.shape[0], row_bytes=rows.shape[1],
                      count_offset=_COUNT_OFFSET, index_offset=wire.HEADER_BYTES,
                      capacity=kept.capacity, row_shift=kept.shift.data_ptr(), positions=0,
                      valid=0, num_positions=0, position_shift=0)
    else:
        positions = kept.positions.reshape(-1).to(torch.int64)  # no copy when int64
        valid = kept.valid.reshape(-1).contiguous()
        source = dict(rows=0, num_rows=0, row_bytes=0, count_offset=0, index_offset=0,
                      capacity=0, row_shift=0, positions=positions.data_ptr(),
                      valid=valid.data_ptr(), num_positions=positions.numel(),
                      position_shift=int(kept.shift))
    thresholds = thresholds.contiguous()  # read only
    _cpu.rule_step(num_segments=rule.num_segments, starts=rule.starts.data_ptr(),
                   ks=rule.ks_int.data_ptr(), low=rule.low.data_ptr(),
                   sparse=rule.sparse.data_ptr(), adjustable=rule.adjustable.data_ptr(),
                   high_total=rule.high_total, patience=rule.patience,
                   marks=rule.marks.data_ptr(), multipliers=rule.multipliers.data_ptr(),
                   scale_min=rule.scale_min, scale_max=rule.scale_max,
                   thresholds=thresholds.data_ptr(), overflowed=overflowed.data_ptr(),
                   capped=_ptr(capped), **source, averages=rule.averages.data_ptr(),
                   scales=rule.scales.data_ptr(), streaks=rule.streaks.data_ptr(),
                   flags=rule.host_flags.data_ptr(), counts=rule.counts_out.data_ptr())
