"""GPU only: decompress_many at sizes that span thousands of merge tiles, with dense and corrupted
rows, and sparse payloads with one dense tile (the merge's small stage overflowing to the direct
path).
"""

import pytest
import torch

import dct_kernels as dk
from gpu_data import DEVICE, DTYPES, device_backends, gpu_data
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", device_backends())
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_decompress_many_large(backend, out_dtype):
    n = (1 << 24) + 5
    payloads = []
    for w in range(4):
        x = gpu_data(n, torch.float32, seed=10 + w)
        payloads.append(dk.compress(x, 2.5, capacity=n // 50, backend="torch"))
    buffers = torch.stack([p.buffer for p in payloads])
    for accumulate in (False, True):
        for average in (False, True):
            base = gpu_data(n, out_dtype, seed=20, specials=False)
            got, want = base.clone(), base.clone()
            dk.decompress_many(buffers, out=got, accumulate=accumulate, average=average,
                               backend=backend)
            dk.decompress_many(buffers, out=want, accumulate=accumulate, average=average,
                               backend="torch")
            assert_bitwise_equal(got, want, f"accumulate={accumulate} average={average}")


@pytest.mark.parametrize("backend", device_backends())
def test_decompress_many_dense_and_corrupted_rows(backend):
    """10% kept (many chunks per merge tile), one row corrupted: same bits as the reference,
    nothing written outside out, the same errors counted, the same result on a rerun."""
    n = (1 << 22) + 77
    payloads = [dk.compress(gpu_data(n, torch.float32, seed=50 + w), 1.2, capacity=n // 4,
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


@pytest.mark.parametrize("backend", device_backends())
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
        x = gpu_data(n, torch.float32, seed=60 + w, specials=False)
        start = 4096 * (3 + w) + 100 * w
        x[start:start + 4096] = 10.0 + x[start:start + 4096]
        payloads.append(dk.compress(x, 2.5, capacity=n // 60, backend="torch"))
        assert int(payloads[-1].overflow) == 0
    buffers = torch.stack([p.buffer for p in payloads])
    for accumulate in (False, True):
        base = gpu_data(n + offset, out_dtype, seed=70, specials=False)
        got, want = base.clone(), base.clone()
        dk.decompress_many(buffers, out=got[offset:], accumulate=accumulate, average=True,
                           backend=backend)
        dk.decompress_many(buffers, out=want[offset:], accumulate=accumulate, average=True,
                           backend="torch")
        assert_bitwise_equal(got, want, f"accumulate={accumulate}")
