"""GPU-only checks: sizes that span thousands of blocks (cross-block ordering of the look-back
scan and the histogram passes), compiled-kernel edge cases (denormals, NaN, inf), determinism
across runs, and the absence of host synchronization on the fixed-capacity paths.

Every device backend is compared bitwise with the torch reference on the same device.
"""

import pytest
import torch

import dct_kernels as dk
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _device_backends():
    return [b for b in ("triton", "cuda") if dk.available_backends()[b] == "available"]


def _data(n, dtype, seed, specials=True):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, device=DEVICE, generator=g)
    if specials:
        pick = torch.randint(0, n, (64,), device=DEVICE, generator=g)
        x[pick[:8]] = float("nan")
        x[pick[8:16]] = float("inf")
        x[pick[16:24]] = -float("inf")
        x[pick[24:32]] = -0.0
        tiny = torch.finfo(dtype).tiny
        x[pick[32:48]] = tiny * torch.rand(16, device=DEVICE, generator=g)  # denormals
    x[n // 3:n // 3 + 5000] = 0.75  # a run of ties across block boundaries
    return x.to(dtype)


@pytest.mark.parametrize("backend", _device_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_large(backend, dtype):
    n = (1 << 24) + 12345
    x = _data(n, dtype, seed=1)
    for k in (1, 97, n // 100, n - 3, n):
        got = dk.select_threshold(x, k, backend=backend)
        want = dk.select_threshold(x, k, backend="torch")
        assert_bitwise_equal(got, want, f"k={k}")
        oracle = torch.topk(x.abs().float(), k).values[-1].to(dtype)
        assert_bitwise_equal(got, oracle, f"topk k={k}")


@pytest.mark.parametrize("backend", _device_backends())
def test_select_segmented_large(backend):
    n = (1 << 22) + 7
    x = _data(n, torch.float32, seed=2)
    cuts = torch.sort(torch.randperm(n - 1, device="cpu")[:50] + 1).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]).to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    ks = torch.clamp((lengths.double() * 0.01).ceil().long(), min=1)
    got = dk.select_threshold(x, ks, segments=offsets, backend=backend)
    want = dk.select_threshold(x, ks, segments=offsets, backend="torch")
    assert_bitwise_equal(got, want)


def _select_cases(n, seed):
    """Inputs that drive the CUDA selection down each of its paths: a wide distribution (the
    sampled window holds), a moderately narrow one (the window does not fit its pool, but the
    deciding bucket does), a very narrow one (every level reads x again), and data whose
    large values sit only where an evenly spaced sample never looks."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    wide = torch.randn(n, device=DEVICE, generator=g)
    moderate = 1.0 + torch.rand(n, device=DEVICE, generator=g)
    narrow = 1.0 + 1e-6 * torch.rand(n, device=DEVICE, generator=g)
    hidden = torch.randn(n, device=DEVICE, generator=g)
    hidden[1::64] *= 1000.0
    return {"wide": wide, "moderate": moderate, "narrow": narrow, "hidden": hidden}


@pytest.mark.parametrize("backend", _device_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_every_path(backend, dtype):
    n = (1 << 22) + 77
    for name, x in _select_cases(n, seed=40).items():
        x = x.to(dtype)
        for k in (1, 3, n // 64, n // 100, n // 2, n - 1, n):
            got = dk.select_threshold(x, k, backend=backend)
            want = dk.select_threshold(x, k, backend="torch")
            assert_bitwise_equal(got, want, f"{name} k={k}")
        offsets = torch.tensor([0, 1, 1000, 70000, n // 2, n], dtype=torch.int64)
        lengths = offsets[1:] - offsets[:-1]
        for ks in (torch.ones_like(lengths), (lengths + 63) // 64, lengths):
            got = dk.select_threshold(x, ks, segments=offsets, backend=backend)
            want = dk.select_threshold(x, ks, segments=offsets, backend="torch")
            assert_bitwise_equal(got, want, f"{name} segmented ks={ks.tolist()}")


@pytest.mark.parametrize("backend", _device_backends())
def test_decompress_unaligned_buffer(backend):
    n = (1 << 20) + 3
    x = _data(n, torch.float32, seed=41)
    payload = dk.compress(x, 1.5, capacity=n // 8, backend="torch")
    for shift in (4, 8, 12):
        holder = torch.zeros(payload.nbytes + 16, dtype=torch.uint8, device=DEVICE)
        view = holder[shift:shift + payload.nbytes]
        view.copy_(payload.buffer)
        moved = dk.SparsePayload.from_buffer(view)
        got = dk.decompress(moved, backend=backend)
        want = dk.decompress(payload, backend="torch")
        assert_bitwise_equal(got, want, f"buffer shifted by {shift} bytes")
        flat = torch.zeros(2 * payload.nbytes + 16, dtype=torch.uint8, device=DEVICE)
        rows = flat[shift:shift + 2 * payload.nbytes].view(2, payload.nbytes)
        rows.copy_(payload.buffer.expand(2, -1))
        out_got = torch.empty(n, device=DEVICE)
        out_want = torch.empty(n, device=DEVICE)
        dk.decompress_many(rows, out=out_got, backend=backend)
        dk.decompress_many(rows.clone(), out=out_want, backend="torch")
        assert_bitwise_equal(out_got, out_want, f"rows shifted by {shift} bytes")


@pytest.mark.parametrize("backend", _device_backends())
@pytest.mark.parametrize("dtype,value_dtype", [(torch.float32, None),
                                               (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, None),
                                               (torch.float16, torch.float16)])
def test_compress_large_with_residual(backend, dtype, value_dtype):
    n = (1 << 24) + 4097
    x = _data(n, dtype, seed=3)
    residual = _data(n, torch.float32, seed=4, specials=False) * 0.01
    threshold = dk.select_threshold(x.float() + residual, n // 100, backend="torch")
    for capacity in (None, n // 200, n // 50):
        r_dev, r_ref = residual.clone(), residual.clone()
        got = dk.compress(x, threshold, residual=r_dev, capacity=capacity,
                          value_dtype=value_dtype, backend=backend)
        want = dk.compress(x, threshold, residual=r_ref, capacity=capacity,
                           value_dtype=value_dtype, backend="torch")
        assert_bitwise_equal(got.buffer, want.buffer, f"buffer capacity={capacity}")
        assert_bitwise_equal(r_dev, r_ref, f"residual capacity={capacity}")


@pytest.mark.parametrize("backend", _device_backends())
def test_compress_segmented_large(backend):
    n = (1 << 23) + 1
    x = _data(n, torch.float32, seed=5)
    offsets = torch.tensor([0, 1, 1000, 4096, 70000, 1 << 20, n], dtype=torch.int64)
    ks = torch.clamp(offsets[1:] - offsets[:-1], max=37)
    thresholds = dk.select_threshold(x, ks, segments=offsets, backend="torch")
    residual = torch.zeros(n, device=DEVICE)
    got = dk.compress(x, thresholds, segments=offsets, residual=residual.clone(),
                      capacity=200, backend=backend)
    want = dk.compress(x, thresholds, segments=offsets, residual=residual.clone(),
                       capacity=200, backend="torch")
    assert_bitwise_equal(got.buffer, want.buffer)


@pytest.mark.parametrize("backend", _device_backends())
def test_compress_is_deterministic(backend):
    n = (1 << 24) + 3
    x = _data(n, torch.float32, seed=6)
    threshold = dk.select_threshold(x, n // 20, backend=backend)
    first = dk.compress(x, threshold, capacity=n // 10, backend=backend).buffer
    for _ in range(4):
        again = dk.compress(x, threshold, capacity=n // 10, backend=backend).buffer
        assert_bitwise_equal(again, first)


@pytest.mark.parametrize("backend", _device_backends())
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_decompress_many_large(backend, out_dtype):
    n = (1 << 24) + 5
    payloads = []
    for w in range(4):
        x = _data(n, torch.float32, seed=10 + w)
        payloads.append(dk.compress(x, 2.5, capacity=n // 50, backend="torch"))
    buffers = torch.stack([p.buffer for p in payloads])
    for accumulate in (False, True):
        for average in (False, True):
            base = _data(n, out_dtype, seed=20, specials=False)
            got, want = base.clone(), base.clone()
            dk.decompress_many(buffers, out=got, accumulate=accumulate, average=average,
                               backend=backend)
            dk.decompress_many(buffers, out=want, accumulate=accumulate, average=average,
                               backend="torch")
            assert_bitwise_equal(got, want, f"accumulate={accumulate} average={average}")


@pytest.mark.parametrize("backend", _device_backends())
def test_decompress_validate_false_guards(backend):
    n = 1 << 20
    x = _data(n, torch.float32, seed=30)
    payload = dk.compress(x, 2.0, capacity=n // 20, backend="torch")
    idx = payload.indices
    idx[5] = n + 100          # out of range
    idx[9] = -7               # negative
    idx[20] = idx[19]         # not ascending
    guard = 4096
    space = torch.randn(n + 2 * guard, device=DEVICE)
    before = space.clone()
    out = space[guard:guard + n]
    errors = torch.zeros((), dtype=torch.int32, device=DEVICE)
    dk.decompress(payload, out=out, validate=False, errors=errors, backend=backend)
    assert_bitwise_equal(space[:guard], before[:guard], "guard before")
    assert_bitwise_equal(space[guard + n:], before[guard + n:], "guard after")
    ref = torch.empty(n, device=DEVICE)
    ref_errors = torch.zeros((), dtype=torch.int32, device=DEVICE)
    dk.decompress(payload, out=ref, validate=False, errors=ref_errors, backend="torch")
    assert_bitwise_equal(out, ref)
    assert int(errors) == int(ref_errors) > 0


@pytest.mark.parametrize("backend", _device_backends())
@pytest.mark.parametrize("columns", [512, 4096, 5000, 40000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_gpu(backend, columns, dtype):
    rows = 64
    x = _data(rows * columns, dtype, seed=columns).view(rows, columns)
    for k in (1, max(1, columns // 20), columns):
        got = dk.compress_rows(x, k, backend=backend)
        want = dk.compress_rows(x, k, backend="torch")
        assert_bitwise_equal(got.indices, want.indices, f"indices k={k}")
        assert_bitwise_equal(got.values, want.values, f"values k={k}")
        assert_bitwise_equal(dk.decompress_rows(got, backend=backend),
                             dk.decompress_rows(got, backend="torch"))
        y = _data(rows * columns, dtype, seed=columns + 1).view(rows, columns)
        assert_bitwise_equal(dk.gather_rows(y, got, backend=backend),
                             dk.gather_rows(y, got, backend="torch"))


@pytest.mark.parametrize("backend", _device_backends())
def test_no_host_sync_on_fixed_capacity_paths(backend):
    n = (1 << 22) + 1
    x = _data(n, torch.float32, seed=40)
    residual = torch.zeros(n, device=DEVICE)
    buffers_payloads = []
    errors = torch.zeros((), dtype=torch.int32, device=DEVICE)
    rows_x = x[:256 * 1024].view(256, 1024)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        threshold = dk.select_threshold(x, n // 100, backend=backend)
        for _ in range(2):
            buffers_payloads.append(dk.compress(x, threshold, residual=residual,
                                                capacity=n // 50, backend=backend))
        buffers = torch.stack([p.buffer for p in buffers_payloads])
        out = torch.empty(n, device=DEVICE)
        dk.decompress(buffers_payloads[0], out=out, validate=False, errors=errors,
                      backend=backend)
        dk.decompress_many(buffers, out=out, average=True, validate=False,
                           capacity=n // 50, value_dtype=torch.float32, errors=errors,
                           backend=backend)
        p = dk.compress_rows(rows_x, 51, backend=backend)
        dk.decompress_rows(p, backend=backend)
        dk.gather_rows(rows_x, p, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(errors) == 0
    assert int(buffers_payloads[0].count) > 0


@pytest.mark.parametrize("backend", _device_backends())
def test_decompress_many_dense_and_corrupted_rows(backend):
    """10% kept (many chunks per merge tile), one row corrupted: same bits as the reference,
    nothing written outside out, the same errors counted, the same result on a rerun."""
    n = (1 << 22) + 77
    payloads = [dk.compress(_data(n, torch.float32, seed=50 + w), 1.2, capacity=n // 4,
                            backend="torch") for w in range(3)]
    buffers = torch.stack([p.buffer for p in payloads])
    row = buffers[1, 32:32 + 4 * (n // 4)].view(torch.int32)
    row[10] = n + 5
    row[1000:1010] = row[1000:1010].flip(0)
    guard = 1 << 12
    results = []
    for b in (backend, backend, "torch"):
        space = torch.randn(n + 2 * guard, device=DEVICE)
        before = space.clone()
        errors = torch.zeros((), dtype=torch.int32, device=DEVICE)
        out = space[guard:guard + n]
        dk.decompress_many(buffers, out=out, average=True, validate=False, errors=errors,
                           backend=b)
        assert_bitwise_equal(space[:guard], before[:guard], f"{b} guard before")
        assert_bitwise_equal(space[guard + n:], before[guard + n:], f"{b} guard after")
        results.append((out.clone(), int(errors)))
    assert_bitwise_equal(results[0][0], results[2][0], "vs reference")
    assert_bitwise_equal(results[1][0], results[0][0], "rerun")
    assert results[0][1] == results[1][1] == results[2][1] > 0


@pytest.mark.parametrize("backend", _device_backends())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1])
def test_decompress_many_sparse_with_a_dense_tile(backend, out_dtype, offset):
    """About 1% kept (the merge's small stage) with one fully kept 4096-output run per rank
    (more entries in a tile than the stage holds), five ranks (a divisor that is not a power of
    two), out aligned and not, a last partial tile: same bits as the reference."""
    n = (1 << 21) + 3
    ranks = 5
    payloads = []
    for w in range(ranks):
        x = _data(n, torch.float32, seed=60 + w, specials=False)
        start = 4096 * (3 + w) + 100 * w
        x[start:start + 4096] = 10.0 + x[start:start + 4096]
        payloads.append(dk.compress(x, 2.5, capacity=n // 60, backend="torch"))
        assert int(payloads[-1].overflow) == 0
    buffers = torch.stack([p.buffer for p in payloads])
    for accumulate in (False, True):
        base = _data(n + offset, out_dtype, seed=70, specials=False)
        got, want = base.clone(), base.clone()
        dk.decompress_many(buffers, out=got[offset:], accumulate=accumulate, average=True,
                           backend=backend)
        dk.decompress_many(buffers, out=want[offset:], accumulate=accumulate, average=True,
                           backend="torch")
        assert_bitwise_equal(got, want, f"accumulate={accumulate}")
