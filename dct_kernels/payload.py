"""Sparse payloads: the self-describing wire buffer of ``compress`` and the row payload of
``compress_rows``.

Wire format, version 1 (little-endian), all in one contiguous uint8 tensor:

====== =====================================================================
bytes  field
====== =====================================================================
0-3    magic, ASCII ``DCTK``
4-5    format version, uint16 (= 1)
6      value dtype code, uint8: 0 fp32, 1 fp16, 2 bf16
7      index dtype code, uint8: 0 int32
8-15   numel of the dense tensor, int64
16-19  capacity, int32
20-23  count, int32 (entries actually sent, written on the device)
24-27  overflow, int32 (entries that passed but did not fit)
28-31  reserved, 0
32...  indices (4 x capacity bytes); values start at the next multiple of 16;
       the buffer ends at the next multiple of 16 after them
====== =====================================================================

Version 2 (written for ``index_encoding="delta"`` or fp8 values; version-1 configurations are
still written as version 1) keeps the header, with byte 6 also 3 = float8_e4m3fn, byte 7 also
1 = delta16, and bytes 28-31 the number S of scale segments (S >= 1 with fp8 values, else 0).
After the header: S + 1 int32 segment offsets and S fp32 scales (fp8 only), then the index
field from the next multiple of 16 (int32 indices or uint16 delta codes), then the values from
the next multiple of 16; the buffer ends at the next multiple of 16. ``dct_kernels.codec``
encodes and decodes it; the cpu core encodes and decodes it too (bitwise the codec), the CUDA
core and the Triton kernels see version 1 rows only (the codec converts).

This module is the one Python definition of that layout (docs/design.md#wire-format), used
by every Python backend and the Triton kernels; ``csrc/wire_format.h`` is the one C++
definition (version 1's layout and version 2's codes; the cpu core takes version 2's byte
offsets from this module), and tests/test_payload.py checks that the two agree.
"""

from __future__ import annotations

import functools
import numbers
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

MAGIC = b"DCTK"
FORMAT_VERSION = 1
HEADER_BYTES = 32
HEADER_WORDS = HEADER_BYTES // 4

# Kernels read the header as eight little-endian int32 words; the indices start right after
# them (at word HEADER_WORDS).
WORD_MAGIC = 0
WORD_VERSION_CODES = 1   # version (uint16) | value code << 16 | index code << 24
WORD_NUMEL_LOW = 2       # numel, int64, low word first
WORD_NUMEL_HIGH = 3
WORD_CAPACITY = 4
WORD_COUNT = 5
WORD_OVERFLOW = 6
WORD_RESERVED = 7
VALUE_CODE_SHIFT = 16    # byte 6
INDEX_CODE_SHIFT = 24    # byte 7

MAGIC_WORD = struct.unpack("<i", MAGIC)[0]  # the value of word WORD_MAGIC

# Value dtype codes (byte 6) and the index dtype code (byte 7).
CODE_FLOAT32 = 0
CODE_FLOAT16 = 1
CODE_BFLOAT16 = 2
INDEX_CODE_INT32 = 0

INDEX_BYTES = 4    # int32 indices
ALIGN_BYTES = 16   # the values start, and the buffer ends, on a multiple of this

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CODE_OF = {torch.float32: CODE_FLOAT32, torch.float16: CODE_FLOAT16,
            torch.bfloat16: CODE_BFLOAT16}
_DTYPE_OF = {code: dtype for dtype, code in _CODE_OF.items()}

MAX_NUMEL = 2**31 - 1  # indices are int32

# Version 2 (see the module docstring and dct_kernels.codec).
FORMAT_VERSION_2 = 2
WORD_SCALES = WORD_RESERVED   # v2: S, the number of scale segments
FLOAT8 = torch.float8_e4m3fn
CODE_FLOAT8_E4M3FN = 3
INDEX_CODE_DELTA16 = 1
INDEX_ENCODINGS = ("int32", "delta")
_INDEX_CODE_OF = {"int32": INDEX_CODE_INT32, "delta": INDEX_CODE_DELTA16}
WIRE_VALUE_DTYPES = VALUE_DTYPES + (FLOAT8,)
_WIRE_DTYPE_OF = {**_DTYPE_OF, CODE_FLOAT8_E4M3FN: FLOAT8}


