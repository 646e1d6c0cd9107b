"""select_threshold: the exact k-th largest magnitude, flat and segmented.

Each case checks the torch reference against the numpy oracle (and against ``torch.topk``, the
contract's own definition), then the backend under test against the reference, bit for bit.
"""

import numpy as np
import pytest
import torch

import dct_kernels
import oracle
from helpers import assert_bitwise_equal
from oracle import DTYPES, dtype_id, make_tensor, seed_of

# Around the Triton work-item size (16384) and its loop step (4096).
SIZES = (1, 2, 17, 4095, 4097, 16385)
KINDS = ("normal", "ties", "specials", "equal", "narrow", "wide")


def _ks(n: int, seed: int):
    """k = 1, k = n, and one k drawn from the seed."""
    return sorted({1, n, 1 + seed % n})


def _check_select(backend, device, x, k, what, segments=None):
    """Reference vs the backend under test; returns the reference's answer."""
    reference = dct_kernels.select_threshold(x, k, segments=segments, backend="torch")
    seg_dev = None if segments is None else segments.to(device)
    k_dev = k.to(device) if isinstance(k, torch.Tensor) else k
    actual = dct_kernels.select_threshold(x.to(device), k_dev, segments=seg_dev, backend=backend)
    assert actual.device.type == torch.device(device).type, what
    assert_bitwise_equal(actual.cpu(), reference, f"{backend}-{device} vs reference, {what}")
    return reference


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_select_matches_oracle(backend_device, dtype, kind, n):
    backend, device = backend_device
    seed = seed_of("select", dtype, kind, n)
    x = make_tensor(kind, n, dtype, seed)
    for k in _ks(n, seed):
        what = f"{kind} n={n} k={k} {dtype}"
        reference = _check_select(backend, device, x, k, what)
        assert reference.dim() == 0
        assert_bitwise_equal(reference, oracle.kth_largest_magnitude(x, k), f"oracle, {what}")
        assert_bitwise_equal(reference, oracle.topk_threshold(x, k), f"topk, {what}")


@pytest.mark.parametrize("dtype,kind", [(torch.float32, "specials"), (torch.float16, "ties"),
                                        (torch.bfloat16, "normal")],
                         ids=("fp32-specials", "fp16-ties", "bf16-normal"))
def test_select_large(backend_device, dtype, kind):
    """Above 1e5 elements: several work items per pass."""
    backend, device = backend_device
    n = 100003
    seed = seed_of("select-large", dtype, kind)
    x = make_tensor(kind, n, dtype, seed)
    k = 1 + seed % (n // 50)
    reference = _check_select(backend, device, x, k, f"{kind} n={n} k={k}")
    assert_bitwise_equal(reference, oracle.kth_largest_magnitude(x, k), "oracle")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_select_any_shape(backend_device, dtype):
    """A non-contiguous 3-D x is flattened; its threshold is that of its values."""
    backend, device = backend_device
    seed = seed_of("select-shape", dtype)
    x = make_tensor("specials", 7 * 13 * 11, dtype, seed).reshape(7, 13, 11).transpose(0, 2)
    k = 1 + seed % x.numel()
    reference = _check_select(backend, device, x, k, "3-D")
    assert_bitwise_equal(reference, oracle.kth_largest_magnitude(x, k), "oracle")


def test_select_orders_nan_inf_and_signed_zero(backend_device):
    """Hand-written: NaN ranks above +inf, -inf equals +inf, -0 equals +0, denormals count."""
    backend, device = backend_device
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([0.0, -inf, 1e-40, nan, -0.0, 2.0, inf, -1e-40], dtype=torch.float32)
    expected = [nan, inf, inf, 2.0, 1e-40, 1e-40, 0.0, 0.0]
    for k, value in enumerate(expected, start=1):
        reference = _check_select(backend, device, x, k, f"k={k}")
        assert_bitwise_equal(reference, torch.tensor(value, dtype=torch.float32), f"k={k}")
    # The k-th largest of -0 and +0 is +0 (a magnitude), never -0.
    assert_bitwise_equal(_check_select(backend, device, torch.tensor([-0.0, -0.0]), 2, "zeros"),
                         torch.tensor(0.0), "-0")


# Segmented selection: "varied" has length-1 segments (so an int k must be 1); "long" has a
# segment spanning two Triton work items; "min8" has every segment at least 8 long.
SEGMENT_LAYOUTS = ("varied", "long", "min8")


def _segments(layout: str, seed: int):
    if layout == "varied":
        return oracle.make_segments(3000, seed)
    if layout == "long":
        return [0, 1, 16390] + [o + 16390 for o in oracle.make_segments(700, seed)[1:]]
    rng = np.random.default_rng(seed)
    return [0] + np.cumsum(rng.integers(8, 600, 12)).tolist()


@pytest.mark.parametrize("k_form", ("int", "tensor"))
@pytest.mark.parametrize("layout", SEGMENT_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_segmented_select(backend_device, dtype, layout, k_form):
    backend, device = backend_device
    seed = seed_of("segmented-select", dtype, layout, k_form)
    offsets = _segments(layout, seed)
    lengths = np.diff(offsets)
    kind = ("normal", "ties", "specials")[seed % 3]
    x = make_tensor(kind, offsets[-1], dtype, seed)
    rng = np.random.default_rng(seed)
    if k_form == "int":
        k = int(lengths.min())
        ks = [k] * len(lengths)
    else:
        ks = [int(rng.integers(1, length + 1)) for length in lengths]
        ks[0], ks[-1] = 1, int(lengths[-1])  # k = 1 and k = segment length both occur
        k = torch.tensor(ks, dtype=(torch.int64, torch.int32)[seed % 2])
    segments = torch.tensor(offsets, dtype=torch.int64)
    reference = _check_select(backend, device, x, k, f"{layout} {k_form}", segments)
    assert reference.shape == (len(lengths),)
    assert_bitwise_equal(reference, oracle.segmented_kth(x, offsets, ks), "oracle")


def test_segmented_select_follows_c_order(backend_device):
    """Segments index the C-order flattening of a non-contiguous x."""
    backend, device = backend_device
    seed = seed_of("segmented-c-order")
    x = make_tensor("normal", 40 * 30, torch.float32, seed).reshape(40, 30).t()
    offsets = [0, 1, 31, 600, 1199, 1200]
    segments = torch.tensor(offsets, dtype=torch.int64)
    reference = _check_select(backend, device, x, 1, "c-order", segments)
    assert_bitwise_equal(reference, oracle.segmented_kth(x, offsets, [1] * 5), "oracle")


def test_segmented_select_with_segments_object(backend_device):
    """A ``Segments`` object (validated once) and a list of k give what offsets and a k tensor
    give; a Segments of another numel is refused naming ``segments``."""
    backend, device = backend_device
    seed = seed_of("segmented-select-object")
    offsets = _segments("varied", seed)
    x = make_tensor("ties", offsets[-1], torch.float32, seed)
    ks = [max(1, (b - a) // 3) for a, b in zip(offsets[:-1], offsets[1:])]
    segments = dct_kernels.ops.Segments(offsets, device=device)
    got = dct_kernels.select_threshold(x.to(device), ks, segments=segments, backend=backend)
    assert_bitwise_equal(got.cpu(), oracle.segmented_kth(x, offsets, ks), "oracle")
    with pytest.raises(ValueError, match="segments"):
        dct_kernels.select_threshold(x[:-1], ks, segments=dct_kernels.ops.Segments(offsets))
    with pytest.raises(ValueError, match="k"):
        dct_kernels.select_threshold(x, ks[:-1], segments=dct_kernels.ops.Segments(offsets))
