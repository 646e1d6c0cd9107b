"""GPU only: compress_rows, decompress_rows and gather_rows on row lengths that span one to many
chunks (int16 and int32 column indices).
"""

import pytest

import dct_kernels as dk
from gpu_data import DTYPES, device_backends, gpu_data
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", device_backends())
@pytest.mark.parametrize("columns", [512, 4096, 5000, 40000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_gpu(backend, columns, dtype):
    rows = 64
    x = gpu_data(rows * columns, dtype, seed=columns).view(rows, columns)
    for k in (1, max(1, columns // 20), columns):
        got = dk.compress_rows(x, k, backend=backend)
        want = dk.compress_rows(x, k, backend="torch")
        assert_bitwise_equal(got.indices, want.indices, f"indices k={k}")
        assert_bitwise_equal(got.values, want.values, f"values k={k}")
        assert_bitwise_equal(dk.decompress_rows(got, backend=backend),
                             dk.decompress_rows(got, backend="torch"))
        y = gpu_data(rows * columns, dtype, seed=columns + 1).view(rows, columns)
        assert_bitwise_equal(dk.gather_rows(y, got, backend=backend),
                             dk.gather_rows(y, got, backend="torch"))
