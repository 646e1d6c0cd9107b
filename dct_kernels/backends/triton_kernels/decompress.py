"""decompress and decompress_many: device-checked scatter and rank-ordered merge.

Payloads are untrusted. Every kernel re-checks a row's header against the expected
configuration (a mismatch voids the whole row), clamps the count to [0, capacity], and skips
every entry whose index is outside [0, numel) or not above every in-range index before it (the
running maximum comes from one ``torch.cummax`` per row); the check kernel adds skipped rows
and entries to the device-side error counter. The entries used are strictly ascending whatever
a buffer holds, so no two of them write the same output. Writes are masked by those
checks, so nothing outside ``out`` (or the merge's scratch) is written whatever a buffer holds.

decompress_many is a merge over output tiles: each program owns TILE consecutive outputs,
zeroes them in an fp32 scratch (``out`` itself when it is fp32 and not accumulated into), adds
rank 0's entries that fall in the tile, then rank 1's, and so on, with a barrier between ranks,
then divides, adds to ``out`` and rounds, while the tile is still in cache. Each rank's entries
for a tile are found by binary search (``torch.searchsorted``) of its running maximum, which is
sorted even in a corrupted buffer and equals the index at every usable entry. Tiles are
disjoint and usable indices distinct, so there are no races and no float atomics: the sum is
``0 + d_0 + d_1 + ...`` in rank order, bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from ... import payload as wire
from ...wire_check import running_highest, usable_slots
from .common import to_f32, to_out

BLOCK = 1024   # entries per program of the scatter / check kernel
TILE = 4096    # outputs per program of the merge
CHUNK = 128    # entries read at a time by the merge
_STORE, _ADD, _CHECK = 0, 1, 2
# Header word positions of the wire format (payload.py), as constants the kernels can read.
_HEADER_WORDS = tl.constexpr(wire.HEADER_WORDS)
_WORD_MAGIC = tl.constexpr(wire.WORD_MAGIC)
_WORD_VERSION_CODES = tl.constexpr(wire.WORD_VERSION_CODES)
_WORD_NUMEL_LOW = tl.constexpr(wire.WORD_NUMEL_LOW)
_WORD_NUMEL_HIGH = tl.constexpr(wire.WORD_NUMEL_HIGH)
_WORD_CAPACITY = tl.constexpr(wire.WORD_CAPACITY)
_WORD_COUNT = tl.constexpr(wire.WORD_COUNT)


@triton.jit
def _row_header(header, capacity, MAGIC: tl.constexpr, VERSION_CODES: tl.constexpr,
                NUMEL_LO: tl.constexpr, NUMEL_HI: tl.constexpr):
    """(header matches, count field in range, count to use) of one row."""
    header_ok = ((tl.load(header + _WORD_MAGIC) == MAGIC)
                 & (tl.load(header + _WORD_VERSION_CODES) == VERSION_CODES)
                 & (tl.load(header + _WORD_NUMEL_LOW) == NUMEL_LO)
                 & (tl.load(header + _WORD_NUMEL_HIGH) == NUMEL_HI)
                 & (tl.load(header + _WORD_CAPACITY) == capacity))
    claimed = tl.load(header + _WORD_COUNT)
    count_ok = (claimed >= 0) & (claimed <= capacity)
    count = tl.where(header_ok, tl.minimum(tl.maximum(claimed, 0), capacity), 0)
    return header_ok, count_ok, count


@triton.jit
def _scatter_kernel(words_ptr, values_ptr, before_ptr, row_words, row_values, values_start,
                    out_ptr, numel, capacity, errors_ptr,
                    MAGIC: tl.constexpr, VERSION_CODES: tl.constexpr,
                    NUMEL_LO: tl.constexpr, NUMEL_HI: tl.constexpr,
                    MODE: tl.constexpr, OUT_CODE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (entry blocks, rows). MODE: store, add (in fp32), or only count errors."""
    row = tl.program_id(1).to(tl.int64)
    header = words_ptr + row * row_words
    header_ok, count_ok, count = _row_header(header, capacity, MAGIC, VERSION_CODES,
                                             NUMEL_LO, NUMEL_HI)
    pid = tl.program_id(0)
    if pid == 0:
        header_errors = tl.where(header_ok, tl.where(count_ok, 0, 1), 1)
        tl.atomic_add(errors_ptr, header_errors, mask=header_errors > 0)

    i = pid * BLOCK + tl.arange(0, BLOCK)
    used = i < count
    indices = header + _HEADER_WORDS
    idx = tl.load(indices + i, mask=used, other=-1)
    highest_before = tl.load(before_ptr + row * capacity + i, mask=used, other=-1)
    valid = used & (idx >= 0) & (idx < numel) & (idx > highest_before)
    bad = tl.sum((used & ~valid).to(tl.int32), 0)
    tl.atomic_add(errors_ptr, bad, mask=bad > 0)

    if MODE != 2:
        value = to_f32(tl.load(values_ptr + row * row_values + values_start + i,
                               mask=valid, other=0.0))
        target = out_ptr + idx
        if MODE == 1:
            value = to_f32(tl.load(target, mask=valid, other=0.0)) + value
        tl.store(target, to_out(value, OUT_CODE), mask=valid)


