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
    nan = torch.tensor(CANONICAL_NAN_BITS[dtype], dtype=_BITS_DTYPE[dtype]).view(dtype)
    return torch.where(torch.isnan(values_f32), nan.to(out.device), out)
