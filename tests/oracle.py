"""Independent oracles for the contract of docs/design.md, and shared case generators.

Nothing here imports ``dct_kernels``: every expected value is computed from the contract with
numpy (and ``torch.topk`` for selection), so that the torch reference backend is itself checked
against something it does not share code with. The wire format is encoded and decoded here with
``struct`` and numpy from the byte table in docs/design.md, again without the package's helpers.

All oracles take and return CPU tensors / numpy arrays; tests move results back from the device.
"""

import struct
import zlib
from collections import namedtuple
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FP16_MAX = 65504.0
BF16_MAX = 3.3895313892515355e38
_SATURATION = {torch.float16: FP16_MAX, torch.bfloat16: BF16_MAX}
_VALUE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# The 32-byte header of docs/design.md#wire-format, field by field in byte order: (name, struct
# code). The header's struct and the fields of a decoded buffer are both read off this table.
_HEADER_FIELDS = (("magic", "4s"), ("version", "H"), ("value_code", "B"), ("index_code", "B"),
                  ("numel", "q"), ("capacity", "i"), ("count", "i"), ("overflow", "i"),
                  ("reserved", "i"))
_HEADER = struct.Struct("<" + "".join(code for _, code in _HEADER_FIELDS))


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


def seed_of(*params) -> int:
    """A seed derived from a test's parameters, so every case draws its own data."""
    return zlib.crc32(repr(params).encode())


# ------------------------------------------------------------------------------ case generators

KINDS = ("normal", "ties", "specials", "equal", "narrow", "wide")


# Subnormal magnitudes of each dtype (a typical one and the smallest).
_DENORMALS = {torch.float32: (1e-40, 1.4e-45), torch.float16: (1e-6, 6e-8),
              torch.bfloat16: (1e-39, 9.2e-41)}


def denormal(dtype: torch.dtype) -> float:
    """A typical subnormal of ``dtype``, as drawn by the sweeps."""
    return _DENORMALS[dtype][0]


def bf16_subnormals() -> torch.Tensor:
    """Every bf16 subnormal (bit patterns 0x0001..0x007F, both signs) and the smallest normal."""
    bits = torch.arange(1, 0x81, dtype=torch.int32)
    bits = torch.cat([bits, bits | 0x8000]).to(torch.int16)
    return bits.view(torch.bfloat16)


# log10 of the range of "wide" data: subnormals up to near the largest finite value.
_WIDE_RANGE = {torch.float32: (-44.0, 38.5), torch.float16: (-7.5, 4.8),
               torch.bfloat16: (-40.0, 38.5)}


def make_tensor(kind: str, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """n values of ``dtype`` (CPU) of one of KINDS, never all zero:

    normal    Gaussian at a random scale;
    ties      magnitudes from 3 levels (one may be 0) with random signs: heavy ties and -0/+0;
    specials  Gaussian with NaN, +-inf, +-0 and subnormals mixed in;
    equal     one value repeated (sometimes negative, sometimes a subnormal);
    narrow    1 + a few ulps: all magnitudes share their high bits;
    wide      random signs, magnitudes log-uniform from subnormal to near the largest finite.
    """
    rng = np.random.default_rng(seed)
    if kind == "normal":
        v = rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 2)
    elif kind == "ties":
        levels = np.array([rng.choice([0.0, 0.5]), 1.0 + rng.integers(0, 4), 7.25])
        v = rng.choice(levels, n) * rng.choice([-1.0, 1.0], n)
        v[rng.integers(0, n)] = levels[2]  # at least one non-zero
    elif kind == "specials":
        v = rng.standard_normal(n)
        denormal, smallest = _DENORMALS[dtype]
        specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, denormal, -denormal, smallest])
        where = rng.random(n) < (0.5 if n <= 4 else 0.15)
        v[where] = rng.choice(specials, int(where.sum()))
    elif kind == "equal":
        choice = seed % 3
        value = [1.0 + rng.random(), -(1.0 + rng.random()), _DENORMALS[dtype][0]][choice]
        v = np.full(n, value)
    elif kind == "narrow":
        eps = float(torch.finfo(dtype).eps)
        v = (1.0 + rng.integers(0, 6, n) * eps) * rng.choice([-1.0, 1.0], n)
    elif kind == "wide":
        lo, hi = _WIDE_RANGE[dtype]
        v = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(lo, hi, n)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if n and not np.any(v != 0):  # a short "specials" draw can be all +-0: keep it live
        v[rng.integers(0, n)] = 1.5
    return torch.from_numpy(v).to(dtype)


