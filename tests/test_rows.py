"""compress_rows / decompress_rows / gather_rows: exactly k entries per row.

The oracle ranks each row with numpy's lexsort on (NaN first, larger magnitude first, lower
column first). The Triton row kernel costs ~30-70 ms per row in the interpreter, so the sweeps
use a few short rows and only a handful of cases have D > 4096 (several column chunks).
"""

import numpy as np
import pytest
import torch

import dct_kernels
import oracle
from dct_kernels import RowPayload
from helpers import assert_bitwise_equal
from oracle import DTYPES, dtype_id, make_tensor, seed_of


def check_rows(backend, device, x, k, value_dtype=None, what=""):
    """compress_rows: reference vs oracle, backend vs reference. Returns the reference."""
    want_idx, want_val = oracle.compress_rows(x, k, value_dtype)
    ref = dct_kernels.compress_rows(x, k, value_dtype=value_dtype, backend="torch")
    index_dtype = torch.int16 if x.shape[1] <= 32768 else torch.int32
    assert ref.indices.dtype == index_dtype, what
    assert (ref.shape, ref.dtype, ref.k) == (tuple(x.shape), x.dtype, k), what
    assert_bitwise_equal(ref.indices, torch.from_numpy(want_idx).to(index_dtype),
                         f"reference indices vs oracle, {what}")
    assert_bitwise_equal(ref.values, want_val, f"reference values vs oracle, {what}")
    got = dct_kernels.compress_rows(x.to(device), k, value_dtype=value_dtype, backend=backend)
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype), what
    assert_bitwise_equal(got.indices.cpu(), ref.indices, f"{backend}-{device} indices, {what}")
    assert_bitwise_equal(got.values.cpu(), ref.values, f"{backend}-{device} values, {what}")
    return ref


def _ks(columns, seed):
    return sorted({1, columns, 1 + seed % columns})