@triton.jit(do_not_specialize=["row_words", "row_values", "capacity", "num_tiles"])
def _merge_kernel(words_ptr, values_ptr, before_ptr, starts_ptr, row_words, row_values,
                  values_start,
                  scratch_ptr, out_ptr, n, capacity, num_tiles,
                  MAGIC: tl.constexpr, VERSION_CODES: tl.constexpr,
                  NUMEL_LO: tl.constexpr, NUMEL_HI: tl.constexpr, RANKS: tl.constexpr,
                  AVERAGE: tl.constexpr, ACCUMULATE: tl.constexpr, OUT_CODE: tl.constexpr,
                  TILE: tl.constexpr, CHUNK: tl.constexpr):
    tile = tl.program_id(0)
    first = tile.to(tl.int64) * TILE
    offs = first + tl.arange(0, TILE)
    inside = offs < n
    tl.store(scratch_ptr + offs, tl.zeros((TILE,), dtype=tl.float32), mask=inside)
    tl.debug_barrier()
    # Row offsets in int64: W x nbytes can exceed 2^31.
    row_words, row_values = row_words.to(tl.int64), row_values.to(tl.int64)
    capacity64 = capacity.to(tl.int64)
    for w in range(RANKS):
        header = words_ptr + w * row_words
        header_ok, _, count = _row_header(header, capacity, MAGIC, VERSION_CODES,
                                          NUMEL_LO, NUMEL_HI)
        lo = tl.load(starts_ptr + w * (num_tiles + 1).to(tl.int64) + tile)
        hi = tl.load(starts_ptr + w * (num_tiles + 1).to(tl.int64) + tile + 1)
        hi = tl.where(header_ok, tl.minimum(hi, count.to(tl.int64)), lo)
        entry = lo
        while entry < hi:
            i = entry + tl.arange(0, CHUNK)
            used = i < hi
            idx = tl.load(header + _HEADER_WORDS + i, mask=used, other=-1)
            highest_before = tl.load(before_ptr + w * capacity64 + i, mask=used, other=-1)
            valid = (used & (idx >= first) & (idx < first + TILE) & (idx < n)
                     & (idx > highest_before))
            value = to_f32(tl.load(values_ptr + w * row_values + values_start + i,
                                   mask=valid, other=0.0))
            target = scratch_ptr + idx
            tl.store(target, tl.load(target, mask=valid, other=0.0) + value, mask=valid)
            entry += CHUNK
        tl.debug_barrier()  # rank w's additions are visible before rank w + 1 reads them
    total = tl.load(scratch_ptr + offs, mask=inside, other=0.0)
    if AVERAGE:
        total = tl.math.div_rn(total, tl.zeros_like(total) + RANKS)
    if ACCUMULATE:
        total = to_f32(tl.load(out_ptr + offs, mask=inside, other=0.0)) + total
    tl.store(out_ptr + offs, to_out(total, OUT_CODE), mask=inside)


