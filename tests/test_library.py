"""The custom ops behind the public API: schema and fake-kernel checks (torch.library.opcheck)
and a torch.compile smoke test that compares compiled with eager results."""

import torch

import dct_kernels as dk
from dct_kernels import library
from dct_kernels import payload as wire
from helpers import assert_bitwise_equal


def _inputs(device, n=5000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(device)
    residual = (torch.randn(n, generator=g) * 0.1).to(device)
    return x, residual


def test_opcheck_every_op(backend_device):
    backend, device = backend_device
    x, residual = _inputs(device)
    n = x.numel()
    thresholds = torch.full((1,), 1.5, device=device)
    offsets = [0, n]
    capacity = 200
    buffer = wire.new_payload(n, capacity, torch.float32, (n,), torch.float32,
                              torch.device(device)).buffer
    errors = torch.zeros((), dtype=torch.int32, device=device)
    out = torch.empty(n, device=device)
    rows = x[:4000].view(40, 100)
    ri, rv = library.compress_rows(rows, 7, 0, backend)
    cases = [
        (library.select_threshold, (x, [50], offsets, backend)),
        (library.count_kept, (x, thresholds, offsets, None, residual, backend)),
        (library.compress, (x, thresholds, offsets, None, residual.clone(), buffer.clone(),
                                 capacity, 0, backend)),
        (library.decompress, (out, buffer, n, capacity, 0, False, errors, backend)),
        (library.decompress_many, (out, torch.stack([buffer, buffer]), capacity, 0, False,
                                   True, errors,
                         backend)),
        (library.compress_rows, (rows, 7, 0, backend)),
        (library.decompress_rows, (ri, rv, torch.empty_like(rows), backend)),
        (library.gather_rows, (rows, ri, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _step(x, residual, threshold, out):
    payload = dk.compress(x, threshold, residual=residual, capacity=300)
    return dk.decompress(payload, out=out, validate=False)


def test_torch_compile_fullgraph_matches_eager():
    x, residual = _inputs("cpu", seed=3)
    threshold = torch.tensor(1.7)
    eager_res, compiled_res = residual.clone(), residual.clone()
    eager = _step(x, eager_res, threshold, torch.empty_like(x))
    compiled_step = torch.compile(_step, backend="eager", fullgraph=True)
    got = compiled_step(x, compiled_res, threshold, torch.empty_like(x))
    assert_bitwise_equal(got, eager)
    assert_bitwise_equal(compiled_res, eager_res)
