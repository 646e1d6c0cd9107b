"""GPU only: select_threshold at sizes that span thousands of blocks (the histogram passes and
their cross-block reductions), and every path of the CUDA selection (sampled window, pooled
candidates, extra passes over x), segmented and not.
"""

import pytest
import torch

import dct_kernels as dk
from gpu_data import DEVICE, DTYPES, device_backends, gpu_data
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_large(backend, dtype):
    n = (1 << 24) + 12345
    x = gpu_data(n, dtype, seed=1)
    for k in (1, 97, n // 100, n - 3, n):
        got = dk.select_threshold(x, k, backend=backend)
        want = dk.select_threshold(x, k, backend="torch")
        assert_bitwise_equal(got, want, f"k={k}")
        oracle = torch.topk(x.abs().float(), k).values[-1].to(dtype)
        assert_bitwise_equal(got, oracle, f"topk k={k}")


@pytest.mark.parametrize("backend", device_backends())
def test_select_segmented_large(backend):
    n = (1 << 22) + 7
    x = gpu_data(n, torch.float32, seed=2)
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


@pytest.mark.parametrize("backend", device_backends())
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
