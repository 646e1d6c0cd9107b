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
        ext._cuda.compress_rows(**_ROWS_ARGS["compress_rows"])
    with pytest.raises(RuntimeError, match="select_threshold"):
        ext._cuda.select_threshold(x=0, dtype=0, offsets=0, items=0, num_items=1, ks=0,
                                   num_segments=1, candidate_capacity=16, out=0, workspace=0,
                                   workspace_bytes=1 << 24, stream=0)


def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="backend"):
        dk.compress(x, 0.5, backend="cuda")


# Valid keyword arguments of every kernel entry of the binding, null pointers (the core checks
# its arguments before any CUDA call, so the tests below never reach one; a test that does, on
# a machine without a driver, sees the launch fail).
_ROWS_ARGS = {
    "compress_rows": dict(x=0, dtype=0, rows=1, columns=8, k=2, indices=0, index_bytes=2,
                          values=0, value_dtype=0, stream=0),
    "decompress_rows": dict(indices=0, index_bytes=2, values=0, value_dtype=0, rows=1,
                            columns=8, k=2, out=0, out_dtype=0, stream=0),
    "gather_rows": dict(y=0, dtype=0, rows=1, columns=8, k=2, indices=0, index_bytes=2, out=0,
                        stream=0),
}
_HEADER = (0, 0, 0, 0)
_PAYLOAD_ARGS = dict(buffers=0, num_rows=1, row_bytes=64, numel=8, capacity=2, value_dtype=0,
                     header=_HEADER, out=0, out_dtype=0, accumulate=False, errors=0,
                     workspace=0, workspace_bytes=0, stream=0)
_ENTRY_ARGS = dict(_ROWS_ARGS, **{
    "select_threshold": dict(x=0, dtype=0, offsets=0, items=0, num_items=1, ks=0,
                             num_segments=1, candidate_capacity=16, out=0, workspace=0,
                             workspace_bytes=0, stream=0),
    "count_kept": dict(x=0, dtype=0, n=8, residual=0, thresholds=0, offsets=0, num_segments=1,
                       count=0, stream=0),
    "compress": dict(x=0, dtype=0, n=8, residual=0, thresholds=0, offsets=0, num_segments=1,
                     payload=0, capacity=2, value_dtype=0, workspace=0, workspace_bytes=0,
                     stream=0),
    "decompress": _PAYLOAD_ARGS,
    "decompress_many": dict(_PAYLOAD_ARGS, average=True),
})
# The dtype-code arguments of each entry.
_DTYPE_ARGS = {name: [a for a in args if a == "dtype" or a.endswith("_dtype")]
               for name, args in _ENTRY_ARGS.items()}


def test_every_argument_is_named_and_keyword_only():
    """A call with positional integers (which could be swapped unnoticed) is refused, and the
    keyword names are the ones this test knows."""
    ext = _cuda_ext()
    for name, args in _ENTRY_ARGS.items():
        entry = getattr(ext._cuda, name)
        signature = entry.__doc__.splitlines()[0]
        assert signature.startswith(f"{name}(*, "), signature
        names = [part.split(":")[0].strip()
                 for part in signature[len(name) + 4:].rsplit(")", 1)[0].split(",")]
        assert sorted(names) == sorted(args), signature
        with pytest.raises(TypeError, match="incompatible function arguments"):
            entry(*args.values())
        swapped = dict(args)
        swapped["strem"] = swapped.pop("stream")
        with pytest.raises(TypeError, match="incompatible function arguments"):
            entry(**swapped)
    for name, kwargs in [("select_threshold_workspace_bytes",
                          dict(num_segments=1, candidate_capacity=16)),
                         ("compress_workspace_bytes", dict(n=1000)),
                         ("decompress_workspace_bytes", dict(num_rows=2, capacity=8, numel=100))]:
        entry = getattr(ext._cuda, name)
        assert entry(**kwargs) > 0
        with pytest.raises(TypeError):
            entry(*kwargs.values())


@pytest.mark.parametrize("name", sorted(_ENTRY_ARGS))
@pytest.mark.parametrize("code", [-1, 3, 7, 255])
def test_bad_dtype_code_is_rejected_before_any_cuda_call(name, code):
    """The core returns an error status for every dtype code but 0, 1, 2 (it used to read an
    unknown code as fp32), before it touches the device: on a machine without a driver the
    error is this ValueError, not the launch failure."""
    ext = _cuda_ext()
    for arg in _DTYPE_ARGS[name]:
        with pytest.raises(ValueError, match=f"{name}: {arg} code is not 0, 1 or 2"):
            getattr(ext._cuda, name)(**dict(_ENTRY_ARGS[name], **{arg: code}))


@pytest.mark.parametrize("name", sorted(_ROWS_ARGS))
@pytest.mark.parametrize("width", [0, 1, 3, 8, -2])
def test_bad_index_width_is_rejected_before_any_cuda_call(name, width):
    """Index widths other than 2 (int16) and 4 (int32) bytes are an error (the core used to
    read every width but 2 as int32)."""
    ext = _cuda_ext()
    with pytest.raises(ValueError, match=f"{name}: index_bytes is not 2 or 4"):
        getattr(ext._cuda, name)(**dict(_ROWS_ARGS[name], index_bytes=width))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize("name", sorted(_ROWS_ARGS))
def test_good_arguments_reach_the_launch(name):
    """With valid codes and widths the checks pass and the call goes on to the launch, which
    fails here only for want of a driver: the checks above reject what they should and no
    more."""
    ext = _cuda_ext()
    for width in (2, 4):
        for code in (0, 1, 2):
            args = dict(_ROWS_ARGS[name], index_bytes=width)
            args.update({arg: code for arg in _DTYPE_ARGS[name]})
            with pytest.raises(RuntimeError, match="cudaErrorInsufficientDriver|no CUDA"):
                getattr(ext._cuda, name)(**args)


def test_header_words_must_be_four():
    ext = _cuda_ext()
    for header in [(), (0, 0, 0), (0, 0, 0, 0, 0)]:
        with pytest.raises(ValueError, match="header: expected 4 int32 words"):
            ext._cuda.decompress(**dict(_PAYLOAD_ARGS, header=header))


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
