"""Per-row top-k (compress_rows), its inverse (decompress_rows) and gather_rows.

compress_rows: one program per row. The k-th largest key t of the row is found bit by bit from
the top (t is the largest key with count(key >= t) >= k), then one more pass keeps every key
above t plus the first (k - count(key > t)) keys equal to t in column order, and writes them
in column order. Exactly k entries per row, ties to the lower column, NaN above +inf.
"""

import torch
import triton
import triton.language as tl

from ... import payload as wire
from ...magnitude import key_bits
from .common import key_params, magnitude_key, to_f32, to_out, to_wire

MAX_BLOCK = 4096


@triton.jit
def _row_keys(x_row, chunk, columns, BITS_TYPE: tl.constexpr, ABS_MASK: tl.constexpr,
              INF_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Columns of one chunk of a row, which exist, their values and magnitude keys."""
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = cols < columns
    x = tl.load(x_row + cols, mask=inside, other=0.0)
    return cols, inside, x, magnitude_key(x, BITS_TYPE, ABS_MASK, INF_BITS)


@triton.jit
def _compress_rows_kernel(x_ptr, columns, k, idx_ptr, val_ptr,
                          BITS_TYPE: tl.constexpr, ABS_MASK: tl.constexpr,
                          INF_BITS: tl.constexpr, KEY_BITS: tl.constexpr,
                          WIRE: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * columns
    kth = tl.zeros((), dtype=tl.int32)
    for b in tl.static_range(KEY_BITS):
        candidate = kth | (1 << (KEY_BITS - 1 - b))
        at_least = tl.zeros((), dtype=tl.int32)
        for chunk in range(NUM_CHUNKS):
            cols, inside, _, key = _row_keys(x_row, chunk, columns, BITS_TYPE, ABS_MASK,
                                             INF_BITS, BLOCK)
            at_least += tl.sum((inside & (key >= candidate)).to(tl.int32), 0)
        kth = tl.where(at_least >= k, candidate, kth)

    above = tl.zeros((), dtype=tl.int32)
    for chunk in range(NUM_CHUNKS):
        cols, inside, _, key = _row_keys(x_row, chunk, columns, BITS_TYPE, ABS_MASK, INF_BITS,
                                         BLOCK)
        above += tl.sum((inside & (key > kth)).to(tl.int32), 0)
    ties_wanted = k - above

    written = tl.zeros((), dtype=tl.int32)
    ties_seen = tl.zeros((), dtype=tl.int32)
    out_row = row * k
    for chunk in range(NUM_CHUNKS):
        cols, inside, x, key = _row_keys(x_row, chunk, columns, BITS_TYPE, ABS_MASK, INF_BITS,
                                         BLOCK)
        tie = (inside & (key == kth)).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, 0)
        keep = (inside & (key > kth)) | ((tie > 0) & (tie_rank <= ties_wanted))
        kept = keep.to(tl.int32)
        slot = written + tl.cumsum(kept, 0) - kept
        tl.store(idx_ptr + out_row + slot, cols.to(idx_ptr.dtype.element_ty), mask=keep)
        tl.store(val_ptr + out_row + slot, to_wire(to_f32(x), WIRE), mask=keep)
        written += tl.sum(kept, 0)
        ties_seen += tl.sum(tie, 0)


@triton.jit
def _payload_columns(idx_ptr, row, k, columns, chunk, BLOCK: tl.constexpr):
    """Slots j of one chunk of a row's k entries, which of them exist, their columns, and
    which columns lie inside [0, columns) (a payload is untrusted)."""
    j = chunk * BLOCK + tl.arange(0, BLOCK)
    used = j < k
    col = tl.load(idx_ptr + row * k + j, mask=used, other=-1).to(tl.int64)
    return j, used, col, used & (col >= 0) & (col < columns)


@triton.jit
def _decompress_rows_kernel(idx_ptr, val_ptr, out_ptr, columns, k,
                            OUT_CODE: tl.constexpr, BLOCK: tl.constexpr,
                            NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    for chunk in range(NUM_CHUNKS):
        j, _, col, ok = _payload_columns(idx_ptr, row, k, columns, chunk, BLOCK)
        value = to_f32(tl.load(val_ptr + row * k + j, mask=ok, other=0.0))
        tl.store(out_ptr + row * columns + col, to_out(value, OUT_CODE), mask=ok)


@triton.jit
def _gather_rows_kernel(y_ptr, idx_ptr, out_ptr, columns, k, BLOCK: tl.constexpr,
                        NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    for chunk in range(NUM_CHUNKS):
        j, used, col, ok = _payload_columns(idx_ptr, row, k, columns, chunk, BLOCK)
        picked = tl.load(y_ptr + row * columns + col, mask=ok, other=0.0)
        tl.store(out_ptr + row * k + j, picked, mask=used)


def _block(size: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(size, 16)))


def compress_rows(x: torch.Tensor, k: int, value_dtype: torch.dtype):
    rows, columns = x.shape
    indices = torch.empty(rows, k, dtype=wire.row_index_dtype(columns), device=x.device)
    values = torch.empty(rows, k, dtype=value_dtype, device=x.device)
    if rows:
        bits_type, abs_mask, inf_bits = key_params(x.dtype)
        _compress_rows_kernel[(rows,)](
            x, columns, k, indices, values, BITS_TYPE=bits_type, ABS_MASK=abs_mask,
            INF_BITS=inf_bits, KEY_BITS=key_bits(x.dtype), WIRE=wire.value_code(value_dtype),
            BLOCK=_block(columns), NUM_CHUNKS=triton.cdiv(columns, _block(columns)), num_warps=8)
    return indices, values


def decompress_rows(indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    rows, columns = out.shape
    out.zero_()
    k = indices.shape[1]
    if rows and k:
        _decompress_rows_kernel[(rows,)](indices, values, out, columns, k,
                                         OUT_CODE=wire.value_code(out.dtype), BLOCK=_block(k),
                                         NUM_CHUNKS=triton.cdiv(k, _block(k)))


def gather_rows(y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    rows, columns = y.shape
    k = indices.shape[1]
    out = torch.empty(rows, k, dtype=y.dtype, device=y.device)
    if rows and k:
        _gather_rows_kernel[(rows,)](y, indices, out, columns, k, BLOCK=_block(k),
                                  NUM_CHUNKS=triton.cdiv(k, _block(k)))
    return out