def value_code(dtype: torch.dtype) -> int:
    """The wire's code for a value dtype (0 fp32, 1 fp16, 2 bf16, 3 float8_e4m3fn)."""
    return CODE_FLOAT8_E4M3FN if dtype == FLOAT8 else _CODE_OF[dtype]


def dtype_of_code(code: int) -> torch.dtype:
    """The value dtype of a wire code (KeyError for an unknown code)."""
    return _WIRE_DTYPE_OF[code]


def index_code(index_encoding: str) -> int:
    """The wire's code for an index encoding (0 "int32", 1 "delta")."""
    return _INDEX_CODE_OF[index_encoding]


def index_encoding_of_code(code: int) -> str:
    """The index encoding of a wire code (KeyError for an unknown code)."""
    if not 0 <= code < len(INDEX_ENCODINGS):
        raise KeyError(code)
    return INDEX_ENCODINGS[code]


def version_of(value_dtype: torch.dtype, index_encoding: str = "int32") -> int:
    """The format version a configuration is written in: 1 for int32 indices with fp32, fp16
    or bf16 values (byte for byte as before version 2 existed), else 2."""
    return 1 if index_encoding == "int32" and value_dtype != FLOAT8 else FORMAT_VERSION_2


@dataclass(frozen=True)
class WireLayout:
    """Where the fields of a wire buffer lie (byte offsets) and its size, for one
    configuration: ``capacity`` slots, ``value_dtype``, ``index_encoding`` and ``num_scales``
    (S, the scale segments of fp8 values; 0 otherwise)."""

    capacity: int
    value_dtype: torch.dtype
    index_encoding: str
    num_scales: int
    version: int
    bounds_offset: int    # S + 1 int32 segment offsets (version 2 with fp8 values)
    scales_offset: int    # S fp32 scales
    indices_offset: int   # int32 indices or uint16 delta codes
    values_offset: int
    nbytes: int

    @property
    def index_bytes(self) -> int:
        """Bytes of one slot's index field (2 for delta codes, 4 for int32 indices)."""
        return 2 if self.index_encoding == "delta" else 4


@functools.lru_cache(maxsize=256)
def wire_layout(capacity: int, value_dtype: torch.dtype, index_encoding: str = "int32",
                num_scales: int = 0) -> WireLayout:
    """The layout of a payload of ``capacity`` slots in any format version (cached: every
    payload built per step asks for it, and a step sees few configurations)."""
    version = version_of(value_dtype, index_encoding)
    if version == 1:
        values_offset, nbytes = layout(capacity, value_dtype)
        return WireLayout(capacity, value_dtype, index_encoding, 0, 1, HEADER_BYTES,
                          HEADER_BYTES, HEADER_BYTES, values_offset, nbytes)
    bounds_offset = HEADER_BYTES
    scales_offset = bounds_offset + 4 * (num_scales + 1 if num_scales else 0)
    indices_offset = _round_up(scales_offset + 4 * num_scales, ALIGN_BYTES)
    index_bytes = 2 if index_encoding == "delta" else 4
    values_offset = _round_up(indices_offset + index_bytes * capacity, ALIGN_BYTES)
    nbytes = _round_up(values_offset + value_dtype.itemsize * capacity, ALIGN_BYTES)
    return WireLayout(capacity, value_dtype, index_encoding, num_scales, version,
                      bounds_offset, scales_offset, indices_offset, values_offset, nbytes)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def layout(capacity: int, value_dtype: torch.dtype) -> Tuple[int, int]:
    """Byte offset of the values and total buffer size for a payload of ``capacity`` slots."""
    values_offset = _round_up(HEADER_BYTES + INDEX_BYTES * capacity, ALIGN_BYTES)
    return values_offset, _round_up(values_offset + value_dtype.itemsize * capacity,
                                    ALIGN_BYTES)


