"""compress_shards: W ranges of x into the W rows of one send tensor, each row bitwise what
``compress`` of the range writes (every backend; version 1 against the independent oracle
too), and the argument errors."""

import numpy as np
import pytest
import torch

import dct_kernels
import oracle
from dct_kernels import payload as wire
from dct_kernels.ops import Segments
from helpers import assert_bitwise_equal
from oracle import make_tensor

FP8 = torch.float8_e4m3fn


def _ranges(n: int, W: int, g: torch.Generator):
    """W + 1 cuts with an empty range, a one-element range and ranges of odd sizes; per range
    a Segments (or None: one segment / empty) and its thresholds (a quantile of the data)."""
    inner = sorted(int(c) for c in torch.randint(1, n, (W - 3,), generator=g))
    cuts = [0, 0, 1] + inner + [n]  # range 0 empty, range 1 one element
    segments = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        size = hi - lo
        if size == 0:
            segments.append(None)
        elif size < 8 or len(segments) % 3 == 2:
            segments.append(None if size % 2 else Segments([0, size]))
        else:
            inner = sorted({int(c) for c in torch.randint(1, size, (3,), generator=g)})
            segments.append(Segments([0] + inner + [size]))
    return cuts, segments


def _thresholds(x, cuts, segments):
    taus = []
    for (lo, hi), seg in zip(zip(cuts[:-1], cuts[1:]), segments):
        offsets = seg.offsets if seg is not None else ([0, hi - lo] if hi > lo else [0])
        for a, b in zip(offsets[:-1], offsets[1:]):
            part = x[lo + a:lo + b].float().abs()
            taus.append(float(part.nan_to_num(0).quantile(0.9)) if b - a > 1 else 0.5)
    return torch.tensor(taus, dtype=torch.float32)


def _case(n: int, W: int, dtype, *, seed: int, x_seed: int, spread: float):
    """x (the oracle's hard cases), a residual of scale ``spread``, W ranges with their
    Segments and per-segment thresholds."""
    g = torch.Generator().manual_seed(seed)
    x = make_tensor("specials", n, dtype, seed=x_seed)
    residual = torch.randn(n, generator=g) * spread
    cuts, segments = _ranges(n, W, g)
    return x, residual, cuts, segments, _thresholds(x, cuts, segments)


CONFIGS = [(None, "int32"), (torch.bfloat16, "int32"), (torch.bfloat16, "delta"),
           (FP8, "delta"), (FP8, "int32")]


