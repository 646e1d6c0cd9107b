"""Wire format version 2 (dct_kernels.codec): delta-coded indices, fp8 values with a scale per
segment, exact error feedback, and untrusted version-2 payloads.

Every backend's payload must equal the independent oracle (tests/oracle_codec.py) byte for byte;
the residual afterwards bit for bit. The huge-gap cases run on the torch and cpu backends only:
their tensors (17M elements) would take the Triton interpreter minutes, and the version-2 code
they exercise is the same for every backend (the Triton compress kernel is covered above).
"""

import numpy as np
import pytest
import torch

import dct_kernels
import oracle
import oracle_codec as oc
from dct_kernels import SparsePayload, codec
from helpers import assert_bitwise_equal
from oracle import make_segments, make_tensor, seed_of

FP8 = torch.float8_e4m3fn
CONFIGS = [(FP8, "delta"), (FP8, "int32"), (torch.bfloat16, "delta"),
           (torch.float16, "delta"), (torch.float32, "delta")]
CONFIG_IDS = ["fp8-delta", "fp8-int32", "bf16-delta", "fp16-delta", "fp32-delta"]


def run(backend, device, x, threshold, *, segments=None, residual=None, capacity,
        value_dtype, index_encoding):
    r = None if residual is None else residual.clone().to(device)
    seg = None if segments is None else torch.tensor(segments, dtype=torch.int64).to(device)
    p = dct_kernels.compress(x.to(device), threshold, segments=seg, residual=r,
                             capacity=capacity, value_dtype=value_dtype,
                             index_encoding=index_encoding, backend=backend)
    return p, r


def check(backend, device, x, threshold, *, segments=None, residual=None, capacity,
          value_dtype=FP8, index_encoding="delta", what=""):
    """compress (backend) == oracle, bytes and residual; decompress == the oracle's decode."""
    want = oc.compress(x, threshold, segments, residual, capacity, value_dtype,
                       index_encoding == "delta")
    p, r = run(backend, device, x, threshold, segments=segments, residual=residual,
               capacity=capacity, value_dtype=value_dtype, index_encoding=index_encoding)
    assert p.version == 2, what
    assert_bitwise_equal(p.buffer.cpu(), want.buffer, f"{backend} payload bytes, {what}")
    if residual is not None:
        assert_bitwise_equal(r.cpu(), torch.from_numpy(want.residual), f"residual, {what}")
    dense = dct_kernels.decompress(p, backend=backend).cpu().reshape(-1)
    expected = torch.zeros(x.numel(), dtype=torch.float64)
    positions, values = oc.decode(want.buffer)
    assert positions == want.positions, what
    if positions:
        expected[torch.tensor(positions, dtype=torch.int64)] = torch.tensor(values,
                                                                            dtype=torch.float64)
    assert_bitwise_equal(dense.to(torch.float64), expected.to(dense.dtype).to(torch.float64),
                         f"decompress, {what}")
    return p, r, want


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", ("normal", "ties", "specials", "wide", "narrow"))
def test_compress_matches_oracle(backend_device, config, kind):
    backend, device = backend_device
    value_dtype, encoding = config
    seed = seed_of("codec", kind, *CONFIG_IDS[CONFIGS.index(config)])
    rng = np.random.default_rng(seed)
    n = 3001
    x = make_tensor(kind, n, torch.float32, seed)
    residual = make_tensor("normal", n, torch.float32, seed + 1) * 0.01
    segments = make_segments(n, seed)
    threshold = float(oracle.kth_largest_magnitude(x, 1 + seed % 200))
    capacity = int(rng.integers(1, 300))
    check(backend, device, x, threshold, segments=segments, residual=residual,
          capacity=capacity, value_dtype=value_dtype, index_encoding=encoding, what=kind)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_k_is_one_and_k_is_n(backend_device, config):
    backend, device = backend_device
    value_dtype, encoding = config
    seed = seed_of("codec-k", *CONFIG_IDS[CONFIGS.index(config)])
    x = make_tensor("normal", 777, torch.float32, seed)
    top = float(oracle.kth_largest_magnitude(x, 1))
    check(backend, device, x, top, capacity=1, value_dtype=value_dtype,
          index_encoding=encoding, what="k=1")
    # k = n: every entry passes and fits (fp8 drops none: one binade range is far below 2^18).
    x = x.sign() * (1 + x.abs() / 10)
    p, _, want = check(backend, device, x, 0.0, capacity=777, value_dtype=value_dtype,
                       index_encoding=encoding, what="k=n")
    assert len(want.positions) == 777 and int(p.overflow) == 0


