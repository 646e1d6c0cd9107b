"""DCT-MP autograd: sparsify_rows, pack_rows and unpack_rows.

Forward results are checked against the independent numpy oracle of compress_rows (which
columns each row keeps); gradients against the hand-built rule (the upstream gradient at the
kept positions, 0 elsewhere), on every backend.
"""

import pytest
import torch

import dct_kernels as dk
import oracle
from helpers import assert_bitwise_equal
from oracle import DTYPES, dtype_id, make_tensor, seed_of


def _kept_mask(x2d: torch.Tensor, k: int) -> torch.Tensor:
    columns, _ = oracle.compress_rows(x2d, k)
    mask = torch.zeros(x2d.shape, dtype=torch.bool)
    mask.scatter_(1, torch.from_numpy(columns).to(torch.int64), True)
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ("normal", "ties", "specials"))
@pytest.mark.parametrize("rows,columns,k", [(3, 7, 1), (5, 33, 4), (2, 300, 300), (4, 65, 13)])
def test_sparsify_rows_forward_and_backward(backend_device, dtype, kind, rows, columns, k):
    backend, device = backend_device
    seed = seed_of(dtype, kind, rows, columns, k)
    x = make_tensor(kind, rows * columns, dtype, seed).reshape(rows, columns)
    mask = _kept_mask(x, k)
    xg = x.to(device).requires_grad_(True)
    y = dk.sparsify_rows(xg, k, backend=backend)
    want = torch.where(mask, x, torch.zeros_like(x))
    assert_bitwise_equal(y.detach().cpu(), want, "forward")
    upstream = make_tensor("normal", rows * columns, dtype, seed + 1).reshape(rows, columns)
    y.backward(upstream.to(device))
    assert_bitwise_equal(xg.grad.cpu(), torch.where(mask, upstream, torch.zeros_like(upstream)),
                         "gradient")


def test_sparsify_rows_keeps_leading_dimensions(backend_device):
    backend, device = backend_device
    x = make_tensor("normal", 2 * 3 * 40, torch.float32, 5).reshape(2, 3, 40)
    y = dk.sparsify_rows(x.to(device), 6, backend=backend).cpu()
    assert y.shape == x.shape
    want = torch.where(_kept_mask(x.reshape(6, 40), 6), x.reshape(6, 40), 0.0).reshape(x.shape)
    assert_bitwise_equal(y, want)


@pytest.mark.parametrize("value_dtype", [None, torch.bfloat16, torch.float16])
def test_pack_unpack_across_a_boundary(backend_device, value_dtype):
    """pack on one side, the (values, indices) cross, unpack on the other; gradients flow back
    through the same [B, k] shapes."""
    backend, device = backend_device
    rows, columns, k = 6, 130, 9
    x = make_tensor("specials", rows * columns, torch.float32, 11).reshape(rows, columns)
    x = torch.nan_to_num(x, nan=3.0e5, posinf=7.0e38, neginf=-7.0e38)  # finite, some huge
    xg = x.to(device).requires_grad_(True)
    values, indices = dk.pack_rows(xg, k, value_dtype=value_dtype, backend=backend)
    ref = dk.compress_rows(x, k, value_dtype=value_dtype, backend="torch")
    assert_bitwise_equal(values.detach().cpu(), ref.values, "values on the wire")
    assert_bitwise_equal(indices.cpu(), ref.indices, "indices on the wire")
    assert not indices.requires_grad
    # The far side: dense activations in fp32, a loss, its gradient back to x.
    dense = dk.unpack_rows(values, indices, columns, dtype=torch.float32, backend=backend)
    mask = _kept_mask(x, k)
    assert_bitwise_equal(dense.detach().cpu(),
                         torch.where(mask, ref.values.float().new_zeros(x.shape).scatter(
                             1, ref.indices.long(), ref.values.float()), 0.0), "unpacked")
    upstream = make_tensor("normal", rows * columns, torch.float32, 12).reshape(rows, columns)
    upstream[:, ::3] *= 1e6  # beyond fp16's range: the gradient saturates on its wire too
    dense.backward(upstream.to(device))
    wire = value_dtype or torch.float32
    largest = torch.finfo(wire).max
    expected = torch.where(mask, upstream.clamp(-largest, largest).to(wire).to(torch.float32),
                           0.0)
    assert_bitwise_equal(xg.grad.cpu(), expected, "gradient through the boundary")


def test_mp_errors_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="k"):
        dk.sparsify_rows(x, 9)
    with pytest.raises(TypeError, match="x"):
        dk.sparsify_rows(x.to(torch.int32), 2)
    with pytest.raises(TypeError, match="x"):
        dk.pack_rows([1.0, 2.0], 1)
    values, indices = dk.pack_rows(x, 2)
    with pytest.raises(ValueError, match="columns"):
        dk.unpack_rows(values, indices, 0)
    with pytest.raises(ValueError, match="indices"):
        dk.unpack_rows(values, indices.to(torch.int32), 8)
    with pytest.raises(ValueError, match="indices"):
        dk.unpack_rows(values, indices[:, :1], 8)
    with pytest.raises(ValueError, match="^dtype"):
        dk.unpack_rows(values, indices, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="^k"):  # rows of no column have no k in [1, D]
        dk.sparsify_rows(torch.randn(2, 3, 0), 1)
