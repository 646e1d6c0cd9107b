"""GPU only: compress at sizes that span thousands of tiles (the cross-tile order of the look-back
scan), with and without a residual, segmented, and its determinism across runs.
"""

import pytest
import torch

import dct_kernels as dk
from gpu_data import DEVICE, device_backends, gpu_data
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", device_backends())
@pytest.mark.parametrize("dtype,value_dtype", [(torch.float32, None),
                                               (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, None),
                                               (torch.float16, torch.float16)])
def test_compress_large_with_residual(backend, dtype, value_dtype):
    n = (1 << 24) + 4097
    x = gpu_data(n, dtype, seed=3)
    residual = gpu_data(n, torch.float32, seed=4, specials=False) * 0.01
    threshold = dk.select_threshold(x.float() + residual, n // 100, backend="torch")
    for capacity in (None, n // 200, n // 50):
        r_dev, r_ref = residual.clone(), residual.clone()
        got = dk.compress(x, threshold, residual=r_dev, capacity=capacity,
                          value_dtype=value_dtype, backend=backend)
        want = dk.compress(x, threshold, residual=r_ref, capacity=capacity,
                           value_dtype=value_dtype, backend="torch")
        assert_bitwise_equal(got.buffer, want.buffer, f"buffer capacity={capacity}")
        assert_bitwise_equal(r_dev, r_ref, f"residual capacity={capacity}")


@pytest.mark.parametrize("backend", device_backends())
def test_compress_segmented_large(backend):
    n = (1 << 23) + 1
    x = gpu_data(n, torch.float32, seed=5)
    offsets = torch.tensor([0, 1, 1000, 4096, 70000, 1 << 20, n], dtype=torch.int64)
    ks = torch.clamp(offsets[1:] - offsets[:-1], max=37)
    thresholds = dk.select_threshold(x, ks, segments=offsets, backend="torch")
    residual = torch.zeros(n, device=DEVICE)
    got = dk.compress(x, thresholds, segments=offsets, residual=residual.clone(),
                      capacity=200, backend=backend)
    want = dk.compress(x, thresholds, segments=offsets, residual=residual.clone(),
                       capacity=200, backend="torch")
    assert_bitwise_equal(got.buffer, want.buffer)


@pytest.mark.parametrize("backend", device_backends())
def test_compress_is_deterministic(backend):
    n = (1 << 24) + 3
    x = gpu_data(n, torch.float32, seed=6)
    threshold = dk.select_threshold(x, n // 20, backend=backend)
    first = dk.compress(x, threshold, capacity=n // 10, backend=backend).buffer
    for _ in range(4):
        again = dk.compress(x, threshold, capacity=n // 10, backend=backend).buffer
        assert_bitwise_equal(again, first)
