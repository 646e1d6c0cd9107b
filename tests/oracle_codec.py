"""An independent oracle for wire format version 2 (docs/design.md#wire-format-version-2).

Pure numpy and Python integers, nothing from ``dct_kernels``: float8_e4m3fn rounding is done
with exact float64 arithmetic (no torch float8 cast), the delta code and its escapes with a
plain loop, and buffers are laid out from the byte table of the design document.
"""

import math
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from oracle import f32, per_element, wire_cast

FLOAT8 = torch.float8_e4m3fn
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, FLOAT8: 3}
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, FLOAT8: 1}
STEP = 65535
MAX_MULTIPLIER = 32768
MIN_EXPONENT = -140
HEADER = struct.Struct("<4sHBBqiiii")


def round16(n: int) -> int:
    return (n + 15) // 16 * 16


def layout(capacity: int, value_dtype, delta: bool, scales: int):
    """(bounds, scales, indices, values, nbytes) byte offsets of a version-2 buffer."""
    bounds_at = 32
    scales_at = bounds_at + (4 * (scales + 1) if scales else 0)
    indices_at = round16(scales_at + 4 * scales)
    values_at = round16(indices_at + (2 if delta else 4) * capacity)
    return bounds_at, scales_at, indices_at, values_at, \
        round16(values_at + ITEMSIZE[value_dtype] * capacity)


def fp8_bits(t: float) -> int:
    """float8_e4m3fn bits of t rounded to nearest even (|t| <= 448, finite), by exact float64
    arithmetic: 3 mantissa bits, exponent bias 7, subnormal step 2^-9."""
    sign = 0x80 if math.copysign(1.0, t) < 0 else 0
    a = abs(t)
    if a == 0:
        return sign
    exponent = math.frexp(a)[1] - 1
    quantum = 2.0 ** (max(exponent, -6) - 3)
    r = a / quantum
    n = math.floor(r)
    frac = r - n
    if frac > 0.5 or (frac == 0.5 and n % 2 == 1):
        n += 1
    value = n * quantum
    if value == 0:
        return sign
    e = math.frexp(value)[1] - 1
    if e < -6:
        return sign | int(value / 2.0 ** -9)
    assert e <= 8 and value <= 448, t
    mantissa = int(value / 2.0 ** e * 8) - 8
    return sign | ((e + 7) << 3) | mantissa


def fp8_value(bits: int) -> float:
    sign = -1.0 if bits & 0x80 else 1.0
    e, m = (bits >> 3) & 0xF, bits & 7
    if e == 0xF and m == 7:
        return math.nan
    if e == 0:
        return sign * m * 2.0 ** -9
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def scale_exponent(amax: float) -> int:
    if amax == 0:
        return 0
    e = MIN_EXPONENT
    while 448.0 * 2.0 ** e < amax:
        e += 1
    return e


CANONICAL_NAN = {torch.float32: 0x7FC00000, torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}


def field_bits(value: float, dtype) -> int:
    """Unsigned bits of a value on a wire of dtype (fp16/bf16/fp32: wire_cast's rounding; every
    NaN as the dtype's canonical quiet NaN)."""
    if math.isnan(value):
        return CANONICAL_NAN[dtype]
    t = wire_cast(np.array([value], dtype=np.float32), dtype)
    return int(t.view({4: torch.int32, 2: torch.int16}[ITEMSIZE[dtype]]).item()) & \
        ((1 << (8 * ITEMSIZE[dtype])) - 1)


@dataclass
class Expected:
    buffer: torch.Tensor            # the whole version-2 wire buffer (uint8, CPU)
    residual: Optional[np.ndarray]  # float32 afterwards
    positions: List[int]            # sent entries
    values: List[float]             # their decoded values (float64)
    count: int                      # slots
    overflow: int


