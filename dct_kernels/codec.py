"""Wire format version 2: delta-coded indices and fp8 values with a scale per segment.

Encoding runs after a backend's compress kernel has written a version-1 payload of candidates
(the first ``capacity`` entries that pass, in index order; fp32 values for fp8, so that they are
exactly acc, else the wire dtype's) and turns it into the version-2 payload: fp8 quantization
with a power-of-two scale per segment, the delta code with its escapes, the cut at the capacity
in slots, and the error-feedback fix-up of the residual for what was rounded or cut. Decoding
turns received version-2 rows into version-1 rows with fp32 values for the backends'
decompress kernels. Both are torch operations over [capacity]-sized tensors on the payload's
device, the same code for every backend that has no codec of its own (the cpu core has one,
``csrc/cpu/codec.cpp``, bitwise this one: see ``backends/__init__.py``), so every backend
writes and reads the same bytes; neither synchronizes with the host (except
``validate=True``). docs/design.md, "Wire format version 2", is the contract; in short:

* delta code, slot j: a code c_j != 0 is an entry at position p + c_j (p: the position reached
  so far, -1 at the start); c_j == 0 is an escape that moves p by 65535 x (v_j + 1), v_j the
  slot's value field read as an unsigned integer, 1 <= v_j + 1 <= 32768. A gap g >= 1 is sent as
  ceil(q / M) escapes (q = (g - 1) div 65535; M = 256 for 8-bit values, else 32768; all but the
  last carry M) and the entry's code g - 65535 q in [1, 65535].
* fp8 (float8_e4m3fn): segment s has scale 2^e_s, the smallest power of two with
  amax_s <= 448 x 2^e_s (amax_s: the largest finite |acc| among the segment's candidates; e_s = 0
  without one), but at least 2^-140, so that the smallest fp8 step times the scale is fp32's
  smallest subnormal. A value is sent as fp8(acc / 2^e_s), rounded to nearest even (one fp8
  step toward zero where that would decode beyond fp32's range: |acc| >= 248 x 2^120); inf and
  NaN as NaN (0x7F); one that rounds to +-0 is not sent and stays in the residual. The decoded
  value fp8 x 2^e_s is exact in fp32 and within a factor 2 of acc, so acc - decoded is exact:
  sent + residual == acc bit for bit for every finite acc.
"""

from typing import Optional, Tuple

import torch

from . import payload as wire
from .payload import SparsePayload
from .magnitude import canonical_nan, widen
from .wire_check import running_highest

ESCAPE_STEP = 65535       # positions an escape moves per unit of its multiplier
MAX_MULTIPLIER = 32768    # largest multiplier of one escape (gaps below 2^31 need one)
FP8_MAX = 448.0           # largest finite float8_e4m3fn
MIN_SCALE_EXPONENT = -140
MAX_SCALE_EXPONENT = 127
FP8_NAN = 0x7F


def escape_limit(value_dtype: torch.dtype) -> int:
    """M: the largest multiplier one escape carries in a value field of this dtype."""
    return min(1 << (8 * value_dtype.itemsize), MAX_MULTIPLIER)


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """e_s (int64) for fp32 amax_s >= 0: the smallest e with amax_s <= 448 x 2^e, at least
    MIN_SCALE_EXPONENT; 0 where amax_s is 0. Exact: log2 gives a first guess that the exact
    float64 comparisons then correct by one step either way."""
    a = amax.to(torch.float64)
    guess = torch.ceil(torch.log2(torch.where(a > 0, a, 1.0) / FP8_MAX))
    e = guess.clamp(MIN_SCALE_EXPONENT - 1, MAX_SCALE_EXPONENT + 1).to(torch.int64)
    limit = torch.full_like(a, FP8_MAX)
    e = torch.where(torch.ldexp(limit, e) < a, e + 1, e)
    e = torch.where(torch.ldexp(limit, e - 1) >= a, e - 1, e)
    e = e.clamp(min=MIN_SCALE_EXPONENT)
    return torch.where(a > 0, e, torch.zeros_like(e))


def powers_of_two(exponents: torch.Tensor) -> torch.Tensor:
    """fp32 2^e for int64 e in [MIN_SCALE_EXPONENT, MAX_SCALE_EXPONENT] (exact)."""
    return torch.ldexp(torch.ones_like(exponents, dtype=torch.float64), exponents).float()