@pytest.mark.parametrize("config", CONFIGS[:3], ids=CONFIG_IDS[:3])
def test_specials_and_signed_zeros(backend_device, config):
    """NaN and inf are sent (as NaN with fp8) and leave 0 in the residual; +-0 never take a
    slot under fp8 (they round to zero); denormals keep the identity."""
    backend, device = backend_device
    value_dtype, encoding = config
    x = torch.tensor([0.0, -0.0, float("nan"), 1e-45, -3e-39, float("inf"), 2.5, -float("inf"),
                      7e-41, 0.0, 1e30, -1e-30])
    residual = torch.tensor([0.0, -0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.0, 0.0, 0.0])
    check(backend, device, x, -1.0, residual=residual, capacity=12, value_dtype=value_dtype,
          index_encoding=encoding, what="specials")


@pytest.mark.parametrize("backend_only", ("torch", "cpu"))
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_gaps_around_the_escapes(backend_only, config):
    """Gaps of exactly 65535 (no escape), 65536 (one), 65535 x 256 (one escape carrying 255
    with fp8), 65535 x 256 + 1 and 2^24 + 3 (two escapes with 8-bit values, one otherwise)."""
    if backend_only == "cpu" and dct_kernels.available_backends()["cpu"] != "available":
        pytest.skip("cpu extension not built")
    value_dtype, encoding = config
    gaps = [5, 65535, 65536, 65535 * 256, 65535 * 256 + 1, 2**24 + 3, 1, 131071]
    positions = np.cumsum(gaps) - 1
    n = int(positions[-1]) + 10
    x = torch.zeros(n)
    x[torch.from_numpy(positions)] = torch.linspace(1.0, 3.0, len(gaps))
    for capacity in (len(gaps) + 8, len(gaps) + 1):  # all fit, then the escapes cut the tail
        residual = torch.zeros(n)
        p, r, want = check(backend_only, "cpu", x, 0.5, residual=residual, capacity=capacity,
                           value_dtype=value_dtype, index_encoding=encoding,
                           what=f"capacity {capacity}")
        pos, val, sent = codec.entries(p)
        assert pos[sent].tolist() == want.positions
        dense = torch.zeros(n, dtype=torch.float64)
        dense[pos[sent]] = val[sent].double()
        assert torch.equal((dense + r.double()).float(), x), "sent + residual == x"


@pytest.mark.parametrize("backend_only", ("torch", "cpu"))
def test_fp8_many_binades_in_one_segment(backend_only):
    """Values over 60 binades in one segment: the scale keeps the largest unsaturated, the
    smallest round to zero and stay in the residual, and sent + residual == acc bit for bit."""
    if backend_only == "cpu" and dct_kernels.available_backends()["cpu"] != "available":
        pytest.skip("cpu extension not built")
    rng = np.random.default_rng(seed_of("binades"))
    n = 5000
    x = torch.from_numpy(rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-30, 30, n)).float()
    residual = torch.from_numpy(rng.standard_normal(n) * 1e-3).float()
    p, r, want = check(backend_only, "cpu", x, 1e-20, residual=residual, capacity=n,
                       value_dtype=FP8, what="binades")
    acc = x + residual
    pos, val, sent = codec.entries(p)
    dense = torch.zeros(n)
    dense[pos[sent]] = val[sent]
    assert torch.equal(dense + r, acc)
    passing = int((acc.abs() >= 1e-20).sum())
    assert 0 < len(want.positions) < passing, "some values must round to zero under the scale"
    assert float(val[sent].abs().max()) <= float(acc.abs().max())