@pytest.mark.parametrize("value_dtype,index_encoding", CONFIGS,
                         ids=["native-int32", "bf16-int32", "bf16-delta", "fp8-delta",
                              "fp8-int32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_are_compress_of_each_range(backend_device, value_dtype, index_encoding, dtype):
    backend, device = backend_device
    n, W, capacity = 4099, 6, 97
    x, residual, cuts, segments, taus = _case(n, W, dtype, seed=11, x_seed=5, spread=0.3)
    fp8 = value_dtype == FP8
    scale_offsets = None
    if fp8:  # one scale count for every row: each range's segments padded with its length
        lengths = [len(s.offsets) if s is not None else 1 for s in segments]
        width = max(lengths) + 1
        scale_offsets = [((s.offsets if s is not None else [0]) + [hi - lo] * width)[:width]
                         for s, lo, hi in zip(segments, cuts[:-1], cuts[1:])]
    vd = value_dtype or dtype
    nbytes = wire.wire_layout(capacity, vd, index_encoding,
                              len(scale_offsets[0]) - 1 if fp8 else 0).nbytes
    dev_segments = [Segments(s.offsets, device=device) if s is not None else None
                    for s in segments]
    out = torch.full((W, nbytes), 0xAB, dtype=torch.uint8, device=device)
    got_residual = residual.clone().to(device)
    payloads = dct_kernels.compress_shards(
        x.to(device), taus.to(device), cuts=cuts, segments=dev_segments, capacity=capacity,
        residual=got_residual, value_dtype=value_dtype, index_encoding=index_encoding,
        scale_offsets=scale_offsets, out=out, backend=backend)
    assert len(payloads) == W
    t = 0
    want_residual = residual.clone().to(device)
    for s, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        count = len(segments[s].offsets) - 1 if segments[s] is not None else int(hi > lo)
        row = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        dct_kernels.compress(x[lo:hi].to(device), taus[t:t + count].to(device)
                             if segments[s] is not None else
                             (taus[t:t + 1].to(device) if count else 0.0),
                             segments=dev_segments[s], residual=want_residual[lo:hi],
                             capacity=capacity, value_dtype=value_dtype,
                             index_encoding=index_encoding,
                             scale_offsets=scale_offsets[s] if fp8 else None, out=row,
                             backend=backend)
        assert_bitwise_equal(out[s].cpu(), row.cpu(), f"row {s} ({hi - lo} elements)")
        assert payloads[s].buffer.data_ptr() == out[s].data_ptr()
        t += count
    assert_bitwise_equal(got_residual.cpu(), want_residual.cpu(), "residual")
    assert int(payloads[0].count) == 0 and payloads[0].numel == 0


def test_version_1_rows_against_the_oracle():
    g = torch.Generator().manual_seed(2)
    n, W, capacity = 2500, 5, 60
    x = torch.randn(n, generator=g)
    residual = torch.randn(n, generator=g) * 0.5
    cuts, segments = _ranges(n, W, g)
    taus = _thresholds(x + residual, cuts, segments)
    nbytes = wire.wire_layout(capacity, torch.bfloat16).nbytes
    out = torch.zeros(W, nbytes, dtype=torch.uint8)
    after = residual.clone()
    dct_kernels.compress_shards(x, taus, cuts=cuts, segments=segments, capacity=capacity,
                                residual=after, value_dtype=torch.bfloat16, out=out)
    t = 0
    for s, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        offsets = segments[s].offsets if segments[s] is not None else [0, hi - lo]
        count = len(offsets) - 1 if hi > lo else 0
        if count == 0:
            assert bytes(out[s, :32].numpy()) == oracle.header(0, capacity, torch.bfloat16,
                                                               0, 0)
            continue
        want = oracle.compress(x[lo:hi], taus[t:t + count].tolist(), offsets,
                               residual=residual[lo:hi], capacity=capacity,
                               value_dtype=torch.bfloat16)
        assert bytes(out[s, :32].numpy()) == oracle.header(hi - lo, capacity, torch.bfloat16,
                                                           want.count, want.overflow), s
        decoded = oracle.decode(out[s])
        np.testing.assert_array_equal(decoded.indices[:want.count], want.indices)
        assert_bitwise_equal(after[lo:hi], torch.from_numpy(want.residual), f"residual {s}")
        t += count


@pytest.mark.skipif(dct_kernels.available_backends()["cpu"] != "available",
                    reason="the cpu core is not built")
@pytest.mark.parametrize("value_dtype,index_encoding", CONFIGS[1:4],
                         ids=["bf16-int32", "bf16-delta", "fp8-delta"])
@pytest.mark.parametrize("capacity", [5, 300], ids=["overflowing", "roomy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cpu_one_call_equals_the_loop(monkeypatch, value_dtype, index_encoding, capacity,
                                      dtype):
    """The cpu backend compresses every range in one call of its core (compress_ranges), in
    wire format version 1 and 2: with per-range compress made to fail it still runs, and it
    writes bitwise what the per-range loop writes (the loop forced by hiding compress_ranges),
    rows that overflow, an empty range (with its fp8 scale section) included, over a send
    tensor full of stale bytes, and leaves the same residual."""
    from dct_kernels.backends import cpu_ext

    n, W = 3001, 9
    x, residual, cuts, segments, taus = _case(n, W, dtype, seed=23, x_seed=8, spread=0.2)
    fp8 = value_dtype == FP8
    scale_offsets = None
    if fp8:
        scale_offsets = [[0, 0, 0] if hi == lo else [0, (hi - lo) // 3, hi - lo]
                         for lo, hi in zip(cuts[:-1], cuts[1:])]
    nbytes = wire.wire_layout(capacity, value_dtype, index_encoding, 2 if fp8 else 0).nbytes

    def run():
        out = torch.full((W, nbytes), 0xCD, dtype=torch.uint8)
        after = residual.clone()
        payloads = dct_kernels.compress_shards(
            x, taus, cuts=cuts, segments=segments, capacity=capacity, residual=after,
            value_dtype=value_dtype, index_encoding=index_encoding,
            scale_offsets=scale_offsets, out=out, backend="cpu")
        return out, after, payloads

    def fail(*args, **kwargs):
        raise AssertionError("per-range compress called")

    with monkeypatch.context() as m:
        m.setattr(cpu_ext, "compress", fail)
        fused, fused_residual, payloads = run()
    with monkeypatch.context() as m:
        m.delattr(cpu_ext, "compress_ranges")
        looped, looped_residual, looped_payloads = run()
    assert_bitwise_equal(fused, looped, "rows")
    assert_bitwise_equal(fused_residual, looped_residual, "residual")
    overflow = [int(p.overflow) for p in payloads]
    assert (max(overflow) > 0) == (capacity == 5), overflow
    for p, q, row, lo, hi in zip(payloads, looped_payloads, fused, cuts[:-1], cuts[1:]):
        assert p.buffer.data_ptr() == row.data_ptr() and p.numel == hi - lo
        assert (p.shape, p.dtype, p.capacity, p.value_dtype, p.index_encoding, p.num_scales) == \
            (q.shape, q.dtype, q.capacity, q.value_dtype, q.index_encoding, q.num_scales)


def test_argument_errors():
    x = torch.randn(100)
    seg = [Segments([0, 40]), Segments([0, 10, 60])]
    taus = torch.ones(3)
    nbytes = wire.wire_layout(8, torch.float32).nbytes
    out = torch.zeros(2, nbytes, dtype=torch.uint8)

    def call(**kw):
        args = dict(cuts=[0, 40, 100], segments=seg, capacity=8, out=out)
        args.update(kw)
        return dct_kernels.compress_shards(args.pop("x", x), args.pop("taus", taus), **args)

    call()
    for kw, needle in [(dict(cuts=[0, 50, 100]), "segments"), (dict(cuts=[0, 40, 99]), "cuts"),
                       (dict(cuts=[0, 60, 40, 100]), "cuts"), (dict(cuts=[0, 40.0, 100]), "cuts"),
                       (dict(segments=seg[:1]), "segments"), (dict(taus=torch.ones(4)),
                                                               "threshold"),
                       (dict(taus=torch.ones(3, dtype=torch.int64)), "threshold"),
                       (dict(out=torch.zeros(2, nbytes + 16, dtype=torch.uint8)), "out"),
                       (dict(out=torch.zeros(3, nbytes, dtype=torch.uint8)), "out"),
                       (dict(capacity=-1), "capacity"),
                       (dict(residual=torch.zeros(99)), "residual"),
                       (dict(scale_offsets=[[0, 40], [0, 60]]), "scale_offsets"),
                       (dict(index_encoding="gap"), "index_encoding")]:
        with pytest.raises((ValueError, TypeError), match=needle):
            call(**kw)
    fp8_out = torch.zeros(2, wire.wire_layout(8, FP8, "delta", 2).nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scale_offsets"):  # rows of different scale counts
        call(value_dtype=FP8, index_encoding="delta", out=fp8_out,
             scale_offsets=[[0, 40, 40], [0, 10, 60, 60]])


def test_an_empty_tensor_gives_empty_rows_on_every_backend(backend_device):
    """x of no elements (every range empty): W empty payloads, bitwise the reference's."""
    backend, device = backend_device
    rows = {}
    for b, dev in ((backend, device), ("torch", "cpu")):
        out = torch.full((3, 64), 7, dtype=torch.uint8, device=dev)
        dct_kernels.compress_shards(torch.zeros(0, device=dev), 1.0, cuts=[0, 0, 0, 0],
                                    segments=[None] * 3, capacity=2, out=out, backend=b)
        rows[b, dev] = out.cpu()
    assert_bitwise_equal(rows[backend, device], rows["torch", "cpu"], "empty rows")