def version_codes_word(value_dtype: torch.dtype, index_encoding: str = "int32") -> int:
    """Header word WORD_VERSION_CODES: version (uint16) | value code << 16 | index code << 24
    (fits int32)."""
    return (version_of(value_dtype, index_encoding)
            | (value_code(value_dtype) << VALUE_CODE_SHIFT)
            | (index_code(index_encoding) << INDEX_CODE_SHIFT))


def _as_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def header_words(numel: int, capacity: int, value_dtype: torch.dtype,
                 index_encoding: str = "int32", num_scales: int = 0) -> list:
    """The header as HEADER_WORDS int32 words (in WORD_* order), with count = overflow = 0."""
    words = [0] * HEADER_WORDS
    words[WORD_MAGIC] = MAGIC_WORD
    words[WORD_VERSION_CODES] = version_codes_word(value_dtype, index_encoding)
    words[WORD_NUMEL_LOW] = _as_int32(numel)
    words[WORD_NUMEL_HIGH] = _as_int32(numel >> 32)
    words[WORD_CAPACITY] = capacity
    words[WORD_SCALES] = num_scales
    return words


@dataclass(frozen=True)
class Header:
    """The fields of a wire buffer's 32-byte header, as read on the host."""

    magic: bytes
    version: int
    value_code: int
    index_code: int
    numel: int
    capacity: int
    count: int
    overflow: int
    num_scales: int = 0   # bytes 28-31: S in version 2 (reserved in version 1)

    @staticmethod
    def parse(raw: bytes) -> "Header":
        """The fields of the first 32 bytes of ``raw`` (no check: see ``problems``)."""
        magic, version, vcode, icode, numel, capacity, count, overflow, scales = struct.unpack(
            "<4sHBBqiiii", raw[:HEADER_BYTES])
        return Header(magic, version, vcode, icode, numel, capacity, count, overflow, scales)

    def problems(self) -> list:
        """Why this header cannot describe a payload of either format version (empty when it
        can)."""
        out = []
        if self.magic != MAGIC:
            out.append(f"magic {self.magic!r} != {MAGIC!r}")
        if self.version == FORMAT_VERSION:
            if self.value_code not in _DTYPE_OF:
                out.append(f"unknown value dtype code {self.value_code}")
            if self.index_code != INDEX_CODE_INT32:
                out.append(f"unknown index dtype code {self.index_code}")
        elif self.version == FORMAT_VERSION_2:
            if self.value_code not in _WIRE_DTYPE_OF:
                out.append(f"unknown value dtype code {self.value_code}")
            if self.index_code not in (INDEX_CODE_INT32, INDEX_CODE_DELTA16):
                out.append(f"unknown index dtype code {self.index_code}")
            if not out:
                fp8 = self.value_code == CODE_FLOAT8_E4M3FN
                if version_of(self.value_dtype, self.index_encoding) != FORMAT_VERSION_2:
                    out.append("format version 2 for a version-1 configuration")
                if fp8 and not 1 <= self.num_scales <= MAX_NUMEL:
                    out.append(f"{self.num_scales} scale segments (fp8 values need >= 1)")
                if not fp8 and self.num_scales != 0:
                    out.append(f"{self.num_scales} scale segments without fp8 values")
        else:
            out.append(f"format version {self.version} not in (1, 2)")
        if not 0 <= self.numel <= MAX_NUMEL:
            out.append(f"numel {self.numel} outside [0, 2^31)")
        if self.capacity < 0:
            out.append(f"negative capacity {self.capacity}")
        return out

    @property
    def value_dtype(self) -> torch.dtype:
        return dtype_of_code(self.value_code)

    @property
    def index_encoding(self) -> str:
        return index_encoding_of_code(self.index_code)

    def layout(self) -> WireLayout:
        """The layout this (problem-free) header describes."""
        return wire_layout(self.capacity, self.value_dtype, self.index_encoding,
                           self.num_scales if self.version == FORMAT_VERSION_2 else 0)


