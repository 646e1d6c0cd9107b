"""The public ops: validation and backend dispatch, in one place.

Each op checks its arguments, picks the backend, and calls it through ``dct_kernels.library``:
directly when eager (the dispatcher's cost would dominate small calls), through the custom ops
while ``torch.compile`` traces (so it sees one opaque op per kernel family).

Every op takes ``backend=None`` ("cuda", "triton", "cpu" or "torch"; see
``available_backends``).
Semantics are identical on every backend; docs/design.md#op-semantics is the contract.
"""

import functools
import numbers
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import codec
from . import library
from . import payload as wire
from .backends import available_backends as _available_backends
from .backends import resolve
from .payload import RowPayload, SparsePayload
from .wire_check import check_rows, describe

__all__ = ["available_backends", "select_threshold", "compress", "compress_shards", "decompress",
           "decompress_many", "compress_rows", "decompress_rows", "gather_rows",
           "payload_errors", "reset_payload_errors", "Segments"]

Number = Union[int, float]


def available_backends() -> Dict[str, str]:
    """Map each backend ("cuda", "triton", "cpu", "torch") to "available" or why it is not."""
    return _available_backends()


# --------------------------------------------------------------------------- validation helpers

def _check_float_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in wire.VALUE_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")


def _check_numel(x: torch.Tensor, name: str) -> None:
    if x.numel() > wire.MAX_NUMEL:
        raise ValueError(f"{name}: {x.numel()} elements; at most 2^31 - 1 are supported "
                         "(indices are int32)")


def _all_ints(values) -> bool:
    """A list or tuple of ints (numpy integers too, bools not). Plain ints are tested first:
    the Integral check costs microseconds per item, and the hook passes W + 1 of them a step."""
    return isinstance(values, (list, tuple)) and all(
        type(v) is int or (not isinstance(v, bool) and isinstance(v, numbers.Integral))
        for v in values)


def _check_int(value, name: str) -> int:
    """An int from an int, a numpy integer or a 0-d integer tensor."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and \
            not value.dtype.is_floating_point and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def _check_capacity(capacity) -> int:
    capacity = _check_int(capacity, "capacity")
    if not 0 <= capacity <= wire.MAX_NUMEL:
        raise ValueError(f"capacity: must be in [0, 2^31 - 1], got {capacity}")
    return capacity


def _check_value_dtype(value_dtype, x_dtype: torch.dtype, fp8: bool = False) -> torch.dtype:
    if value_dtype is None:
        return x_dtype
    allowed = wire.WIRE_VALUE_DTYPES if fp8 else wire.VALUE_DTYPES
    if value_dtype not in allowed:
        names = ("torch.float32, torch.float16, torch.bfloat16 or torch.float8_e4m3fn" if fp8
                 else "torch.float32, torch.float16 or torch.bfloat16")
        raise TypeError(f"value_dtype: expected {names}, got {value_dtype}")
    return value_dtype


def _check_index_encoding(index_encoding) -> str:
    if index_encoding not in wire.INDEX_ENCODINGS:
        raise ValueError(f"index_encoding: expected 'int32' or 'delta', got {index_encoding!r}")
    return index_encoding


class Segments:
    """Segment offsets validated once, for ops called every step on the same layout.

    ``Segments(offsets, device=None)``: offsets are S+1 ints (a list, tuple or 1-D int64
    tensor) rising strictly from 0 to numel, so no segment is empty. The object keeps them as a
    host list (``offsets``), as a device tensor (``tensor``, on ``device``, default CPU) and
    their lengths, so ``select_threshold`` and ``compress`` given ``segments=Segments(...)``
    neither re-validate nor copy offsets to the host (no host synchronization for device
    offsets). Immutable by convention: build a new one for another layout.

    Attributes: ``offsets`` (list of S+1 ints), ``numel`` (int), ``lengths`` (list of S ints),
    ``tensor`` (int64 [S+1] on ``device``), ``num_segments`` (S).

    Raises:
        TypeError for offsets that are neither a list of ints nor a tensor; ValueError for a
        tensor that is not a 1-D int64 one of at least 2 offsets, or offsets that do not
        rise strictly from 0 (the messages name ``segments``).
    """

    def __init__(self, offsets, device=None):
        if isinstance(offsets, Segments):
            offsets = offsets.offsets
        if isinstance(offsets, torch.Tensor):
            host = _check_segments(offsets, int(offsets[-1]) if offsets.numel() else 0)
        else:
            if not _all_ints(offsets):
                raise TypeError("segments: expected a list of int offsets or an int64 tensor")
            host = [int(o) for o in offsets]
            if len(host) < 2:
                raise ValueError(f"segments: expected S+1 >= 2 offsets, got {len(host)}")
            if host[0] != 0:
                raise ValueError(f"segments: offsets must start at 0, got {host[0]}")
            if any(b <= a for a, b in zip(host[:-1], host[1:])):
                raise ValueError("segments: offsets must rise strictly (no empty segment)")
        self.offsets: List[int] = host
        self.numel = host[-1]
        self.num_segments = len(host) - 1
        self.lengths = [b - a for a, b in zip(host[:-1], host[1:])]
        device = torch.device("cpu") if device is None else torch.device(device)
        self.tensor = torch.tensor(host, dtype=torch.int64).to(device)

    def __len__(self) -> int:
        return self.num_segments

    def __repr__(self) -> str:
        return (f"Segments(num_segments={self.num_segments}, numel={self.numel}, "
                f"device={self.tensor.device})")


def _check_segments(segments, numel: int) -> List[int]:
    """Validated segment offsets as a host list (copies device offsets to the host; a
    ``Segments`` object was validated when built and is only checked against numel)."""
    if isinstance(segments, Segments):
        if segments.numel != numel:
            raise ValueError(f"segments: offsets must run from 0 to numel={numel}, got "
                             f"0 .. {segments.numel}")
        return segments.offsets
    if not isinstance(segments, torch.Tensor):
        raise TypeError(f"segments: expected an int64 tensor of offsets, got "
                        f"{type(segments).__name__}")
    if segments.dtype != torch.int64 or segments.dim() != 1 or segments.numel() < 2:
        raise ValueError(f"segments: expected a 1-D int64 tensor of S+1 >= 2 offsets, got "
                         f"shape {tuple(segments.shape)} {segments.dtype}")
    offsets = segments.cpu().tolist()
    if offsets[0] != 0 or offsets[-1] != numel:
        raise ValueError(f"segments: offsets must run from 0 to numel={numel}, got "
                         f"{offsets[0]} .. {offsets[-1]}")
    if any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError("segments: offsets must rise strictly (no empty segment)")
    return offsets


def _check_k(k, offsets: List[int], segmented: bool) -> List[int]:
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if isinstance(k, torch.Tensor) and k.dim() == 1:
        if not segmented:
            raise ValueError("k: a tensor of per-segment k needs segments=")
        if k.dtype.is_floating_point or k.dtype == torch.bool or k.dtype.is_complex:
            raise TypeError(f"k: expected an integer tensor, got {k.dtype}")
        if k.numel() != len(lengths):
            raise ValueError(f"k: expected {len(lengths)} values (one per segment), "
                             f"got {k.numel()}")
        ks = [int(v) for v in k.cpu().tolist()]
    elif isinstance(k, (list, tuple)):
        if not segmented:
            raise ValueError("k: a list of per-segment k needs segments=")
        if len(k) != len(lengths):
            raise ValueError(f"k: expected {len(lengths)} values (one per segment), "
                             f"got {len(k)}")
        ks = [_check_int(v, "k") for v in k]
    else:
        ks = [_check_int(k, "k")] * len(lengths)
    for s, (kk, length) in enumerate(zip(ks, lengths)):
        if not 1 <= kk <= length:
            where = f" for segment {s}" if segmented else ""
            raise ValueError(f"k: must satisfy 1 <= k <= numel ({length}){where}, got {kk}")
    return ks


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors on one device intersect (not checked while
    torch.compile traces, where tensors have no addresses)."""
    if torch.compiler.is_compiling() or a.device != b.device or a.numel() == 0 or \
            b.numel() == 0:
        return False
    a_start, b_start = a.data_ptr(), b.data_ptr()
    a_end = a_start + a.numel() * a.element_size()
    b_end = b_start + b.numel() * b.element_size()
    return a_start < b_end and b_start < a_end


