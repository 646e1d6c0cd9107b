"""Backend "cuda": the compiled CUDA C++ core in csrc/cuda/, bound with pybind11 as
``dct_kernels._cuda``.

The core knows nothing of torch: this module passes it data pointers, sizes, dtype codes, the
current CUDA stream and scratch ("workspace") tensors allocated through torch's caching
allocator, and receives inputs the op layer has already validated (see
``dct_kernels/backends/__init__.py`` for the contract). Every launch is checked in the core; a
failure raises RuntimeError naming the kernel and the CUDA error. The core's arguments are
keyword-only (named as in ``csrc/cuda/dct_cuda.h``), so every call below names them. No function
here synchronizes with the host.
"""

from collections import OrderedDict
from typing import Dict, List

import numpy as np
import torch

from .. import payload as wire

try:
    from .. import _cuda  # the compiled extension
except ImportError as exc:  # not built on this machine
    raise ImportError(f"dct_kernels._cuda not found: {exc}") from exc

NAME = "cuda"

_CACHE_ENTRIES = 64
_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def available() -> str:
    try:
        devices = _cuda.device_count()
    except RuntimeError as exc:
        return f"extension built, but no usable CUDA device ({str(exc).rsplit(': ', 1)[-1]})"
    if devices == 0:
        return "extension built, but no CUDA device"
    if not torch.cuda.is_available():
        return "extension built, but this torch has no CUDA support"
    return "available"


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def _cached(key: tuple, build) -> torch.Tensor:
    """Small device tensors derived from host lists (work items, ks), kept so that a training
    loop that calls with the same segments every step copies them to the device once."""
    tensor = _cache.get(key)
    if tensor is None:
        tensor = build()
        _cache[key] = tensor
        if len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return tensor