def make_segments(n: int, seed: int) -> List[int]:
    """Offsets 0 = o_0 < o_1 < ... < o_S = n with varied lengths, some of length 1."""
    rng = np.random.default_rng(seed)
    offsets = [0]
    while offsets[-1] < n:
        length = int(rng.choice([1, 1, 2, rng.integers(3, 40), rng.integers(40, 5000)]))
        offsets.append(min(n, offsets[-1] + length))
    return offsets


GUARD = 64


def guarded(n: int, dtype: torch.dtype, device, seed: int):
    """(big, out): ``out`` is the contiguous middle n elements of ``big``, whose GUARD
    elements on each side hold random non-zero values; a write outside ``out`` changes them."""
    rng = np.random.default_rng(seed)
    fill = rng.uniform(1.0, 2.0, n + 2 * GUARD) * rng.choice([-1.0, 1.0], n + 2 * GUARD)
    big = torch.from_numpy(fill).to(dtype).to(device)
    return big, big[GUARD:GUARD + n]


def unguard(big: torch.Tensor):
    """(both guard regions, the middle) of a ``guarded`` tensor, on the CPU."""
    big = big.detach().cpu()
    return torch.cat([big[:GUARD], big[-GUARD:]]), big[GUARD:-GUARD]


# ------------------------------------------------------------------------------ conversions

def f32(t: torch.Tensor) -> np.ndarray:
    """A float tensor as a flat float32 numpy array (exact for fp16/bf16)."""
    return t.detach().cpu().reshape(-1).to(torch.float32).numpy().copy()


def round_to_bf16(v: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), returned as float32; NaN stays NaN."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    bits = v.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = (rounded & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(v), v, out)