def _row_args(numel, capacity, value_dtype):
    """Row strides, value offset and the expected header words, as kernel arguments."""
    values_offset, nbytes = wire.layout(capacity, value_dtype)
    itemsize = value_dtype.itemsize
    words = wire.header_words(numel, capacity, value_dtype)
    strides = (nbytes // 4, nbytes // itemsize, values_offset // itemsize)
    header = dict(MAGIC=words[wire.WORD_MAGIC], VERSION_CODES=words[wire.WORD_VERSION_CODES],
                  NUMEL_LO=words[wire.WORD_NUMEL_LOW], NUMEL_HI=words[wire.WORD_NUMEL_HIGH])
    return strides, header


def _typed_views(buffers: torch.Tensor, value_dtype: torch.dtype):
    return buffers.view(torch.int32), buffers.view(value_dtype)


def _running_highest(words: torch.Tensor, capacity: int, numel: int):
    """(through, before) of ``wire_check.running_highest`` over each row's first ``count``
    in-range indices (int32 [W, capacity]), and the mask of the slots below each count."""
    counts = words[:, wire.WORD_COUNT].clamp(0, capacity)
    indices = words[:, wire.HEADER_WORDS:wire.HEADER_WORDS + capacity]
    used, usable = usable_slots(indices, counts, numel)
    through, before = running_highest(indices, usable)
    return through, before.contiguous(), used


def _launch_scatter(buffers, numel, capacity, value_dtype, out, mode, errors, before=None):
    words, values = _typed_views(buffers, value_dtype)
    if before is None:
        before = _running_highest(words, capacity, numel)[1]
    strides, header = _row_args(numel, capacity, value_dtype)
    grid = (max(1, triton.cdiv(capacity, BLOCK)), buffers.shape[0])
    _scatter_kernel[grid](words, values, before, *strides, out, numel, capacity, errors,
                          **header, MODE=mode, OUT_CODE=wire.value_code(out.dtype), BLOCK=BLOCK,
                          num_warps=4)


def decompress(out: torch.Tensor, buffer: torch.Tensor, numel: int, capacity: int,
               value_dtype: torch.dtype, accumulate: bool, errors: torch.Tensor) -> None:
    if not accumulate:
        out.zero_()
    _launch_scatter(buffer[None], numel, capacity, value_dtype, out,
                    _ADD if accumulate else _STORE, errors)


def _tile_starts(through: torch.Tensor, used: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """[W, num_tiles + 1] int64: where each tile's entries begin in each row, by binary search
    of the running maximum (slots past the count read as the largest int32, above every valid
    index since numel < 2^31)."""
    largest = torch.iinfo(torch.int32).max
    keys = torch.where(used, through, largest)
    bounds = torch.arange(num_tiles + 1, device=keys.device, dtype=torch.int64) * TILE
    bounds = bounds.clamp(max=largest).to(torch.int32)
    return torch.searchsorted(keys, bounds.expand(keys.shape[0], -1).contiguous())


def decompress_many(out: torch.Tensor, buffers: torch.Tensor, capacity: int,
                    value_dtype: torch.dtype, accumulate: bool, average: bool,
                    errors: torch.Tensor) -> None:
    n = out.numel()
    ranks = buffers.shape[0]
    words, values = _typed_views(buffers, value_dtype)
    through, before, used = _running_highest(words, capacity, n)
    # Count bad rows and entries once (the merge skips the same entries without counting).
    _launch_scatter(buffers, n, capacity, value_dtype, out, _CHECK, errors, before)
    if n == 0:
        return
    in_place = out.dtype == torch.float32 and not accumulate
    scratch = out if in_place else torch.empty(n, dtype=torch.float32, device=out.device)
    num_tiles = triton.cdiv(n, TILE)
    starts = _tile_starts(through, used, num_tiles)
    strides, header = _row_args(n, capacity, value_dtype)
    _merge_kernel[(num_tiles,)](
        words, values, before, starts, *strides, scratch, out, n, capacity, num_tiles,
        **header, RANKS=ranks, AVERAGE=average, ACCUMULATE=accumulate,
        OUT_CODE=wire.value_code(out.dtype), TILE=TILE, CHUNK=CHUNK, num_warps=8)
