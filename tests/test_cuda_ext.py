"""The compiled CUDA core on any machine: it builds wherever nvcc is, imports without a GPU,
says why it cannot run, turns CUDA failures into errors that name the kernel, and splits
segments into work items that cover each segment exactly once."""

import os
import shutil

import numpy as np
import pytest
import torch

import dct_kernels as dk

NVCC = shutil.which("nvcc") is not None and os.environ.get("DCT_KERNELS_CUDA") != "0"


def _cuda_ext():
    try:
        from dct_kernels.backends import cuda_ext
    except ImportError as exc:
        pytest.skip(f"CUDA extension not built: {exc}")
    return cuda_ext


@pytest.mark.skipif(not NVCC, reason="nvcc not on the PATH: the extension is not built")
def test_extension_is_built_where_nvcc_is():
    import importlib
    importlib.import_module("dct_kernels._cuda")


def test_available_backends_reports_cuda():
    status = dk.available_backends()["cuda"]
    if torch.cuda.is_available():
        assert status in ("available",) or "extension" in status
    else:
        assert status != "available"
        assert "extension" in status or "nvcc" in status


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_without_gpu_calls_raise_naming_the_kernel():
    ext = _cuda_ext()
    with pytest.raises(RuntimeError, match="cudaGetDeviceCount"):
        ext._cuda.device_count()
    # A launch (null pointers are never touched: the launch itself fails without a driver).
    with pytest.raises(RuntimeError, match="compress_rows_kernel"):
        ext._cuda.compress_rows(0, 0, 1, 8, 2, 0, 2, 0, 0, 0)
    with pytest.raises(RuntimeError, match="select_threshold"):
        ext._cuda.select_threshold(0, 0, 0, 0, 1, 0, 1, 16, 0, 0, 1 << 24, 0)


def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="backend"):
        dk.compress(x, 0.5, backend="cuda")


def test_bad_dtype_code_is_rejected():
    ext = _cuda_ext()
    with pytest.raises(ValueError, match="dtype code"):
        ext._cuda.gather_rows(0, 7, 1, 1, 1, 0, 2, 0, 0)


@pytest.mark.parametrize("offsets", [
    [0, 1],
    [0, 5, 40000, 1 << 20],
    [0, 16384, 16385, 3 * 16384 + 7],
    list(range(0, 3000, 3)) + [3001],
])
def test_work_items_cover_each_segment_once(offsets):
    ext = _cuda_ext()
    items = ext._work_items(offsets, torch.device("cpu")).numpy()
    begin, end, seg = items[:, 0], items[:, 1], items[:, 2]
    assert np.all(end > begin)
    # Ordered, contiguous, and exactly the elements of [0, n).
    assert begin[0] == 0 and end[-1] == offsets[-1]
    assert np.array_equal(begin[1:], end[:-1])
    # Every item lies inside its own segment, and every segment has an item.
    bounds = np.asarray(offsets)
    assert np.all(begin >= bounds[seg]) and np.all(end <= bounds[seg + 1])
    assert np.array_equal(np.unique(seg), np.arange(len(offsets) - 1))
    assert np.all(end - begin <= ext._item_size(offsets[-1]))
