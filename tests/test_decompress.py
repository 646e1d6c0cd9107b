"""decompress: overwrite and accumulate, and untrusted payloads.

Payloads are encoded by the oracle (not by the package's compress), so these tests depend on
nothing but the wire format. Valid payloads are checked against ``oracle.decompress``; corrupted
ones must raise and write nothing with ``validate=True``, and with ``validate=False`` must skip
exactly the bad entries, count them, and never write outside ``out`` (checked with guard
regions around it).
"""

import numpy as np
import pytest
import torch

import dct_kernels
import oracle
from dct_kernels import SparsePayload
from helpers import assert_bitwise_equal, assert_same_bits
from oracle import DTYPES, dtype_id, make_tensor, seed_of


def make_payload(n, value_dtype, seed, *, kind="specials", capacity_extra=0, k=None):
    """A valid wire buffer (CPU) of a compressed random tensor (about k entries, by default
    a number drawn from the seed), and its oracle result."""
    x = make_tensor(kind, n, torch.float32, seed)
    threshold = float(oracle.kth_largest_magnitude(x, k or 1 + seed % n))
    expected = oracle.compress(x, threshold, value_dtype=value_dtype)
    capacity = expected.count + capacity_extra
    buffer = oracle.encode(n, capacity, value_dtype, expected.indices, expected.values)
    return buffer, expected


def view(buffer, device, shape=None, dtype=None):
    return SparsePayload.from_buffer(buffer.clone().to(device), shape=shape, dtype=dtype)


def _initial_out(n, dtype, seed, device):
    return make_tensor("normal", n, dtype, seed + 7).to(device)


# ------------------------------------------------------------------------------ valid payloads