class SparsePayload:
    """Indices and values of the kept entries of a dense tensor, in one wire buffer.

    Attributes:
        buffer: the contiguous uint8 wire buffer (header, indices, values); send it as is.
        indices: int32 ``[capacity]`` view of the buffer, positions in the flattened tensor,
            strictly ascending over the first ``count`` slots (int32 index encoding only; a
            delta-coded payload has ``codes`` instead; ``codec.entries`` decodes either).
        codes: uint16 ``[capacity]`` view of a delta-coded payload's index field.
        values: ``[capacity]`` view of the buffer in the wire dtype (``value_dtype``).
        scales, scale_offsets: fp32 ``[S]`` and int32 ``[S + 1]`` views (fp8 values only).
        count, overflow: 0-d int32 views of the buffer's header, written on the device
            (count: slots used, escapes of the delta code included).
        numel, shape, dtype: the dense tensor that ``decompress`` rebuilds.
        capacity, value_dtype, index_encoding, num_scales: the wire configuration
            (``version`` 1 or 2 follows from it).

    Slots at or past ``count`` are unspecified (``compress`` zeroes them).
    """

    def __init__(self, buffer: torch.Tensor, *, numel: int, capacity: int,
                 value_dtype: torch.dtype, shape: Tuple[int, ...], dtype: torch.dtype,
                 index_encoding: str = "int32", num_scales: int = 0):
        if value_dtype not in WIRE_VALUE_DTYPES:
            raise ValueError(f"value_dtype: expected one of {WIRE_VALUE_DTYPES}, "
                             f"got {value_dtype!r}")
        if index_encoding not in INDEX_ENCODINGS:
            raise ValueError(f"index_encoding: expected one of {INDEX_ENCODINGS}, "
                             f"got {index_encoding!r}")
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"dtype: expected one of {VALUE_DTYPES}, got {dtype!r}")
        where = wire_layout(capacity, value_dtype, index_encoding, num_scales)
        nbytes = where.nbytes
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != nbytes:
            raise ValueError(
                f"buffer: expected a 1-D uint8 tensor of {nbytes} bytes for capacity {capacity} "
                f"and {value_dtype}, got {tuple(buffer.shape)} {buffer.dtype}")
        if not buffer.is_contiguous():
            raise ValueError("buffer: must be contiguous")
        self.buffer = buffer
        self.numel = int(numel)
        self.capacity = int(capacity)
        self.value_dtype = value_dtype
        self.index_encoding = index_encoding
        self.num_scales = int(num_scales)
        self.version = where.version
        self.shape = tuple(map(int, shape))
        self.dtype = dtype
        self.layout = where
        self._values_offset = where.values_offset

    @property
    def indices(self) -> torch.Tensor:
        if self.index_encoding != "int32":
            raise ValueError("indices: a delta-coded payload has codes, not indices; "
                             "dct_kernels.codec.entries decodes its positions")
        start = self.layout.indices_offset
        return self.buffer[start:start + INDEX_BYTES * self.capacity].view(torch.int32)

    @property
    def codes(self) -> torch.Tensor:
        if self.index_encoding != "delta":
            raise ValueError("codes: only a delta-coded payload has codes")
        start = self.layout.indices_offset
        return self.buffer[start:start + 2 * self.capacity].view(torch.uint16)

    @property
    def values(self) -> torch.Tensor:
        end = self._values_offset + self.value_dtype.itemsize * self.capacity
        return self.buffer[self._values_offset:end].view(self.value_dtype)

    @property
    def scales(self) -> torch.Tensor:
        start = self.layout.scales_offset
        return self.buffer[start:start + 4 * self.num_scales].view(torch.float32)

    @property
    def scale_offsets(self) -> torch.Tensor:
        start = self.layout.bounds_offset
        n = self.num_scales + 1 if self.num_scales else 0
        return self.buffer[start:start + 4 * n].view(torch.int32)

    @property
    def count(self) -> torch.Tensor:
        return self.buffer[:HEADER_BYTES].view(torch.int32)[WORD_COUNT]

    @property
    def overflow(self) -> torch.Tensor:
        return self.buffer[:HEADER_BYTES].view(torch.int32)[WORD_OVERFLOW]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @staticmethod
    def from_buffer(buffer: torch.Tensor, shape: Optional[Tuple[int, ...]] = None,
                    dtype: Optional[torch.dtype] = None) -> "SparsePayload":
        """View a received wire buffer (either format version) as a payload.

        Reads the 32-byte header to the host (a device-to-host copy, so it synchronizes with
        the buffer's stream). ``shape`` defaults to ``(numel,)`` and ``dtype`` (of the dense
        tensor) to the value dtype (fp32 for fp8 values). Raises ValueError when the header is
        not of this format or does not match the buffer's size or ``shape``. Counts, indices
        and scales are not checked here; ``decompress`` checks them.
        """
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("buffer: expected a 1-D uint8 tensor (a wire buffer)")
        if buffer.numel() < HEADER_BYTES:
            raise ValueError(f"buffer: {buffer.numel()} bytes is shorter than the "
                             f"{HEADER_BYTES}-byte header")
        header = Header.parse(bytes(buffer[:HEADER_BYTES].cpu().numpy().tobytes()))
        problems = header.problems()
        if problems:
            raise ValueError("buffer: not a dct_kernels payload: " + "; ".join(problems))
        value_dtype = header.value_dtype
        where = header.layout()
        if where.nbytes != buffer.numel():
            raise ValueError(f"buffer: header says capacity {header.capacity} "
                             f"({where.nbytes} bytes) but the buffer has {buffer.numel()} bytes")
        if shape is None:
            shape = (header.numel,)
        if not isinstance(shape, (tuple, list, torch.Size)) or not all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
            raise ValueError(f"shape: expected a tuple of ints, got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape: dimensions must be >= 0, got {shape}")
        n = 1
        for s in shape:
            n *= s
        if n != header.numel:
            raise ValueError(f"shape: {shape} has {n} elements, the payload has {header.numel}")
        if dtype is None:
            dtype = torch.float32 if value_dtype == FLOAT8 else value_dtype
        if dtype not in VALUE_DTYPES:
            raise TypeError(f"dtype: expected one of fp32, fp16, bf16, got {dtype}")
        return SparsePayload(buffer.contiguous(), numel=header.numel, capacity=header.capacity,
                             value_dtype=value_dtype, shape=shape, dtype=dtype,
                             index_encoding=where.index_encoding, num_scales=where.num_scales)

    def __repr__(self) -> str:
        extra = "" if self.version == 1 else \
            f", index_encoding={self.index_encoding!r}, num_scales={self.num_scales}"
        return (f"SparsePayload(numel={self.numel}, capacity={self.capacity}, "
                f"value_dtype={self.value_dtype}{extra}, shape={self.shape}, dtype={self.dtype}, "
                f"nbytes={self.nbytes}, device={self.buffer.device})")