def cast(v: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 values rounded once (to nearest even, overflow to inf) to ``dtype``."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    if dtype == torch.float32:
        return torch.from_numpy(v.copy())
    if dtype == torch.float16:
        with np.errstate(over="ignore"):
            return torch.from_numpy(v.astype(np.float16))
    return torch.from_numpy(round_to_bf16(v)).to(torch.bfloat16)  # exact: already bf16 values


def wire_cast(v: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Values as sent on a ``dtype`` wire: finite values saturate at the largest finite value
    of fp16/bf16 instead of becoming inf; inf and NaN pass unchanged."""
    v = np.asarray(v, dtype=np.float32)
    if dtype in _SATURATION:
        limit = np.float32(_SATURATION[dtype])
        v = np.where(np.isfinite(v), np.clip(v, -limit, limit), v).astype(np.float32)
    return cast(v, dtype)


# ------------------------------------------------------------------------------ select

def kth_largest_magnitude(x: torch.Tensor, k: int) -> torch.Tensor:
    """0-d tensor in x.dtype: the k-th largest |x| (NaN largest, then +inf; -0 == +0), from
    a numpy sort (which puts NaN last in ascending order)."""
    mags = np.sort(np.abs(f32(x).astype(np.float64)))
    return torch.tensor(mags[mags.size - k], dtype=torch.float64).to(x.dtype)


def topk_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The same value as the contract states it: ``torch.topk(x.abs().flatten(), k)``."""
    return torch.topk(x.detach().cpu().abs().flatten(), k).values[-1]


def segmented_kth(x: torch.Tensor, offsets: Sequence[int], ks: Sequence[int]) -> torch.Tensor:
    flat = x.detach().cpu().reshape(-1)
    return torch.stack([kth_largest_magnitude(flat[a:b], k)
                        for a, b, k in zip(offsets[:-1], offsets[1:], ks)])


# ------------------------------------------------------------------------------ compress

@dataclass
class Compressed:
    """What compress must produce: the sent entries, counts and the residual afterwards."""
    acc: np.ndarray               # float32, x + residual
    indices: np.ndarray           # int64, the sent entries, ascending
    values: torch.Tensor          # wire dtype, their values
    count: int
    overflow: int
    residual: Optional[np.ndarray]  # float32 residual after the call (None without one)


def per_element(thresholds, offsets: Sequence[int]) -> np.ndarray:
    """fp32 threshold of every element: a float, a 0-d tensor or one per segment."""
    if isinstance(thresholds, torch.Tensor):
        t = f32(thresholds)
    else:
        t = np.array([thresholds], dtype=np.float32)
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    if t.size == 1:
        t = np.repeat(t, len(lengths))
    return np.repeat(t, lengths)


def compress(x: torch.Tensor, thresholds, offsets: Optional[Sequence[int]] = None,
             residual: Optional[torch.Tensor] = None, capacity: Optional[int] = None,
             value_dtype: Optional[torch.dtype] = None) -> Compressed:
    """The contract's compress: keep isnan(acc) | (t not NaN and |acc| >= t), in index order;
    the first ``capacity`` are sent; residual = acc - sent (0 for a sent inf/NaN), acc elsewhere."""
    acc = f32(x)
    if residual is not None:
        acc = acc + f32(residual)
    offsets = [0, acc.size] if offsets is None else list(offsets)
    t = per_element(thresholds, offsets)
    with np.errstate(invalid="ignore"):
        keep = np.isnan(acc) | (~np.isnan(t) & (np.abs(acc) >= t))
    kept = np.flatnonzero(keep)
    capacity = kept.size if capacity is None else capacity
    sent = kept[:capacity]
    values = wire_cast(acc[sent], value_dtype or x.dtype)
    after = None
    if residual is not None:
        after = acc.copy()
        with np.errstate(invalid="ignore", over="ignore"):
            after[sent] = np.where(np.isfinite(acc[sent]), acc[sent] - f32(values), 0.0)
    return Compressed(acc, sent, values, int(sent.size), int(kept.size - sent.size), after)


# ------------------------------------------------------------------------------ wire format

def layout(capacity: int, value_dtype: torch.dtype):
    """(values byte offset, total bytes) from the table of docs/design.md#wire-format."""
    values_at = (32 + 4 * capacity + 15) // 16 * 16
    return values_at, (values_at + _ITEMSIZE[value_dtype] * capacity + 15) // 16 * 16


def header(numel: int, capacity: int, value_dtype: torch.dtype, count: int,
           overflow: int) -> bytes:
    return _HEADER.pack(b"DCTK", 1, _VALUE_CODE[value_dtype], 0, numel, capacity, count,
                        overflow, 0)


def encode(numel: int, capacity: int, value_dtype: torch.dtype, indices, values: torch.Tensor,
           count: Optional[int] = None, overflow: int = 0) -> torch.Tensor:
    """A wire buffer (CPU uint8) holding ``indices``/``values`` in its first slots; the rest are
    zero. ``count`` defaults to len(indices) and may be set to anything (to corrupt it)."""
    indices = np.asarray(indices, dtype=np.int32)
    count = indices.size if count is None else count
    values_at, nbytes = layout(capacity, value_dtype)
    raw = bytearray(nbytes)
    raw[:32] = header(numel, capacity, value_dtype, count, overflow)
    raw[32:32 + 4 * indices.size] = indices.astype("<i4").tobytes()
    if values.numel():
        vbytes = values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        raw[values_at:values_at + len(vbytes)] = vbytes
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


# A parsed wire buffer: the header's fields, then ``indices`` (int64 [capacity]) and ``values``
# (float32 [capacity]).
Decoded = namedtuple("Decoded", [name for name, _ in _HEADER_FIELDS] + ["indices", "values"])


def decode(buffer: torch.Tensor) -> Decoded:
    """Parse a wire buffer (any device) with struct/numpy."""
    raw = buffer.detach().cpu().numpy().tobytes()
    fields = _HEADER.unpack(raw[:32])
    capacity, code = fields[5], fields[2]
    dtype = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}[code]
    values_at, _ = layout(capacity, dtype)
    indices = np.frombuffer(raw, dtype="<i4", count=capacity, offset=32).astype(np.int64)
    if dtype == torch.float32:
        values = np.frombuffer(raw, dtype="<f4", count=capacity, offset=values_at)
    elif dtype == torch.float16:
        values = np.frombuffer(raw, dtype="<f2", count=capacity, offset=values_at)
    else:  # bf16: the high half of a float32
        half = np.frombuffer(raw, dtype="<u2", count=capacity, offset=values_at)
        values = (half.astype(np.uint32) << 16).view(np.float32)
    return Decoded(*fields, indices, values.astype(np.float32))


CORRUPTIONS = ("index_high", "index_huge", "index_negative", "unsorted", "duplicate",
               "count_high", "count_negative", "magic", "version", "value_code", "numel",
               "capacity")


def _set_int(buffer: torch.Tensor, byte_offset: int, value: int, width: int = 4) -> None:
    raw = np.array([value], dtype={4: "<i4", 8: "<i8"}[width]).view(np.uint8)
    buffer[byte_offset:byte_offset + width] = torch.from_numpy(raw.copy())


def corrupt(buffer: torch.Tensor, how: str, count: int, capacity: int,
            numel: int) -> torch.Tensor:
    """A copy of a valid wire buffer (CPU, ``count`` >= 3 entries) with one of CORRUPTIONS.
    Index corruptions hit the entry at position 1024 when there is one (the first of the
    Triton scatter's second block, whose predecessor lives in the first block), else the
    middle one; "index_high"/"index_huge" hit the last entry, so only that entry is bad."""
    bad = buffer.clone()
    at = 1024 if count > 1025 else count // 2
    index_at = 32 + 4 * at
    indices = decode(bad).indices
    if how == "index_high":           # just past the end
        _set_int(bad, 32 + 4 * (count - 1), numel + 3)
    elif how == "index_huge":
        _set_int(bad, 32 + 4 * (count - 1), 2**31 - 1)
    elif how == "index_negative":
        _set_int(bad, index_at, -1 - at)
    elif how == "unsorted":           # swap two neighbours
        _set_int(bad, index_at, int(indices[at - 1]))
        _set_int(bad, index_at - 4, int(indices[at]))
    elif how == "duplicate":
        _set_int(bad, index_at, int(indices[at - 1]))
    elif how == "count_high":
        _set_int(bad, 20, capacity + 1)
    elif how == "count_negative":
        _set_int(bad, 20, -3)
    elif how == "magic":
        bad[0] = ord("X")
    elif how == "version":
        bad[4] = 2
    elif how == "value_code":         # another valid dtype code
        bad[6] = (int(bad[6]) + 1) % 3
    elif how == "numel":
        _set_int(bad, 8, numel + 1, width=8)
    elif how == "capacity":
        _set_int(bad, 16, capacity - 1)
    else:
        raise ValueError(f"unknown corruption {how!r}")
    return bad


def usable_entries(buffer: torch.Tensor, numel: int, capacity: int,
                   value_dtype: torch.dtype):
    """(indices, fp32 values, errors) of the entries a decoder may use, by the rules for
    untrusted payloads: a header that does not match voids the row (1 error); a count outside
    [0, capacity] is an error and is clamped; entry i < count is skipped (1 error each) when
    its index is outside [0, numel) or not above every in-range index before it."""
    magic, version, code, index_code, head_numel, head_capacity, *_ = _HEADER.unpack(
        buffer.detach().cpu().numpy()[:32].tobytes())
    if (magic != b"DCTK" or version != 1 or code != _VALUE_CODE[value_dtype]
            or index_code != 0 or head_numel != numel or head_capacity != capacity):
        return np.zeros(0, np.int64), np.zeros(0, np.float32), 1
    d = decode(buffer)
    errors = 0 if 0 <= d.count <= capacity else 1
    count = min(max(d.count, 0), capacity)
    idx = d.indices[:count]
    ok = np.zeros(count, dtype=bool)
    highest = -1
    for i, index in enumerate(idx.tolist()):
        if 0 <= index < numel and index > highest:
            ok[i] = True
        if 0 <= index < numel:
            highest = max(highest, index)
    return idx[ok], d.values[:count][ok], errors + int((~ok).sum())


def decompress(indices: np.ndarray, values: np.ndarray, out: torch.Tensor,
               accumulate: bool) -> torch.Tensor:
    """Expected ``out`` afterwards: zeros except the entries (overwrite), or out[i] + value
    rounded once at the entries only (accumulate)."""
    if accumulate:
        expected = out.detach().cpu().reshape(-1).clone()
        expected[torch.from_numpy(indices)] = cast(f32(out)[indices] + values, out.dtype)
    else:
        dense = np.zeros(out.numel(), np.float32)
        dense[indices] = values
        expected = cast(dense, out.dtype)
    return expected.reshape(out.shape)


def merge(rows: Sequence[tuple], out: torch.Tensor, accumulate: bool,
          average: bool) -> torch.Tensor:
    """decompress_many: 0 + d_0 + d_1 + ... in fp32 (rank order), / W (IEEE) with ``average``,
    out + sum with ``accumulate``, then one rounding to out's dtype. ``rows`` holds
    (indices, fp32 values) per rank."""
    n = out.numel()
    total = np.zeros(n, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for indices, values in rows:
            dense = np.zeros(n, np.float32)
            dense[indices] = values
            total = total + dense
        if average:
            total = total / np.float32(len(rows))
        if accumulate:
            total = f32(out) + total
    return cast(total, out.dtype).reshape(out.shape)


# ------------------------------------------------------------------------------ rows

def compress_rows(x: torch.Tensor, k: int, value_dtype: Optional[torch.dtype] = None):
    """(int64 column indices [B, k], values [B, k]): the k largest magnitudes of each row
    (NaN largest, ties to the lower column), columns ascending."""
    a = f32(x).reshape(x.shape)
    mags = np.abs(a.astype(np.float64))
    nan = np.isnan(mags)
    columns = np.arange(x.shape[1])
    picked = []
    for row in range(x.shape[0]):
        # lexsort: last key is primary. NaN first, then larger magnitude, then lower column.
        order = np.lexsort((columns, -np.where(nan[row], 0.0, mags[row]), ~nan[row]))
        picked.append(np.sort(order[:k]))
    indices = np.array(picked, dtype=np.int64).reshape(x.shape[0], k)
    values = np.take_along_axis(a, indices, axis=1)
    return indices, wire_cast(values.reshape(-1), value_dtype or x.dtype).reshape(indices.shape)


def decompress_rows(indices: np.ndarray, values: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Dense [B, D] of ``dtype``: zeros except in-range entries (others are skipped)."""
    dense = np.zeros(shape, np.float32)
    v = f32(values).reshape(indices.shape)
    for row in range(shape[0]):
        ok = (indices[row] >= 0) & (indices[row] < shape[1])
        dense[row, indices[row][ok]] = v[row][ok]
    return cast(dense.reshape(-1), dtype).reshape(shape)
