"""Magnitude order as integer keys, shared by the torch reference and the host-side checks.

An element's key is its absolute value's bit pattern, with every NaN mapped to the largest key,
so integer order equals ``torch.topk(x.abs())`` order: NaN > +inf > finite, and -0 == +0.
fp32 keys are 31-bit, fp16/bf16 keys 15-bit. The Triton and CUDA kernels compute the same keys
on the device.
"""

import torch

_ABS_MASK = {torch.float32: 0x7FFFFFFF, torch.float16: 0x7FFF, torch.bfloat16: 0x7FFF}
_INF_BITS = {torch.float32: 0x7F800000, torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
_BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def key_bits(dtype: torch.dtype) -> int:
    """Number of significant bits in a key of this dtype (31 or 15)."""
    return 31 if dtype == torch.float32 else 15


def key_constants(dtype: torch.dtype):
    """(abs mask, bits of +inf, key bits) of a dtype, for kernels that compute keys."""
    return _ABS_MASK[dtype], _INF_BITS[dtype], key_bits(dtype)


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of x (fp32/fp16/bf16), same shape."""
    bits = x.view(_BITS_DTYPE[x.dtype]).to(torch.int32) & _ABS_MASK[x.dtype]
    return torch.where(bits > _INF_BITS[x.dtype], _ABS_MASK[x.dtype], bits)


def threshold_keys(threshold_f32: torch.Tensor) -> torch.Tensor:
    """Keys of fp32 thresholds for ``|acc| >= t``; a negative (non-NaN) threshold keeps all."""
    keys = magnitude_keys(threshold_f32)
    negative = (threshold_f32.view(torch.int32) < 0) & (keys != _ABS_MASK[torch.float32])
    return torch.where(negative, 0, keys)


def keys_to_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The non-negative values whose keys these are (NaN for the NaN key)."""
    return keys.to(_BITS_DTYPE[dtype]).view(dtype)


# The one NaN bit pattern put on the wire (positive quiet NaN), so every backend writes the
# same bytes whatever NaN payload the data carried.
CANONICAL_NAN_BITS = {torch.float32: 0x7FC00000, torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}


def saturating_cast(values_f32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> wire dtype; finite values clamp to the largest finite value, inf passes, NaN
    becomes the canonical NaN."""
    if dtype == torch.float32:
        out = values_f32.clone()
    else:
        limit = torch.finfo(dtype).max
        clamped = values_f32.clamp(-limit, limit)
        out = torch.where(torch.isfinite(values_f32), clamped, values_f32).to(dtype)
    return canonical_nan(out, torch.isnan(values_f32))


def widen(x: torch.Tensor) -> torch.Tensor:
    """fp32/fp16/bf16 ``x`` as fp32, NaN payloads included (exact, as the cpu core widens):
    torch's own conversion of a 16-bit NaN depends on its code path (the same fp16 NaN can
    come out 0x7FC00000 or 0x7FFFFFFF)."""
    wide = x.to(torch.float32)
    if x.dtype == torch.float32:
        return wide
    bits = x.view(torch.int16).to(torch.int32) & 0xFFFF
    if x.dtype == torch.bfloat16:
        exact = bits << 16
    else:  # fp16 NaN: its sign, fp32's all-ones exponent, the 10-bit payload on top
        exact = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x3FF) << 13)
    return torch.where(torch.isnan(wide), exact.view(torch.float32), wide)


def canonical_nan(t: torch.Tensor, where=None) -> torch.Tensor:
    """``t`` (fp32/fp16/bf16) with the canonical NaN at ``where`` (default: where t is NaN).
    torch's dtype conversions keep or set NaN payloads as their code path happens to (a 16-bit
    NaN widened to fp32 can come out 0x7FC00000 or 0x7FFFFFFF), the other backends write the
    canonical one."""
    nan = torch.tensor(CANONICAL_NAN_BITS[t.dtype], dtype=_BITS_DTYPE[t.dtype]).view(t.dtype)
    return torch.where(torch.isnan(t) if where is None else where, nan.to(t.device), t)
