"""compress: keep rule, index order, fixed capacity and overflow, wire saturation, residual.

Each case runs the torch reference and checks it against ``oracle.compress`` (header bytes, the
live slots, the residual), then checks the backend under test against the reference bit for
bit. Slots at or past ``count`` are unspecified by the contract and are not compared across
backends (but are compared run to run in the determinism test).
"""

import math

import numpy as np
import pytest
import torch

import dct_kernels
import oracle
from helpers import assert_bitwise_equal
from oracle import DTYPES, dtype_id, make_tensor, seed_of

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------ helpers

def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _run(backend, device, x, threshold, *, residual=None, segments=None, **kw):
    """compress on copies of the inputs on ``device``; (payload, residual after) on the CPU."""
    res = residual.clone().to(device) if residual is not None else None
    payload = dct_kernels.compress(x.to(device), _to(threshold, device), residual=res,
                                   segments=_to(segments, device), backend=backend, **kw)
    if res is not None:
        res = res.cpu()
    return payload, res


def _live(payload):
    """The specified part of a payload: header bytes, then the first ``count`` slots."""
    count = int(payload.count)
    return (bytes(payload.buffer[:32].cpu().numpy()), payload.indices[:count].cpu(),
            payload.values[:count].cpu())


def _check_against_oracle(payload, residual, expected: oracle.Compressed, x, capacity,
                          value_dtype, what):
    value_dtype = value_dtype or x.dtype
    capacity = expected.count if capacity is None else capacity
    head = oracle.header(x.numel(), capacity, value_dtype, expected.count, expected.overflow)
    assert bytes(payload.buffer[:32].cpu().numpy()) == head, f"header, {what}"
    assert payload.buffer.numel() == oracle.layout(capacity, value_dtype)[1], what
    assert (payload.shape, payload.dtype) == (tuple(x.shape), x.dtype), what
    decoded = oracle.decode(payload.buffer)
    np.testing.assert_array_equal(decoded.indices[:expected.count], expected.indices,
                                  err_msg=f"indices, {what}")
    assert_bitwise_equal(payload.values[:expected.count].cpu(), expected.values,
                         f"values, {what}")
    if expected.residual is not None:
        assert_bitwise_equal(residual.reshape(-1), torch.from_numpy(expected.residual),
                             f"residual, {what}")


def check_compress(backend, device, x, threshold, *, residual=None, segments=None,
                   capacity=None, value_dtype=None, what=""):
    """Reference vs oracle, then backend vs reference. Returns the oracle's answer."""
    offsets = None if segments is None else segments.tolist()
    expected = oracle.compress(x, threshold, offsets, residual, capacity, value_dtype)
    kw = dict(residual=residual, segments=segments, capacity=capacity, value_dtype=value_dtype)
    ref, ref_res = _run("torch", "cpu", x, threshold, **kw)
    _check_against_oracle(ref, ref_res, expected, x, capacity, value_dtype, f"reference {what}")
    got, got_res = _run(backend, device, x, threshold, **kw)
    assert got.buffer.device.type == torch.device(device).type
    assert got.buffer.numel() == ref.buffer.numel(), what
    (rh, ri, rv), (gh, gi, gv) = _live(ref), _live(got)
    assert gh == rh, f"{backend}-{device} header, {what}"
    assert_bitwise_equal(gi, ri, f"{backend}-{device} indices, {what}")
    assert_bitwise_equal(gv, rv, f"{backend}-{device} values, {what}")
    if residual is not None:
        assert_bitwise_equal(got_res, ref_res, f"{backend}-{device} residual, {what}")
        _check_nothing_lost(got_res, got, expected)
    return expected


def _check_nothing_lost(residual_after, payload, expected):
    """sent + residual == acc bit for bit where acc is finite (|acc| < 2^29 on an fp16 wire,
    as the contract bounds it); an inf/NaN that was sent leaves 0; the rest keeps acc.
    (Compared with assert_bitwise_equal: NaN payloads differ between CPU and GPU.)"""
    acc, res = torch.from_numpy(expected.acc), residual_after.reshape(-1).cpu()
    sent = torch.from_numpy(expected.indices)
    sent_values = payload.values[:expected.count].cpu().float()
    bound = 2.0 ** 29 if payload.value_dtype == torch.float16 else math.inf
    finite = torch.isfinite(acc[sent])
    checked = finite & (acc[sent].abs() < bound)
    assert_bitwise_equal((sent_values + res[sent])[checked], acc[sent][checked],
                         "sent + residual != acc")
    assert (res[sent][~finite] == 0).all(), "a sent inf/NaN must leave 0 in the residual"
    unsent = torch.ones(acc.numel(), dtype=torch.bool)
    unsent[sent] = False
    assert_bitwise_equal(res[unsent], acc[unsent], "unsent entries must keep acc")