@pytest.mark.parametrize("kind", ("normal", "ties", "specials", "equal"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows,columns", [(1, 1), (3, 2), (2, 17), (2, 100)])
def test_compress_rows_matches_oracle(backend_device, rows, columns, dtype, kind):
    backend, device = backend_device
    seed = seed_of("rows", rows, columns, dtype, kind)
    x = make_tensor(kind, rows * columns, dtype, seed).reshape(rows, columns)
    for k in _ks(columns, seed):
        check_rows(backend, device, x, k, what=f"{kind} k={k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compress_rows_wide(backend_device, dtype):
    """D = 5000: two column chunks of the Triton kernel; ties across the chunk boundary."""
    backend, device = backend_device
    seed = seed_of("rows-wide", dtype)
    x = make_tensor(("ties", "specials", "normal")[seed % 3], 2 * 5000, dtype, seed)
    x = x.reshape(2, 5000)
    x[0, 4090:4100] = 7.25  # ties straddling column 4096
    check_rows(backend, device, x, 1 + seed % 300, what="D=5000")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compress_rows_rows_differ(backend_device, dtype):
    """Consecutive rows of different kinds and scales: the cpu core starts each row's search
    from the previous row's k-th magnitude, and must give the same exact result when that guess
    fits (a row like the last), when fewer than k keys reach it (a row at a smaller scale) and
    when far more than k do (a row at a larger scale, ties, zeros)."""
    backend, device = backend_device
    seed = seed_of("rows-differ", dtype)
    rng = np.random.default_rng(seed)
    columns = 150
    plan = ["normal", "normal", "normal", "small", "normal", "large", "normal", "ties", "relu",
            "relu", "specials", "normal", "equal", "normal", "narrow", "wide", "zero", "normal"]
    rows = []
    for i, kind in enumerate(plan):
        base = "normal" if kind in ("small", "large", "relu", "zero") else kind
        row = make_tensor(base, columns, torch.float32, seed + i)
        if kind == "normal":  # one scale for the run of "normal" rows
            row = row / row.abs().max()
        row = {"small": row * 1e-3, "large": row * 1e3, "relu": row.clamp(min=0),
               "zero": row * 0}.get(kind, row)
        rows.append(row)
    x = torch.stack(rows).to(dtype)
    for k in (1, int(rng.integers(2, 20)), 40, columns):
        check_rows(backend, device, x, k, what=f"k={k}")


@pytest.mark.skipif(dct_kernels.available_backends()["cpu"] != "available",
                    reason="the cpu core is not built")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [1, 8, 32, 100])
def test_compress_rows_guess_paths(k, threads):
    """Many rows whose scale steps by 1, 0.85, 0.5 or 2 from the row before: the cpu core's
    first guess fits, misses low and fits on the retry three eighths of a binade lower, misses
    both (histograms), or catches too many keys; rows of keys a few ulps apart (the candidate
    histogram's bins are single keys) and rows with ties at the k-th magnitude inside a wide
    candidate range. Exact results whichever path decided. (The guesses are the cpu core's
    alone; the other backends' row kernels are exercised by the tests above.)"""
    backend, device = "cpu", "cpu"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed_of("rows-guess-paths", k))
    columns = 512
    steps = torch.tensor([1.0, 0.85, 0.5, 2.0])[torch.randint(0, 4, (240,), generator=g)]
    scales = torch.cumprod(steps, 0).clamp(1e-20, 1e20)
    x = torch.relu(torch.randn(240, columns, generator=g)) * scales[:, None]
    near = 1.0 + torch.randint(0, 40, (columns,), generator=g).float() * 2.0 ** -23
    x[100:104] = near  # keys within a span below 256
    x[150:154, ::7] = x[150:154].abs().max(dim=1, keepdim=True).values * 0.5  # ties
    try:
        check_rows(backend, device, x, k, what=f"k={k}")
    finally:
        torch.set_num_threads(before)


def _nan_payload_rows(seed: int, columns: int) -> torch.Tensor:
    """Rows whose k-th largest magnitude (for k up to a quarter of a row) is a NaN or +inf, with
    NaNs of every payload (the smallest, 0x7F800001, the quiet default, the largest, negative
    ones), between rows of ordinary scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, columns, generator=g)
    payloads = torch.tensor([0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7F800000, 0x7F8ABCDE,
                             -0x00400000, -0x7F7FFFFF], dtype=torch.int64)  # as int32 bits
    picks = payloads[torch.randint(0, len(payloads), (2, columns), generator=g)]
    specials = picks.to(torch.int32).view(torch.float32)
    x[1, ::2] = specials[0, ::2]
    x[3, 1::2] = specials[1, 1::2]
    x[4] = x[4] * 1e-30
    return x


@pytest.mark.skipif(dct_kernels.available_backends()["cpu"] != "available",
                    reason="the cpu core is not built")
@pytest.mark.parametrize("columns", [1, 15, 63, 64, 65, 127, 200, 512])
def test_compress_rows_every_scan_isa(columns):
    """The cpu core's row scan (the keys at or above a bound, as a bitmap) has a scalar, an
    SSE2, an AVX2 and an AVX-512F implementation, picked by the CPU; each one this CPU can run
    is forced in turn and must give the oracle's rows: rows of several scales (guesses that fit,
    miss and over-collect), ties, ±0, denormals, inf, NaNs of every payload including rows whose
    k-th magnitude is a NaN (a bound above every vector compare, left to the scalar loop), and
    widths that are not multiples of a vector or of a 64-column word."""
    from dct_kernels import _cpu

    isas = _cpu._key_scan_isas()
    assert isas[:2] == ["scalar", "sse2"] or isas == ["scalar"]
    seed = seed_of("rows-scan-isa", columns)
    g = torch.Generator().manual_seed(seed)
    steps = torch.tensor([1.0, 0.85, 0.5, 2.0])[torch.randint(0, 4, (40,), generator=g)]
    scaled = torch.relu(torch.randn(40, columns, generator=g)) * torch.cumprod(steps, 0)[:, None]
    kinds = [make_tensor(kind, 3 * columns, torch.float32, seed + i).reshape(3, columns)
             for i, kind in enumerate(("specials", "ties", "wide", "equal"))]
    x = torch.cat([scaled, *kinds, _nan_payload_rows(seed, columns)])
    before = _cpu._key_scan_isa()
    try:
        for isa in isas:
            _cpu._set_key_scan_isa(isa=isa)
            assert _cpu._key_scan_isa() == isa
            for k in sorted({1, max(1, columns // 8), max(1, columns // 4), columns}):
                check_rows("cpu", "cpu", x, k, what=f"{isa} k={k}")
    finally:
        _cpu._set_key_scan_isa(isa=before)
    with pytest.raises(ValueError, match="isa"):
        _cpu._set_key_scan_isa(isa="avx1024")
    assert _cpu._key_scan_isa() == before


@pytest.mark.parametrize("columns,index_dtype", [(32768, torch.int16), (32769, torch.int32)],
                         ids=("D32768-int16", "D32769-int32"))
def test_compress_rows_index_dtype(backend_device, columns, index_dtype):
    """int16 column indices up to D = 32768 (the last column is 32767), int32 beyond; the
    largest magnitudes sit in the last columns so the widest indices are used."""
    backend, device = backend_device
    seed = seed_of("rows-index-dtype", columns)
    x = make_tensor("normal", columns, torch.float16, seed).reshape(1, columns)
    x[0, -3:] = torch.tensor([300.0, -400.0, 500.0])
    ref = check_rows(backend, device, x, 5, what=f"D={columns}")
    assert ref.indices.dtype == index_dtype
    assert ref.indices[0, -3:].tolist() == [columns - 3, columns - 2, columns - 1]


def test_compress_rows_nan_rows(backend_device):
    """Hand-written ranking: NaN above +inf above finite, -0 == +0, ties to the lower column."""
    backend, device = backend_device
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, nan, nan, nan, nan],
                      [1.0, nan, -inf, 2.0, nan],
                      [-0.0, 0.0, -0.0, 0.0, -0.0],
                      [3.0, -3.0, 1.0, 3.0, -3.0],
                      [1e-40, -2e-40, 0.0, inf, -1e-45]])
    ref = check_rows(backend, device, x, 3, what="hand-written")
    assert ref.indices.tolist() == [[0, 1, 2], [1, 2, 4], [0, 1, 2], [0, 1, 3], [0, 1, 3]]


@pytest.mark.parametrize("value_dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
def test_compress_rows_saturates(backend_device, value_dtype):
    """A finite value never becomes inf on a 16-bit wire; inf and NaN pass."""
    backend, device = backend_device
    seed = seed_of("rows-saturate", value_dtype)
    x = make_tensor("wide", 3 * 40, torch.float32, seed).reshape(3, 40)
    x[0, :4] = torch.tensor([7e4, -3.4e38, float("inf"), float("nan")])
    ref = check_rows(backend, device, x, 10, value_dtype=value_dtype, what="saturation")
    finite = torch.isfinite(torch.gather(x, 1, ref.indices.long()))
    assert torch.isfinite(ref.values.float()[finite]).all()


@pytest.mark.parametrize("x_dtype", (torch.bfloat16, torch.float32), ids=dtype_id)
def test_bf16_subnormals_rows(backend_device, x_dtype):
    """bf16 subnormals are ranked and sent unchanged on a bf16 wire."""
    backend, device = backend_device
    x = oracle.bf16_subnormals().to(x_dtype).reshape(4, 64)
    check_rows(backend, device, x, 20, value_dtype=torch.bfloat16, what="bf16 subnormals")


# ------------------------------------------------------------------------------ decompress, gather

def _oracle_payload(rows, columns, k, dtype, seed):
    """A RowPayload built by the oracle (not by compress_rows)."""
    x = make_tensor("specials", rows * columns, dtype, seed).reshape(rows, columns)
    indices, values = oracle.compress_rows(x, k)
    index_dtype = torch.int16 if columns <= 32768 else torch.int32
    return RowPayload(torch.from_numpy(indices).to(index_dtype), values, (rows, columns), dtype)


def _on(p: RowPayload, device) -> RowPayload:
    return RowPayload(p.indices.to(device), p.values.to(device), p.shape, p.dtype)


@pytest.mark.parametrize("out_dtype", (None,) + DTYPES,
                         ids=lambda d: "new" if d is None else dtype_id(d))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows,columns,k", [(1, 1, 1), (3, 17, 5), (2, 5000, 4500), (4, 9, 9)])
def test_decompress_rows(backend_device, rows, columns, k, dtype, out_dtype):
    backend, device = backend_device
    seed = seed_of("decompress-rows", rows, columns, k, dtype, out_dtype)
    p = _oracle_payload(rows, columns, k, dtype, seed)
    want = oracle.decompress_rows(p.indices.long().numpy(), p.values, p.shape,
                                  out_dtype or dtype)
    results = {}
    for be, dev in (("torch", "cpu"), (backend, device)):
        out = None
        if out_dtype is not None:  # overwritten entirely, whatever it held
            out = make_tensor("normal", rows * columns, out_dtype, seed).reshape(rows, columns)
            out = out.to(dev)
        results[be, dev] = dct_kernels.decompress_rows(_on(p, dev), out=out, backend=be).cpu()
    assert_bitwise_equal(results["torch", "cpu"], want, "reference vs oracle")
    assert_bitwise_equal(results[backend, device], results["torch", "cpu"],
                         f"{backend}-{device} vs reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rows,columns,k", [(1, 1, 1), (3, 17, 5), (2, 5000, 4500)])
def test_gather_rows(backend_device, rows, columns, k, dtype):
    """gather_rows(y, p) == y.gather(1, p.indices.long())."""
    backend, device = backend_device
    seed = seed_of("gather-rows", rows, columns, k, dtype)
    p = _oracle_payload(rows, columns, k, torch.float32, seed)
    y = make_tensor("specials", rows * columns, dtype, seed + 1).reshape(rows, columns)
    want = torch.from_numpy(np.take_along_axis(y.float().numpy(), p.indices.long().numpy(), 1))
    ref = dct_kernels.gather_rows(y, p, backend="torch")
    assert_bitwise_equal(ref, want.to(dtype), "reference vs take_along_axis")
    assert_bitwise_equal(ref, y.gather(1, p.indices.long()), "reference vs torch.gather")
    got = dct_kernels.gather_rows(y.to(device), _on(p, device), backend=backend)
    assert_bitwise_equal(got.cpu(), ref, f"{backend}-{device} vs reference")


def test_rows_skip_out_of_range_indices(backend_device):
    """A hand-made RowPayload with indices outside [0, D): decompress_rows never writes them
    (guards around out stay unchanged) and gather_rows gives 0 there."""
    backend, device = backend_device
    rows, columns = 3, 10
    indices = torch.tensor([[0, 4, 10], [-1, 2, 9], [3, 32767, -32768]], dtype=torch.int16)
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    p = RowPayload(indices, values, (rows, columns), torch.float32)
    want = torch.zeros(rows, columns)
    want[0, 0], want[0, 4], want[1, 2], want[1, 9], want[2, 3] = 1.0, 2.0, 5.0, 6.0, 7.0
    y = torch.arange(1.0, 31.0).reshape(rows, columns)
    want_gather = torch.tensor([[1.0, 5.0, 0.0], [0.0, 13.0, 20.0], [24.0, 0.0, 0.0]])
    for be, dev in (("torch", "cpu"), (backend, device)):
        big, flat = oracle.guarded(rows * columns, torch.float32, dev, seed_of("rows-guard"))
        before = big.cpu().clone()
        dct_kernels.decompress_rows(_on(p, dev), out=flat.view(rows, columns), backend=be)
        guards, result = oracle.unguard(big)
        assert_bitwise_equal(result.view(rows, columns), want, f"{be}-{dev} out")
        assert_bitwise_equal(guards, oracle.unguard(before)[0], f"{be}-{dev}: written outside out")
        got = dct_kernels.gather_rows(y.to(dev), _on(p, dev), backend=be)
        assert_bitwise_equal(got.cpu(), want_gather, f"{be}-{dev} gather")


def test_bf16_subnormals_decompress_rows(backend_device):
    """bf16 subnormal values land unchanged in a bf16 and an fp32 out."""
    backend, device = backend_device
    values = oracle.bf16_subnormals().reshape(4, 64)
    indices = torch.arange(0, 128, 2, dtype=torch.int16).repeat(4, 1)
    p = RowPayload(indices, values, (4, 128), torch.bfloat16)
    for out_dtype in (torch.bfloat16, torch.float32):
        want = oracle.decompress_rows(indices.long().numpy(), values, p.shape, out_dtype)
        ref = dct_kernels.decompress_rows(p, out=torch.empty(4, 128, dtype=out_dtype),
                                          backend="torch")
        assert_bitwise_equal(ref, want, f"reference vs oracle, out {out_dtype}")
        out = torch.empty(4, 128, dtype=out_dtype, device=device)
        dct_kernels.decompress_rows(_on(p, device), out=out, backend=backend)
        assert_bitwise_equal(out.cpu(), ref, f"{backend}-{device} vs reference, out {out_dtype}")
