"""GPU only: no host synchronization on the fixed-capacity paths of every op, run one after another
as a training step runs them (torch.cuda.set_sync_debug_mode("error") turns any sync into an
error).
"""

import pytest
import torch

import dct_kernels as dk
from gpu_data import DEVICE, device_backends, gpu_data

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", device_backends())
def test_no_host_sync_on_fixed_capacity_paths(backend):
    n = (1 << 22) + 1
    x = gpu_data(n, torch.float32, seed=40)
    residual = torch.zeros(n, device=DEVICE)
    buffers_payloads = []
    errors = torch.zeros((), dtype=torch.int32, device=DEVICE)
    rows_x = x[:256 * 1024].view(256, 1024)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        threshold = dk.select_threshold(x, n // 100, backend=backend)
        for _ in range(2):
            buffers_payloads.append(dk.compress(x, threshold, residual=residual,
                                                capacity=n // 50, backend=backend))
        buffers = torch.stack([p.buffer for p in buffers_payloads])
        out = torch.empty(n, device=DEVICE)
        dk.decompress(buffers_payloads[0], out=out, validate=False, errors=errors,
                      backend=backend)
        dk.decompress_many(buffers, out=out, average=True, validate=False,
                           capacity=n // 50, value_dtype=torch.float32, errors=errors,
                           backend=backend)
        p = dk.compress_rows(rows_x, 51, backend=backend)
        dk.decompress_rows(p, backend=backend)
        dk.gather_rows(rows_x, p, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(errors) == 0
    assert int(buffers_payloads[0].count) > 0
