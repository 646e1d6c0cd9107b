"""sparse_all_to_all on a GPU with NCCL, world size 1 (NCCL refuses two ranks on one GPU; the
multi-rank logic is tested on gloo in test_mp_exchange.py).

Each device backend is compared bitwise with the torch reference on the CPU, and the steady
state (forward and backward) runs under ``torch.cuda.set_sync_debug_mode("error")``, which
raises on any host synchronization made through torch.
"""

import pytest
import torch

import dct_kernels as dk
from gpu_data import no_host_sync
from helpers import assert_bitwise_equal
from oracle import make_tensor

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _device_backends():
    if not torch.cuda.is_available():
        return ["torch"]  # collected, then skipped by the gpu marker
    return ["torch"] + [b for b in ("triton", "cuda") if dk.available_backends()[b] == "available"]


def _exchange(x, k, value_dtype, upstream, backend):
    xg = x.clone().requires_grad_(True)
    y = dk.mp.sparse_all_to_all(xg, k, value_dtype=value_dtype, backend=backend)
    y.backward(upstream)
    return y.detach(), xg.grad


@pytest.mark.parametrize("backend", _device_backends())
@pytest.mark.parametrize("dtype, value_dtype, columns, k", [
    (torch.float32, torch.bfloat16, 1024, 51), (torch.float32, None, 40000, 7),
    (torch.bfloat16, None, 300, 15), (torch.float16, torch.float16, 64, 64)])
def test_sparse_all_to_all_nccl(nccl_group, backend, dtype, value_dtype, columns, k):
    rows = 257
    x = make_tensor("specials", rows * columns, dtype, columns).reshape(rows, columns)
    upstream = make_tensor("normal", rows * columns, dtype, k).reshape(rows, columns)
    want_y, want_grad = _exchange_cpu(x, k, value_dtype, upstream)
    xd, gd = x.to(DEVICE), upstream.to(DEVICE)
    _exchange(xd, k, value_dtype, gd, backend)  # the first call checks the ranks agree
    with no_host_sync():
        for _ in range(2):
            y, grad = _exchange(xd, k, value_dtype, gd, backend)
    assert_bitwise_equal(y, want_y, "forward")
    assert_bitwise_equal(grad, want_grad, "gradient")


def _exchange_cpu(x, k, value_dtype, upstream):
    """At W = 1 the exchange is pack_rows then unpack_rows with the torch backend on the CPU."""
    xg = x.clone().requires_grad_(True)
    values, indices = dk.pack_rows(xg, k, value_dtype=value_dtype, backend="torch")
    y = dk.unpack_rows(values, indices, x.shape[1], dtype=x.dtype, backend="torch")
    y.backward(upstream)
    return y.detach(), xg.grad