def _whole(numel: int) -> List[int]:
    return [0, numel]


def _device_offsets(offsets: List[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int64).to(device, non_blocking=True)


def _thresholds(threshold, num_segments: int, device: torch.device) -> torch.Tensor:
    """fp32 [S] thresholds on ``device`` (a single one broadcast to every segment)."""
    if isinstance(threshold, bool):
        raise TypeError("threshold: expected a float or a floating-point tensor, got bool")
    if isinstance(threshold, numbers.Real):
        return torch.full((num_segments,), float(threshold), dtype=torch.float32, device=device)
    if not isinstance(threshold, torch.Tensor):
        raise TypeError(f"threshold: expected a float or a tensor, got {type(threshold).__name__}")
    if not threshold.dtype.is_floating_point:
        raise TypeError(f"threshold: expected a floating-point tensor, got {threshold.dtype}")
    if threshold.device != device and threshold.device.type != "cpu":
        # A host threshold is copied over; reading a device one from elsewhere would race.
        raise ValueError(f"threshold: expected a tensor on {device} (like x) or on the CPU, "
                         f"got {threshold.device}")
    threshold = threshold.detach()
    if num_segments == 1 and threshold.numel() == 1 and threshold.dim() <= 1 and \
            threshold.dtype == torch.float32 and threshold.device == device:
        return threshold.view(1)  # the common case, without a copy
    if threshold.dim() == 0 or tuple(threshold.shape) == (1,):
        t = threshold.reshape(1).to(device=device, dtype=torch.float32, non_blocking=True)
        return t.expand(num_segments).contiguous()
    if threshold.dim() != 1 or threshold.numel() != num_segments:
        raise ValueError(f"threshold: expected a scalar or {num_segments} thresholds (one per "
                         f"segment), got shape {tuple(threshold.shape)}")
    return threshold.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()


_error_counters: Dict[torch.device, torch.Tensor] = {}


def payload_errors(device=None) -> torch.Tensor:
    """The device-side counter of payload errors found by ``validate=False`` decoding.

    A 0-d int32 tensor on ``device`` (default: the current CUDA device, else CPU). Decoding
    with ``validate=False`` never synchronizes; it skips bad rows/entries and adds their
    number here. Read it (``int(payload_errors(dev))``, which synchronizes) when convenient,
    and clear it with ``reset_payload_errors``.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    counter = _error_counters.get(device)
    if counter is None:
        counter = torch.zeros((), dtype=torch.int32, device=device)
        _error_counters[device] = counter
    return counter


def reset_payload_errors(device=None) -> None:
    """Set the payload error counter of ``device`` to zero (no host synchronization)."""
    payload_errors(device).zero_()


def _errors_for(errors: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    if errors is None:
        return payload_errors(device)
    if not isinstance(errors, torch.Tensor) or errors.dtype != torch.int32 or \
            errors.numel() != 1 or errors.device != device:
        raise ValueError(f"errors: expected a one-element int32 tensor on {device}")
    return errors.view(())


def _check_out(out, numel: int, device: torch.device, name: str = "out") -> torch.Tensor:
    _check_float_tensor(out, name)
    if out.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {out.device}")
    if out.numel() != numel:
        raise ValueError(f"{name}: expected {numel} elements, got {out.numel()}")
    _check_numel(out, name)  # positions are int32 on the wire and in the cores
    if not out.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (it is written in place)")
    return out


# --------------------------------------------------------------------------------------- ops

def select_threshold(x: torch.Tensor, k, *, segments: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """The k-th largest magnitude of x: exact, in x's dtype, on x's device.

    Args:
        x: fp32, fp16 or bf16 tensor of any shape (flattened in C order).
        k: 1 <= k <= x.numel(); with ``segments``, an int for every segment or an integer
            tensor (or list) of S values, each within its segment's length.
        segments: optional int64 tensor of S+1 offsets rising strictly from 0 to x.numel(),
            or a ``Segments`` object (validated once, no host copy of the offsets).

    Returns:
        A 0-d tensor τ equal to ``torch.topk(x.abs().flatten(), k).values[-1]`` (NaN ranks
        above +inf, -0 equals +0), hence count(|x| > τ) < k <= count(|x| >= τ); with
        ``segments``, a tensor of S such thresholds.

    Raises:
        TypeError for a non-float x or non-integer k; ValueError for k out of range or bad
        segments, and on the triton and cuda backends for x of 2^31 or more elements (their
        kernels index with int32; the torch backend has no such limit).

    Sync: segment offsets and a tensor k are read on the host (a copy if they live on the
    GPU); the selection itself does not synchronize on the triton/cuda backends.
    """
    _check_float_tensor(x, "x")
    numel = x.numel()
    segmented = segments is not None
    offsets = _check_segments(segments, numel) if segmented else _whole(numel)
    if not segmented and numel == 0:
        raise ValueError("k: must satisfy 1 <= k <= numel (0): x is empty")
    ks = _check_k(k, offsets, segmented)
    impl = resolve(backend, x.device)
    if impl.NAME != "torch":
        _check_numel(x, "x")
    thresholds = library.call_select_threshold(impl, x.detach().contiguous().view(-1), ks,
                                               offsets)
    return thresholds if segmented else thresholds.view(())


def _check_residual(residual, x: torch.Tensor) -> None:
    """An error-feedback residual for x: fp32, contiguous, on x's device, x.numel() elements,
    not overlapping x (other than being x itself)."""
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual: expected a torch.Tensor, got {type(residual).__name__}")
    if residual.dtype != torch.float32:
        raise TypeError(f"residual: expected dtype float32, got {residual.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual: expected a tensor on {x.device} (like x), "
                         f"got {residual.device}")
    if residual.numel() != x.numel():
        raise ValueError(f"residual: expected {x.numel()} elements (like x), "
                         f"got {residual.numel()}")
    if not residual.is_contiguous():
        raise ValueError("residual: must be contiguous (it is updated in place)")
    if _overlap(residual, x) and not (residual.data_ptr() == x.data_ptr()
                                      and residual.dtype == x.dtype):
        raise ValueError("residual: must not overlap x (other than being x itself)")


def _check_wire_out(out, shape: tuple, x: torch.Tensor, residual, capacity: int,
                    value_dtype: torch.dtype, index_encoding: str) -> None:
    """A uint8 wire buffer (or rows of them) of exactly ``shape``, contiguous, on x's device,
    not overlapping x or the residual."""
    if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or \
            tuple(out.shape) != shape:
        what = f"a 1-D uint8 tensor of {shape[0]} bytes" if len(shape) == 1 else \
            f"a [{shape[0]}, {shape[1]}] uint8 tensor (rows of {shape[1]} bytes)"
        raise ValueError(f"out: expected {what} (capacity "
                         f"{capacity}, {value_dtype}, {index_encoding}), got "
                         f"{tuple(getattr(out, 'shape', ()))} {getattr(out, 'dtype', out)}")
    if out.device != x.device:
        raise ValueError(f"out: expected a tensor on {x.device} (like x), got {out.device}")
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous (the payload is written in place)")
    if _overlap(out, x) or (residual is not None and _overlap(out, residual)):
        raise ValueError("out: must not overlap x or residual")


def compress(x: torch.Tensor, threshold: Union[Number, torch.Tensor], *,
             segments: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
             capacity: Optional[int] = None, value_dtype: Optional[torch.dtype] = None,
             index_encoding: str = "int32", position_offset: int = 0,
             total_numel: Optional[int] = None, scale_offsets: Optional[List[int]] = None,
             out: Optional[torch.Tensor] = None,
             backend: Optional[str] = None) -> SparsePayload:
    """Keep the entries of x (+ residual) whose magnitude reaches the threshold.

    Args:
        x: fp32, fp16 or bf16 tensor of any shape, fewer than 2^31 elements (flattened in C
            order; a non-contiguous x is copied first).
        threshold: a float or 0-d tensor; with ``segments``, also a tensor of S thresholds.
            Compared in fp32 as ``|acc| >= threshold`` in magnitude order (a NaN threshold keeps
            exactly the NaNs; NaN always passes; a negative threshold keeps everything). A
            tensor threshold lives on x's device or on the CPU.
        segments: optional int64 offsets (S+1, strictly rising from 0 to numel): element i uses
            its segment's threshold; also a ``Segments`` object (offsets validated once,
            device offsets kept).
        residual: optional fp32 contiguous error-feedback buffer with x.numel() elements.
            ``acc = x + residual`` in fp32; afterwards residual holds ``acc - sent`` (0 where an
            inf/NaN was sent, all of acc where nothing was sent), so sent + residual == acc.
        capacity: None for a payload of exactly the kept entries (the count is read on the
            host: synchronizes), or an int >= 0 for a fixed-size payload (no synchronization);
            entries past the capacity stay in the residual and are counted in ``overflow``.
        value_dtype: wire dtype of the values (default x.dtype); fp16/bf16 saturate finite
            values at their largest finite value; every NaN is sent as the wire dtype's
            canonical quiet NaN, so all backends write the same bytes. ``torch.float8_e4m3fn``
            sends acc / 2^e_s rounded to fp8 with one power-of-two scale per segment, chosen so
            that no value saturates (inf and NaN go as NaN); a value that rounds to +-0 is not
            sent and stays in the residual. The error-feedback identity then holds for every
            finite acc.
        index_encoding: "int32" (format version 1 unless the values are fp8) or "delta":
            uint16 gaps between kept indices, an escape slot per 65535 x M positions a gap
            needs beyond 65535 (M = 256 with fp8 values, else 32768); an entry whose slots do
            not all fit is cut with everything after it (overflow; it stays in the residual).
            Either with fp8 values writes format version 2 (docs/design.md).
        position_offset, total_numel: x is the range [position_offset, position_offset +
            x.numel()) of a tensor of ``total_numel`` elements (default: x itself), and the
            payload describes that tensor: positions are written as index + position_offset
            and the header's numel is total_numel (so W payloads of disjoint ranges decode
            with ``decompress_many`` into one tensor).
        scale_offsets: fp8 values only: the scale segments, a list of S+1 ints rising (not
            necessarily strictly) from 0 to total_numel; default: the segments (shifted by
            position_offset, with the parts of the tensor before and after x as segments of
            their own). A fixed S keeps a payload's size the same whatever x covers.
        out: optional 1-D contiguous uint8 tensor on x's device of exactly the wire size of
            the configuration (``payload.wire_layout(capacity, value_dtype, index_encoding,
            S)``, S the segments with fp8 values, else 0) — e.g. a row of a preallocated
            ``[W, nbytes]`` send tensor: the payload is written there (zeroed, header,
            entries) and the returned payload views it, so nothing is copied before a
            collective. Needs ``capacity``.

    With format version 2, capacity counts slots (escapes included) and ``capacity=None``
    sizes the payload for every kept entry and its escapes.

    Returns:
        A ``SparsePayload``: kept indices ascending, in one wire buffer (``out`` when given).

    Raises:
        TypeError/ValueError naming the argument for a bad dtype, device, residual, capacity,
        threshold or segments, or x.numel() >= 2^31.
    """
    _check_float_tensor(x, "x")
    _check_numel(x, "x")
    numel = x.numel()
    device = x.device
    value_dtype = _check_value_dtype(value_dtype, x.dtype, fp8=True)
    index_encoding = _check_index_encoding(index_encoding)
    segmented = segments is not None
    offsets = _check_segments(segments, numel) if segmented else _whole(numel)
    num_segments = len(offsets) - 1
    position_offset = _check_int(position_offset, "position_offset")
    total = numel + position_offset if total_numel is None else \
        _check_int(total_numel, "total_numel")
    if position_offset < 0 or position_offset + numel > total or total > wire.MAX_NUMEL:
        raise ValueError(f"position_offset, total_numel: x's {numel} elements from "
                         f"{position_offset} must lie within [0, total_numel = {total}), "
                         f"total_numel < 2^31")
    if value_dtype == wire.FLOAT8:
        scale_offsets = _check_scale_offsets(scale_offsets, offsets, position_offset, total)
    elif scale_offsets is not None:
        raise ValueError("scale_offsets: only fp8 values have scale segments")
    num_scales = len(scale_offsets) - 1 if value_dtype == wire.FLOAT8 else 0
    if capacity is not None:
        capacity = _check_capacity(capacity)
    _check_residual(residual, x)
    if out is not None:
        if capacity is None:
            raise ValueError("out: needs a fixed capacity= (the buffer's size depends on it)")
        needed = wire.wire_layout(capacity, value_dtype, index_encoding, num_scales).nbytes
        _check_wire_out(out, (needed,), x, residual, capacity, value_dtype, index_encoding)
    impl = resolve(backend, device)
    thresholds = _thresholds(threshold, num_segments, device)
    flat = x.detach().contiguous().view(-1)
    residual_flat = residual.detach().view(-1) if residual is not None else None
    shape = tuple(x.shape) if total == numel else (total,)
    return _compress_checked(impl, flat, x.dtype, thresholds, segments, offsets, residual_flat,
                             capacity, value_dtype, index_encoding, scale_offsets,
                             position_offset, total, shape, out)


def compress_shards(x: torch.Tensor, threshold: Union[Number, torch.Tensor], *,
                    cuts: Sequence[int],
                    segments: Sequence[Optional[Segments]], capacity: int,
                    residual: Optional[torch.Tensor] = None,
                    value_dtype: Optional[torch.dtype] = None, index_encoding: str = "int32",
                    scale_offsets: Optional[Sequence[List[int]]] = None, out: torch.Tensor,
                    backend: Optional[str] = None) -> List[SparsePayload]:
    """Compress W contiguous ranges of x into the W rows of one send tensor, validated once.

    Row s holds bitwise what ``compress(x[cuts[s]:cuts[s + 1]], threshold[t_s:t_{s+1}],
    segments=segments[s], residual=residual[cuts[s]:cuts[s + 1]], capacity=capacity,
    value_dtype=value_dtype, index_encoding=index_encoding, scale_offsets=scale_offsets[s],
    out=out[s])`` would write, t_s the number of segments of the rows before s: positions
    relative to the range's start, the header's numel the range's length (an empty range gives
    an empty payload of numel 0). The reduce_scatter exchange compresses its shards this way:
    W calls of ``compress`` would validate W times, which at 64 ranks costs more than the
    kernels.

    Args:
        x: fp32, fp16 or bf16 tensor, flattened in C order (a non-contiguous x is copied).
        threshold: a float or 0-d tensor for every segment, or a tensor of sum(S_s)
            thresholds, S_s = the segments of range s (1 for ``segments[s] = None`` over a
            non-empty range, 0 for an empty one); on x's device or the CPU, as ``compress``.
        cuts: W + 1 ints rising (not necessarily strictly) from 0 to x.numel().
        segments: W entries: a ``Segments`` over the range (offsets from 0 to its length), or
            None (one segment; required for an empty range).
        capacity: slots per row (an int >= 0).
        residual: optional error-feedback buffer of x (as ``compress``), updated in place.
        value_dtype, index_encoding: as ``compress``; ``scale_offsets`` (fp8 values only): W
            lists, each as ``compress``'s for its range, all of one length (one row size).
        out: a contiguous uint8 tensor [W, nbytes] on x's device, nbytes the wire size of the
            configuration (``payload.wire_layout``).

    Returns:
        The W payloads (views of the rows of ``out``). No host synchronization.

    Raises:
        TypeError/ValueError naming the argument, as ``compress``; ``cuts``, ``segments``,
        ``threshold`` or ``scale_offsets`` that do not describe W ranges of x.
    """
    _check_float_tensor(x, "x")
    _check_numel(x, "x")
    numel, device = x.numel(), x.device
    value_dtype = _check_value_dtype(value_dtype, x.dtype, fp8=True)
    index_encoding = _check_index_encoding(index_encoding)
    capacity = _check_capacity(capacity)
    if not _all_ints(cuts) or len(cuts) < 2:
        raise TypeError("cuts: expected a list of W + 1 int offsets")
    cuts = [int(c) for c in cuts]
    if cuts[0] != 0 or cuts[-1] != numel or any(b < a for a, b in zip(cuts[:-1], cuts[1:])):
        raise ValueError(f"cuts: expected offsets rising from 0 to numel={numel}, got "
                         f"{cuts[:4]}...")
    world = len(cuts) - 1
    if not isinstance(segments, (list, tuple)) or len(segments) != world:
        raise ValueError(f"segments: expected {world} entries (one per range)")
    offsets = []
    for s, (seg, lo, hi) in enumerate(zip(segments, cuts[:-1], cuts[1:])):
        if seg is None:
            offsets.append(_whole(hi - lo) if hi > lo else [0, 0])
        elif not isinstance(seg, Segments) or seg.numel != hi - lo:
            raise ValueError(f"segments: entry {s} must be None or a Segments over the range's "
                             f"{hi - lo} elements")
        else:
            offsets.append(seg.offsets)
    counts = [len(o) - 1 if o[-1] > 0 else 0 for o in offsets]
    fp8 = value_dtype == wire.FLOAT8
    if fp8:
        if not isinstance(scale_offsets, (list, tuple)) or len(scale_offsets) != world:
            raise ValueError(f"scale_offsets: fp8 values need {world} lists (one per range)")
        scale_offsets = [_check_scale_offsets(b, o, 0, hi - lo) for b, o, lo, hi
                         in zip(scale_offsets, offsets, cuts[:-1], cuts[1:])]
        if len({len(b) for b in scale_offsets}) != 1:
            raise ValueError("scale_offsets: every range needs the same number of scale "
                             "segments (one row size)")
        num_scales = len(scale_offsets[0]) - 1
    elif scale_offsets is not None:
        raise ValueError("scale_offsets: only fp8 values have scale segments")
    else:
        num_scales = 0
    taus = _thresholds(threshold, sum(counts), device)
    _check_residual(residual, x)
    needed = wire.wire_layout(capacity, value_dtype, index_encoding, num_scales).nbytes
    _check_wire_out(out, (world, needed), x, residual, capacity, value_dtype, index_encoding)
    impl = resolve(backend, device)
    flat = x.detach().contiguous().view(-1)
    residual_flat = residual.detach().view(-1) if residual is not None else None
    # A backend that compresses every range in one call (bitwise the loop below): at 64
    # ranks the loop's per-row Python costs more than the kernels.
    where = wire.wire_layout(capacity, value_dtype, index_encoding, num_scales)
    if library.call_compress_ranges(impl, flat, taus, cuts, offsets, residual_flat, out, where,
                                    scale_offsets if fp8 else None):
        return [wire.SparsePayload(row, numel=hi - lo, capacity=capacity,
                                   value_dtype=value_dtype, shape=(hi - lo,), dtype=x.dtype,
                                   index_encoding=index_encoding, num_scales=num_scales)
                for row, lo, hi in zip(out.unbind(0), cuts[:-1], cuts[1:])]
    payloads, t = [], 0
    for s in range(world):
        lo, hi = cuts[s], cuts[s + 1]
        payloads.append(_compress_checked(
            impl, flat[lo:hi], x.dtype, taus[t:t + counts[s]], segments[s], offsets[s],
            residual_flat[lo:hi] if residual_flat is not None else None, capacity,
            value_dtype, index_encoding, scale_offsets[s] if fp8 else None, 0, hi - lo,
            (hi - lo,), out[s]))
        t += counts[s]
    return payloads


def _compress_checked(impl, flat, x_dtype, thresholds, segments, offsets, residual_flat,
                      capacity, value_dtype, index_encoding, scale_offsets, position_offset,
                      total, shape, out) -> SparsePayload:
    """``compress`` on validated arguments: ``flat`` the contiguous 1-D x, ``thresholds`` fp32
    [S] on its device, ``offsets`` the host segment offsets (``segments`` what the caller
    passed: a ``Segments`` lends its device tensor), ``scale_offsets`` checked (fp8)."""
    numel = flat.numel()
    device = flat.device
    segmented = segments is not None
    num_scales = len(scale_offsets) - 1 if value_dtype == wire.FLOAT8 else 0
    version = wire.version_of(value_dtype, index_encoding)
    if numel == 0:
        payload = wire.new_payload(total, capacity or 0, value_dtype, shape, x_dtype,
                                   device, index_encoding, num_scales)
        if value_dtype == wire.FLOAT8:
            payload.scale_offsets.copy_(torch.tensor(scale_offsets, dtype=torch.int32))
        if out is not None:
            out.copy_(payload.buffer)
            payload = wire.SparsePayload(out, numel=total, capacity=capacity,
                                         value_dtype=value_dtype, shape=shape,
                                         dtype=x_dtype, index_encoding=index_encoding,
                                         num_scales=num_scales)
        return payload
    if isinstance(segments, Segments) and segments.tensor.device == device:
        seg_dev = segments.tensor
    else:
        seg_dev = _device_offsets(offsets, device) if segmented else None
    if version == 2:
        return _compress_v2(impl, x_dtype, flat, thresholds, offsets, seg_dev, residual_flat,
                            capacity, value_dtype, index_encoding, scale_offsets,
                            position_offset, total, shape, out)
    if capacity is None:
        capacity = library.call_count_kept(impl, flat, thresholds, offsets, seg_dev,
                                           residual_flat)
    own_shape = shape if total == numel else (numel,)
    if out is not None:
        out.zero_()
        out[:wire.HEADER_BYTES].view(torch.int32).copy_(
            wire.header_tensor(numel, capacity, value_dtype), non_blocking=True)
        payload = wire.SparsePayload(out, numel=numel, capacity=capacity,
                                     value_dtype=value_dtype, shape=own_shape, dtype=x_dtype)
    else:
        payload = wire.new_payload(numel, capacity, value_dtype, own_shape, x_dtype, device)
    library.call_compress(impl, flat, thresholds, offsets, seg_dev, residual_flat, payload)
    if total != numel:
        return _as_range(payload, position_offset, total, shape)
    return payload


def _as_range(payload: SparsePayload, position_offset: int, total: int,
              shape) -> SparsePayload:
    """A version-1 payload of x as one of the whole tensor: indices += position_offset (every
    slot: those past the count are unspecified anyway) and the header's numel := total."""
    words = wire.header_tensor(total, payload.capacity, payload.value_dtype)
    head = payload.buffer[:wire.HEADER_BYTES].view(torch.int32)
    head[wire.WORD_NUMEL_LOW:wire.WORD_NUMEL_HIGH + 1].copy_(
        words[wire.WORD_NUMEL_LOW:wire.WORD_NUMEL_HIGH + 1], non_blocking=True)
    if position_offset:
        payload.indices.add_(position_offset)
    return wire.SparsePayload(payload.buffer, numel=total, capacity=payload.capacity,
                              value_dtype=payload.value_dtype, shape=shape,
                              dtype=payload.dtype)