_TEMPLATE_BYTES = 1 << 16  # buffers up to this size are cloned from a cached template


@functools.lru_cache(maxsize=256)
def _header_tensor(numel: int, capacity: int, value_dtype: torch.dtype,
                   index_encoding: str = "int32", num_scales: int = 0) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(header_words(numel, capacity, value_dtype, index_encoding,
                                         num_scales), dtype=torch.int32)


def header_tensor(numel: int, capacity: int, value_dtype: torch.dtype,
                  index_encoding: str = "int32", num_scales: int = 0) -> torch.Tensor:
    """The header as a host int32 tensor of HEADER_WORDS words (count = overflow = 0); cached,
    so do not write to it (a fresh one while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return torch.tensor(header_words(numel, capacity, value_dtype, index_encoding,
                                         num_scales), dtype=torch.int32)
    return _header_tensor(numel, capacity, value_dtype, index_encoding, num_scales)


@functools.lru_cache(maxsize=64)
def _template(numel: int, capacity: int, value_dtype: torch.dtype, nbytes: int,
              device: torch.device, index_encoding: str = "int32",
              num_scales: int = 0) -> torch.Tensor:
    with torch.inference_mode(False):
        buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        buffer[:HEADER_BYTES].view(torch.int32).copy_(
            _header_tensor(numel, capacity, value_dtype, index_encoding, num_scales))
        _neutral_scales(buffer, numel, capacity, value_dtype, index_encoding, num_scales)
        return buffer


def _neutral_scales(buffer: torch.Tensor, numel: int, capacity: int, value_dtype: torch.dtype,
                    index_encoding: str, num_scales: int) -> None:
    """A fresh fp8 buffer's scale section: one segment covering everything, the others empty
    (offsets 0, ..., 0, numel), every scale 1, so that even an empty payload decodes."""
    if not num_scales:
        return
    where = wire_layout(capacity, value_dtype, index_encoding, num_scales)
    bounds = [0] * num_scales + [numel]
    buffer[where.bounds_offset:where.scales_offset].view(torch.int32).copy_(
        torch.tensor(bounds, dtype=torch.int32), non_blocking=True)
    buffer[where.scales_offset:where.scales_offset + 4 * num_scales].view(
        torch.float32).fill_(1.0)


def new_payload(numel: int, capacity: int, value_dtype: torch.dtype, shape, dtype,
                device: torch.device, index_encoding: str = "int32",
                num_scales: int = 0) -> SparsePayload:
    """A zeroed wire buffer with its header written (count = overflow = 0).

    The header travels with a non-blocking host-to-device copy, so no host synchronization.
    Small buffers are a copy of a cached template (one allocation and one copy: this runs on
    every compress call, where the separate zeroing, header tensor and header copy cost more
    than a small CPU kernel).
    """
    nbytes = wire_layout(capacity, value_dtype, index_encoding, num_scales).nbytes
    if nbytes <= _TEMPLATE_BYTES and not torch.compiler.is_compiling():
        buffer = _template(numel, capacity, value_dtype, nbytes, torch.device(device),
                           index_encoding, num_scales).clone()
    else:
        buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        buffer[:HEADER_BYTES].view(torch.int32).copy_(
            header_tensor(numel, capacity, value_dtype, index_encoding, num_scales),
            non_blocking=True)
        _neutral_scales(buffer, numel, capacity, value_dtype, index_encoding, num_scales)
    return SparsePayload(buffer, numel=numel, capacity=capacity, value_dtype=value_dtype,
                         shape=shape, dtype=dtype, index_encoding=index_encoding,
                         num_scales=num_scales)


@dataclass
class RowPayload:
    """Exactly k entries of each row of a ``[B, D]`` tensor (``compress_rows``).

    Attributes:
        indices: ``[B, k]`` column indices, ascending in each row; int16 when D <= 32768,
            else int32.
        values: ``[B, k]`` values in the wire dtype.
        shape: ``(B, D)`` of the dense tensor; dtype: its dtype.

    Its size depends only on (B, D, k, dtypes), never on the data, so it can be exchanged
    without a size exchange.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: Tuple[int, int]
    dtype: torch.dtype

    @property
    def k(self) -> int:
        """Entries kept per row."""
        return self.indices.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of indices and values together (what crosses a boundary)."""
        return (self.indices.numel() * self.indices.element_size()
                + self.values.numel() * self.values.element_size())


def row_index_dtype(num_columns: int) -> torch.dtype:
    """Column index dtype of a RowPayload: int16 when D <= 32768, else int32."""
    return torch.int16 if num_columns <= 32768 else torch.int32