def _quantile_threshold(acc_source: torch.Tensor, seed: int) -> float:
    """A realistic threshold: the magnitude ranked about 10% from the top."""
    k = 1 + seed % max(1, acc_source.numel() // 10)
    return float(oracle.kth_largest_magnitude(acc_source.float(), k))


def _kept_count(x, threshold, residual=None, offsets=None) -> int:
    """How many entries pass (by the oracle), to size capacities around it."""
    return oracle.compress(x, threshold, offsets, residual).count


# ------------------------------------------------------------------------------ sweeps

# scenario -> how the threshold, capacity, residual and wire dtype are chosen.
SCENARIOS = ("quantile", "quantile_tensor", "hair_above", "cap0", "overflow", "roomy",
             "negative", "zero", "nan", "inf", "residual", "residual_wide", "wire_fp16",
             "wire_bf16", "wire_fp32")


def _scenario(name, x, seed):
    """(threshold, residual, capacity, value_dtype) of a scenario."""
    residual = None
    if name.startswith("residual"):
        kind = "wide" if name == "residual_wide" else "normal"
        residual = make_tensor(kind, x.numel(), torch.float32, seed + 1)
    acc = x.float().reshape(-1) + (residual if residual is not None else 0.0)
    threshold = {"negative": -1.5, "zero": 0.0, "nan": NAN, "inf": INF}.get(name)
    if threshold is None:
        threshold = _quantile_threshold(acc, seed)
    if name == "quantile_tensor":
        threshold = torch.tensor(threshold, dtype=x.dtype)  # rounded to x.dtype, then fp32
    if name == "hair_above":
        # Rounds back to the same fp32 threshold, so entries equal to it still pass: the
        # comparison is in fp32, not in the Python float's precision.
        threshold = threshold * (1 + 1e-10)
    kept = _kept_count(x, threshold, residual)
    capacity = {"cap0": 0, "overflow": kept // 2, "roomy": kept + 37,
                "residual": kept // 2}.get(name)
    value_dtype = {"wire_fp16": torch.float16, "wire_bf16": torch.bfloat16,
                   "wire_fp32": torch.float32, "residual_wide": torch.float16}.get(name)
    return threshold, residual, capacity, value_dtype


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("n", (1, 2, 17, 4097))
@pytest.mark.parametrize("kind", ("normal", "ties", "specials", "equal", "wide"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compress_matches_oracle(backend_device, dtype, kind, n, scenario):
    backend, device = backend_device
    seed = seed_of("compress", dtype, kind, n, scenario)
    x = make_tensor(kind, n, dtype, seed)
    threshold, residual, capacity, value_dtype = _scenario(scenario, x, seed)
    check_compress(backend, device, x, threshold, residual=residual, capacity=capacity,
                   value_dtype=value_dtype, what=f"{scenario} {kind} n={n}")


@pytest.mark.parametrize("n,dtype,kind,scenario", [
    (100003, torch.float32, "specials", "residual"),
    (100003, torch.bfloat16, "normal", "overflow"),
    (16385, torch.float16, "ties", "quantile"),
    (8192, torch.float32, "wide", "residual_wide"),
    (4095, torch.bfloat16, "specials", "roomy"),
], ids=lambda p: str(p).replace("torch.", ""))
def test_compress_large(backend_device, n, dtype, kind, scenario):
    """Many 4096-element tiles, and sizes just off a tile boundary."""
    backend, device = backend_device
    seed = seed_of("compress-large", n, dtype, kind, scenario)
    x = make_tensor(kind, n, dtype, seed)
    threshold, residual, capacity, value_dtype = _scenario(scenario, x, seed)
    expected = check_compress(backend, device, x, threshold, residual=residual,
                              capacity=capacity, value_dtype=value_dtype, what=scenario)
    assert expected.count > 1  # the case really compacts across tiles


def test_overflow_keeps_first_in_index_order(backend_device):
    """Hand-written: 6 entries pass, 4 fit; the first 4 by index are sent, 2 overflow and stay
    whole in the residual."""
    backend, device = backend_device
    x = torch.tensor([5.0, 0.1, -6.0, 7.0, 0.2, 8.0, -9.0, 10.0])
    residual = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25])
    expected = check_compress(backend, device, x, 1.0, residual=residual, capacity=4)
    np.testing.assert_array_equal(expected.indices, [0, 2, 3, 5])
    assert (expected.count, expected.overflow) == (4, 2)
    np.testing.assert_array_equal(expected.residual,
                                  np.float32([0, 0.1, 0, 0, 0.2, 0, -9.0, 10.25]))


# ------------------------------------------------------------------------------ segmented

@pytest.mark.parametrize("threshold_form", ("per_segment", "single", "single_tensor"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_segmented_compress(backend_device, dtype, threshold_form):
    """Each element uses its segment's threshold; segments include length-1 ones."""
    backend, device = backend_device
    seed = seed_of("segmented-compress", dtype, threshold_form)
    offsets = oracle.make_segments(9000, seed)
    n = offsets[-1]
    x = make_tensor(("normal", "specials", "ties")[seed % 3], n, dtype, seed)
    residual = make_tensor("normal", n, torch.float32, seed + 1) * 0.1
    segments = torch.tensor(offsets, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    if threshold_form == "per_segment":
        # Per-segment quantiles of |x| (some 0, some NaN-free maxima), and a negative one.
        ks = [int(rng.integers(1, b - a + 1)) for a, b in zip(offsets[:-1], offsets[1:])]
        threshold = oracle.segmented_kth(x, offsets, ks).float()
        threshold[len(ks) // 2] = -1.0
    elif threshold_form == "single":
        threshold = _quantile_threshold(x, seed)
    else:
        threshold = torch.tensor(_quantile_threshold(x, seed))
    for capacity in (None, _kept_count(x, threshold, residual, offsets) // 3):
        check_compress(backend, device, x, threshold, residual=residual, segments=segments,
                       capacity=capacity, what=f"{threshold_form} capacity={capacity}")


# ------------------------------------------------------------------------------ wire values

@pytest.mark.parametrize("value_dtype", (torch.float16, torch.bfloat16), ids=dtype_id)
def test_saturation_on_16_bit_wire(backend_device, value_dtype):
    """Finite values beyond the wire's range are sent as its largest finite value (never
    inf), inf and NaN pass, and the residual keeps what saturation cut off."""
    backend, device = backend_device
    big = [7e4, -7e4, 65519.0, 65520.0, -65536.0, 1e30, 3.4e38, -3.39e38, 3.3895e38]
    x = torch.tensor(big + [INF, -INF, NAN, 1.0, -0.0, 6e-8, 1e-30], dtype=torch.float32)
    residual = torch.zeros_like(x)
    expected = check_compress(backend, device, x, -1.0, residual=residual,
                              value_dtype=value_dtype)
    values = expected.values.float()
    limit = oracle.FP16_MAX if value_dtype == torch.float16 else oracle.BF16_MAX
    assert torch.isfinite(values[:len(big)]).all()
    if value_dtype == torch.float16:
        assert values[:5].tolist() == [limit, -limit, limit, limit, -limit]
    assert values[6].item() == limit and values[7].item() == -limit
    assert values[len(big):len(big) + 2].tolist() == [INF, -INF]
    assert math.isnan(values[len(big) + 2].item())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compress_keeps_specials(backend_device, dtype):
    """Hand-written keep rule: NaN always passes, a NaN threshold keeps only NaNs, +inf
    threshold keeps inf and NaN, -0 and denormals compare by magnitude."""
    backend, device = backend_device
    tiny = oracle.denormal(dtype)
    x = torch.tensor([NAN, -INF, 0.0, -0.0, tiny, 2.0, INF, -2.0], dtype=torch.float32).to(dtype)
    cases = {NAN: [0], INF: [0, 1, 6], 2.0: [0, 1, 5, 6, 7], 0.0: list(range(8)),
             -0.0: list(range(8))}
    for threshold, kept in cases.items():
        expected = check_compress(backend, device, x, threshold, what=f"t={threshold}")
        np.testing.assert_array_equal(expected.indices, kept, err_msg=f"t={threshold}")


# ------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("capacity", (None, 0, 5))
def test_compress_empty(backend_device, capacity):
    """An empty x is allowed: count 0, overflow 0, a buffer of the requested capacity."""
    backend, device = backend_device
    for shape in ((0,), (3, 0)):
        x = torch.empty(shape, dtype=torch.float16)
        payload, _ = _run(backend, device, x, 0.5, capacity=capacity)
        head = oracle.header(0, capacity or 0, torch.float16, 0, 0)
        assert bytes(payload.buffer[:32].cpu().numpy()) == head
        assert payload.buffer.numel() == oracle.layout(capacity or 0, torch.float16)[1]
        assert payload.shape == shape and payload.dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compress_non_contiguous(backend_device, dtype):
    """x is flattened in C order whatever its strides; the payload remembers its shape."""
    backend, device = backend_device
    seed = seed_of("compress-strided", dtype)
    x = make_tensor("specials", 7 * 13 * 11, dtype, seed).reshape(7, 13, 11).transpose(0, 2)
    residual = make_tensor("normal", x.numel(), torch.float32, seed + 1).reshape(x.shape)
    check_compress(backend, device, x, _quantile_threshold(x.reshape(-1), seed),
                   residual=residual.contiguous(), capacity=30, what="strided")


def test_compress_is_deterministic(backend_device):
    """Same inputs, same bytes: whole buffers and residuals, run after run."""
    backend, device = backend_device
    seed = seed_of("compress-determinism")
    x = make_tensor("specials", 16385, torch.float32, seed)
    residual = make_tensor("normal", 16385, torch.float32, seed + 1)
    threshold = float(oracle.kth_largest_magnitude(x, 1638))
    runs = [_run(backend, device, x, threshold, residual=residual, capacity=700,
                 value_dtype=torch.bfloat16) for _ in range(3)]
    first_payload, first_residual = runs[0]
    assert int(first_payload.overflow) > 0
    for payload, res in runs[1:]:
        assert torch.equal(payload.buffer.cpu(), first_payload.buffer.cpu())
        assert torch.equal(res.view(torch.int32), first_residual.view(torch.int32))


@pytest.mark.parametrize("x_dtype", (torch.bfloat16, torch.float32), ids=dtype_id)
def test_bf16_subnormals_compress(backend_device, x_dtype):
    """Every bf16 subnormal survives compress, from bf16 data or from fp32 data sent on a bf16
    wire: kept by magnitude, sent unchanged, residual 0."""
    backend, device = backend_device
    x = oracle.bf16_subnormals().to(x_dtype)
    threshold = float(x[5].float())  # the 6th smallest subnormal: keeps 0x0006 and up
    check_compress(backend, device, x, threshold, residual=torch.zeros(x.numel()),
                   value_dtype=torch.bfloat16, what="bf16 subnormals")


# ------------------------------------------------------------- precomputed segments, out=

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_compress_with_segments_object_and_out(backend_device, dtype):
    """A ``Segments`` object gives what the offsets tensor gives, and ``out=`` (a row of a
    preallocated send tensor, dirty from an earlier use) holds the same bytes in its live part,
    zeroed past ``count``, with the other rows untouched."""
    backend, device = backend_device
    seed = seed_of("compress-segments-out", dtype)
    offsets = oracle.make_segments(5000, seed)
    n = offsets[-1]
    x = make_tensor(("normal", "specials", "ties")[seed % 3], n, dtype, seed).to(device)
    residual = (make_tensor("normal", n, torch.float32, seed + 1) * 0.1).to(device)
    threshold = torch.full((len(offsets) - 1,), 0.7)
    threshold[0] = -1.0
    segments = dct_kernels.ops.Segments(offsets, device=device)
    capacity = 300
    want_res = residual.clone()
    want = dct_kernels.compress(x, threshold, segments=torch.tensor(offsets), residual=want_res,
                                capacity=capacity, backend=backend)
    send = torch.full((3, want.nbytes), 0xAB, dtype=torch.uint8, device=device)
    got_res = residual.clone()
    got = dct_kernels.compress(x, threshold, segments=segments, residual=got_res,
                               capacity=capacity, out=send[1], backend=backend)
    assert got.buffer.data_ptr() == send[1].data_ptr()
    count = int(got.count)
    assert count == int(want.count) and int(got.overflow) == int(want.overflow)
    assert bytes(send[1, :32].cpu().numpy()) == bytes(want.buffer[:32].cpu().numpy())
    assert_bitwise_equal(got.indices[:count].cpu(), want.indices[:count].cpu(), "indices")
    assert_bitwise_equal(got.values[:count].cpu(), want.values[:count].cpu(), "values")
    assert_bitwise_equal(got_res.cpu(), want_res.cpu(), "residual")
    assert int((got.indices[count:] != 0).sum()) == 0, "slots past count not zeroed"
    assert bool((send[0] == 0xAB).all()) and bool((send[2] == 0xAB).all()), "other rows"


def test_compress_out_and_segments_errors():
    x = torch.randn(100)
    good = torch.zeros(dct_kernels.compress(x, 0.5, capacity=10).nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="out"):
        dct_kernels.compress(x, 0.5, out=good)  # no capacity
    with pytest.raises(ValueError, match="out"):
        dct_kernels.compress(x, 0.5, capacity=40, out=good)  # wrong size
    with pytest.raises(ValueError, match="out"):
        dct_kernels.compress(x, 0.5, capacity=10, out=good.float())
    with pytest.raises(ValueError, match="segments"):
        dct_kernels.compress(x, 0.5, segments=dct_kernels.ops.Segments([0, 50, 99]))
    for bad in ([0], [1, 100], [0, 50, 50, 100]):
        with pytest.raises(ValueError, match="segments"):
            dct_kernels.ops.Segments(bad)
    with pytest.raises(TypeError, match="segments"):
        dct_kernels.ops.Segments([0, 2.5, 100])