@pytest.mark.parametrize("index_encoding", ["delta", "int32"])
def test_fp8_near_the_top_of_fp32(backend_device, index_encoding):
    """|acc| >= 248 x 2^120 gets the scale 2^120, and rounding to nearest would send 256 x 2^120
    = 2^128, inf in fp32: the fp8 value one step toward zero goes instead (the oracle's rule),
    every decoded value is finite and sent + residual == acc bit for bit; values just below the
    edge and in another segment are unaffected."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(seed_of("fp8-top"))
    top = torch.tensor([3.2e38, 3.29e38, 3.296e38, 3.3e38, 3.4e38, -3.4e38, 3.4028235e38,
                        -3.4028235e38, 2.5e38, 1.0])
    x = torch.cat([top, torch.randn(50, generator=g) * 1e38, torch.randn(60, generator=g)])
    residual = torch.randn(x.numel(), generator=g) * 1e30
    residual[60:] = torch.randn(60, generator=g) * 1e-3
    p, r, _ = check(backend, device, x, 0.0, segments=[0, 60, x.numel()], residual=residual,
                    capacity=x.numel(), value_dtype=FP8, index_encoding=index_encoding,
                    what="fp8 near FLT_MAX")
    dense = dct_kernels.decompress(p, backend=backend).cpu()
    assert torch.isfinite(dense).all()
    assert torch.equal(dense + r.cpu(), x + residual)
    assert float(dense.abs().max()) == 240 * 2.0 ** 120  # the step below 256 x 2^120


def test_fp8_all_zero_segment(backend_device):
    """A segment with nothing to send gets scale 1 and no slot; its neighbours are unaffected."""
    backend, device = backend_device
    x = torch.cat([torch.linspace(1, 2, 100), torch.zeros(100), -torch.linspace(1e-6, 1e-5, 100)])
    p, _, _ = check(backend, device, x, 0.0, segments=[0, 100, 200, 300], capacity=300,
                    value_dtype=FP8, what="zero segment")
    assert p.scales.cpu().tolist()[1] == 1.0
    assert int(p.count) == 200


def test_version1_configurations_are_unchanged(backend_device):
    """int32 indices with fp32/fp16/bf16 values: format version 1, the same bytes as without
    the index_encoding argument."""
    backend, device = backend_device
    x = make_tensor("normal", 500, torch.float32, seed_of("v1-unchanged")).to(device)
    for value_dtype in oracle.DTYPES:
        a = dct_kernels.compress(x, 0.5, capacity=90, value_dtype=value_dtype, backend=backend)
        b = dct_kernels.compress(x, 0.5, capacity=90, value_dtype=value_dtype,
                                 index_encoding="int32", backend=backend)
        assert a.version == b.version == 1
        assert_bitwise_equal(a.buffer.cpu(), b.buffer.cpu(), "v1 bytes")


def test_capacity_none_fits_every_entry_and_escape():
    x = torch.zeros(300000)
    x[[0, 70000, 70001, 299999]] = torch.tensor([1.0, -2.0, 3.0, 4.0])
    p = dct_kernels.compress(x, 0.5, value_dtype=FP8, index_encoding="delta")
    assert p.capacity == 6 and int(p.count) == 6 and int(p.overflow) == 0
    assert_bitwise_equal(p.buffer, oc.compress(x, 0.5, capacity=6).buffer, "capacity=None")


def test_decompress_many_sums_in_rank_order(backend_device):
    backend, device = backend_device
    n, rows = 2000, []
    seed = seed_of("codec-many")
    dense = torch.zeros(n, dtype=torch.float32)
    for w in range(3):
        x = make_tensor("normal", n, torch.float32, seed + w)
        threshold = float(oracle.kth_largest_magnitude(x, 300))
        p, _ = run(backend, device, x, threshold, capacity=400, value_dtype=FP8,
                   index_encoding="delta", segments=[0, 700, n])
        rows.append(p.buffer)
        positions, values = oc.decode(p.buffer)
        assert len(positions) == 300
        part = torch.zeros(n, dtype=torch.float32)
        part[torch.tensor(positions, dtype=torch.int64)] = torch.tensor(values,
                                                                         dtype=torch.float32)
        dense = dense + part
    buffers = torch.stack(rows)
    out = torch.full((n,), 7.0, device=device)
    dct_kernels.decompress_many(buffers, out=out, average=True, backend=backend)
    assert_bitwise_equal(out.cpu(), dense / 3, "average of 3 rows")
    out2 = torch.zeros(n, device=device)
    dct_kernels.decompress_many(buffers, out=out2, capacity=400, value_dtype=FP8,
                                index_encoding="delta", num_scales=2, backend=backend)
    assert_bitwise_equal(out2.cpu(), dense, "sum with the configuration given")


# ------------------------------------------------------------------------------ untrusted input

def _valid_payload(value_dtype=FP8, encoding="delta", n=5000, capacity=300):
    seed = seed_of("codec-corrupt", value_dtype, encoding)
    x = make_tensor("normal", n, torch.float32, seed)
    x[1000:4000] = 0  # a gap that takes escapes under any value width? no: 3000 < 65535
    return dct_kernels.compress(x, 0.8, capacity=capacity, value_dtype=value_dtype,
                                index_encoding=encoding, segments=torch.tensor([0, 2500, n]),
                                backend="torch")


def _poke(buffer, offset, fmt, value):
    import struct
    raw = struct.pack(fmt, value)
    buffer[offset:offset + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)


def _defects(p):
    """Each defect of a valid version-2 payload ``p``, as the (byte offset, struct format,
    value) writes that make it."""
    where, count = p.layout, int(p.count)
    return {
        "version": [(4, "<B", 3)],
        "value_code": [(6, "<B", 4)],
        "index_code": [(7, "<B", 2)],
        "count_high": [(20, "<i", p.capacity + 1)],
        "scale_not_power_of_two": [(where.scales_offset, "<f", 3.0)],
        "scale_negative": [(where.scales_offset + 4, "<f", -0.5)],
        "scale_inf": [(where.scales_offset, "<f", float("inf"))],
        "scale_too_small": [(where.scales_offset, "<f", 2.0 ** -141)],
        "bounds": [(where.bounds_offset + 4, "<i", 6000)],
        # the last entry's gap runs past numel
        "past_numel": [(where.indices_offset + 2 * (count - 1), "<H", 65000)],
        # a 16-bit value field carries more than 32768
        "escape_too_large": [(where.indices_offset + 2 * 5, "<H", 0),
                             (where.values_offset + 2 * 5, "<H", 40000)],
        "dangling_escape": [(where.indices_offset + 2 * (count - 1), "<H", 0)],
    }


def corrupted(how):
    """(a valid version-2 payload, a copy of its buffer with one defect)."""
    value_dtype = torch.bfloat16 if how == "escape_too_large" else FP8
    p = _valid_payload(value_dtype)
    b = p.buffer.clone()
    for offset, fmt, value in _defects(p)[how]:
        _poke(b, offset, fmt, value)
    return p, b


CORRUPTIONS = ("version", "value_code", "index_code", "count_high", "scale_not_power_of_two",
               "scale_negative", "scale_inf", "scale_too_small", "bounds", "past_numel",
               "escape_too_large", "dangling_escape")


# What validate=True says of each defect's row.
ACCOUNT = {how: "bad header, scales or segment bounds" for how in CORRUPTIONS}
ACCOUNT.update({"count_high": r"count outside \[0, capacity\]$",
                "past_numel": "1 bad entries", "dangling_escape": "1 bad entries",
                "escape_too_large": "[0-9]+ bad entries"})  # with all the entries after it


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_validate_rejects_and_writes_nothing(backend_device, how):
    backend, device = backend_device
    p, bad = corrupted(how)
    big, out = oracle.guarded(p.numel, torch.float32, device, seed_of("v2-guard", how))
    before = big.clone()
    with pytest.raises(ValueError, match="invalid payload|not a dct_kernels payload"):
        payload = SparsePayload(bad.to(device), numel=p.numel, capacity=p.capacity,
                                value_dtype=p.value_dtype, shape=p.shape, dtype=p.dtype,
                                index_encoding=p.index_encoding, num_scales=p.num_scales)
        dct_kernels.decompress(payload, out=out, backend=backend)
    assert_bitwise_equal(big.cpu(), before.cpu(), "nothing written")
    with pytest.raises(ValueError, match=f"invalid payload: row 0: {ACCOUNT[how]}"):
        dct_kernels.decompress_many(bad[None].to(device), out=out, capacity=p.capacity,
                                    value_dtype=p.value_dtype, index_encoding="delta",
                                    num_scales=p.num_scales, backend=backend)
    assert_bitwise_equal(big.cpu(), before.cpu(), "nothing written (many)")


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_unvalidated_skips_and_counts(backend_device, how):
    backend, device = backend_device
    p, bad = corrupted(how)
    big, out = oracle.guarded(p.numel, torch.float32, device, seed_of("v2-skip", how))
    guards = oracle.unguard(big)[0]
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    payload = SparsePayload(bad.to(device), numel=p.numel, capacity=p.capacity,
                            value_dtype=p.value_dtype, shape=p.shape, dtype=p.dtype,
                            index_encoding=p.index_encoding, num_scales=p.num_scales)
    dct_kernels.decompress(payload, out=out, validate=False, errors=errors, backend=backend)
    assert_bitwise_equal(oracle.unguard(big)[0], guards, "guards untouched")
    assert int(errors) >= 1
    good_pos, good_val = oc.decode(p.buffer)
    got = oracle.unguard(big)[1]
    # Whatever was written is one of the valid payload's entries (or 0): nothing invented.
    valid = dict(zip(good_pos, good_val))
    nonzero = torch.nonzero(got).flatten().tolist()
    for i in nonzero:
        if how in ("past_numel", "dangling_escape", "escape_too_large"):
            assert i in valid and float(got[i]) == np.float32(valid[i]), i


def test_fuzzed_payloads_never_write_outside_out(backend_device):
    """Random byte flips anywhere in valid version-2 payloads: validate=False never writes
    outside out; validate=True either raises or agrees with validate=False counting nothing."""
    backend, device = backend_device
    rng = np.random.default_rng(seed_of("v2-fuzz"))
    payloads = [_valid_payload(FP8, "delta"), _valid_payload(torch.bfloat16, "delta"),
                _valid_payload(FP8, "int32")]
    for trial in range(12):
        p = payloads[trial % 3]
        bad = p.buffer.clone()
        for _ in range(int(rng.integers(1, 6))):
            bad[int(rng.integers(0, bad.numel()))] = int(rng.integers(0, 256))
        payload = SparsePayload(bad.to(device), numel=p.numel, capacity=p.capacity,
                                value_dtype=p.value_dtype, shape=p.shape, dtype=p.dtype,
                                index_encoding=p.index_encoding, num_scales=p.num_scales)
        big, out = oracle.guarded(p.numel, torch.float32, device, trial)
        guards = oracle.unguard(big)[0]
        errors = torch.zeros(1, dtype=torch.int32, device=device)
        dct_kernels.decompress(payload, out=out, validate=False, errors=errors,
                               backend=backend)
        assert_bitwise_equal(oracle.unguard(big)[0], guards, f"trial {trial}")
        unchecked = out.clone()
        try:
            checked = dct_kernels.decompress(payload, validate=True, backend=backend)
        except ValueError:
            assert int(errors) > 0, f"trial {trial}: rejected but nothing counted"
            continue
        assert int(errors) == 0, f"trial {trial}: accepted but errors counted"
        assert_bitwise_equal(checked.cpu(), unchecked.cpu(), f"trial {trial}")


def test_bad_arguments_name_themselves():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="index_encoding"):
        dct_kernels.compress(x, 0.5, capacity=10, index_encoding="varint")
    with pytest.raises(TypeError, match="value_dtype"):
        dct_kernels.compress(x, 0.5, capacity=10, value_dtype=torch.float8_e5m2)
    p = dct_kernels.compress(x, 0.5, capacity=10, value_dtype=FP8)
    with pytest.raises(ValueError, match="num_scales"):
        dct_kernels.decompress_many(p.buffer[None], out=torch.zeros(100), capacity=10,
                                    value_dtype=FP8)


@pytest.mark.parametrize("config", CONFIGS + [(torch.bfloat16, "int32")],
                         ids=CONFIG_IDS + ["bf16-int32"])
def test_a_range_of_a_larger_tensor(backend_device, config):
    """position_offset/total_numel: the payload of x describes the larger tensor (positions
    shifted, numel the total), entries and residual as for x alone; padded scale segments
    (empty ones) decode; disjoint ranges decode together with decompress_many."""
    backend, device = backend_device
    value_dtype, encoding = config
    seed = seed_of("codec-range", value_dtype, encoding)
    total, cut = 9000, 4000
    full = make_tensor("normal", total, torch.float32, seed)
    threshold = float(oracle.kth_largest_magnitude(full, 200))
    fp8 = value_dtype == FP8
    rows = []
    for lo, hi in ((0, cut), (cut, total)):
        extra = {"scale_offsets": [0, lo, (lo + hi) // 2, hi, total, total]} if fp8 else {}
        alone, r_alone = run(backend, device, full[lo:hi], threshold,
                             residual=torch.zeros(hi - lo), capacity=150,
                             value_dtype=value_dtype, index_encoding=encoding)
        residual = torch.zeros(hi - lo, device=device)
        p = dct_kernels.compress(full[lo:hi].to(device), threshold, residual=residual,
                                 capacity=150, value_dtype=value_dtype, index_encoding=encoding,
                                 position_offset=lo, total_numel=total, backend=backend, **extra)
        assert p.numel == total and p.shape == (total,)
        pos, val, sent = codec.entries(p)
        pos_a, val_a, sent_a = codec.entries(alone)
        assert (pos[sent] - lo).tolist() == pos_a[sent_a].tolist()
        if not fp8:  # (fp8 scales may differ: other segments)
            assert_bitwise_equal(val[sent].cpu(), val_a[sent_a].cpu(), "values")
            assert_bitwise_equal(residual.cpu(), r_alone.cpu(), "residual")
        rows.append(p.buffer)
    if fp8:
        return  # the two ranges' payloads have their own scale layouts
    out = torch.zeros(total, device=device)
    dct_kernels.decompress_many(torch.stack(rows), out=out, backend=backend)
    keep = full.abs() >= threshold
    assert torch.equal((out.cpu() != 0), keep & (full != 0))


def test_range_arguments_are_checked():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="position_offset"):
        dct_kernels.compress(x, 0.5, capacity=10, position_offset=-1)
    with pytest.raises(ValueError, match="total_numel"):
        dct_kernels.compress(x, 0.5, capacity=10, position_offset=50, total_numel=120)
    with pytest.raises(ValueError, match="scale_offsets"):
        dct_kernels.compress(x, 0.5, capacity=10, value_dtype=FP8, scale_offsets=[0, 50, 90])
    with pytest.raises(ValueError, match="scale_offsets"):
        dct_kernels.compress(x, 0.5, capacity=10, value_dtype=FP8,
                             scale_offsets=[0, 60, 50, 100])
    with pytest.raises(ValueError, match="scale_offsets"):
        dct_kernels.compress(x, 0.5, capacity=10, scale_offsets=[0, 100])


@pytest.mark.parametrize("backend_only", ("torch", "cpu"))
def test_decompress_many_large_rows(backend_only):
    """Rows of more than 4096 slots (the cpu core decodes them on several threads). Not on
    the Triton interpreter (minutes at this size): its version-2 part is the shared codec."""
    if backend_only == "cpu" and dct_kernels.available_backends()["cpu"] != "available":
        pytest.skip("cpu extension not built")
    backend, device = backend_only, "cpu"
    n, rows, dense = 400000, [], torch.zeros(400000)
    for w in range(3):
        x = make_tensor("normal", n, torch.float32, seed_of("codec-large", w))
        threshold = float(oracle.kth_largest_magnitude(x, 5000))
        p, _ = run(backend, device, x, threshold, capacity=6000, value_dtype=FP8,
                   index_encoding="delta", segments=[0, 123457, n])
        rows.append(p.buffer)
        positions, values = oc.decode(p.buffer.cpu())
        part = torch.zeros(n)
        part[torch.tensor(positions, dtype=torch.int64)] = torch.tensor(values,
                                                                         dtype=torch.float32)
        dense = dense + part
    out = torch.zeros(n, device=device)
    dct_kernels.decompress_many(torch.stack(rows), out=out, backend=backend)
    assert_bitwise_equal(out.cpu(), dense, "sum of 3 rows of 6000 slots")


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, FP8])
def test_capacity_zero_round_trips(backend_device, value_dtype):
    """A version-2 payload of no slot (capacity 0: nothing passes, or an empty tensor) decodes
    to zeros through every path, with no error counted."""
    backend, device = backend_device
    x = make_tensor("normal", 40, torch.float32, seed_of("cap0")).to(device)
    for tensor, capacity in ((x, 0), (x[:0], 0), (x, None)):
        p = dct_kernels.compress(tensor, 1e9, capacity=capacity, value_dtype=value_dtype,
                                 index_encoding="delta", backend=backend)
        assert p.capacity == 0 and p.version == 2
        for validate in (True, False):
            errors = torch.zeros(1, dtype=torch.int32, device=device)
            out = dct_kernels.decompress(p, validate=validate, errors=errors, backend=backend)
            assert out.numel() == tensor.numel() and not out.any() and int(errors) == 0
            many = torch.ones(tensor.numel(), device=device)
            dct_kernels.decompress_many(torch.stack([p.buffer, p.buffer]), out=many,
                                        validate=validate, errors=errors, backend=backend)
            assert not many.any() and int(errors) == 0
        positions, values, sent = codec.entries(p)
        assert positions.numel() == values.numel() == sent.numel() == 0


def test_a_version2_row_is_not_read_as_version1(backend_device):
    """A delta-coded bf16 row of capacity 1 has the byte size of a version-1 bf16 row of
    capacity 1; told to expect version 1, validate=True refuses it and validate=False skips
    and counts it (writing nothing), on every backend alike."""
    backend, device = backend_device
    x = torch.zeros(20)
    x[7] = 3.0
    v2 = dct_kernels.compress(x, 1.0, capacity=1, value_dtype=torch.bfloat16,
                              index_encoding="delta", backend="torch")
    v1 = dct_kernels.compress(x, 1.0, capacity=1, value_dtype=torch.bfloat16)
    assert v2.buffer.numel() == v1.buffer.numel()
    rows = v2.buffer[None].to(device)
    with pytest.raises(ValueError, match="buffers.*format version 2"):
        dct_kernels.decompress_many(rows, out=torch.zeros(20, device=device), capacity=1,
                                    value_dtype=torch.bfloat16, validate=True, backend=backend)
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.zeros(20, device=device)
    dct_kernels.decompress_many(rows, out=out, capacity=1, value_dtype=torch.bfloat16,
                                validate=False, errors=errors, backend=backend)
    assert not out.any() and int(errors) == 1
