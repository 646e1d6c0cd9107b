"""Backend registry: which implementations exist here, and which one an op uses.

A backend is a plain module with ``NAME``, ``available() -> str`` ("available" or why not) and
these functions, which receive inputs the op layer (``dct_kernels.ops``) has already validated,
flattened and made contiguous; ``offsets`` is the host list of S+1 segment offsets (``[0, n]``
without segments), ``thresholds`` an fp32 tensor of S, ``seg_dev`` the offsets on the device
(or None without segments):

- ``select_threshold(x, ks, offsets) -> [S] tensor`` in x's dtype;
- ``count_kept(x, thresholds, offsets, seg_dev, residual) -> 0-d tensor``;
- ``compress(x, thresholds, offsets, seg_dev, residual, payload)``: fills the payload's buffer
  (written header already in place) and updates the residual;
- ``decompress(out, buffer, numel, capacity, value_dtype, accumulate, errors)``;
- ``decompress_many(out, buffers, capacity, value_dtype, accumulate, average, errors)``;
- ``compress_rows(x, k, value_dtype) -> (indices, values)``;
- ``decompress_rows(indices, values, out)``; ``gather_rows(y, indices) -> tensor``.

Optionally, wire format version 2 (``dct_kernels/codec.py`` is its reference, used by a
backend that does not have these; the result must be bitwise the same):

- ``encode_v2(candidates, payload, scale_offsets, residual, position_offset)``: the codec's
  ``encode`` (``scale_offsets`` a host list);
- ``decompress_v2(out, buffers, numel, where, accumulate, average, many, errors)``: decode
  version-2 rows of layout ``where`` into out as decompress (``many`` False) or
  decompress_many would.

Optionally, the DDP hook's threshold rule (``dct_kernels/distributed/threshold_rule.py`` is
its reference, used by a backend that does not have these; bitwise the same):

- ``rule_estimate(rule, thresholds, x, residual)``: ``ThresholdRule.estimate`` in one call;
- ``rule_step(rule, thresholds, kept, overflowed, capped)``: ``ThresholdRule.step``'s state
  update (counts into ``rule.counts_out``, flags into ``rule.host_flags``) in one call.

``torch_ref`` is the reference implementation of that contract; ``cuda_ext`` and ``cpu_ext``
bind the compiled cores of csrc/ (CUDA and host C++), ``triton_kernels`` holds the Triton
kernels.
"""

import importlib
import importlib.util
import os
from typing import Dict

import torch

from .interpreter import triton_interpreting

NAMES = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "DCT_KERNELS_BACKEND"

_modules: Dict[str, object] = {}
_reasons: Dict[str, str] = {}


def _import_failure(name: str, exc: ImportError) -> str:
    """Why the compiled extension ``dct_kernels._<name>`` cannot be imported: not built, or
    built but not loadable (a sanitizer build without its runtime preloaded, a module built
    for another Python or torch), in which case the loader's own message is what helps."""
    # Whether the module file is there decides it: "from .. import _cpu" of a missing module
    # raises a plain ImportError ("cannot import name"), not ModuleNotFoundError.
    try:
        present = importlib.util.find_spec(f"dct_kernels._{name}") is not None
    except (ImportError, ValueError):
        present = False
    if not present:
        return f"extension not built (dct_kernels._{name} is missing)"
    cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
    return f"extension built but not loadable: {cause}"


def _load(name: str):
    """Import a backend module; remember why when it cannot be used."""
    if name in _modules or name in _reasons:
        return _modules.get(name)
    if name == "torch":
        from . import torch_ref as module
    elif name == "triton":
        if importlib.util.find_spec("triton") is None:
            _reasons[name] = "triton not installed"
            return None
        module = importlib.import_module(".triton_kernels", __name__)
    else:
        extension = {"cuda": "cuda_ext", "cpu": "cpu_ext"}[name]
        try:
            module = importlib.import_module(f".{extension}", __name__)
        except ImportError as exc:
            _reasons[name] = _import_failure(name, exc)
            return None
    reason = module.available()
    if reason != "available":
        _reasons[name] = reason
        return None
    _modules[name] = module
    return module


def available_backends() -> Dict[str, str]:
    """Each backend name mapped to "available" or a short reason why it cannot be used."""
    result = {}
    for name in NAMES:
        module = _load(name)
        result[name] = "available" if module is not None else _reasons[name]
    return result


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    if name == "cpu":
        return device.type == "cpu"
    return device.type == "cuda"


_resolved: Dict[tuple, object] = {}


def resolve(backend, device: torch.device):
    """The backend module for tensors on ``device``.

    ``backend`` (or the DCT_KERNELS_BACKEND environment variable) names one explicitly;
    otherwise CUDA tensors use "cuda" when the extension is built, else "triton", and CPU
    tensors use "cpu" when its extension is built, else "torch". Every op calls this, so
    successful answers are remembered per (backend, environment, device type).
    """
    key = (backend, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"), device.type)
    module = _resolved.get(key)
    if module is None:
        module = _resolve(backend, device)
        _resolved[key] = module
    return module


def _resolve(backend, device: torch.device):
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend is not None:
        if backend not in NAMES:
            raise ValueError(f"backend: expected one of {NAMES}, got {source}")
        module = _load(backend)
        if module is None:
            raise ValueError(f"backend: {source} is not available here: {_reasons[backend]}")
        if not _runs_on(backend, device):
            hint = " (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)" \
                if backend == "triton" else ""
            raise ValueError(f"backend: {source} cannot run on {device} tensors{hint}")
        return module
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            module = _load(name)
            if module is not None:
                return module
    elif device.type == "cpu":
        module = _load("cpu")
        if module is not None:
            return module
    return _load("torch")
