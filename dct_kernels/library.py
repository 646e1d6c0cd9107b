"""The backend calls as torch custom ops (``torch.ops.dct_kernels.*``), with fake kernels.

``dct_kernels.ops`` validates its arguments and then calls the ``call_*`` functions at the end
of this file: eagerly they call the backend directly, and while ``torch.compile`` traces they
go through these custom ops, so the graph sees each kernel launch as one opaque op whose output
shapes it knows from the fake kernel, instead of tracing into Triton launches or data
pointers. Arguments are plain tensors, ints and the backend's name; the op layer has already
checked them.
"""

import contextlib
from typing import List, Optional, Tuple

import torch

from . import payload as wire
from .backends import resolve

def _run(backend: str, device: torch.device, function: str, *args):
    """Call ``function`` of the backend with ``device`` current (Triton launches on the current
    CUDA device, not on the device of its tensors)."""
    context = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with context:
        return getattr(resolve(backend, device), function)(*args)


def _payload_view(buffer: torch.Tensor, numel: int, capacity: int,
                  value_code: int, dtype: torch.dtype) -> wire.SparsePayload:
    return wire.SparsePayload(buffer, numel=numel, capacity=capacity,
                              value_dtype=wire.dtype_of_code(value_code), shape=(numel,),
                              dtype=dtype)


@torch.library.custom_op("dct_kernels::select_threshold", mutates_args=())
def select_threshold(x: torch.Tensor, ks: List[int], offsets: List[int],
                     backend: str) -> torch.Tensor:
    return _run(backend, x.device, "select_threshold", x, ks, offsets).clone()


@select_threshold.register_fake
def _(x, ks, offsets, backend):
    return x.new_empty(len(ks))


@torch.library.custom_op("dct_kernels::count_kept", mutates_args=())
def count_kept(x: torch.Tensor, thresholds: torch.Tensor, offsets: List[int],
               seg_dev: Optional[torch.Tensor], residual: Optional[torch.Tensor],
               backend: str) -> torch.Tensor:
    total = _run(backend, x.device, "count_kept", x, thresholds, offsets, seg_dev, residual)
    return total.reshape(()).to(torch.int64)


@count_kept.register_fake
def _(x, thresholds, offsets, seg_dev, residual, backend):
    return x.new_empty((), dtype=torch.int64)


@torch.library.custom_op("dct_kernels::compress", mutates_args=("residual", "buffer"))
def compress(x: torch.Tensor, thresholds: torch.Tensor, offsets: List[int],
                  seg_dev: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  buffer: torch.Tensor, capacity: int, value_code: int, backend: str) -> None:
    payload = _payload_view(buffer, x.numel(), capacity, value_code, x.dtype)
    _run(backend, x.device, "compress", x, thresholds, offsets, seg_dev, residual, payload)


@compress.register_fake
def _(x, thresholds, offsets, seg_dev, residual, buffer, capacity, value_code, backend):
    return None


@torch.library.custom_op("dct_kernels::decompress", mutates_args=("out", "errors"))
def decompress(out: torch.Tensor, buffer: torch.Tensor, numel: int, capacity: int,
               value_code: int, accumulate: bool, errors: torch.Tensor, backend: str) -> None:
    _run(backend, out.device, "decompress", out, buffer, numel, capacity,
         wire.dtype_of_code(value_code), accumulate, errors)


@decompress.register_fake
def _(out, buffer, numel, capacity, value_code, accumulate, errors, backend):
    return None


@torch.library.custom_op("dct_kernels::decompress_many", mutates_args=("out", "errors"))
def decompress_many(out: torch.Tensor, buffers: torch.Tensor, capacity: int, value_code: int,
                    accumulate: bool, average: bool, errors: torch.Tensor, backend: str) -> None:
    _run(backend, out.device, "decompress_many", out, buffers, capacity,
         wire.dtype_of_code(value_code), accumulate, average, errors)


@decompress_many.register_fake
def _(out, buffers, capacity, value_code, accumulate, average, errors, backend):
    return None


