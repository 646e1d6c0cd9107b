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

This module is the one Python definition of that layout (docs/design.md#wire-format), used
by every Python backend and the Triton kernels; ``csrc/wire_format.h`` is the one C++
definition, and tests/test_payload.py checks that the two agree.
"""

from __future__ import annotations

import functools
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


def value_code(dtype: torch.dtype) -> int:
    """The wire's code for a value dtype (0 fp32, 1 fp16, 2 bf16)."""
    return _CODE_OF[dtype]


def dtype_of_code(code: int) -> torch.dtype:
    """The value dtype of a wire code (KeyError for an unknown code)."""
    return _DTYPE_OF[code]


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def layout(capacity: int, value_dtype: torch.dtype) -> Tuple[int, int]:
    """Byte offset of the values and total buffer size for a payload of ``capacity`` slots."""
    values_offset = _round_up(HEADER_BYTES + INDEX_BYTES * capacity, ALIGN_BYTES)
    return values_offset, _round_up(values_offset + value_dtype.itemsize * capacity,
                                    ALIGN_BYTES)


def version_codes_word(value_dtype: torch.dtype) -> int:
    """Header word WORD_VERSION_CODES: version (uint16) | value code << 16 | index code << 24
    (fits int32)."""
    return (FORMAT_VERSION | (value_code(value_dtype) << VALUE_CODE_SHIFT)
            | (INDEX_CODE_INT32 << INDEX_CODE_SHIFT))


def _as_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def header_words(numel: int, capacity: int, value_dtype: torch.dtype) -> list:
    """The header as HEADER_WORDS int32 words (in WORD_* order), with count = overflow = 0."""
    words = [0] * HEADER_WORDS
    words[WORD_MAGIC] = MAGIC_WORD
    words[WORD_VERSION_CODES] = version_codes_word(value_dtype)
    words[WORD_NUMEL_LOW] = _as_int32(numel)
    words[WORD_NUMEL_HIGH] = _as_int32(numel >> 32)
    words[WORD_CAPACITY] = capacity
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

    @staticmethod
    def parse(raw: bytes) -> "Header":
        magic, version, vcode, icode, numel, capacity, count, overflow, _ = struct.unpack(
            "<4sHBBqiiii", raw[:HEADER_BYTES])
        return Header(magic, version, vcode, icode, numel, capacity, count, overflow)

    def problems(self) -> list:
        """Why this header cannot describe a payload of this format (empty when it can)."""
        out = []
        if self.magic != MAGIC:
            out.append(f"magic {self.magic!r} != {MAGIC!r}")
        if self.version != FORMAT_VERSION:
            out.append(f"format version {self.version} != {FORMAT_VERSION}")
        if self.value_code not in _DTYPE_OF:
            out.append(f"unknown value dtype code {self.value_code}")
        if self.index_code != INDEX_CODE_INT32:
            out.append(f"unknown index dtype code {self.index_code}")
        if not 0 <= self.numel <= MAX_NUMEL:
            out.append(f"numel {self.numel} outside [0, 2^31)")
        if self.capacity < 0:
            out.append(f"negative capacity {self.capacity}")
        return out


class SparsePayload:
    """Indices and values of the kept entries of a dense tensor, in one wire buffer.

    Attributes:
        buffer: the contiguous uint8 wire buffer (header, indices, values); send it as is.
        indices: int32 ``[capacity]`` view of the buffer, positions in the flattened tensor,
            strictly ascending over the first ``count`` slots.
        values: ``[capacity]`` view of the buffer in the wire dtype (``value_dtype``).
        count, overflow: 0-d int32 views of the buffer's header, written on the device.
        numel, shape, dtype: the dense tensor that ``decompress`` rebuilds.
        capacity, value_dtype: the size and value type of the wire format.

    Slots at or past ``count`` are unspecified (``compress`` zeroes them).
    """

    def __init__(self, buffer: torch.Tensor, *, numel: int, capacity: int,
                 value_dtype: torch.dtype, shape: Tuple[int, ...], dtype: torch.dtype):
        values_offset, nbytes = layout(capacity, value_dtype)
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
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._values_offset = values_offset

    @property
    def indices(self) -> torch.Tensor:
        end = HEADER_BYTES + INDEX_BYTES * self.capacity
        return self.buffer[HEADER_BYTES:end].view(torch.int32)

    @property
    def values(self) -> torch.Tensor:
        end = self._values_offset + self.value_dtype.itemsize * self.capacity
        return self.buffer[self._values_offset:end].view(self.value_dtype)

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
        """View a received wire buffer as a payload.

        Reads the 32-byte header to the host (a device-to-host copy, so it synchronizes with
        the buffer's stream). ``shape`` defaults to ``(numel,)`` and ``dtype`` (of the dense
        tensor) to the value dtype. Raises ValueError when the header is not of this format or
        does not match the buffer's size or ``shape``. Counts and indices are not checked here;
        ``decompress`` checks them.
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
        value_dtype = dtype_of_code(header.value_code)
        _, nbytes = layout(header.capacity, value_dtype)
        if nbytes != buffer.numel():
            raise ValueError(f"buffer: header says capacity {header.capacity} ({nbytes} bytes) "
                             f"but the buffer has {buffer.numel()} bytes")
        if shape is None:
            shape = (header.numel,)
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape: dimensions must be >= 0, got {shape}")
        n = 1
        for s in shape:
            n *= s
        if n != header.numel:
            raise ValueError(f"shape: {shape} has {n} elements, the payload has {header.numel}")
        if dtype is None:
            dtype = value_dtype
        if dtype not in VALUE_DTYPES:
            raise TypeError(f"dtype: expected one of fp32, fp16, bf16, got {dtype}")
        return SparsePayload(buffer.contiguous(), numel=header.numel, capacity=header.capacity,
                             value_dtype=value_dtype, shape=shape, dtype=dtype)

    def __repr__(self) -> str:
        return (f"SparsePayload(numel={self.numel}, capacity={self.capacity}, "
                f"value_dtype={self.value_dtype}, shape={self.shape}, dtype={self.dtype}, "
                f"nbytes={self.nbytes}, device={self.buffer.device})")


_TEMPLATE_BYTES = 1 << 16  # buffers up to this size are cloned from a cached template


@functools.lru_cache(maxsize=256)
def _header_tensor(numel: int, capacity: int, value_dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(header_words(numel, capacity, value_dtype), dtype=torch.int32)


def header_tensor(numel: int, capacity: int, value_dtype: torch.dtype) -> torch.Tensor:
    """The header as a host int32 tensor of HEADER_WORDS words (count = overflow = 0); cached,
    so do not write to it (a fresh one while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return torch.tensor(header_words(numel, capacity, value_dtype), dtype=torch.int32)
    return _header_tensor(numel, capacity, value_dtype)


@functools.lru_cache(maxsize=64)
def _template(numel: int, capacity: int, value_dtype: torch.dtype, nbytes: int,
              device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        buffer[:HEADER_BYTES].view(torch.int32).copy_(_header_tensor(numel, capacity,
                                                                     value_dtype))
        return buffer


def new_payload(numel: int, capacity: int, value_dtype: torch.dtype, shape, dtype,
                device: torch.device) -> SparsePayload:
    """A zeroed wire buffer with its header written (count = overflow = 0).

    The header travels with a non-blocking host-to-device copy, so no host synchronization.
    Small buffers are a copy of a cached template (one allocation and one copy: this runs on
    every compress call, where the separate zeroing, header tensor and header copy cost more
    than a small CPU kernel).
    """
    _, nbytes = layout(capacity, value_dtype)
    if nbytes <= _TEMPLATE_BYTES and not torch.compiler.is_compiling():
        buffer = _template(numel, capacity, value_dtype, nbytes, torch.device(device)).clone()
    else:
        buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        buffer[:HEADER_BYTES].view(torch.int32).copy_(
            header_tensor(numel, capacity, value_dtype), non_blocking=True)
    return SparsePayload(buffer, numel=numel, capacity=capacity, value_dtype=value_dtype,
                         shape=shape, dtype=dtype)


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
        return self.indices.shape[1]

    @property
    def nbytes(self) -> int:
        return (self.indices.numel() * self.indices.element_size()
                + self.values.numel() * self.values.element_size())


def row_index_dtype(num_columns: int) -> torch.dtype:
    """Column index dtype of a RowPayload: int16 when D <= 32768, else int32."""
    return torch.int16 if num_columns <= 32768 else torch.int32
