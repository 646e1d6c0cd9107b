"""The cpu backend (host C++ core) where the generic tests do not reach: sizes that span many
of its work chunks and threads, results that do not depend on the thread count, each path of
its selection, concurrent callers, a forked child, and errors raised by the binding.

Everything is compared bit for bit with the torch reference (the generic tests compare the
reference with the independent oracles), at thread counts 1 to 4 (more threads than cores is
allowed: the results must not change).
"""

import multiprocessing
import re
import threading

import numpy as np
import pytest
import torch

import dct_kernels as dk
import oracle
from helpers import assert_bitwise_equal, assert_same_bits

pytestmark = pytest.mark.skipif(dk.available_backends()["cpu"] != "available",
                                reason="cpu extension not built")

THREADS = (1, 2, 3, 4)
# Above the chunk sizes of the core (64 Ki elements per compress task, 16 Ki outputs per
# merge tile, 64 Ki per select task) and not a multiple of any of them.
LARGE = (1 << 20) + 12345


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _at_threads(fn):
    """fn() at every thread count of THREADS; the results (tuples of tensors) are checked to
    be bitwise equal to each other, and the first is returned."""
    results = []
    for t in THREADS:
        torch.set_num_threads(t)
        results.append(fn())
    for t, r in zip(THREADS[1:], results[1:]):
        for a, b in zip(r, results[0]):
            assert_bitwise_equal(a, b, f"{t} threads against 1")
    return results[0]


def _data(kind, n, dtype, seed):
    return oracle.make_tensor(kind, n, dtype, oracle.seed_of("cpu", kind, n, dtype, seed))


# --------------------------------------------------------------------------------- select

# Data that send the selection down each of its paths: "normal" and "wide" data the sampled
# window; "narrow" and "equal" data (every key in a few bins) and "spikes" (the evenly spaced
# sample sees only large values) the radix fallback; fp16/bf16 the 15-bit histogram.
SELECT_KINDS = ("normal", "wide", "narrow", "equal", "ties", "specials", "spikes")