@torch.library.custom_op("dct_kernels::compress_rows", mutates_args=())
def compress_rows(x: torch.Tensor, k: int, value_code: int,
                  backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _run(backend, x.device, "compress_rows", x, k, wire.dtype_of_code(value_code))


@compress_rows.register_fake
def _(x, k, value_code, backend):
    rows, columns = x.shape
    return (x.new_empty((rows, k), dtype=wire.row_index_dtype(columns)),
            x.new_empty((rows, k), dtype=wire.dtype_of_code(value_code)))


@torch.library.custom_op("dct_kernels::decompress_rows", mutates_args=("out",))
def decompress_rows(indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
                    backend: str) -> None:
    _run(backend, out.device, "decompress_rows", indices, values, out)


@decompress_rows.register_fake
def _(indices, values, out, backend):
    return None


@torch.library.custom_op("dct_kernels::gather_rows", mutates_args=())
def gather_rows(y: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    return _run(backend, y.device, "gather_rows", y, indices)


@gather_rows.register_fake
def _(y, indices, backend):
    return y.new_empty(indices.shape)


# ------------------------------------------------------------------------ eager dispatch
# The op layer calls these. Eagerly they call the backend module straight away: going through
# the custom op costs tens of microseconds of dispatcher work per call (argument defaults,
# autograd and redispatch layers), more than a small tensor's whole kernel on the CPU. While
# torch.compile traces (or for tensor subclasses such as FakeTensor) they go through the
# custom ops above, so the graph holds one opaque op per kernel with its fake kernel. Both
# paths run the same backend function on the same arguments. Tensors the kernels write
# through raw pointers get their version counter bumped, as the custom op would.

def _traced(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _direct(impl, device: torch.device, function: str, *args):
    if device.type == "cuda":
        with torch.cuda.device(device):
            return getattr(impl, function)(*args)
    return getattr(impl, function)(*args)


def _bump(*tensors) -> None:
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def call_select_threshold(impl, x: torch.Tensor, ks: List[int],
                          offsets: List[int]) -> torch.Tensor:
    if _traced(x):
        return select_threshold(x, ks, offsets, impl.NAME)
    return _direct(impl, x.device, "select_threshold", x, ks, offsets)


def call_count_kept(impl, x, thresholds, offsets, seg_dev, residual) -> int:
    """The kept count as a Python int (reading it synchronizes)."""
    if _traced(x):
        return int(count_kept(x, thresholds, offsets, seg_dev, residual, impl.NAME))
    return int(_direct(impl, x.device, "count_kept", x, thresholds, offsets, seg_dev, residual))


def call_compress(impl, x, thresholds, offsets, seg_dev, residual,
                  payload: wire.SparsePayload) -> None:
    if _traced(x):
        compress(x, thresholds, offsets, seg_dev, residual, payload.buffer, payload.capacity,
                 wire.value_code(payload.value_dtype), impl.NAME)
        return
    _direct(impl, x.device, "compress", x, thresholds, offsets, seg_dev, residual, payload)
    _bump(residual, payload.buffer)


def call_compress_ranges(impl, x, thresholds, cuts, offsets, residual, out,
                         where: wire.WireLayout, scale_offsets) -> bool:
    """A backend's optional ``compress_ranges`` (every range of compress_shards in one call),
    eagerly. False, with nothing done, while tracing or when the backend has none: the caller
    then compresses range by range."""
    if _traced(x) or not hasattr(impl, "compress_ranges"):
        return False
    _direct(impl, x.device, "compress_ranges", x, thresholds, cuts, offsets, residual, out,
            where, scale_offsets)
    _bump(residual, out)
    return True


def call_decompress(impl, out, buffer, numel: int, capacity: int, value_dtype: torch.dtype,
                    accumulate: bool, errors) -> None:
    if _traced(out):
        decompress(out, buffer, numel, capacity, wire.value_code(value_dtype), accumulate,
                   errors, impl.NAME)
        return
    _direct(impl, out.device, "decompress", out, buffer, numel, capacity, value_dtype,
            accumulate, errors)
    _bump(out, errors)


def call_decompress_many(impl, out, buffers, capacity: int, value_dtype: torch.dtype,
                         accumulate: bool, average: bool, errors) -> None:
    if _traced(out):
        decompress_many(out, buffers, capacity, wire.value_code(value_dtype), accumulate,
                        average, errors, impl.NAME)
        return
    _direct(impl, out.device, "decompress_many", out, buffers, capacity, value_dtype,
            accumulate, average, errors)
    _bump(out, errors)


def call_compress_rows(impl, x, k: int, value_dtype: torch.dtype):
    if _traced(x):
        return compress_rows(x, k, wire.value_code(value_dtype), impl.NAME)
    return _direct(impl, x.device, "compress_rows", x, k, value_dtype)


def call_decompress_rows(impl, indices, values, out) -> None:
    if _traced(out):
        decompress_rows(indices, values, out, impl.NAME)
        return
    _direct(impl, out.device, "decompress_rows", indices, values, out)
    _bump(out)


def call_gather_rows(impl, y, indices) -> torch.Tensor:
    if _traced(y):
        return gather_rows(y, indices, impl.NAME)
    return _direct(impl, y.device, "gather_rows", y, indices)