def _to_device(values: List[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def _code(dtype: torch.dtype) -> int:
    return wire.value_code(dtype)


# ----------------------------------------------------------------------- select_threshold

def _item_size(n: int) -> int:
    """Elements per histogram work item: about 2048 items for large tensors, within bounds
    that keep each block's shared histogram worth its flush."""
    per = -(-n // 2048)
    per = -(-per // 4096) * 4096
    return int(min(max(per, 16384), 1 << 20))


def _work_items(offsets: List[int], device: torch.device) -> torch.Tensor:
    """[items, 3] int64 (begin, end, segment): chunks of each segment, never crossing one."""
    def build():
        bounds = np.asarray(offsets, dtype=np.int64)
        size = _item_size(int(bounds[-1]))
        lengths = bounds[1:] - bounds[:-1]
        pieces = (lengths + size - 1) // size
        segment = np.repeat(np.arange(len(lengths), dtype=np.int64), pieces)
        first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
        begin = bounds[:-1][segment] + (np.arange(len(segment)) - first_piece) * size
        end = np.minimum(begin + size, bounds[1:][segment])
        items = np.stack([begin, end, segment], axis=1)
        return torch.from_numpy(np.ascontiguousarray(items)).to(device, non_blocking=True)
    return _cached(("items", tuple(offsets), device), build)


def select_threshold(x: torch.Tensor, ks: List[int], offsets: List[int]) -> torch.Tensor:
    device = x.device
    n = x.numel()
    items = _work_items(offsets, device)
    offsets_dev = _cached(("offsets", tuple(offsets), device), lambda: _to_device(offsets, device))
    ks_dev = _cached(("ks", tuple(ks), device), lambda: _to_device(ks, device))
    segments = len(ks)
    # The candidate pool: the sampled window (about 1-3% of x for kept ratios up to 10%) fits,
    # except for narrow-range data, which takes extra passes over x instead.
    candidates = max(min(n, 1 << 16), n >> 5)
    nbytes = _cuda.select_threshold_workspace_bytes(num_segments=segments,
                                                    candidate_capacity=candidates)
    workspace = _workspace(nbytes, device)
    out = torch.empty(segments, dtype=x.dtype, device=device)
    _cuda.select_threshold(x=x.data_ptr(), dtype=_code(x.dtype), offsets=offsets_dev.data_ptr(),
                           items=items.data_ptr(), num_items=items.shape[0],
                           ks=ks_dev.data_ptr(), num_segments=segments,
                           candidate_capacity=candidates, out=out.data_ptr(),
                           workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
                           stream=_stream())
    return out


# --------------------------------------------------------------------------------- compress

def _compress_args(x, thresholds, offsets, seg_dev, residual) -> Dict[str, int]:
    """The core's compress arguments; thresholds arrive fp32, contiguous, on x's device."""
    return dict(x=x.data_ptr(), dtype=_code(x.dtype), n=x.numel(),
                residual=residual.data_ptr() if residual is not None else 0,
                thresholds=thresholds.data_ptr(),
                offsets=seg_dev.data_ptr() if seg_dev is not None else 0,
                num_segments=len(offsets) - 1)


def count_kept(x, thresholds, offsets, seg_dev, residual) -> torch.Tensor:
    args = _compress_args(x, thresholds, offsets, seg_dev, residual)
    count = torch.zeros((), dtype=torch.int64, device=x.device)
    _cuda.count_kept(**args, count=count.data_ptr(), stream=_stream())
    return count


def compress(x, thresholds, offsets, seg_dev, residual, payload: wire.SparsePayload) -> None:
    args = _compress_args(x, thresholds, offsets, seg_dev, residual)
    nbytes = _cuda.compress_workspace_bytes(n=x.numel())
    workspace = _workspace(nbytes, x.device)
    _cuda.compress(**args, payload=payload.buffer.data_ptr(), capacity=payload.capacity,
                   value_dtype=_code(payload.value_dtype), workspace=workspace.data_ptr(),
                   workspace_bytes=workspace.numel(), stream=_stream())


# ------------------------------------------------------------------------------- decompress

def _rows_args(buffers: torch.Tensor, numel: int, capacity: int, value_dtype: torch.dtype):
    buffers = buffers.contiguous()
    # The header words every row must carry: magic, version | codes, numel low, numel high.
    header = tuple(wire.header_words(numel, capacity, value_dtype)[:wire.WORD_NUMEL_HIGH + 1])
    return buffers, dict(buffers=buffers.data_ptr(), num_rows=buffers.shape[0],
                         row_bytes=buffers.shape[1], numel=numel, capacity=capacity,
                         value_dtype=_code(value_dtype), header=header)


def decompress(out: torch.Tensor, buffer: torch.Tensor, numel: int, capacity: int,
               value_dtype: torch.dtype, accumulate: bool, errors: torch.Tensor) -> None:
    rows, args = _rows_args(buffer.view(1, -1), numel, capacity, value_dtype)
    nbytes = _cuda.decompress_workspace_bytes(num_rows=1, capacity=capacity, numel=numel)
    workspace = _workspace(nbytes, out.device)
    _cuda.decompress(**args, out=out.data_ptr(), out_dtype=_code(out.dtype),
                     accumulate=accumulate, errors=errors.data_ptr(),
                     workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
                     stream=_stream())


def decompress_many(out: torch.Tensor, buffers: torch.Tensor, capacity: int,
                    value_dtype: torch.dtype, accumulate: bool, average: bool,
                    errors: torch.Tensor) -> None:
    numel = out.numel()
    rows, args = _rows_args(buffers, numel, capacity, value_dtype)
    nbytes = _cuda.decompress_workspace_bytes(num_rows=rows.shape[0], capacity=capacity,
                                              numel=numel)
    workspace = _workspace(nbytes, out.device)
    _cuda.decompress_many(**args, out=out.data_ptr(), out_dtype=_code(out.dtype),
                          accumulate=accumulate, average=average, errors=errors.data_ptr(),
                          workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
                          stream=_stream())


# ------------------------------------------------------------------------------------- rows

def compress_rows(x: torch.Tensor, k: int, value_dtype: torch.dtype):
    rows, columns = x.shape
    indices = torch.empty(rows, k, dtype=wire.row_index_dtype(columns), device=x.device)
    values = torch.empty(rows, k, dtype=value_dtype, device=x.device)
    _cuda.compress_rows(x=x.data_ptr(), dtype=_code(x.dtype), rows=rows, columns=columns, k=k,
                        indices=indices.data_ptr(), index_bytes=indices.element_size(),
                        values=values.data_ptr(), value_dtype=_code(value_dtype),
                        stream=_stream())
    return indices, values


def decompress_rows(indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    rows, columns = out.shape
    _cuda.decompress_rows(indices=indices.data_ptr(), index_bytes=indices.element_size(),
                          values=values.data_ptr(), value_dtype=_code(values.dtype), rows=rows,
                          columns=columns, k=indices.shape[1], out=out.data_ptr(),
                          out_dtype=_code(out.dtype), stream=_stream())


def gather_rows(y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    rows, columns = y.shape
    k = indices.shape[1]
    out = torch.empty(rows, k, dtype=y.dtype, device=y.device)
    _cuda.gather_rows(y=y.data_ptr(), dtype=_code(y.dtype), rows=rows, columns=columns, k=k,
                      indices=indices.data_ptr(), index_bytes=indices.element_size(),
                      out=out.data_ptr(), stream=_stream())
    return out