def _select_input(kind, n, dtype):
    if kind != "spikes":
        return _data(kind, n, dtype, 0)
    x = _data("normal", n, dtype, 1) * 1e-3
    x[::97] = 50.0  # a period the sample's stride does not divide
    x[::256] = -100.0
    return x


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=oracle.dtype_id)
@pytest.mark.parametrize("kind", SELECT_KINDS)
def test_select_large_matches_reference_at_every_thread_count(kind, dtype, threads_restored):
    x = _select_input(kind, LARGE, dtype)
    for k in (1, 37, LARGE // 100, LARGE // 3, LARGE):
        (got,) = _at_threads(lambda: (dk.select_threshold(x, k, backend="cpu"),))
        assert_bitwise_equal(got, oracle.topk_threshold(x, k), f"{kind} k={k}")


def test_select_segments_small_and_large(threads_restored):
    """Many small segments (dealt to threads in groups) next to segments larger than the
    small-segment cutoff (each spread over the threads)."""
    n = 3 * LARGE // 2
    x = _data("normal", n, torch.float32, 2)
    offsets = oracle.make_segments(n - 300000, 3)
    offsets = offsets[:-1] + [offsets[-1], offsets[-1] + 40000, n]  # then two large ones
    lengths = np.diff(offsets)
    ks = [max(1, int(length) // 50) for length in lengths]
    segments = torch.tensor(offsets, dtype=torch.int64)
    (got,) = _at_threads(lambda: (dk.select_threshold(
        x, torch.tensor(ks), segments=segments, backend="cpu"),))
    assert_bitwise_equal(got, dk.select_threshold(x, torch.tensor(ks), segments=segments,
                                                  backend="torch"), "segmented")


# ------------------------------------------------------------------------------- compress

@pytest.mark.parametrize("value_dtype", oracle.DTYPES, ids=oracle.dtype_id)
@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=oracle.dtype_id)
def test_compress_large_matches_reference(dtype, value_dtype, threads_restored):
    x = _data("specials", LARGE, dtype, 4)
    residual0 = _data("normal", LARGE, torch.float32, 5) * 0.1
    threshold = float(dk.select_threshold(x.float() + residual0, LARGE // 50, backend="cpu"))
    for capacity in (None, LARGE // 200):  # the second overflows in the middle of a chunk
        def run(backend):
            residual = residual0.clone()
            p = dk.compress(x, threshold, residual=residual, capacity=capacity,
                            value_dtype=value_dtype, backend=backend)
            return p.buffer, residual
        buffer, residual = _at_threads(lambda: run("cpu"))
        ref_buffer, ref_residual = run("torch")
        assert torch.equal(buffer, ref_buffer), f"capacity={capacity}: wire bytes differ"
        assert_bitwise_equal(residual, ref_residual, f"capacity={capacity}: residual")


def test_compress_segments_across_chunks(threads_restored):
    """Segment boundaries that fall inside the core's chunks and blocks, one threshold each."""
    x = _data("normal", LARGE, torch.float32, 6)
    offsets = [0, 1, 17, 65535, 65536, 65537, 200003, 700001, LARGE]
    segments = torch.tensor(offsets, dtype=torch.int64)
    thresholds = torch.tensor([0.0, 3.0, 1.0, -1.0, float("nan"), 2.5, 0.5, 2.0])
    residual0 = _data("normal", LARGE, torch.float32, 7)

    def run(backend):
        residual = residual0.clone()
        p = dk.compress(x, thresholds, segments=segments, residual=residual, backend=backend)
        return p.buffer, residual
    buffer, residual = _at_threads(lambda: run("cpu"))
    ref_buffer, ref_residual = run("torch")
    assert torch.equal(buffer, ref_buffer)
    assert_bitwise_equal(residual, ref_residual, "residual")


def test_compress_residual_aliasing_x(threads_restored):
    """compress(x, t, residual=x): x is read and rewritten in place."""
    base = _data("normal", LARGE, torch.float32, 8)

    def run(backend):
        x = base.clone()
        p = dk.compress(x, 1.5, residual=x, capacity=LARGE // 20, backend=backend)
        return p.buffer, x
    got = _at_threads(lambda: run("cpu"))
    for a, b in zip(got, run("torch")):
        assert_bitwise_equal(a, b, "aliased residual")


# ----------------------------------------------------------------------------- decompress

def _payloads(n, ranks, value_dtype, seed):
    buffers = []
    for w in range(ranks):
        x = _data("specials", n, torch.float32, seed + w)
        buffers.append(dk.compress(x, 1.0, capacity=n // 8, value_dtype=value_dtype,
                                   backend="torch").buffer)
    return torch.stack(buffers)


@pytest.mark.parametrize("ranks", [1, 3, 8])
@pytest.mark.parametrize("out_dtype", oracle.DTYPES, ids=oracle.dtype_id)
def test_decompress_many_large_matches_reference(ranks, out_dtype, threads_restored):
    n = LARGE // 2
    buffers = _payloads(n, ranks, torch.bfloat16, 10 * ranks)
    # One corrupted row: an unsorted run in its middle (skipped and counted).
    bad = oracle.corrupt(buffers[ranks // 2], "unsorted", n // 8, n // 8, n)
    buffers[ranks // 2] = bad
    start = _data("normal", n, out_dtype, 11)
    for accumulate, average in ((False, False), (True, True), (False, True)):
        def run(backend):
            out = start.clone()
            errors = torch.zeros((), dtype=torch.int32)
            dk.decompress_many(buffers, out=out, accumulate=accumulate, average=average,
                               validate=False, errors=errors, backend=backend)
            return out, errors
        got = _at_threads(lambda: run("cpu"))
        for a, b in zip(got, run("torch")):
            assert_bitwise_equal(a, b, f"accumulate={accumulate} average={average}")
        assert int(got[1]) > 0


def test_decompress_large_matches_reference(threads_restored):
    n = LARGE
    (buffer,) = _payloads(n, 1, torch.float16, 20)
    start = _data("normal", n, torch.float32, 21)
    for accumulate in (False, True):
        def run(backend):
            out = start.clone()
            dk.decompress(dk.SparsePayload.from_buffer(buffer), out=out, accumulate=accumulate,
                          backend=backend)
            return (out,)
        assert_bitwise_equal(_at_threads(lambda: run("cpu"))[0], run("torch")[0], "decompress")


# ----------------------------------------------------------------------------------- rows

@pytest.mark.parametrize("columns", [33, 4096, 40000])
def test_rows_many_rows_match_reference(columns, threads_restored):
    rows = max(3, (1 << 20) // columns)
    x = _data("ties", rows * columns, torch.float32, columns).view(rows, columns)
    x[1] = 1.0  # a row of equal magnitudes: ties to the lower columns
    x[2, ::2] = float("nan")
    for k in (1, max(1, columns // 20), columns):
        got = _at_threads(lambda: (lambda p: (p.indices, p.values))(
            dk.compress_rows(x, k, value_dtype=torch.bfloat16, backend="cpu")))
        ref = dk.compress_rows(x, k, value_dtype=torch.bfloat16, backend="torch")
        assert_bitwise_equal(got[0], ref.indices, f"k={k} indices")
        assert_bitwise_equal(got[1], ref.values, f"k={k} values")
        p = dk.compress_rows(x, k, backend="cpu")
        assert_bitwise_equal(_at_threads(lambda: (dk.decompress_rows(p, backend="cpu"),))[0],
                             dk.decompress_rows(p, backend="torch"), "decompress_rows")
        assert_bitwise_equal(_at_threads(lambda: (dk.gather_rows(x, p, backend="cpu"),))[0],
                             dk.gather_rows(x, p, backend="torch"), "gather_rows")


# ----------------------------------------------------------------- threads, fork, binding

def test_concurrent_callers_get_their_own_results(threads_restored):
    """Python threads calling at once (the GIL is released in the kernels; a caller that finds
    the pool busy runs on its own thread) each get exactly the single-caller result."""
    torch.set_num_threads(2)
    inputs = [_data("normal", LARGE // 4, torch.float32, 30 + i) for i in range(4)]
    expected = [dk.select_threshold(x, 1000, backend="cpu") for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = dk.select_threshold(inputs[i], 1000, backend="cpu")
    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not any(w.is_alive() for w in workers)
    for got, want in zip(results, expected):
        assert_bitwise_equal(got, want, "concurrent select")


def _child_select(queue):
    # The input comes from numpy: torch's own parallel ops are not safe in a forked child of a
    # parent that used its OpenMP threads (they hang there, with or without dct_kernels).
    x = torch.from_numpy(np.arange(1, LARGE + 1, dtype=np.float32))
    torch.set_num_threads(2)
    queue.put(float(dk.select_threshold(x, 10, backend="cpu")))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="no fork on this platform")
def test_forked_child_does_not_hang(threads_restored):
    """The pool's threads do not survive fork(): a child that calls a kernel after the parent
    used the pool gets a pool of its own instead of waiting on threads that are gone."""
    torch.set_num_threads(2)
    dk.select_threshold(_data("normal", LARGE, torch.float32, 40), 5, backend="cpu")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_select, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("forked child hung in the cpu backend")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == float(LARGE - 9)


def test_binding_errors_name_the_kernel():
    from dct_kernels import _cpu
    x = torch.ones(8)
    out = torch.empty(1)
    with pytest.raises(RuntimeError, match="select_threshold"):
        _cpu.select_threshold(x=x.data_ptr(), dtype=0, offsets=[0, 8], ks=[9],
                              out=out.data_ptr(), threads=1)
    buffer = torch.zeros(48, dtype=torch.uint8)
    errors = torch.zeros((), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="decompress"):  # rows too short for the capacity
        _cpu.decompress(buffers=buffer.data_ptr(), row_bytes=48, numel=8, capacity=100,
                        value_dtype=0, header=[0, 0, 0, 0], out=out.data_ptr(), out_dtype=0,
                        accumulate=False, errors=errors.data_ptr(), threads=1)
    with pytest.raises(ValueError, match="dtype code"):
        _cpu.count_kept(x=x.data_ptr(), dtype=7, n=8, residual=0, thresholds=out.data_ptr(),
                        offsets=0, num_segments=1, threads=1)


# Each binding's arguments, in order, named as in csrc/cpu/dct_cpu.h; where the CUDA core has
# the same argument (csrc/cuda/bindings.cpp) it has the same name.
BINDING_ARGUMENTS = {
    "compress": ("x", "dtype", "n", "residual", "thresholds", "offsets", "num_segments",
                 "payload", "capacity", "value_dtype", "threads"),
    "decompress_many": ("buffers", "num_rows", "row_bytes", "numel", "capacity", "value_dtype",
                        "header", "out", "out_dtype", "accumulate", "average", "errors",
                        "threads"),
    "compress_rows": ("x", "dtype", "rows", "columns", "k", "indices", "index_bytes", "values",
                      "value_dtype", "threads"),
}


def test_binding_arguments_are_named_and_keyword_only():
    """A positional call is refused (two swapped integers fail instead of running), the same
    values by name run, the names are those of the C++ declarations, and every kernel of the
    module takes keywords only (its signature in the docstring starts with `*`)."""
    from dct_kernels import _cpu
    from dct_kernels import payload as wire
    x = torch.arange(1.0, 9.0)
    out = torch.zeros(8)
    thresholds = torch.full((1,), 0.5)
    buffer = torch.zeros(wire.layout(1, torch.float32)[1], dtype=torch.uint8)
    header = wire.header_words(8, 1, torch.float32)
    buffer[:4 * len(header)] = torch.tensor(header, dtype=torch.int32).view(torch.uint8)
    errors = torch.zeros((), dtype=torch.int32)
    compress = dict(x=x.data_ptr(), dtype=0, n=8, residual=0, thresholds=thresholds.data_ptr(),
                    offsets=0, num_segments=1, payload=buffer.data_ptr(), capacity=1,
                    value_dtype=0, threads=1)
    many = dict(buffers=buffer.data_ptr(), num_rows=1, row_bytes=buffer.numel(), numel=8,
                capacity=1, value_dtype=0, header=header[:4], out=out.data_ptr(), out_dtype=0,
                accumulate=False, average=False, errors=errors.data_ptr(), threads=1)
    for name, arguments in (("compress", compress), ("decompress_many", many)):
        assert tuple(arguments) == BINDING_ARGUMENTS[name]
        kernel = getattr(_cpu, name)
        with pytest.raises(TypeError):
            kernel(*arguments.values())
        with pytest.raises(TypeError):
            kernel(**arguments, stream=0)
        kernel(**arguments)
    # Every entry passes, one fits: x[0] sent, the other seven counted as overflow.
    assert int(errors) == 0 and out.tolist() == [1.0] + [0.0] * 7
    for name, arguments in BINDING_ARGUMENTS.items():
        signature = getattr(_cpu, name).__doc__.splitlines()[0]
        assert signature.startswith(f"{name}(*, "), signature
        assert re.findall(r"(\w+): ", signature) == list(arguments), name
    no_arguments = ("_key_scan_isas", "_key_scan_isa")
    for name in dir(_cpu):
        if name.startswith("__"):
            continue
        expected = f"{name}()" if name in no_arguments else f"{name}(*, "
        assert getattr(_cpu, name).__doc__.startswith(expected), name


def test_cpu_tensors_default_to_the_cpu_backend(monkeypatch):
    from dct_kernels.backends import resolve
    monkeypatch.delenv("DCT_KERNELS_BACKEND", raising=False)
    assert resolve(None, torch.device("cpu")).NAME == "cpu"
    assert dk.available_backends()["cpu"] == "available"


def _with_nans(dtype, n, seed):
    """n values of ``dtype`` with NaNs of several bit patterns (quiet, negative, other
    payloads) and infinities among them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(dtype)
    bits = x.view(torch.int16)
    patterns = ([0x7E00, -0x200, 0x7C01, 0x7FFF] if dtype == torch.float16 else
                [0x7FC0, -1, 0x7F81, -0x40])  # -1 = 0xFFFF, -0x40 = 0xFFC0
    where = torch.randperm(n, generator=g)[:12]
    for i, w in enumerate(where.tolist()):
        bits[w] = patterns[i % len(patterns)]
    x[where[-1]] = float("inf")
    return x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [40, 1000])
def test_nan_payloads_give_the_same_bits_as_the_reference(dtype, n, threads_restored):
    """Whatever NaN bits the data carries, the cpu core and the torch reference write the same
    payload, residual and decompressed bits (torch's own 16-bit to fp32 conversion of a NaN
    depends on its code path, so the reference widens NaNs exactly)."""
    x = _with_nans(dtype, n, seed=n)
    residual0 = torch.randn(n, generator=torch.Generator().manual_seed(5))
    capacity = n // 8  # some of what passes overflows and stays in the residual
    for value_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        for index_encoding in ("int32", "delta"):
            got = {}
            for backend in ("cpu", "torch"):
                r = residual0.clone()
                p = dk.compress(x, 0.5, residual=r, capacity=capacity, value_dtype=value_dtype,
                                index_encoding=index_encoding, backend=backend)
                outs = [dk.decompress(p, out=torch.full((n,), 7.0, dtype=d), accumulate=True,
                                      backend=backend) for d in oracle.DTYPES]
                many = [dk.decompress_many(torch.stack([p.buffer] * 3),
                                           out=torch.zeros(n, dtype=d), average=True,
                                           backend=backend) for d in oracle.DTYPES]
                got[backend] = [p.buffer, r] + outs + many
            what = f"{dtype} -> {value_dtype}, {index_encoding}"
            for a, b in zip(got["cpu"], got["torch"]):
                assert_same_bits(a, b, what)
    rows = x.view(8, n // 8)
    for value_dtype in oracle.DTYPES:
        got = {}
        for backend in ("cpu", "torch"):
            p = dk.compress_rows(rows, 3, value_dtype=value_dtype, backend=backend)
            got[backend] = [dk.decompress_rows(p, out=torch.empty(rows.shape, dtype=d),
                                               backend=backend) for d in oracle.DTYPES]
        for a, b in zip(got["cpu"], got["torch"]):
            assert_same_bits(a, b, f"rows {dtype} -> {value_dtype}")

