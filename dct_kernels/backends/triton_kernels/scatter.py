"""decompress and decompress_many: device-checked scatter of wire buffers.

Payloads are untrusted. Each program re-checks its row's header against the expected
configuration (a mismatch voids the whole row), clamps the count to [0, capacity], and skips
every entry whose index is outside [0, numel) or not above its predecessor's; skipped rows and
entries are added to the device-side error counter. Writes are masked by those checks, so
nothing outside ``out`` is written whatever the buffer holds.

decompress_many sums the rows in rank order with one launch per rank into an fp32 accumulator
(plain loads and stores: within a valid payload the indices are distinct, so there are no
races and no float atomics), then one pass divides, adds to ``out`` and rounds. The launch order
is the summation order, which makes the result bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from ... import payload as wire
from .common import f32_to, to_f32, WIRE_CODE

BLOCK = 1024
_HEADER_WORDS = wire.HEADER_BYTES // 4
_STORE, _ADD = 0, 1


@triton.jit(do_not_specialize=["row"])
def _scatter_kernel(words_ptr, values_ptr, row, row_words, row_values, values_start,
                    out_ptr, numel, capacity, errors_ptr,
                    MAGIC: tl.constexpr, VERSION_CODES: tl.constexpr,
                    NUMEL_LO: tl.constexpr, NUMEL_HI: tl.constexpr,
                    MODE: tl.constexpr, OUT_CODE: tl.constexpr, BLOCK: tl.constexpr):
    header = words_ptr + row.to(tl.int64) * row_words
    header_ok = ((tl.load(header) == MAGIC) & (tl.load(header + 1) == VERSION_CODES)
                 & (tl.load(header + 2) == NUMEL_LO) & (tl.load(header + 3) == NUMEL_HI)
                 & (tl.load(header + 4) == capacity))
    claimed = tl.load(header + 5)
    count_ok = (claimed >= 0) & (claimed <= capacity)
    count = tl.where(header_ok, tl.minimum(tl.maximum(claimed, 0), capacity), 0)
    pid = tl.program_id(0)
    if pid == 0:
        header_errors = tl.where(header_ok, tl.where(count_ok, 0, 1), 1)
        tl.atomic_add(errors_ptr, header_errors, mask=header_errors > 0)

    i = pid * BLOCK + tl.arange(0, BLOCK)
    used = i < count
    indices = header + 8  # the header is 8 words
    idx = tl.load(indices + i, mask=used, other=-1)
    previous = tl.load(indices + i - 1, mask=used & (i > 0), other=-1)
    valid = used & (idx >= 0) & (idx < numel) & (idx > previous)
    bad = tl.sum((used & ~valid).to(tl.int32), 0)
    tl.atomic_add(errors_ptr, bad, mask=bad > 0)

    value = to_f32(tl.load(values_ptr + row.to(tl.int64) * row_values + values_start + i,
                           mask=valid, other=0.0))
    target = out_ptr + idx
    if MODE == 1:
        value = to_f32(tl.load(target, mask=valid, other=0.0)) + value
    tl.store(target, f32_to(value, OUT_CODE), mask=valid)


@triton.jit(do_not_specialize=["ranks"])
def _finish_kernel(total_ptr, out_ptr, n, ranks,
                   AVERAGE: tl.constexpr, ACCUMULATE: tl.constexpr, OUT_CODE: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    total = tl.load(total_ptr + offs, mask=inside, other=0.0)
    if AVERAGE:
        total = tl.math.div_rn(total, ranks.to(tl.float32))
    if ACCUMULATE:
        total = to_f32(tl.load(out_ptr + offs, mask=inside, other=0.0)) + total
    tl.store(out_ptr + offs, f32_to(total, OUT_CODE), mask=inside)


def _launch_row(words, values, row, numel, capacity, value_dtype, out, mode, errors):
    values_offset, nbytes = wire.layout(capacity, value_dtype)
    itemsize = values.element_size()
    vc = wire.version_codes_word(value_dtype)
    _, _, numel_lo, numel_hi = wire.header_words(numel, capacity, value_dtype)[:4]
    grid = (max(1, triton.cdiv(capacity, BLOCK)),)
    _scatter_kernel[grid](
        words, values, row, nbytes // 4, nbytes // itemsize, values_offset // itemsize,
        out, numel, capacity, errors,
        MAGIC=wire.MAGIC_WORD, VERSION_CODES=vc, NUMEL_LO=numel_lo, NUMEL_HI=numel_hi,
        MODE=mode, OUT_CODE=WIRE_CODE[out.dtype], BLOCK=BLOCK, num_warps=4)


def _typed_views(buffers: torch.Tensor, value_dtype: torch.dtype):
    return buffers.view(torch.int32), buffers.view(value_dtype)


def scatter(out: torch.Tensor, buffer: torch.Tensor, numel: int, capacity: int,
            value_dtype: torch.dtype, accumulate: bool, errors: torch.Tensor) -> None:
    words, values = _typed_views(buffer[None], value_dtype)
    if not accumulate:
        out.zero_()
    _launch_row(words, values, 0, numel, capacity, value_dtype, out,
                _ADD if accumulate else _STORE, errors)


def merge(out: torch.Tensor, buffers: torch.Tensor, capacity: int, value_dtype: torch.dtype,
          accumulate: bool, average: bool, errors: torch.Tensor) -> None:
    n = out.numel()
    direct = out.dtype == torch.float32 and not accumulate and not average
    total = out if direct else torch.empty(n, dtype=torch.float32, device=out.device)
    total.zero_()
    words, values = _typed_views(buffers, value_dtype)
    for row in range(buffers.shape[0]):
        _launch_row(words, values, row, n, capacity, value_dtype, total, _ADD, errors)
    if not direct and n:
        _finish_kernel[(triton.cdiv(n, 4096),)](
            total, out, n, buffers.shape[0], AVERAGE=average, ACCUMULATE=accumulate,
            OUT_CODE=WIRE_CODE[out.dtype], BLOCK=4096, num_warps=8)
