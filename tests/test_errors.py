"""Bad inputs: a TypeError or ValueError whose message names the argument at fault.

Messages have the form "argument: what was expected"; the tests match that prefix, since a
bare name such as "x" or "k" would match almost any message.

Each case is a small lambda over valid inputs with exactly one thing wrong; the valid inputs
themselves are checked to go through (test_valid_inputs_are_accepted), so a case cannot pass
because of some other mistake.
"""

import re
from types import SimpleNamespace

import pytest
import torch

import dct_kernels
import oracle
from dct_kernels import RowPayload
from helpers import assert_bitwise_equal

D = dct_kernels


def _inputs(device):
    """Valid inputs on ``device``: x (64 floats), a payload of it (p), its buffer gathered
    twice (g), x as 8 x 8 rows and their RowPayload (rp), and two segments of x (seg)."""
    x = oracle.make_tensor("normal", 64, torch.float32, oracle.seed_of("errors")).to(device)
    p = D.compress(x, 0.5, capacity=16, backend="torch")
    rows = x.reshape(8, 8)
    return SimpleNamespace(x=x, dev=x.device, p=p, g=p.buffer[None].repeat(2, 1), rows=rows,
                           rp=D.compress_rows(rows, 3, backend="torch"),
                           seg=torch.tensor([0, 10, 64]))


def _floats(n, device, dtype=torch.float32):
    return torch.zeros(n, dtype=dtype, device=device)


def _seg(*offsets, dtype=torch.int64):
    return torch.tensor(offsets, dtype=dtype)