def compress(x: torch.Tensor, thresholds, offsets: Optional[Sequence[int]] = None,
             residual: Optional[torch.Tensor] = None, capacity: int = 0,
             value_dtype=FLOAT8, delta: bool = True) -> Expected:
    """The contract: candidates are the first ``capacity`` entries that pass (as version 1);
    fp8 scales from their finite magnitudes per segment; fp8 values that round to +-0 are not
    sent; then entries and their escapes fill the slots in index order until one does not fit."""
    acc = f32(x)
    if residual is not None:
        acc = (acc + f32(residual)).astype(np.float32)
    numel = acc.size
    offsets = [0, numel] if offsets is None else list(offsets)
    t = per_element(thresholds, offsets)
    with np.errstate(invalid="ignore"):
        passing = np.isnan(acc) | (~np.isnan(t) & (np.abs(acc) >= t))
    kept = np.flatnonzero(passing)
    candidates = kept[:capacity]
    overflow = kept.size - candidates.size
    fp8 = value_dtype == FLOAT8
    segment_of = np.searchsorted(np.asarray(offsets), np.arange(numel), side="right") - 1
    scales = []
    if fp8:
        for s in range(len(offsets) - 1):
            mags = [abs(float(acc[i])) for i in candidates
                    if segment_of[i] == s and math.isfinite(acc[i])]
            scales.append(scale_exponent(max(mags, default=0.0)))
    limit = 256 if ITEMSIZE[value_dtype] == 1 else MAX_MULTIPLIER
    slots = []        # (code or index, value bits)
    positions, values = [], []
    after = acc.copy() if residual is not None else None
    previous, full = -1, False
    for i in candidates.tolist():
        a = float(acc[i])
        if fp8:
            scale = 2.0 ** scales[segment_of[i]]
            bits = fp8_bits(a / scale) if math.isfinite(a) else 0x7F
            if bits & 0x7F == 0:
                continue        # rounds to zero: not sent, stays in the residual
            if math.isfinite(a) and abs(fp8_value(bits) * scale) >= 2.0 ** 128:
                bits -= 1       # would decode past fp32's range: one fp8 step toward zero
            sent = fp8_value(bits) * scale
        else:
            bits = field_bits(a, value_dtype)
            sent = float(wire_cast(np.array([a], np.float32), value_dtype).float().item())
        if full:
            overflow += 1
            continue
        entry = []
        if delta:
            gap = i - previous
            q = (gap - 1) // STEP
            escapes = -(-q // limit)
            for r in range(escapes):
                multiplier = limit if r < escapes - 1 else q - (escapes - 1) * limit
                entry.append((0, multiplier - 1))
            entry.append((gap - STEP * q, bits))
        else:
            entry.append((i, bits))
        if len(slots) + len(entry) > capacity:
            full = True
            overflow += 1
            continue
        slots += entry
        previous = i
        positions.append(i)
        values.append(sent)
        if after is not None:
            after[i] = np.float32(a - sent) if math.isfinite(a) else 0.0
    nscales = len(offsets) - 1 if fp8 else 0
    bounds_at, scales_at, indices_at, values_at, nbytes = layout(capacity, value_dtype, delta,
                                                                 nscales)
    raw = bytearray(nbytes)
    raw[:32] = HEADER.pack(b"DCTK", 2, CODES[value_dtype], 1 if delta else 0, numel, capacity,
                           len(slots), overflow, nscales)
    if fp8:
        raw[bounds_at:bounds_at + 4 * (nscales + 1)] = struct.pack(f"<{nscales + 1}i", *offsets)
        raw[scales_at:scales_at + 4 * nscales] = struct.pack(
            f"<{nscales}f", *[2.0 ** e for e in scales])
    width = ITEMSIZE[value_dtype]
    for j, (code, bits) in enumerate(slots):
        if delta:
            raw[indices_at + 2 * j:indices_at + 2 * j + 2] = struct.pack("<H", code)
        else:
            raw[indices_at + 4 * j:indices_at + 4 * j + 4] = struct.pack("<i", code)
        raw[values_at + width * j:values_at + width * (j + 1)] = bits.to_bytes(width, "little")
    buffer = torch.frombuffer(raw, dtype=torch.uint8).clone()
    return Expected(buffer, after, positions, values, len(slots), overflow)


def decode(buffer: torch.Tensor):
    """(positions, float64 values) of a valid version-2 buffer, by a plain loop."""
    raw = buffer.detach().cpu().numpy().tobytes()
    _, version, vcode, icode, numel, capacity, count, _, nscales = HEADER.unpack(raw[:32])
    assert version == 2
    dtype = {v: k for k, v in CODES.items()}[vcode]
    delta = icode == 1
    bounds_at, scales_at, indices_at, values_at, _ = layout(capacity, dtype, delta, nscales)
    bounds = struct.unpack(f"<{nscales + 1}i", raw[bounds_at:bounds_at + 4 * (nscales + 1)]) \
        if nscales else ()
    scales = struct.unpack(f"<{nscales}f", raw[scales_at:scales_at + 4 * nscales])
    width = ITEMSIZE[dtype]
    positions, values = [], []
    p = -1
    for j in range(count):
        bits = int.from_bytes(raw[values_at + width * j:values_at + width * (j + 1)], "little")
        if delta:
            code = struct.unpack("<H", raw[indices_at + 2 * j:indices_at + 2 * j + 2])[0]
            if code == 0:
                p += STEP * (bits + 1)
                continue
            p += code
        else:
            p = struct.unpack("<i", raw[indices_at + 4 * j:indices_at + 4 * j + 4])[0]
        if dtype == FLOAT8:
            s = int(np.searchsorted(np.asarray(bounds), p, side="right")) - 1
            v = fp8_value(bits) * scales[s]
        else:
            v = float(torch.tensor([bits], dtype=torch.int64).to(
                {4: torch.int32, 2: torch.int16}[width]).view(dtype).float().item()) \
                if width == 2 else struct.unpack("<f", bits.to_bytes(4, "little"))[0]
        positions.append(p)
        values.append(v)
    return positions, values
