"""GPU only: decompress of buffers that are not 16-byte aligned and of corrupted payloads with
validate=False (nothing outside out is written).
"""

import pytest
import torch

import dct_kernels as dk
from gpu_data import DEVICE, device_backends, gpu_data
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", device_backends())
def test_decompress_unaligned_buffer(backend):
    n = (1 << 20) + 3
    x = gpu_data(n, torch.float32, seed=41)
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


@pytest.mark.parametrize("backend", device_backends())
def test_decompress_validate_false_guards(backend):
    n = 1 << 20
    x = gpu_data(n, torch.float32, seed=30)
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
