"""Device helpers shared by the Triton kernels: magnitude keys and wire casts."""

import torch
import triton
import triton.language as tl

from ...magnitude import key_constants
from ...payload import CODE_BFLOAT16, CODE_FLOAT16

# The wire's value dtype codes (payload.py), as constants the kernels can read.
_CODE_FLOAT16 = tl.constexpr(CODE_FLOAT16)
_CODE_BFLOAT16 = tl.constexpr(CODE_BFLOAT16)


def key_params(dtype: torch.dtype):
    """(Triton integer type of the bits, abs mask, bits of +inf) for ``magnitude_key``."""
    abs_mask, inf_bits, bits = key_constants(dtype)
    return (tl.int32 if bits == 31 else tl.int16), abs_mask, inf_bits


@triton.jit
def magnitude_key(v, BITS_TYPE: tl.constexpr, ABS_MASK: tl.constexpr, INF_BITS: tl.constexpr):
    """int32 key whose order is magnitude order: |v| bits, every NaN mapped to the top key."""
    bits = v.to(BITS_TYPE, bitcast=True).to(tl.int32) & ABS_MASK
    return tl.where(bits > INF_BITS, ABS_MASK, bits)


@triton.jit
def f32_key(v):
    bits = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(bits > 0x7F800000, 0x7FFFFFFF, bits)


@triton.jit
def threshold_key(t):
    """Key of an fp32 threshold for |acc| >= t; a negative (non-NaN) threshold keeps all."""
    key = f32_key(t)
    negative = (t.to(tl.int32, bitcast=True) < 0) & (key != 0x7FFFFFFF)
    return tl.where(negative, 0, key)


@triton.jit
def to_f32(v):
    """Widen to fp32 exactly; bf16 goes through its bits, because the interpreter flushes bf16
    subnormals when it converts them."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def f32_to_bf16(v):
    """Round-to-nearest-even fp32 -> bf16 done on the bits, so the interpreter (which
    truncates) and the GPU agree with torch; every NaN becomes the canonical 0x7FC0."""
    u = v.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def f32_to(v, CODE: tl.constexpr):
    """fp32 -> dtype of the wire code CODE (payload.py), rounding to nearest even."""
    if CODE == _CODE_FLOAT16:
        return v.to(tl.float16)
    elif CODE == _CODE_BFLOAT16:
        return f32_to_bf16(v)
    else:
        return v


@triton.jit
def to_out(v, CODE: tl.constexpr):
    """fp32 -> the dtype of a dense output (f32_to), every NaN the canonical NaN of that dtype,
    as the torch reference and the cpu core write it (a NaN's payload, or what a GPU's
    arithmetic makes of one, would otherwise differ between backends)."""
    is_nan = v != v
    if CODE == _CODE_FLOAT16:
        nan = tl.full(v.shape, 0x7E00, tl.int16).to(tl.float16, bitcast=True)
        return tl.where(is_nan, nan, f32_to(v, _CODE_FLOAT16))
    elif CODE == _CODE_BFLOAT16:
        return f32_to(v, _CODE_BFLOAT16)  # f32_to_bf16 makes every NaN 0x7FC0 already
    else:
        nan = tl.full(v.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
        return tl.where(is_nan, nan, v)


@triton.jit
def to_wire(v, CODE: tl.constexpr):
    """fp32 -> wire dtype; finite values saturate at the wire's largest finite value, inf
    passes, every NaN becomes the canonical NaN (as ``magnitude.saturating_cast``)."""
    finite = tl.abs(v) < float("inf")
    is_nan = v != v
    if CODE == _CODE_FLOAT16:
        wire = f32_to(tl.where(finite, tl.minimum(tl.maximum(v, -65504.0), 65504.0), v),
                      _CODE_FLOAT16)
        nan = tl.full(v.shape, 0x7E00, tl.int16).to(tl.float16, bitcast=True)
        return tl.where(is_nan, nan, wire)
    elif CODE == _CODE_BFLOAT16:
        limit = 3.3895313892515355e38
        return f32_to(tl.where(finite, tl.minimum(tl.maximum(v, -limit), limit), v),
                      _CODE_BFLOAT16)
    else:
        nan = tl.full(v.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
        return tl.where(is_nan, nan, v)