# name -> (exception, argument the message must start with, call(backend, inputs)).
CASES = {
    # select_threshold
    "select integer x": (TypeError, "x", lambda b, i: D.select_threshold(
        torch.ones(4, dtype=torch.int64, device=i.dev), 1, backend=b)),
    "select k=0": (ValueError, "k", lambda b, i: D.select_threshold(i.x, 0, backend=b)),
    "select k>n": (ValueError, "k", lambda b, i: D.select_threshold(i.x, 65, backend=b)),
    "select k float": (TypeError, "k", lambda b, i: D.select_threshold(i.x, 2.0, backend=b)),
    "select k bool": (TypeError, "k", lambda b, i: D.select_threshold(i.x, True, backend=b)),
    "select empty x": (ValueError, "k", lambda b, i: D.select_threshold(i.x[:0], 1, backend=b)),
    "select k tensor without segments": (ValueError, "k", lambda b, i: D.select_threshold(
        i.x, torch.tensor([1]), backend=b)),
    "select k tensor wrong length": (ValueError, "k", lambda b, i: D.select_threshold(
        i.x, torch.tensor([1, 1, 1]), segments=i.seg, backend=b)),
    "select k tensor float": (TypeError, "k", lambda b, i: D.select_threshold(
        i.x, torch.tensor([1.0, 1.0]), segments=i.seg, backend=b)),
    "select k beyond a segment": (ValueError, "k", lambda b, i: D.select_threshold(
        i.x, 11, segments=i.seg, backend=b)),
    "select segments falling": (ValueError, "segments", lambda b, i: D.select_threshold(
        i.x, 1, segments=_seg(0, 30, 20, 64), backend=b)),
    # compress
    "compress integer x": (TypeError, "x", lambda b, i: D.compress(
        torch.ones(4, dtype=torch.int32, device=i.dev), 0.5, backend=b)),
    "compress x not a tensor": (TypeError, "x", lambda b, i: D.compress(
        [1.0, 2.0], 0.5, backend=b)),
    "compress value_dtype int": (TypeError, "value_dtype", lambda b, i: D.compress(
        i.x, 0.5, value_dtype=torch.int32, backend=b)),
    "compress value_dtype fp64": (TypeError, "value_dtype", lambda b, i: D.compress(
        i.x, 0.5, value_dtype=torch.float64, backend=b)),
    "compress residual fp16": (TypeError, "residual", lambda b, i: D.compress(
        i.x, 0.5, residual=_floats(64, i.dev, torch.float16), backend=b)),
    "compress residual size": (ValueError, "residual", lambda b, i: D.compress(
        i.x, 0.5, residual=_floats(63, i.dev), backend=b)),
    "compress residual device": (ValueError, "residual", lambda b, i: D.compress(
        i.x, 0.5, residual=_floats(64, "meta"), backend=b)),
    "compress residual non-contiguous": (ValueError, "residual", lambda b, i: D.compress(
        i.x, 0.5, residual=_floats(128, i.dev)[::2], backend=b)),
    "compress capacity -1": (ValueError, "capacity", lambda b, i: D.compress(
        i.x, 0.5, capacity=-1, backend=b)),
    "compress capacity float": (TypeError, "capacity", lambda b, i: D.compress(
        i.x, 0.5, capacity=4.0, backend=b)),
    "compress segments not from 0": (ValueError, "segments", lambda b, i: D.compress(
        i.x, 0.5, segments=_seg(1, 10, 64), backend=b)),
    "compress segments not to numel": (ValueError, "segments", lambda b, i: D.compress(
        i.x, 0.5, segments=_seg(0, 10, 63), backend=b)),
    "compress segments not rising": (ValueError, "segments", lambda b, i: D.compress(
        i.x, 0.5, segments=_seg(0, 10, 10, 64), backend=b)),
    "compress segments int32": (ValueError, "segments", lambda b, i: D.compress(
        i.x, 0.5, segments=_seg(0, 10, 64, dtype=torch.int32), backend=b)),
    "compress segments list": (TypeError, "segments", lambda b, i: D.compress(
        i.x, 0.5, segments=[0, 10, 64], backend=b)),
    "compress threshold wrong length": (ValueError, "threshold", lambda b, i: D.compress(
        i.x, torch.tensor([0.5, 0.5, 0.5]), segments=i.seg, backend=b)),
    "compress threshold bool": (TypeError, "threshold", lambda b, i: D.compress(
        i.x, True, backend=b)),
    "compress threshold int tensor": (TypeError, "threshold", lambda b, i: D.compress(
        i.x, torch.tensor(1), backend=b)),
    "compress unknown backend": (ValueError, "backend", lambda b, i: D.compress(
        i.x, 0.5, backend="numpy")),
    # decompress
    "decompress not a payload": (TypeError, "payload", lambda b, i: D.decompress(
        i.p.buffer, backend=b)),
    "decompress out numel": (ValueError, "out", lambda b, i: D.decompress(
        i.p, out=_floats(63, i.dev), backend=b)),
    "decompress out int": (TypeError, "out", lambda b, i: D.decompress(
        i.p, out=_floats(64, i.dev, torch.int32), backend=b)),
    "decompress out non-contiguous": (ValueError, "out", lambda b, i: D.decompress(
        i.p, out=_floats(128, i.dev)[::2], backend=b)),
    "decompress accumulate without out": (ValueError, "out", lambda b, i: D.decompress(
        i.p, accumulate=True, backend=b)),
    "decompress errors counter int64": (ValueError, "errors", lambda b, i: D.decompress(
        i.p, validate=False, errors=_floats((), i.dev, torch.int64), backend=b)),
    # decompress_many
    "many rows of mismatched size": (ValueError, "buffers", lambda b, i: D.decompress_many(
        i.g[:, :-16], out=torch.zeros_like(i.x), backend=b)),
    "many rows not wire-sized": (ValueError, "buffers", lambda b, i: D.decompress_many(
        i.g[:, :-4].contiguous(), out=torch.zeros_like(i.x), backend=b)),
    "many buffers not uint8": (ValueError, "buffers", lambda b, i: D.decompress_many(
        i.g.to(torch.int32), out=torch.zeros_like(i.x), backend=b)),
    "many buffers 1-D": (ValueError, "buffers", lambda b, i: D.decompress_many(
        i.g[0], out=torch.zeros_like(i.x), backend=b)),
    "many out numel": (ValueError, "buffers", lambda b, i: D.decompress_many(
        i.g, out=_floats(65, i.dev), backend=b)),
    "many out int": (TypeError, "out", lambda b, i: D.decompress_many(
        i.g, out=_floats(64, i.dev, torch.int64), backend=b)),
    "many capacity without value_dtype": (
        ValueError, "capacity, value_dtype",
        lambda b, i: D.decompress_many(i.g, out=torch.zeros_like(i.x), capacity=16, backend=b)),
    "many unreadable row 0": (ValueError, "buffers", lambda b, i: D.decompress_many(
        torch.zeros_like(i.g), out=torch.zeros_like(i.x), validate=False, backend=b)),
    # rows
    "compress_rows 1-D x": (ValueError, "x", lambda b, i: D.compress_rows(i.x, 3, backend=b)),
    "compress_rows int x": (TypeError, "x", lambda b, i: D.compress_rows(
        i.rows.to(torch.int32), 3, backend=b)),
    "compress_rows k>D": (ValueError, "k", lambda b, i: D.compress_rows(i.rows, 9, backend=b)),
    "compress_rows k=0": (ValueError, "k", lambda b, i: D.compress_rows(i.rows, 0, backend=b)),
    "compress_rows value_dtype": (TypeError, "value_dtype", lambda b, i: D.compress_rows(
        i.rows, 3, value_dtype=torch.int8, backend=b)),
    "gather_rows y shape": (ValueError, "y", lambda b, i: D.gather_rows(
        i.rows[:, :7], i.rp, backend=b)),
    "gather_rows y int": (TypeError, "y", lambda b, i: D.gather_rows(
        i.rows.to(torch.int32), i.rp, backend=b)),
    "gather_rows p": (TypeError, "p", lambda b, i: D.gather_rows(i.rows, i.p, backend=b)),
    "decompress_rows out shape": (ValueError, "out", lambda b, i: D.decompress_rows(
        i.rp, out=_floats((4, 16), i.dev), backend=b)),
    "decompress_rows index dtype": (ValueError, "p", lambda b, i: D.decompress_rows(
        RowPayload(i.rp.indices.int(), i.rp.values, i.rp.shape, i.rp.dtype), backend=b)),
    "decompress_rows shape of 3": (ValueError, "p", lambda b, i: D.decompress_rows(
        RowPayload(i.rp.indices, i.rp.values, i.rp.shape + (1,), i.rp.dtype), backend=b)),
    "decompress_rows negative D": (ValueError, "p", lambda b, i: D.decompress_rows(
        RowPayload(i.rp.indices, i.rp.values, (i.rp.shape[0], -8), i.rp.dtype), backend=b)),
    "decompress_rows indices a list": (TypeError, "p", lambda b, i: D.decompress_rows(
        RowPayload(i.rp.indices.tolist(), i.rp.values, i.rp.shape, i.rp.dtype), backend=b)),
    "gather_rows payload dtype": (ValueError, "p", lambda b, i: D.gather_rows(
        i.rows, RowPayload(i.rp.indices, i.rp.values, i.rp.shape, torch.float64),
        backend=b)),
    "many index_encoding alone": (
        ValueError, "index_encoding, num_scales",
        lambda b, i: D.decompress_many(i.g, out=torch.zeros_like(i.x), index_encoding="bogus",
                                       backend=b)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_names_the_argument(backend_device, case):
    backend, device = backend_device
    error, argument, call = CASES[case]
    with pytest.raises(error, match=rf"^{re.escape(argument)}:"):
        call(backend, _inputs(device))


def test_valid_inputs_are_accepted(backend_device):
    """The control: the same calls with nothing wrong go through."""
    backend, device = backend_device
    i = _inputs(device)
    assert D.select_threshold(i.x, torch.tensor([1, 10]), segments=i.seg,
                              backend=backend).shape == (2,)
    assert D.select_threshold(i.x, 64, backend=backend).dim() == 0
    D.compress(i.x, torch.tensor([0.5, 0.5]), segments=i.seg, residual=torch.zeros_like(i.x),
               capacity=4, value_dtype=torch.float16, backend=backend)
    D.decompress(i.p, out=torch.zeros_like(i.x), accumulate=True, validate=False,
                 errors=_floats((), device, torch.int32), backend=backend)
    D.decompress_many(i.g, out=torch.zeros_like(i.x), capacity=16,
                      value_dtype=torch.float32, backend=backend)
    D.compress_rows(i.rows, 8, value_dtype=torch.bfloat16, backend=backend)
    D.gather_rows(i.rows, i.rp, backend=backend)
    D.decompress_rows(i.rp, out=_floats((8, 8), device), backend=backend)


def test_numel_limit_is_documented_in_the_error():
    """x.numel() >= 2^31 is refused with a message that says why (checked without allocating:
    an expanded view has 2^31 elements but one element of storage)."""
    x = torch.zeros(1).expand(2**31)
    with pytest.raises(ValueError, match="^x: .*2\\^31"):
        D.compress(x, 0.5, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("index_encoding", ["int32", "delta"])
def test_an_output_of_2_31_elements_is_refused(backend, index_encoding):
    """decompress_many decodes into out's numel: an out of 2^31 elements or more is refused
    before any decoding (a delta-coded position past 2^31 - 1 could not be written as int32)."""
    if backend not in D.available_backends():
        pytest.skip(f"{backend} backend not built")
    rows = D.compress(torch.arange(1.0, 65.0), 1.0, capacity=64, value_dtype=torch.bfloat16,
                      index_encoding=index_encoding).buffer[None]
    out = torch.zeros(1, dtype=torch.bfloat16).expand(2**31 + 2**17)
    with pytest.raises(ValueError, match="^out: .*2\\^31"):
        D.decompress_many(rows, out=out, capacity=64, value_dtype=torch.bfloat16,
                          index_encoding=index_encoding, backend=backend)


def test_available_backends():
    backends = D.available_backends()
    assert set(backends) == {"cuda", "triton", "cpu", "torch"}
    assert all(isinstance(reason, str) and reason for reason in backends.values())
    assert backends["torch"] == "available"
    assert backends["triton"] == "available"  # on the GPU, or interpreted on the CPU


def test_an_extension_that_does_not_load_says_why(tmp_path, monkeypatch):
    """A compiled extension that is missing reads "not built"; one that is there but fails to
    load (here a file that is no shared object) gives the loader's own reason instead. Both
    are imported as the backends import them (``from dct_kernels import _<name>``)."""
    from dct_kernels import backends

    def failure(name):
        try:
            exec(f"from dct_kernels import _{name}", {})
        except ImportError as exc:
            wrapped = ImportError(f"dct_kernels._{name} not found: {exc}")
            wrapped.__cause__ = exc
            return backends._import_failure(name, wrapped)
        raise AssertionError(f"dct_kernels._{name} imported")

    assert failure("no_such_extension") == \
        "extension not built (dct_kernels._no_such_extension is missing)"
    (tmp_path / "_broken.so").write_bytes(b"not an ELF file")
    monkeypatch.setattr(dct_kernels, "__path__", [*dct_kernels.__path__, str(tmp_path)])
    reason = failure("broken")
    assert reason.startswith("extension built but not loadable: "), reason
    assert "_broken.so" in reason, reason  # the loader's message names the file


def test_residual_overlapping_x_is_rejected():
    buffer = torch.randn(2000)
    with pytest.raises(ValueError, match="residual"):
        dct_kernels.compress(buffer[:1000], 1.0, residual=buffer[1:1001])


def test_numpy_scalars_and_single_thresholds_are_accepted(backend_device):
    """numpy integers/floats work where ints/floats do, and a one-element threshold applies to
    every segment, as a 0-d one does."""
    import numpy as np

    backend, device = backend_device
    x = torch.randn(3000, generator=torch.Generator().manual_seed(5)).to(device)
    segments = torch.tensor([0, 1000, 3000], device=device)
    tau = dct_kernels.select_threshold(x, np.int64(30), backend=backend)
    assert_bitwise_equal(tau, dct_kernels.select_threshold(x, 30, backend=backend))
    a = dct_kernels.compress(x, np.float32(1.5), capacity=np.int32(500), backend=backend)
    b = dct_kernels.compress(x, 1.5, capacity=500, backend=backend)
    assert_bitwise_equal(a.buffer, b.buffer)
    one = dct_kernels.compress(x, torch.tensor([1.5]), segments=segments, backend=backend)
    assert_bitwise_equal(one.buffer, dct_kernels.compress(x, 1.5, backend=backend).buffer)


def test_nan_goes_on_the_wire_as_the_canonical_nan(backend_device):
    """Whatever NaN payload the data carries, every backend writes the same bytes."""
    backend, device = backend_device
    bits = torch.tensor([0x7FC01234, 0xFFC01234 - (1 << 32), 0x7F800001, 0x3F800000],
                        dtype=torch.int32)
    x = bits.view(torch.float32).repeat(50).to(device)
    canonical = {torch.float32: (torch.int32, 0x7FC00000), torch.float16: (torch.int16, 0x7E00),
                 torch.bfloat16: (torch.int16, 0x7FC0)}
    for value_dtype, (bits_dtype, nan_bits) in canonical.items():
        p = dct_kernels.compress(x, 0.5, value_dtype=value_dtype, backend=backend)
        sent = p.values[:int(p.count)].cpu()
        nan = torch.isnan(sent)
        assert int(nan.sum()) == 150
        assert bool((sent.view(bits_dtype)[nan] == nan_bits).all()), value_dtype
        rows = dct_kernels.compress_rows(x.view(20, 10), 8, value_dtype=value_dtype,
                                         backend=backend)
        row_nan = torch.isnan(rows.values.cpu())
        assert bool((rows.values.cpu().view(bits_dtype)[row_nan] == nan_bits).all())