@pytest.mark.parametrize("accumulate", (False, True), ids=("overwrite", "accumulate"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("value_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", (1, 17, 1025, 5000))
def test_decompress_matches_oracle(backend_device, n, value_dtype, out_dtype, accumulate):
    backend, device = backend_device
    seed = seed_of("decompress", n, value_dtype, out_dtype, accumulate)
    kind = ("specials", "wide", "ties")[seed % 3]
    buffer, expected = make_payload(n, value_dtype, seed, kind=kind, capacity_extra=seed % 5)
    before = _initial_out(n, out_dtype, seed, "cpu")
    want = oracle.decompress(expected.indices, oracle.f32(expected.values), before, accumulate)

    ref_out = before.clone()
    dct_kernels.decompress(view(buffer, "cpu"), out=ref_out, accumulate=accumulate,
                           backend="torch")
    assert_bitwise_equal(ref_out, want, "reference vs oracle")

    out = before.clone().to(device)
    result = dct_kernels.decompress(view(buffer, device), out=out, accumulate=accumulate,
                                    backend=backend)
    assert result.data_ptr() == out.data_ptr()
    assert_bitwise_equal(out.cpu(), ref_out, f"{backend}-{device} vs reference")


@pytest.mark.parametrize("value_dtype", DTYPES, ids=dtype_id)
def test_decompress_new_tensor(backend_device, value_dtype):
    """Without out: a new tensor of the payload's shape and dense dtype."""
    backend, device = backend_device
    seed = seed_of("decompress-new", value_dtype)
    buffer, expected = make_payload(6 * 35, value_dtype, seed)
    dense_dtype = DTYPES[seed % 3]
    want = oracle.decompress(expected.indices, oracle.f32(expected.values),
                             torch.zeros(6, 35, dtype=dense_dtype), False)
    ref = dct_kernels.decompress(view(buffer, "cpu", (6, 35), dense_dtype), backend="torch")
    assert_bitwise_equal(ref, want, "reference vs oracle")
    got = dct_kernels.decompress(view(buffer, device, (6, 35), dense_dtype), backend=backend)
    assert got.device.type == torch.device(device).type
    assert_bitwise_equal(got.cpu(), ref, f"{backend}-{device} vs reference")


def test_decompress_large(backend_device):
    """1e5 elements, a few thousand entries over several scatter blocks (1024 each)."""
    backend, device = backend_device
    n, seed = 100003, seed_of("decompress-large")
    x = make_tensor("normal", n, torch.float32, seed)
    expected = oracle.compress(x, float(oracle.kth_largest_magnitude(x, 4000)),
                               value_dtype=torch.bfloat16)
    buffer = oracle.encode(n, expected.count, torch.bfloat16, expected.indices, expected.values)
    before = _initial_out(n, torch.float32, seed, "cpu")
    want = oracle.decompress(expected.indices, oracle.f32(expected.values), before, True)
    ref = before.clone()
    dct_kernels.decompress(view(buffer, "cpu"), out=ref, accumulate=True, backend="torch")
    assert_bitwise_equal(ref, want, "reference vs oracle")
    out = before.clone().to(device)
    dct_kernels.decompress(view(buffer, device), out=out, accumulate=True, backend=backend)
    assert_bitwise_equal(out.cpu(), ref, f"{backend}-{device} vs reference")


def test_bf16_subnormals_decompress(backend_device):
    """bf16 subnormal wire values land unchanged in an fp32 out."""
    backend, device = backend_device
    values = oracle.bf16_subnormals()
    n = 2 * values.numel()
    indices = np.arange(0, n, 2)
    buffer = oracle.encode(n, values.numel(), torch.bfloat16, indices, values)
    want = oracle.decompress(indices, oracle.f32(values), torch.zeros(n), False)
    ref = dct_kernels.decompress(view(buffer, "cpu", dtype=torch.float32), backend="torch")
    assert_bitwise_equal(ref, want, "reference vs oracle")
    got = dct_kernels.decompress(view(buffer, device, dtype=torch.float32), backend=backend)
    assert_bitwise_equal(got.cpu(), ref, f"{backend}-{device} vs reference")


# ------------------------------------------------------------------------------ corrupted payloads

CORRUPTIONS = oracle.CORRUPTIONS


def _corrupted_case(how, value_dtype, seed):
    """(corrupted buffer, numel and capacity the receiver expects, the oracle's usable
    entries and error count). Index corruptions get over 1024 entries, to corrupt the first
    entry of the second scatter block."""
    n, k = (3000, 2000) if how in ("unsorted", "duplicate", "index_negative") else (300, 40)
    buffer, expected = make_payload(n, value_dtype, seed, kind="normal", capacity_extra=2, k=k)
    capacity = expected.count + 2
    bad = oracle.corrupt(buffer, how, expected.count, capacity, n)
    return bad, n, capacity, oracle.usable_entries(bad, n, capacity, value_dtype)


def _payload(bad, device, n, capacity, value_dtype):
    """The receiver's view: its own numel/capacity/dtype, whatever the header says."""
    return SparsePayload(bad.clone().to(device), numel=n, capacity=capacity,
                         value_dtype=value_dtype, shape=(n,), dtype=torch.float32)


def _decompress_into(payload, out_dtype, seed, device, backend, accumulate, **kw):
    """decompress into the middle of a guarded tensor; (big before, big after) on the CPU."""
    big, out = oracle.guarded(payload.numel, out_dtype, device, seed)
    before = big.cpu().clone()
    dct_kernels.decompress(payload, out=out, accumulate=accumulate, backend=backend, **kw)
    return before, big.cpu()


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_validate_rejects_and_writes_nothing(backend_device, how):
    backend, device = backend_device
    seed = seed_of("validate", how)
    value_dtype = DTYPES[seed % 3]
    bad, n, capacity, _ = _corrupted_case(how, value_dtype, seed)
    payload = _payload(bad, device, n, capacity, value_dtype)
    big, out = oracle.guarded(n, torch.float32, device, seed)
    before = big.cpu().clone()
    with pytest.raises(ValueError, match="^payload:"):
        dct_kernels.decompress(payload, out=out, accumulate=bool(seed % 2), backend=backend)
    assert_bitwise_equal(big.cpu(), before, "nothing may be written")


@pytest.mark.parametrize("accumulate", (False, True), ids=("overwrite", "accumulate"))
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_unvalidated_skips_bad_entries(backend_device, how, accumulate):
    """validate=False: bad entries (or a whole bad header) are skipped and counted, the rest
    land, and nothing outside out changes."""
    backend, device = backend_device
    seed = seed_of("unvalidated", how, accumulate)
    value_dtype = DTYPES[seed % 3]
    bad, n, capacity, (indices, values, errors) = _corrupted_case(how, value_dtype, seed)
    assert errors > 0
    results = {}
    for be, dev in (("torch", "cpu"), (backend, device)):
        payload = _payload(bad, dev, n, capacity, value_dtype)
        # Alternate between an explicit counter and the global one.
        if seed % 2:
            counter = torch.zeros((), dtype=torch.int32, device=dev)
            before, after = _decompress_into(payload, torch.float32, seed, dev, be, accumulate,
                                             validate=False, errors=counter)
        else:
            dct_kernels.reset_payload_errors(dev)
            before, after = _decompress_into(payload, torch.float32, seed, dev, be, accumulate,
                                             validate=False)
            counter = dct_kernels.payload_errors(dev)
        what = f"{be}-{dev} {how}"
        (guards_before, out_before), (guards, out) = oracle.unguard(before), oracle.unguard(after)
        assert_bitwise_equal(guards, guards_before, f"{what}: written outside out")
        want = oracle.decompress(indices, values, out_before, accumulate)
        assert_bitwise_equal(out, want, f"{what}: out")
        assert int(counter) == errors, f"{what}: error counter"
        results[be, dev] = after
    assert_bitwise_equal(results[backend, device], results["torch", "cpu"],
                         f"{backend}-{device} vs reference")
    if how in ("index_high", "index_huge", "index_negative"):
        assert indices.size == oracle.decode(bad).count - 1, "the other entries still land"


@pytest.mark.parametrize("value_dtype", DTYPES, ids=dtype_id)
def test_unvalidated_valid_payload_counts_nothing(backend_device, value_dtype):
    backend, device = backend_device
    seed = seed_of("unvalidated-valid", value_dtype)
    buffer, expected = make_payload(2100, value_dtype, seed, capacity_extra=3)
    dct_kernels.reset_payload_errors(device)
    big, out = oracle.guarded(2100, torch.bfloat16, device, seed)
    before = big.cpu().clone()
    dct_kernels.decompress(view(buffer, device), out=out, validate=False, backend=backend)
    assert int(dct_kernels.payload_errors(device)) == 0
    want = oracle.decompress(expected.indices, oracle.f32(expected.values),
                             torch.zeros(2100, dtype=torch.bfloat16), False)
    guards, out = oracle.unguard(big)
    assert_bitwise_equal(out, want, "out")
    assert_bitwise_equal(guards, oracle.unguard(before)[0], "written outside out")


@pytest.mark.parametrize("indices,used", [
    ([5, 100, 7, 8, 101], [5, 100, 101]),      # a high index shadows the smaller ones after it
    ([5, 7, 3, 5, 9], [5, 7, 9]),              # a repeat of an earlier index is never used twice
    ([-4, 2, 300, 3, 1], [2, 3]),              # out-of-range indices do not raise the bar
])
def test_unvalidated_uses_only_a_rising_sequence(backend_device, indices, used):
    """validate=False uses entry i only when its index is in range and above every in-range
    index before it, so the entries written are distinct whatever the buffer holds."""
    backend, device = backend_device
    n, capacity = 200, len(indices)
    values = torch.arange(1, capacity + 1, dtype=torch.float32) * 1.5
    buffer = torch.tensor(list(oracle.header(n, capacity, torch.float32, capacity, 0)),
                          dtype=torch.uint8)
    layout_offset, nbytes = oracle.layout(capacity, torch.float32)
    buffer = torch.cat([buffer, torch.zeros(nbytes - 32, dtype=torch.uint8)])
    buffer[32:32 + 4 * capacity] = torch.tensor(indices, dtype=torch.int32).view(torch.uint8)
    buffer[layout_offset:layout_offset + 4 * capacity] = values.view(torch.uint8)
    errors = torch.zeros((), dtype=torch.int32, device=device)
    payload = SparsePayload.from_buffer(buffer.to(device))
    out = dct_kernels.decompress(payload, validate=False, errors=errors, backend=backend).cpu()
    expected = torch.zeros(n)
    for slot, index in enumerate(indices):
        if index in used and indices.index(index) == slot:
            expected[index] = values[slot]
    assert_bitwise_equal(out, expected)
    assert int(errors) == capacity - len(used)
    many = torch.zeros(n, device=device)
    dct_kernels.decompress_many(torch.stack([buffer, buffer]).to(device), out=many,
                                validate=False, errors=errors, backend=backend)
    assert_bitwise_equal(many.cpu(), expected * 2)


def _f32_bits(*patterns):
    return torch.tensor(list(patterns), dtype=torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("n", [9, 1003])  # below and above the cpu core's streaming stores
def test_nans_made_on_the_way_out_are_canonical_like_the_reference(backend_device, n):
    """A NaN that a dense output gets from the wire's fp32 payload bits, from an fp8 NaN, from
    +inf and -inf of two ranks meeting at one position (x86 makes that 0xFFC00000), from a
    NaN already in an accumulated output or from a decoded row is written as the canonical NaN
    of the output's dtype, bitwise as the torch reference on the CPU writes it."""
    backend, device = backend_device
    if (backend, device) == ("torch", "cpu"):
        pytest.skip("the reference itself")
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x[:3] = torch.tensor([1.0, 2.0, 3.0])
    p = dct_kernels.compress(x, 0.0, backend="torch")
    p.values[:2] = _f32_bits(0x7F800001, 0xFFC00000)
    fp8 = x.clone()
    fp8[1], fp8[2] = float("nan"), float("inf")
    p8 = dct_kernels.compress(fp8, 0.0, value_dtype=torch.float8_e4m3fn, backend="torch")
    up, down = x.clone(), x.clone()
    up[0], down[0] = float("inf"), float("-inf")
    rows = torch.stack([dct_kernels.compress(t, 0.0, capacity=n, backend="torch").buffer
                        for t in (up, down)])
    holding_nan = torch.zeros(n)
    holding_nan[:2] = _f32_bits(0x7FC00123, 0xFFC00000)
    values = x[:8].reshape(1, 8).clone()
    values[0, 0] = _f32_bits(0x7F800001)[0]
    columns = torch.arange(8, dtype=torch.int16)[None]

    def outputs(b, dev):
        def on(payload):
            return SparsePayload.from_buffer(payload.buffer.to(dev))
        row_payload = dct_kernels.payload.RowPayload(columns.to(dev), values.to(dev), (1, 16),
                                                     torch.float32)
        got = [dct_kernels.decompress(on(p), backend=b),
               dct_kernels.decompress(on(p8), backend=b),
               dct_kernels.decompress(on(p), out=holding_nan.to(dev), accumulate=True,
                                      backend=b)]
        for dtype in DTYPES:
            got += [dct_kernels.decompress_many(rows.to(dev), backend=b,
                                                out=torch.zeros(n, dtype=dtype, device=dev)),
                    dct_kernels.decompress_many(rows.to(dev), average=True, backend=b,
                                                out=torch.zeros(n, dtype=dtype, device=dev))]
        return [t.cpu() for t in got + [dct_kernels.decompress_rows(row_payload, backend=b)]]

    want = outputs("torch", "cpu")
    assert want[0][:2].isnan().all() and want[1][1:3].isnan().all()
    for i, (a, w) in enumerate(zip(outputs(backend, device), want)):
        assert_same_bits(a, w, f"{backend} on {device}, output {i}")
