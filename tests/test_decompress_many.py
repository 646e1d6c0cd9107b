"""decompress_many: the rank-ordered fp32 sum of W gathered payloads.

The W rows are oracle-encoded payloads of different random tensors, compressed with different
thresholds into one fixed capacity (so some rows overflow and some have free slots). Expected
values come from ``oracle.merge``: 0 + d_0 + d_1 + ... in fp32, / W, + out, one rounding.
"""

import numpy as np
import pytest
import torch

import dct_kernels
from dct_kernels import payload as wire
import oracle
from helpers import assert_bitwise_equal
from oracle import DTYPES, dtype_id, make_tensor, seed_of


def gathered(world, n, capacity, value_dtype, seed, kinds=("normal", "specials", "ties"),
             k=None):
    """[W, nbytes] uint8 (CPU) and the (indices, fp32 values) each row carries. Row w keeps
    its k + w largest magnitudes (k drawn from the seed unless given)."""
    rows, entries = [], []
    for w in range(world):
        x = make_tensor(kinds[w % len(kinds)], n, torch.float32, seed + w)
        k_row = min(n, k + w) if k else 1 + (seed + 7919 * w) % n
        expected = oracle.compress(x, float(oracle.kth_largest_magnitude(x, k_row)),
                                   capacity=capacity, value_dtype=value_dtype)
        rows.append(oracle.encode(n, capacity, value_dtype, expected.indices, expected.values,
                                  overflow=expected.overflow))
        entries.append((expected.indices, oracle.f32(expected.values)))
    return torch.stack(rows), entries


def run_many(backend, device, buffers, out, **kw):
    """decompress_many on copies; the result on the CPU."""
    out = out.clone().to(device)
    result = dct_kernels.decompress_many(buffers.clone().to(device), out=out, backend=backend,
                                         **kw)
    assert result.data_ptr() == out.data_ptr()
    return out.cpu()


def check_many(backend, device, buffers, entries, out, what, **kw):
    want = oracle.merge(entries, out, kw.get("accumulate", False), kw.get("average", False))
    reference = run_many("torch", "cpu", buffers, out, **kw)
    assert_bitwise_equal(reference, want, f"reference vs oracle, {what}")
    assert_bitwise_equal(run_many(backend, device, buffers, out, **kw), reference,
                         f"{backend}-{device} vs reference, {what}")