def _check_scale_offsets(scale_offsets, offsets: List[int], position_offset: int,
                         total: int) -> List[int]:
    """fp8 scale segments: as given (checked) or from the segments over the whole tensor."""
    if scale_offsets is None:
        bounds = sorted(set([0] + [position_offset + o for o in offsets] + [total]))
        return bounds if len(bounds) > 1 else [0, 0]
    if not _all_ints(scale_offsets):
        raise TypeError("scale_offsets: expected a list of int offsets")
    bounds = [int(o) for o in scale_offsets]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or \
            any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"scale_offsets: expected S+1 >= 2 offsets rising from 0 to "
                         f"total_numel = {total}, got {bounds[:4]}...")
    return bounds


def _compress_v2(impl, x_dtype, flat, thresholds, offsets, seg_dev, residual_flat, capacity,
                 value_dtype, index_encoding, scale_offsets, position_offset, total, shape,
                 out) -> SparsePayload:
    """Format version 2: the backend's kernel writes the candidates as a version-1 payload
    (fp32 values under fp8, so that they are exactly acc), ``codec.encode`` the rest."""
    numel = flat.numel()
    device = flat.device
    fp8 = value_dtype == wire.FLOAT8
    num_scales = len(scale_offsets) - 1 if fp8 else 0
    candidate_dtype = torch.float32 if fp8 else value_dtype
    kept = capacity
    if kept is None:
        kept = library.call_count_kept(impl, flat, thresholds, offsets, seg_dev, residual_flat)
    candidates = wire.new_payload(numel, kept, candidate_dtype, (numel,), x_dtype, device)
    library.call_compress(impl, flat, thresholds, offsets, seg_dev, residual_flat, candidates)
    if capacity is None:  # every kept entry and its escapes (synchronizes, as documented)
        capacity = kept + int(codec.escapes_needed(candidates, value_dtype, index_encoding,
                                                   position_offset))
    if out is not None:
        out.zero_()
        out[:wire.HEADER_BYTES].view(torch.int32).copy_(
            wire.header_tensor(total, capacity, value_dtype, index_encoding, num_scales),
            non_blocking=True)
        payload = wire.SparsePayload(out, numel=total, capacity=capacity,
                                     value_dtype=value_dtype, shape=shape, dtype=x_dtype,
                                     index_encoding=index_encoding, num_scales=num_scales)
    else:
        payload = wire.new_payload(total, capacity, value_dtype, shape, x_dtype, device,
                                   index_encoding, num_scales)
    if hasattr(impl, "encode_v2"):  # the backend's own encoder (bitwise the codec's)
        impl.encode_v2(candidates, payload, scale_offsets if fp8 else None, residual_flat,
                       position_offset)
    else:
        bounds = _scale_tensor(tuple(scale_offsets), device) if fp8 else None
        codec.encode(candidates, payload, bounds, residual_flat, position_offset)
    return payload


