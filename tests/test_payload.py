"""The wire format, byte for byte, as the table of docs/design.md#wire-format defines it,
SparsePayload's views, and the one C++ definition of the layout (csrc/wire_format.h) against the
one Python definition (dct_kernels/payload.py).

Expected bytes are written here by hand with ``struct`` (not with the package's helpers).
"""

import glob
import os
import re
import shutil
import subprocess
import struct

import numpy as np
import pytest
import torch

import dct_kernels
import oracle
from dct_kernels import SparsePayload
from helpers import assert_bitwise_equal
from oracle import DTYPES, dtype_id, make_tensor, seed_of

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _round16(n):
    return -(-n // 16) * 16


@pytest.mark.parametrize("capacity", (0, 1, 2, 3, 4, 5, 7, 8, 33))
@pytest.mark.parametrize("value_dtype", DTYPES, ids=dtype_id)
def test_wire_layout(backend_device, value_dtype, capacity):
    """Header fields at their offsets, indices at byte 32, values at the next multiple of 16,
    the buffer's end at the multiple of 16 after them, for a compress with overflow."""
    backend, device = backend_device
    seed = seed_of("layout", value_dtype, capacity)
    n = 50
    x = make_tensor("normal", n, torch.float32, seed)
    x = x / (x.abs().max() + 1.0)  # all below 1 in magnitude
    x[::5] = 100.0 + torch.arange(10.0)  # exactly 10 entries pass the threshold below
    payload = dct_kernels.compress(x.to(device), 50.0, capacity=capacity,
                                   value_dtype=value_dtype, backend=backend)
    raw = bytes(payload.buffer.cpu().numpy())
    sent = min(capacity, 10)

    assert raw[0:4] == b"DCTK"
    assert struct.unpack("<H", raw[4:6]) == (1,)
    assert raw[6] == CODES[value_dtype] and raw[7] == 0
    assert struct.unpack("<q", raw[8:16]) == (n,)
    assert struct.unpack("<iiii", raw[16:32]) == (capacity, sent, 10 - sent, 0)

    values_at = _round16(32 + 4 * capacity)
    assert len(raw) == _round16(values_at + ITEMSIZE[value_dtype] * capacity)
    indices = struct.unpack(f"<{sent}i", raw[32:32 + 4 * sent])
    assert indices == tuple(range(0, 5 * sent, 5))
    wire = torch.frombuffer(bytearray(raw[values_at:values_at + ITEMSIZE[value_dtype] * sent]),
                            dtype=value_dtype) if sent else torch.empty(0, dtype=value_dtype)
    assert_bitwise_equal(wire, (100.0 + torch.arange(float(sent))).to(value_dtype), "values")


def test_payload_views(backend_device):
    """indices/values/count/overflow are views of the one buffer, with the documented types."""
    backend, device = backend_device
    seed = seed_of("views")
    x = make_tensor("normal", 300, torch.float16, seed).reshape(10, 30)
    payload = dct_kernels.compress(x.to(device), 0.5, capacity=20, backend=backend)
    assert payload.buffer.dtype == torch.uint8 and payload.buffer.is_contiguous()
    assert payload.indices.dtype == torch.int32 and payload.indices.shape == (20,)
    assert payload.values.dtype == torch.float16 and payload.values.shape == (20,)
    assert payload.count.dtype == torch.int32 and payload.count.dim() == 0
    assert payload.overflow.dtype == torch.int32 and payload.overflow.dim() == 0
    assert (payload.numel, payload.capacity, payload.shape, payload.dtype) == \
        (300, 20, (10, 30), torch.float16)
    assert payload.nbytes == payload.buffer.numel() == oracle.layout(20, torch.float16)[1]
    base = payload.buffer.data_ptr()
    assert payload.indices.data_ptr() == base + 32
    assert payload.values.data_ptr() == base + oracle.layout(20, torch.float16)[0]
    assert payload.count.data_ptr() == base + 20 and payload.overflow.data_ptr() == base + 24
    payload.buffer[20:24] = torch.tensor([7, 0, 0, 0], dtype=torch.uint8)
    assert int(payload.count) == 7


@pytest.mark.parametrize("value_dtype", DTYPES, ids=dtype_id)
def test_from_buffer_round_trip(backend_device, value_dtype):
    """A received copy of the buffer is the same payload and decompresses the same."""
    backend, device = backend_device
    seed = seed_of("round-trip", value_dtype)
    x = make_tensor("specials", 4 * 25, torch.bfloat16, seed).reshape(4, 25)
    sent = dct_kernels.compress(x.to(device), 0.7, capacity=40, value_dtype=value_dtype,
                                backend=backend)
    received = SparsePayload.from_buffer(sent.buffer.clone(), shape=(4, 25),
                                         dtype=torch.bfloat16)
    for name in ("numel", "capacity", "value_dtype", "shape", "dtype", "nbytes"):
        assert getattr(received, name) == getattr(sent, name), name
    for name in ("indices", "values", "count", "overflow"):
        assert_bitwise_equal(getattr(received, name), getattr(sent, name), name)
    assert_bitwise_equal(dct_kernels.decompress(received, backend=backend),
                         dct_kernels.decompress(sent, backend=backend), "decompress")

    plain = SparsePayload.from_buffer(sent.buffer.clone())  # defaults: (numel,), value dtype
    assert (plain.shape, plain.dtype) == ((100,), value_dtype)


def _valid_buffer():
    return oracle.encode(10, 3, torch.float32, [1, 4, 9], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("how", ("magic", "version", "value_code", "index_code", "numel",
                                 "capacity", "too_long", "too_short", "header_only", "dtype",
                                 "shape"))
def test_from_buffer_rejects(how):
    buffer = _valid_buffer()
    kw = {}
    if how == "magic":
        buffer[:4] = torch.tensor(list(b"KTCD"), dtype=torch.uint8)
    elif how == "version":
        buffer[4] = 2
    elif how == "value_code":
        buffer[6] = 3
    elif how == "index_code":
        buffer[7] = 1
    elif how == "numel":
        buffer[8:16] = torch.from_numpy(np.array([-1], "<i8").view(np.uint8).copy())
    elif how == "capacity":          # the header's capacity does not match the size
        buffer[16] = 9  # (capacity 4 would still fit these 64 bytes)
    elif how == "too_long":
        buffer = torch.cat([buffer, torch.zeros(16, dtype=torch.uint8)])
    elif how == "too_short":
        buffer = buffer[:-16]
    elif how == "header_only":
        buffer = buffer[:20]
    elif how == "shape":
        kw["shape"] = (3, 4)
    elif how == "dtype":
        kw["dtype"] = torch.int32
    error = TypeError if how == "dtype" else ValueError
    argument = how if how in ("dtype", "shape") else "buffer"
    with pytest.raises(error, match=f"^{argument}:"):
        SparsePayload.from_buffer(buffer, **kw)


def test_payload_configuration_is_checked():
    """The constructor and from_buffer name what they refuse (a float64 wire dtype, an unknown
    index encoding, a shape that is not a tuple of ints)."""
    buffer = _valid_buffer()
    base = dict(numel=10, capacity=3, value_dtype=torch.float32, shape=(10,),
                dtype=torch.float32)
    for name, bad in (("value_dtype", torch.float64), ("index_encoding", "x"),
                      ("dtype", torch.float64)):
        with pytest.raises(ValueError, match=f"^{name}:"):
            SparsePayload(buffer, **dict(base, **{name: bad}))
    for shape in (10, (2.5, 4), ("2", 5)):
        with pytest.raises(ValueError, match="^shape:"):
            SparsePayload.from_buffer(buffer, shape=shape)
    assert SparsePayload.from_buffer(buffer, shape=torch.Size([2, 5])).shape == (2, 5)


def test_from_buffer_accepts_the_valid_one():
    """The control for test_from_buffer_rejects: the unmodified buffer is accepted."""
    p = SparsePayload.from_buffer(_valid_buffer(), shape=(2, 5))
    assert (p.numel, p.capacity, p.shape, p.dtype, int(p.count)) == \
        (10, 3, (2, 5), torch.float32, 3)
    assert p.indices.tolist() == [1, 4, 9] and p.values.tolist() == [1.0, 2.0, 3.0]


# ------------------------------------------------------- the C++ and Python homes of the layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIRE_H = os.path.join(ROOT, "csrc", "wire_format.h")

# Each constant of csrc/wire_format.h and its Python name in dct_kernels/payload.py.
CPP_TO_PYTHON = {
    "kHeaderBytes": "HEADER_BYTES", "kHeaderWords": "HEADER_WORDS",
    "kWordMagic": "WORD_MAGIC", "kWordVersionCodes": "WORD_VERSION_CODES",
    "kWordNumelLow": "WORD_NUMEL_LOW", "kWordNumelHigh": "WORD_NUMEL_HIGH",
    "kWordCapacity": "WORD_CAPACITY", "kWordCount": "WORD_COUNT",
    "kWordOverflow": "WORD_OVERFLOW", "kWordReserved": "WORD_RESERVED",
    "kFormatVersion": "FORMAT_VERSION", "kValueCodeShift": "VALUE_CODE_SHIFT",
    "kIndexCodeShift": "INDEX_CODE_SHIFT", "kCodeFloat32": "CODE_FLOAT32",
    "kCodeFloat16": "CODE_FLOAT16", "kCodeBFloat16": "CODE_BFLOAT16",
    "kIndexCodeInt32": "INDEX_CODE_INT32", "kIndexBytes": "INDEX_BYTES",
    "kAlignBytes": "ALIGN_BYTES", "kFormatVersion2": "FORMAT_VERSION_2",
    "kWordScales": "WORD_SCALES", "kCodeFloat8E4M3FN": "CODE_FLOAT8_E4M3FN",
    "kIndexCodeDelta16": "INDEX_CODE_DELTA16",
}


def _cpp_constants():
    with open(WIRE_H) as f:
        text = f.read()
    return {name: int(value) for name, value in
            re.findall(r"constexpr\s+int(?:64_t)?\s+(k\w+)\s*=\s*(-?\d+)\s*;", text)}


def test_cpp_wire_constants_equal_the_python_ones():
    from dct_kernels import payload as wire
    cpp = _cpp_constants()
    assert set(cpp) == set(CPP_TO_PYTHON), "a constant of wire_format.h has no Python twin"
    for cpp_name, py_name in CPP_TO_PYTHON.items():
        assert cpp[cpp_name] == getattr(wire, py_name), (cpp_name, py_name)
    # And both agree with the format's table, written here by hand.
    assert (cpp["kHeaderBytes"], cpp["kHeaderWords"], cpp["kWordCount"],
            cpp["kWordOverflow"], cpp["kAlignBytes"]) == (32, 8, 5, 6, 16)
    assert (cpp["kFormatVersion2"], cpp["kWordScales"], cpp["kCodeFloat8E4M3FN"],
            cpp["kIndexCodeDelta16"]) == (2, 7, 3, 1)
    assert {wire.value_code(t): t for t in CODES} == {c: t for t, c in CODES.items()}


def test_cpu_core_compares_value_codes_by_name():
    """The cpu core reads version-2 value codes through wire_format.h's names (a new code
    changes one place), not through numbers of its own."""
    sources = glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.[ch]*"))
    assert sources
    for path in sources:
        with open(path) as f:
            text = f.read()
        assert not re.findall(r"value_code\s*(?:[=!<>]=|[<>])\s*-?\d", text), path


def test_cpp_dtype_enum_is_the_wire_codes():
    """The DType both C++ cores take (csrc/dct_api.h) has its values from wire_format.h, not
    from numbers of its own, and no core header defines a DType of its own."""
    with open(os.path.join(ROOT, "csrc", "dct_api.h")) as f:
        text = f.read()
    enum = re.search(r"enum class DType : int \{(.*?)\};", text, re.S).group(1)
    assert re.findall(r"(k\w+) = ([^,\s]+)", enum) == [
        ("kFloat32", "wire::kCodeFloat32"), ("kFloat16", "wire::kCodeFloat16"),
        ("kBFloat16", "wire::kCodeBFloat16")]
    for core_header in (("cuda", "dct_cuda.h"), ("cpu", "dct_cpu.h")):
        with open(os.path.join(ROOT, "csrc", *core_header)) as f:
            assert "enum class DType" not in f.read(), core_header


CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_cpp_layout_functions_equal_the_python_layout(tmp_path):
    """values_offset and buffer_bytes of wire_format.h, compiled and run, against
    payload.layout for capacities around every 16-byte boundary."""
    from dct_kernels import payload as wire
    capacities = list(range(0, 40)) + [1000, 4095, 4096, 4097, (1 << 31) - 1]
    source = tmp_path / "layout.cpp"
    source.write_text(
        '#include <cstdio>\n#include "wire_format.h"\nint main() {\n'
        + "".join(f"  std::printf(\"%lld %lld %lld\\n\", "
                  f"(long long)dct::wire::values_offset({c}LL), "
                  f"(long long)dct::wire::buffer_bytes({c}LL, 4), "
                  f"(long long)dct::wire::buffer_bytes({c}LL, 2));\n" for c in capacities)
        + "  return 0;\n}\n")
    binary = tmp_path / "layout"
    subprocess.run([CXX, "-std=c++17", "-I", os.path.join(ROOT, "csrc"), str(source), "-o",
                    str(binary)], check=True, capture_output=True, timeout=120)
    lines = subprocess.run([str(binary)], check=True, capture_output=True, text=True,
                           timeout=60).stdout.splitlines()
    assert len(lines) == len(capacities)
    for capacity, line in zip(capacities, lines):
        offset, bytes4, bytes2 = map(int, line.split())
        assert (offset, bytes4) == wire.layout(capacity, torch.float32), capacity
        assert (offset, bytes2) == wire.layout(capacity, torch.bfloat16), capacity
        # And by hand: indices from byte 32, values at the next multiple of 16.
        assert offset == _round16(32 + 4 * capacity)
        assert bytes2 == _round16(offset + 2 * capacity)