def escapes_needed(candidates: SparsePayload, value_dtype: torch.dtype,
                   index_encoding: str, position_offset: int = 0) -> torch.Tensor:
    """0-d int64 on the device: the escape slots the candidates' gaps need if every one of them
    is sent (an upper bound when fp8 drops some: merging two gaps never needs more slots)."""
    if index_encoding != "delta" or candidates.capacity == 0:
        return torch.zeros((), dtype=torch.int64, device=candidates.buffer.device)
    index = candidates.indices.to(torch.int64) + position_offset
    valid = torch.arange(candidates.capacity, device=index.device) < candidates.count
    previous = running_highest(index[None], valid[None])[1][0]
    quotient = torch.where(valid, (index - previous - 1) // ESCAPE_STEP, torch.zeros_like(index))
    limit = escape_limit(value_dtype)
    return ((quotient + limit - 1) // limit).sum()


def _value_field_bits(values: torch.Tensor) -> torch.Tensor:
    """The value field of [..., capacity] slots as unsigned integers (int64)."""
    size = values.element_size()
    if size == 1:
        return values.view(torch.uint8).to(torch.int64)
    if size == 2:
        return values.view(torch.int16).to(torch.int64) & 0xFFFF
    return values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _bits_as(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 unsigned bit patterns as a tensor of ``dtype`` (same bits)."""
    size = dtype.itemsize
    if size == 1:
        return bits.to(torch.uint8).view(dtype)
    if size == 2:
        return torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(dtype)
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(dtype)


def _write_header_counts(buffer: torch.Tensor, count: torch.Tensor,
                         overflow: torch.Tensor) -> None:
    words = buffer[:wire.HEADER_BYTES].view(torch.int32)
    words[wire.WORD_COUNT].copy_(count.to(torch.int32))
    words[wire.WORD_OVERFLOW].copy_(overflow.to(torch.int32))


def encode(candidates: SparsePayload, out: SparsePayload, offsets: Optional[torch.Tensor],
           residual: Optional[torch.Tensor], position_offset: int = 0) -> None:
    """Write the version-2 payload ``out`` (zeroed, header written) from ``candidates``, the
    version-1 payload a compress kernel wrote (fp32 values when out's are fp8, else out's
    value dtype; its indices + ``position_offset`` are out's positions), and fix the residual
    (of the candidates' tensor) up for what was rounded or cut.

    ``offsets``: int64 [S + 1] scale-segment offsets over out's positions on the device
    (out.num_scales = S), needed for fp8. No host synchronization.
    """
    device = out.buffer.device
    capacity = candidates.capacity
    fp8 = out.value_dtype == wire.FLOAT8
    delta = out.index_encoding == "delta"
    local = candidates.indices.to(torch.int64)
    index = local + position_offset
    value = candidates.values
    slot = torch.arange(capacity, device=device)
    valid = slot < candidates.count

    if fp8:
        # Scales from the candidates; quantize; values that round to +-0 are not sent.
        segment = (torch.searchsorted(offsets, index, right=True) - 1).clamp(
            0, out.num_scales - 1)
        finite = torch.isfinite(value)
        magnitude = torch.where(valid & finite, value.abs(), torch.zeros_like(value))
        amax = torch.zeros(out.num_scales, dtype=torch.float32, device=device)
        amax.scatter_reduce_(0, segment, magnitude, "amax")
        scales = powers_of_two(scale_exponents(amax))
        scale = scales[segment]
        scaled = torch.where(finite, value / scale, torch.zeros_like(value))
        bits = scaled.to(wire.FLOAT8).view(torch.uint8).to(torch.int64)
        bits = torch.where(finite, bits, torch.full_like(bits, FP8_NAN))
        keep = valid & ((bits & 0x7F) != 0)
        decoded = bits.to(torch.uint8).view(wire.FLOAT8).to(torch.float32) * scale
        # Rounded up past fp32's range (|acc| >= 248 x 2^120 with the scale 2^120): one fp8
        # step toward zero, so that what is sent decodes finite.
        over = finite & torch.isinf(decoded)
        bits = torch.where(over, bits - 1, bits)
        decoded = torch.where(
            over, bits.to(torch.uint8).view(wire.FLOAT8).to(torch.float32) * scale, decoded)
        out.scale_offsets.copy_(offsets.to(torch.int32))
        out.scales.copy_(scales)
    else:
        bits = _value_field_bits(value)
        keep = valid

    # Slots: one per entry, plus its escapes with the delta code; what does not fit is cut
    # (the end positions rise, so the cut is a suffix in index order).
    if delta:
        previous = running_highest(index[None], keep[None])[1][0]
        gap = index - previous
        quotient = torch.where(keep, (gap - 1) // ESCAPE_STEP, torch.zeros_like(gap))
        limit = escape_limit(out.value_dtype)
        escapes = (quotient + limit - 1) // limit
        code = gap - ESCAPE_STEP * quotient
    else:
        escapes = torch.zeros_like(index)
    slots = torch.where(keep, 1 + escapes, torch.zeros_like(escapes))
    end = torch.cumsum(slots, 0)
    fits = keep & (end <= out.capacity)
    count = torch.where(fits, end, torch.zeros_like(end)).amax() if capacity else \
        torch.zeros((), dtype=torch.int64, device=device)
    overflow = candidates.overflow.to(torch.int64) + (keep & ~fits).sum()

    # Slot-centric scatter: slot s belongs to the first candidate whose end passes s.
    if out.capacity and capacity:
        s = torch.arange(out.capacity, device=device)
        owner = torch.searchsorted(end, s, right=True).clamp(max=capacity - 1)
        used = s < count
        is_entry = used & (s == end[owner] - 1)
        out_bits = torch.where(is_entry, bits[owner], torch.zeros_like(s))
        if delta:
            first = end[owner] - 1 - escapes[owner]
            rank = s - first
            multiplier = torch.where(rank < escapes[owner] - 1, torch.full_like(s, limit),
                                     quotient[owner] - (escapes[owner] - 1) * limit)
            out_bits = torch.where(used & ~is_entry, multiplier - 1, out_bits)
            codes = torch.where(is_entry, code[owner], torch.zeros_like(s))
            out.codes.view(torch.int16).copy_(_bits_as(codes, torch.int16))
        else:
            out.indices.copy_(torch.where(is_entry, index[owner], torch.zeros_like(s)))
        out.values.copy_(_bits_as(out_bits, out.value_dtype))
    _write_header_counts(out.buffer, count, overflow)

    if residual is not None and capacity:
        # Candidates hold acc (fp32 on the wire) or a value whose v1 residual completes it.
        current = residual.gather(0, local)
        if fp8:
            sent = torch.where(finite, value - decoded, torch.zeros_like(value))
            fixed = torch.where(fits, sent, value)
        else:
            fixed = torch.where(fits, current, current + widen(value))
        fixed = torch.where(valid, fixed, current)
        # Slots past the count point at the last candidate with its own value, so the scatter
        # writes each position with one value only (deterministic, no host sync).
        last = (candidates.count.to(torch.int64) - 1).clamp(min=0)
        target = torch.where(valid, local, local[last])
        residual.scatter_(0, target, torch.where(valid, fixed, fixed[last]))


def _row_fields(buffers: torch.Tensor, where: wire.WireLayout):
    capacity = where.capacity
    start = where.indices_offset
    raw = buffers[:, start:start + where.index_bytes * capacity].contiguous()
    if where.index_encoding == "delta":
        index_field = raw.view(torch.int16).to(torch.int64) & 0xFFFF
    else:
        index_field = raw.view(torch.int32).to(torch.int64)
    start = where.values_offset
    values = buffers[:, start:start + where.value_dtype.itemsize * capacity].contiguous()
    return index_field, values.view(where.value_dtype)


def decode(buffers: torch.Tensor, numel: int, where: wire.WireLayout):
    """Per slot of [W, nbytes] version-2 rows: (positions int64, fp32 values, entry_ok bool,
    row_ok bool [W], count_ok bool [W], errors int64 [W]) on the device, no host
    synchronization. ``count_ok`` is whether a row's count lies in [0, capacity]. ``errors``
    counts what ``validate=False`` skips: 1 for a row whose header, count or scales are bad
    (the count is then clamped, the header's row dropped), plus every entry it cannot use, plus
    1 for an invalid escape and 1 for a dangling one (an escape in the last used slot)."""
    capacity = where.capacity
    device = buffers.device
    words = buffers[:, :wire.HEADER_BYTES].contiguous().view(torch.int32)
    expected = torch.tensor(wire.header_words(numel, capacity, where.value_dtype,
                                              where.index_encoding, where.num_scales),
                            dtype=torch.int32).to(device, non_blocking=True)
    check = [wire.WORD_MAGIC, wire.WORD_VERSION_CODES, wire.WORD_NUMEL_LOW,
             wire.WORD_NUMEL_HIGH, wire.WORD_CAPACITY, wire.WORD_SCALES]
    header_ok = (words[:, check] == expected[check]).all(dim=1)
    count = words[:, wire.WORD_COUNT].to(torch.int64)
    count_ok = (count >= 0) & (count <= capacity)
    count = count.clamp(0, capacity)
    row_ok = header_ok.clone()
    if where.value_dtype == wire.FLOAT8:
        s = where.num_scales
        start = where.bounds_offset
        bounds = buffers[:, start:start + 4 * (s + 1)].contiguous().view(torch.int32)
        bounds = bounds.to(torch.int64)
        start = where.scales_offset
        scales = buffers[:, start:start + 4 * s].contiguous().view(torch.float32)
        mantissa, exponent = torch.frexp(scales)
        scales_ok = (torch.isfinite(scales) & (mantissa == 0.5)
                     & (exponent - 1 >= MIN_SCALE_EXPONENT)
                     & (exponent - 1 <= MAX_SCALE_EXPONENT)).all(dim=1)
        bounds_ok = (bounds[:, 0] == 0) & (bounds[:, -1] == numel) & \
            (bounds[:, 1:] >= bounds[:, :-1]).all(dim=1)
        row_ok &= scales_ok & bounds_ok
    errors = (~row_ok).to(torch.int64) + (row_ok & ~count_ok).to(torch.int64)
    count = torch.where(row_ok, count, torch.zeros_like(count))

    field, values = _row_fields(buffers, where)
    slot = torch.arange(capacity, device=device)
    used = slot[None, :] < count[:, None]
    bits = _value_field_bits(values)
    if where.index_encoding == "delta":
        is_entry = field != 0
        multiplier = bits + 1
        bad_escape = used & ~is_entry & (multiplier > MAX_MULTIPLIER)
        advance = torch.where(is_entry, field, ESCAPE_STEP * multiplier)
        advance = torch.where(used & ~bad_escape, advance, torch.zeros_like(advance))
        broken = torch.cummax(bad_escape.to(torch.int64), dim=1).values > 0
        positions = torch.cumsum(advance, dim=1) - 1
        entry_ok = used & is_entry & ~broken & (positions < numel)
        if capacity:
            last = (count - 1).clamp(min=0)
            dangling = (count > 0) & ~is_entry.gather(1, last[:, None])[:, 0]
        else:  # no slot, nothing dangles (the count is clamped to 0)
            dangling = torch.zeros_like(count, dtype=torch.bool)
        errors += bad_escape.any(dim=1).to(torch.int64) + dangling.to(torch.int64)
        errors += (used & is_entry & ~entry_ok).sum(dim=1)
    else:
        positions = field
        in_range = used & (positions >= 0) & (positions < numel)
        entry_ok = in_range & (positions > running_highest(positions, in_range)[1])
        errors += (used & ~entry_ok).sum(dim=1)

    if where.value_dtype == wire.FLOAT8:
        segment = torch.searchsorted(bounds.contiguous(),
                                     positions.clamp(0, max(numel - 1, 0)).contiguous(),
                                     right=True) - 1
        segment = segment.clamp(0, where.num_scales - 1)
        # fp8 NaN (0x7F/0xFF) widens to a NaN whose bits depend on torch's path.
        decoded = canonical_nan(values.to(torch.float32) * scales.gather(1, segment))
    else:
        decoded = widen(values)
    decoded = torch.where(entry_ok, decoded, torch.zeros_like(decoded))
    positions = torch.where(entry_ok, positions, torch.full_like(positions, -1))
    return positions, decoded, entry_ok, row_ok, count_ok, errors


def to_version1(buffers: torch.Tensor, numel: int, where: wire.WireLayout,
                positions: torch.Tensor, decoded: torch.Tensor,
                entry_ok: torch.Tensor) -> torch.Tensor:
    """[W, v1 nbytes] version-1 rows with fp32 values of the decoded entries (the usable ones,
    in slot order), for the backends' decompress kernels."""
    rows, capacity = positions.shape
    device = buffers.device
    v1 = wire.wire_layout(capacity, torch.float32)
    out = torch.zeros(rows, v1.nbytes, dtype=torch.uint8, device=device)
    header = torch.tensor(wire.header_words(numel, capacity, torch.float32),
                          dtype=torch.int32).to(device, non_blocking=True)
    words = out[:, :wire.HEADER_BYTES].view(torch.int32)
    words.copy_(header.expand(rows, -1))
    words[:, wire.WORD_COUNT] = entry_ok.sum(dim=1).to(torch.int32)
    if capacity:
        # Usable entries to the front, in order; the others to a spare column.
        dest = torch.where(entry_ok, torch.cumsum(entry_ok.to(torch.int64), dim=1) - 1,
                           torch.full_like(positions, capacity))
        index = torch.zeros(rows, capacity + 1, dtype=torch.int32, device=device)
        index.scatter_(1, dest, positions.to(torch.int32))
        value = torch.zeros(rows, capacity + 1, dtype=torch.float32, device=device)
        value.scatter_(1, dest, decoded)
        out[:, v1.indices_offset:v1.indices_offset + 4 * capacity].view(torch.int32).copy_(
            index[:, :capacity])
        out[:, v1.values_offset:v1.values_offset + 4 * capacity].view(torch.float32).copy_(
            value[:, :capacity])
    return out


def describe_rows(row_ok: torch.Tensor, count_ok: torch.Tensor, errors: torch.Tensor) -> str:
    """A short account of the bad rows (host; call only when validating)."""
    bad = [(w, ok, c, e) for w, (ok, c, e) in
           enumerate(zip(row_ok.tolist(), count_ok.tolist(), errors.tolist())) if e]

    def account(ok, count_fits, e):
        if not ok:
            return "bad header, scales or segment bounds" + (
                "" if count_fits else ", count outside [0, capacity]")
        entries = e - (not count_fits)
        parts = [] if count_fits else ["count outside [0, capacity]"]
        if entries:
            parts.append(f"{entries} bad entries or escapes (gap stream past numel, escape "
                         "out of range, dangling escape)")
        return "; ".join(parts)

    parts = [f"row {w}: " + account(ok, c, e) for w, ok, c, e in bad[:4]]
    return ", ".join(parts) + (" ..." if len(bad) > 4 else "")


def row_positions(rows: torch.Tensor, where: wire.WireLayout):
    """(positions int64 [W, capacity], sent bool [W, capacity]) of trusted rows of one
    configuration (this rank's own send rows; the numel in each header may differ), without
    the checks of ``decode``. No host synchronization."""
    count = rows[:, :wire.HEADER_BYTES].contiguous().view(torch.int32)[:, wire.WORD_COUNT]
    field, values = _row_fields(rows, where)
    slot = torch.arange(where.capacity, device=rows.device)
    used = slot[None, :] < count.to(torch.int64)[:, None]
    if where.index_encoding == "delta":
        is_entry = field != 0
        step = torch.where(is_entry, field, ESCAPE_STEP * (_value_field_bits(values) + 1))
        positions = torch.cumsum(torch.where(used, step, torch.zeros_like(step)), dim=1) - 1
        sent = used & is_entry
    else:
        positions, sent = field, used
    return torch.where(sent, positions, torch.full_like(positions, -1)), sent


def positions(payload: SparsePayload) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positions int64 [capacity], sent bool [capacity]) of a trusted payload of either
    version (-1 where a slot carries no entry): what a caller of compress needs to count its
    kept entries, without ``decode``'s checks or the values. No host synchronization."""
    if payload.version == 1:
        slot = torch.arange(payload.capacity, device=payload.buffer.device)
        sent = slot < payload.count
        return torch.where(sent, payload.indices.to(torch.int64), torch.full_like(slot, -1)), sent
    found, sent = row_positions(payload.buffer[None], payload.layout)
    return found[0], sent[0]


def entries(payload: SparsePayload) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions int64, fp32 values, sent bool) per slot of a trusted payload of either
    version; -1, 0 and False where a slot carries no entry. No host synchronization."""
    if payload.version == 1:
        found, sent = positions(payload)
        values = widen(payload.values)
        return found, torch.where(sent, values, torch.zeros_like(values)), sent
    found, decoded, ok, *_ = decode(payload.buffer[None], payload.numel, payload.layout)
    return found[0], decoded[0], ok[0]