@functools.lru_cache(maxsize=256)
def _scale_tensor_cached(bounds: tuple, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(bounds, dtype=torch.int64).to(device)


def _scale_tensor(bounds: tuple, device: torch.device) -> torch.Tensor:
    """The scale segments as an int64 device tensor, cached (the hook passes the same ones
    every step)."""
    if torch.compiler.is_compiling():
        return torch.tensor(bounds, dtype=torch.int64).to(device)
    return _scale_tensor_cached(bounds, torch.device(device))


def _raise_invalid(check, name: str) -> None:
    if not check.ok:
        raise ValueError(f"{name}: invalid payload: {describe(check)}")


def decompress(payload: SparsePayload, *, out: Optional[torch.Tensor] = None,
               accumulate: bool = False, validate: bool = True,
               errors: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """Rebuild the dense tensor of a payload: zeros except the sent entries.

    Args:
        payload: a ``SparsePayload`` (from ``compress`` or ``SparsePayload.from_buffer``).
        out: optional contiguous fp32/fp16/bf16 tensor with payload.numel elements on the
            payload's device; overwritten, or with ``accumulate=True`` added to at the sent
            entries (``out[i] = out[i] + value`` in fp32, rounded to out's dtype; other entries
            are untouched).
        validate: True checks the payload first (header, count, indices in range and strictly
            ascending) and raises ValueError without writing anything (synchronizes). False
            never synchronizes: bad rows/entries are skipped and counted in ``errors``.
        errors: the device-side error counter for ``validate=False`` (default
            ``payload_errors(device)``).

    Returns:
        out, or a new tensor of payload.shape and payload.dtype. Nothing outside it is written,
        whatever the payload says.

    Raises:
        TypeError for a payload that is not a ``SparsePayload`` or an ``out`` of another
        dtype; ValueError (naming the argument) for an ``out`` of the wrong size, device or
        layout, and with ``validate=True`` for a bad payload.
    """
    if not isinstance(payload, SparsePayload):
        raise TypeError(f"payload: expected a SparsePayload, got {type(payload).__name__}")
    device = payload.buffer.device
    if out is None:
        if accumulate:
            raise ValueError("out: accumulate=True needs an out tensor to add to")
        out = torch.empty(payload.shape, dtype=payload.dtype, device=device)
    _check_out(out, payload.numel, device)
    counter = _errors_for(errors, device)
    impl = resolve(backend, device)
    if payload.version == 2:
        _decompress_v2(impl, out.view(-1), payload.buffer[None], payload.numel,
                       payload.layout, accumulate, False, False, validate, counter, "payload")
        return out
    if validate:
        _raise_invalid(check_rows(payload.buffer[None], payload.numel, payload.capacity,
                                  payload.value_dtype), "payload")
    library.call_decompress(impl, out.view(-1), payload.buffer, payload.numel,
                            payload.capacity, payload.value_dtype, accumulate, counter)
    return out


def _scratch_counter(device: torch.device) -> torch.Tensor:
    """A counter for the version-1 rows the codec builds (valid by construction)."""
    return torch.zeros((), dtype=torch.int32, device=device)


def _decompress_v2(impl, out: torch.Tensor, buffers: torch.Tensor, numel: int, where,
                   accumulate: bool, average: bool, many: bool, validate: bool,
                   counter: torch.Tensor, name: str) -> None:
    """Version-2 rows into out as decompress (``many`` False) or decompress_many: with
    ``validate`` a bad row raises ValueError (synchronizes) before anything is written;
    otherwise what is bad is skipped and counted in ``counter``. A backend with its own
    decoder (``decompress_v2``) decodes; the others get version-1 rows of fp32 values from
    the codec."""
    if validate or not hasattr(impl, "decompress_v2"):
        positions, decoded, ok, row_ok, count_ok, errors = codec.decode(buffers, numel, where)
        if validate and int(errors.sum()):
            raise ValueError(f"{name}: invalid payload: "
                             f"{codec.describe_rows(row_ok, count_ok, errors)}")
    if hasattr(impl, "decompress_v2"):
        impl.decompress_v2(out, buffers, numel, where, accumulate, average, many,
                           counter if not validate else _scratch_counter(out.device))
        return
    counter.add_(errors.sum().to(torch.int32))
    rows = codec.to_version1(buffers, numel, where, positions, decoded, ok)
    scratch = _scratch_counter(out.device)
    if many:
        library.call_decompress_many(impl, out, rows, where.capacity, torch.float32,
                                     accumulate, average, scratch)
    else:
        library.call_decompress(impl, out, rows[0], numel, where.capacity, torch.float32,
                                accumulate, scratch)


def _buffers_config(buffers: torch.Tensor, capacity, value_dtype, index_encoding,
                    num_scales) -> wire.WireLayout:
    """The rows' configuration: as given, or the one carried by most rows whose headers
    describe a payload of this row size (the lowest rank's on a tie)."""
    nbytes = buffers.shape[1]
    if capacity is not None or value_dtype is not None:
        if capacity is None or value_dtype is None:
            raise ValueError("capacity, value_dtype: give both or neither")
        capacity = _check_capacity(capacity)
        value_dtype = _check_value_dtype(value_dtype, torch.float32, fp8=True)
        index_encoding = _check_index_encoding(index_encoding or "int32")
        if value_dtype == wire.FLOAT8:
            num_scales = _check_int(num_scales, "num_scales") if num_scales is not None else 0
            if num_scales < 1:
                raise ValueError(f"num_scales: fp8 rows need the number of scale segments "
                                 f"(>= 1), got {num_scales}")
        elif num_scales:
            raise ValueError(f"num_scales: only rows with fp8 values have scale segments, "
                             f"got {num_scales}")
        where = wire.wire_layout(capacity, value_dtype, index_encoding, num_scales or 0)
        if where.nbytes != nbytes:
            raise ValueError(f"buffers: rows of {nbytes} bytes, but capacity {capacity} with "
                             f"{value_dtype} ({index_encoding}) needs {where.nbytes}")
        return where
    if index_encoding is not None or num_scales is not None:
        raise ValueError("index_encoding, num_scales: describe rows only together with "
                         "capacity and value_dtype (without them each row's header does)")
    # One copy of all the headers; a corrupted row is then one invalid row, whichever it is.
    headers = [wire.Header.parse(raw.tobytes())
               for raw in buffers[:, :wire.HEADER_BYTES].cpu().numpy()]
    votes = {}  # insertion-ordered: ties go to the lowest rank
    for header in headers:
        if not header.problems():
            where = header.layout()
            if where.nbytes == nbytes:
                votes[where] = votes.get(where, 0) + 1
    if votes:
        return max(votes, key=votes.get)
    row0 = headers[0]
    why = "; ".join(row0.problems())
    if not why:
        why = (f"capacity {row0.capacity} with {row0.value_dtype} needs "
               f"{row0.layout().nbytes} bytes")
    raise ValueError(f"buffers: no row is a dct_kernels payload in rows of {nbytes} bytes "
                     f"(row 0: {why}); pass capacity= and value_dtype= to decode them as "
                     "payloads of that configuration")


def decompress_many(buffers: torch.Tensor, *, out: torch.Tensor, accumulate: bool = False,
                    average: bool = False, validate: bool = True,
                    capacity: Optional[int] = None, value_dtype: Optional[torch.dtype] = None,
                    index_encoding: Optional[str] = None, num_scales: Optional[int] = None,
                    errors: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Sum W gathered payloads into ``out``, in rank order, deterministically.

    Args:
        buffers: ``[W, nbytes]`` uint8, row w the wire buffer of rank w (as an all-gather
            leaves them). All rows must have the same configuration and numel == out.numel().
        out: contiguous fp32/fp16/bf16 tensor on the buffers' device.
        accumulate: ``out = out + sum`` instead of ``out = sum``.
        average: divide the sum by W first.
        validate: True checks every row first and raises ValueError, writing nothing
            (synchronizes); False skips bad rows/entries and counts them in ``errors``.
        capacity, value_dtype: the rows' configuration; when omitted it is the one most rows'
            headers carry among those that describe a payload of the rows' size (one small
            device-to-host copy of the headers, which synchronizes; ValueError when no row
            does). Rows that differ, or whose numel is not out's, are invalid rows.
        index_encoding, num_scales: with capacity and value_dtype, the rest of a format-2
            configuration (default "int32"; num_scales, the scale segments, for fp8 values).

    The sum is ``0 + d_0 + d_1 + ... + d_{W-1}`` in fp32 (d_w the dense tensor of row w; a sum
    of zeros is +0), then ``/ W`` with ``average`` (IEEE division), then added to out in fp32
    with ``accumulate``, then rounded once to out's dtype. No float atomics: the result is
    bitwise identical on every rank and every run.

    Returns:
        out.

    Raises:
        TypeError/ValueError naming the argument: buffers not a 2-D uint8 tensor, an ``out``
        of the wrong dtype, size, device or layout, capacity and value_dtype not given
        together, a configuration whose row size is not the buffers'; with
        ``validate=True``, ValueError for a bad row (naming the rank).
    """
    if not isinstance(buffers, torch.Tensor):
        raise TypeError(f"buffers: expected a torch.Tensor, got {type(buffers).__name__}")
    if buffers.dtype != torch.uint8 or buffers.dim() != 2 or buffers.shape[0] < 1:
        raise ValueError(f"buffers: expected a [W >= 1, nbytes] uint8 tensor, got "
                         f"{tuple(buffers.shape)} {buffers.dtype}")
    if buffers.shape[1] < wire.HEADER_BYTES or buffers.shape[1] % wire.ALIGN_BYTES:
        raise ValueError(f"buffers: rows of {buffers.shape[1]} bytes are not wire buffers")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    device = buffers.device
    _check_out(out, out.numel(), device)
    buffers = buffers.contiguous()
    where = _buffers_config(buffers, capacity, value_dtype, index_encoding, num_scales)
    capacity, value_dtype = where.capacity, where.value_dtype
    counter = _errors_for(errors, device)
    impl = resolve(backend, device)
    if where.version == 2:
        _decompress_v2(impl, out.view(-1), buffers, out.numel(), where, accumulate, average,
                       True, validate, counter, "buffers")
        return out
    if validate:
        _raise_invalid(check_rows(buffers, out.numel(), capacity, value_dtype), "buffers")
    library.call_decompress_many(impl, out.view(-1), buffers, capacity, value_dtype,
                                 accumulate, average, counter)
    return out


def compress_rows(x: torch.Tensor, k: int, *, value_dtype: Optional[torch.dtype] = None,
                  backend: Optional[str] = None) -> RowPayload:
    """Keep exactly the k largest magnitudes of each row of x ([B, D]).

    Ties go to the lower column index; NaN ranks above +inf. Column indices are ascending in
    each row, int16 when D <= 32768, else int32. Values are in ``value_dtype`` (default
    x.dtype; fp16/bf16 saturate finite values). No host synchronization; the payload's size
    depends only on (B, D, k, dtypes).

    Raises:
        TypeError for a non-float x; ValueError for x not 2-D or k outside [1, D].
    """
    _check_float_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [B, D] tensor, got shape {tuple(x.shape)}")
    _check_numel(x, "x")
    k = _check_int(k, "k")
    columns = x.shape[1]
    if not 1 <= k <= columns:
        raise ValueError(f"k: must satisfy 1 <= k <= D ({columns}), got {k}")
    value_dtype = _check_value_dtype(value_dtype, x.dtype)
    impl = resolve(backend, x.device)
    indices, values = library.call_compress_rows(impl, x.detach().contiguous(), k,
                                                 value_dtype)
    return RowPayload(indices, values, (x.shape[0], columns), x.dtype)


def _check_row_payload(p, name: str = "p") -> None:
    if not isinstance(p, RowPayload):
        raise TypeError(f"{name}: expected a RowPayload, got {type(p).__name__}")
    shape = tuple(p.shape) if isinstance(p.shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) != 2 or not _all_ints(shape) or min(shape) < 0:
        raise ValueError(f"{name}: shape must be (B, D) of two ints >= 0, got {p.shape!r}")
    if not isinstance(p.indices, torch.Tensor) or not isinstance(p.values, torch.Tensor):
        raise TypeError(f"{name}: indices and values must be tensors, got "
                        f"{type(p.indices).__name__} and {type(p.values).__name__}")
    if p.dtype not in wire.VALUE_DTYPES:
        raise ValueError(f"{name}: dtype must be float32, float16 or bfloat16, got {p.dtype}")
    rows, columns = shape
    if p.indices.dim() != 2 or p.indices.shape[0] != rows or \
            p.indices.dtype != wire.row_index_dtype(columns):
        raise ValueError(f"{name}: indices must be [{rows}, k] "
                         f"{wire.row_index_dtype(columns)}, got {tuple(p.indices.shape)} "
                         f"{p.indices.dtype}")
    if p.values.shape != p.indices.shape or p.values.dtype not in wire.VALUE_DTYPES:
        raise ValueError(f"{name}: values must be float and shaped like indices "
                         f"{tuple(p.indices.shape)}, got {tuple(p.values.shape)} "
                         f"{p.values.dtype}")
    if p.values.device != p.indices.device:
        raise ValueError(f"{name}: indices and values are on different devices")


def decompress_rows(p: RowPayload, *, out: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Dense ``[B, D]`` tensor of a RowPayload: zeros except the kept entries.

    ``out`` (optional, contiguous, p.shape) is overwritten. Column indices outside [0, D) are
    skipped (never written). Returns out or a new tensor of p.dtype.

    Raises:
        TypeError/ValueError naming ``p`` for a payload that is not a well-formed
        ``RowPayload``, and naming ``out`` for one of the wrong dtype, shape or device.
    """
    _check_row_payload(p)
    device = p.indices.device
    if out is None:
        out = torch.empty(p.shape, dtype=p.dtype, device=device)
    _check_out(out, p.shape[0] * p.shape[1], device)
    if tuple(out.shape) != tuple(p.shape):
        raise ValueError(f"out: expected shape {tuple(p.shape)}, got {tuple(out.shape)}")
    impl = resolve(backend, device)
    library.call_decompress_rows(impl, p.indices.contiguous(), p.values.contiguous(), out)
    return out


def gather_rows(y: torch.Tensor, p: RowPayload, *, backend: Optional[str] = None) -> torch.Tensor:
    """y's entries at p's positions: ``[B, k]`` in y's dtype (DCT-MP's backward pass).

    y must have p.shape. Positions outside [0, D) give 0. No host synchronization.

    Raises:
        TypeError/ValueError naming ``p`` for a payload that is not a well-formed
        ``RowPayload``, and naming ``y`` for a tensor that is not a float tensor of p.shape.
    """
    _check_row_payload(p)
    _check_float_tensor(y, "y")
    if tuple(y.shape) != tuple(p.shape):
        raise ValueError(f"y: expected shape {tuple(p.shape)} (the payload's), "
                         f"got {tuple(y.shape)}")
    if y.device != p.indices.device:
        raise ValueError(f"y: expected a tensor on {p.indices.device}, got {y.device}")
    impl = resolve(backend, y.device)
    return library.call_gather_rows(impl, y.detach().contiguous(), p.indices.contiguous())