@pytest.mark.parametrize("n", (17, 4097))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("average", (False, True), ids=("sum", "average"))
@pytest.mark.parametrize("accumulate", (False, True), ids=("overwrite", "accumulate"))
@pytest.mark.parametrize("world", (1, 2, 3, 5))
def test_decompress_many_matches_oracle(backend_device, world, accumulate, average, out_dtype,
                                        n):
    backend, device = backend_device
    seed = seed_of("many", world, accumulate, average, out_dtype, n)
    value_dtype = DTYPES[seed % 3]
    capacity = 1 + seed % (n // 2 + 1)
    buffers, entries = gathered(world, n, capacity, value_dtype, seed)
    out = make_tensor("normal", n, out_dtype, seed + 99)
    check_many(backend, device, buffers, entries, out, f"W={world} {value_dtype}",
               accumulate=accumulate, average=average)


@pytest.mark.parametrize("world,n,capacity", [(1, 1, 1), (2, 1, 3), (3, 2, 0), (5, 16385, 2100)])
def test_decompress_many_edges(backend_device, world, n, capacity):
    """One element, capacity 0 (only the zeros and out), capacity beyond numel, and rows
    spanning several scatter blocks."""
    backend, device = backend_device
    seed = seed_of("many-edges", world, n, capacity)
    buffers, entries = gathered(world, n, capacity, torch.float16, seed)
    out = make_tensor("specials", n, torch.float32, seed + 1)
    for accumulate in (False, True):
        check_many(backend, device, buffers, entries, out, f"accumulate={accumulate}",
                   accumulate=accumulate, average=True)


def test_decompress_many_large(backend_device):
    backend, device = backend_device
    n, seed = 100003, seed_of("many-large")
    buffers, entries = gathered(3, n, 3000, torch.bfloat16, seed)
    out = make_tensor("normal", n, torch.bfloat16, seed + 1)
    check_many(backend, device, buffers, entries, out, "large", accumulate=True, average=True)


def test_decompress_many_given_configuration(backend_device):
    """capacity= and value_dtype= given instead of read from row 0's header."""
    backend, device = backend_device
    seed = seed_of("many-config")
    buffers, entries = gathered(3, 500, 60, torch.bfloat16, seed)
    out = make_tensor("normal", 500, torch.float16, seed + 1)
    check_many(backend, device, buffers, entries, out, "given", capacity=60,
               value_dtype=torch.bfloat16)


def test_decompress_many_rank_order(backend_device):
    """Hand-written: the sum is formed in rank order in fp32, so 1e8 + 1 - 1e8 is 0 in fp32
    (not 1), and 2^-149 / 2 rounds to 0 (IEEE), and +0 + -0 is +0."""
    backend, device = backend_device
    ranks = [[1e8, 1.4e-45, -0.0], [1.0, 0.0, -0.0], [-1e8, 0.0, -0.0]]
    buffers = torch.stack([oracle.encode(3, 3, torch.float32, [0, 1, 2], torch.tensor(r))
                           for r in ranks])
    out = torch.zeros(3)
    got = run_many(backend, device, buffers, out)
    assert_bitwise_equal(got, torch.tensor([0.0, 1.4e-45, 0.0]), "sum")
    got = run_many(backend, device, buffers[:2], out, average=True)
    assert_bitwise_equal(got, torch.tensor([50000000.0, 0.0, 0.0]), "average")


def test_decompress_many_is_deterministic(backend_device):
    backend, device = backend_device
    seed = seed_of("many-determinism")
    buffers, _ = gathered(5, 4097, 900, torch.float32, seed)
    out = make_tensor("normal", 4097, torch.bfloat16, seed + 1)
    runs = [run_many(backend, device, buffers, out, accumulate=True, average=True)
            for _ in range(3)]
    for other in runs[1:]:
        assert torch.equal(other.view(torch.int16), runs[0].view(torch.int16))


# ------------------------------------------------------------------------------ corrupted rows

def _corrupt_row(buffers, row, how, n, capacity):
    """A copy of buffers with one row corrupted (oracle.CORRUPTIONS)."""
    bad = buffers.clone()
    count = oracle.decode(bad[row]).count
    bad[row] = oracle.corrupt(bad[row], how, count, capacity, n)
    return bad


def _one_bad_row(tag, how, row):
    """Three ranks' payloads (n = 300, capacity 40) with row ``row`` corrupted, and each row's
    usable entries and error count by the oracle."""
    seed = seed_of(tag, how)
    world, n, capacity, value_dtype = 3, 300, 40, DTYPES[seed % 3]
    buffers, _ = gathered(world, n, capacity, value_dtype, seed, kinds=("normal",), k=30)
    bad = _corrupt_row(buffers, row, how, n, capacity)
    usable = [oracle.usable_entries(bad[w], n, capacity, value_dtype) for w in range(world)]
    return seed, n, capacity, value_dtype, bad, usable


ROW_CORRUPTIONS = ("index_high", "index_negative", "unsorted", "duplicate", "count_high",
                   "count_negative", "magic", "numel", "value_code")


@pytest.mark.parametrize("how", ROW_CORRUPTIONS)
def test_corrupted_row(backend_device, how):
    """One bad row among W: validate=True raises and writes nothing; validate=False skips its
    bad entries (or the whole row), counts them, still sums the other rows, and writes only
    inside out."""
    backend, device = backend_device
    seed, n, capacity, value_dtype, bad, usable = _one_bad_row("many-corrupt", how, 1)
    errors = sum(u[2] for u in usable)
    assert errors > 0 and usable[1][2] > 0

    # validate=True: ValueError naming the buffers, nothing written anywhere.
    big, out = oracle.guarded(n, torch.float32, device, seed)
    before = big.cpu().clone()
    with pytest.raises(ValueError, match="^buffers:"):
        dct_kernels.decompress_many(bad.to(device), out=out, accumulate=True,
                                    capacity=capacity, value_dtype=value_dtype,
                                    backend=backend)
    assert_bitwise_equal(big.cpu(), before, "validate=True wrote something")

    results = {}
    for be, dev in (("torch", "cpu"), (backend, device)):
        big, out = oracle.guarded(n, torch.float32, dev, seed)
        before = big.cpu().clone()
        counter = torch.zeros((), dtype=torch.int32, device=dev)
        dct_kernels.decompress_many(bad.to(dev), out=out, accumulate=True, average=True,
                                    validate=False, capacity=capacity,
                                    value_dtype=value_dtype, errors=counter, backend=be)
        after = big.cpu()
        (guards_before, out_before), (guards, result) = oracle.unguard(before), \
            oracle.unguard(after)
        assert_bitwise_equal(guards, guards_before, f"{be}-{dev}: written outside out")
        want = oracle.merge([u[:2] for u in usable], out_before, True, True)
        assert_bitwise_equal(result, want, f"{be}-{dev}: out vs oracle")
        assert int(counter) == errors, f"{be}-{dev}: error counter"
        results[be, dev] = after
    assert_bitwise_equal(results[backend, device], results["torch", "cpu"],
                         f"{backend}-{device} vs reference")


@pytest.mark.parametrize("how", ("magic", "version", "numel", "value_code", "capacity"))
def test_bad_row_zero_without_configuration(backend_device, how):
    """Without capacity=/value_dtype= the configuration is the one most rows' headers carry, so
    a corrupted row 0 (even one claiming another wire dtype of the same size) is one invalid
    row: skipped and counted with validate=False, a ValueError naming the buffers with
    validate=True."""
    backend, device = backend_device
    seed, n, _, _, bad, usable = _one_bad_row("many-row0", how, 0)
    assert usable[0][2] == 1 and sum(u[2] for u in usable) == 1  # row 0 void, counted once
    with pytest.raises(ValueError, match="^buffers:"):
        dct_kernels.decompress_many(bad.to(device), out=torch.zeros(n, device=device),
                                    backend=backend)
    big, out = oracle.guarded(n, torch.float32, device, seed)
    before = big.cpu().clone()
    counter = torch.zeros((), dtype=torch.int32, device=device)
    dct_kernels.decompress_many(bad.to(device), out=out, accumulate=True, validate=False,
                                errors=counter, backend=backend)
    (guards_before, out_before), (guards, result) = oracle.unguard(before), \
        oracle.unguard(big.cpu())
    assert_bitwise_equal(guards, guards_before, "written outside out")
    assert_bitwise_equal(result, oracle.merge([u[:2] for u in usable], out_before, True, False),
                         "out vs oracle")
    assert int(counter) == 1


def test_rows_for_another_numel_or_row_size(backend_device):
    """Rows of another numel than out's are invalid rows (counted with validate=False, a
    ValueError with validate=True); rows whose headers need another row size describe no
    payload at all: a ValueError that says what row 0 needs."""
    backend, device = backend_device
    world, capacity = 3, 40
    buffers, _ = gathered(world, 300, capacity, torch.float32, seed_of("many-numel"),
                          kinds=("normal",), k=30)
    buffers = buffers.to(device)
    with pytest.raises(ValueError, match="^buffers:.*numel"):
        dct_kernels.decompress_many(buffers, out=torch.zeros(299, device=device),
                                    backend=backend)
    out = torch.full((299,), 7.0, device=device)
    counter = torch.zeros((), dtype=torch.int32, device=device)
    dct_kernels.decompress_many(buffers, out=out, validate=False, errors=counter,
                                backend=backend)
    assert int(counter) == world
    assert_bitwise_equal(out.cpu(), torch.zeros(299), "a sum of no valid row")
    needs = wire.layout(capacity, torch.float32)[1]
    with pytest.raises(ValueError, match=f"^buffers: no row .*needs {needs} bytes"):
        dct_kernels.decompress_many(buffers[:, :needs - 16], out=torch.zeros(300, device=device),
                                    validate=False, backend=backend)


def test_valid_rows_count_no_errors(backend_device):
    backend, device = backend_device
    seed = seed_of("many-valid-errors")
    buffers, entries = gathered(5, 3000, 1500, torch.float32, seed)
    dct_kernels.reset_payload_errors(device)
    out = torch.zeros(3000).to(device)
    dct_kernels.decompress_many(buffers.to(device), out=out, validate=False, backend=backend)
    assert int(dct_kernels.payload_errors(device)) == 0
    assert_bitwise_equal(out.cpu(), oracle.merge(entries, torch.zeros(3000), False, False), "sum")
    assert np.count_nonzero(oracle.f32(out)) > 0


def test_bf16_subnormals_decompress_many(backend_device):
    """bf16 subnormal wire values are summed exactly."""
    backend, device = backend_device
    values = oracle.bf16_subnormals()
    n = values.numel()
    rows = [oracle.encode(n, n, torch.bfloat16, np.arange(n), values),
            oracle.encode(n, n, torch.bfloat16, np.arange(n), values.flip(0))]
    entries = [(np.arange(n), oracle.f32(values)), (np.arange(n), oracle.f32(values.flip(0)))]
    check_many(backend, device, torch.stack(rows), entries, torch.zeros(n), "bf16 subnormals")
