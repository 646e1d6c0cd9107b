"""Exact k-th largest magnitude by radix select over the magnitude keys.

Each pass histograms one 8-bit digit of the keys that match the digits chosen so far (one read
of the data per pass: 4 passes for fp32's 31-bit keys, 2 for 16-bit keys), then a tiny kernel
per segment picks the digit holding the k-th largest key and updates (prefix, k remaining) on
the device. No host synchronization; ties, NaN, denormals and narrow ranges need no special
case because the result is an exact key.

Work is split into items of at most CHUNK elements, each inside one segment, so segmented
selection (one threshold per parameter of a bucket) costs the same as a flat one.
"""

from typing import List

import numpy as np
import torch
import triton
import triton.language as tl

from ...magnitude import key_bits, keys_to_values
from .common import key_params, magnitude_key

RADIX_BITS = 8
NUM_BINS = 1 << RADIX_BITS
# Module attributes so the benchmark can sweep them.
BLOCK = 4096               # elements per loop step
CHUNK = 4 * BLOCK          # elements per program (a work item)


@triton.jit
def _histogram_pass(x_ptr, items_ptr, state_ptr, hist_ptr,
                    SHIFT: tl.constexpr, HIGH: tl.constexpr,
                    BITS_TYPE: tl.constexpr, ABS_MASK: tl.constexpr, INF_BITS: tl.constexpr,
                    NUM_BINS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    item = tl.program_id(0)
    segment = tl.load(items_ptr + 3 * item)
    start = tl.load(items_ptr + 3 * item + 1)
    end = tl.load(items_ptr + 3 * item + 2)
    prefix_high = tl.load(state_ptr + 2 * segment) >> HIGH
    hist = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for step in range(0, CHUNK, BLOCK):  # static trip count; the mask stops at the item's end
        offs = start + step + tl.arange(0, BLOCK)
        inside = offs < end
        key = magnitude_key(tl.load(x_ptr + offs, mask=inside, other=0.0),
                            BITS_TYPE, ABS_MASK, INF_BITS)
        match = inside & ((key >> HIGH) == prefix_high)
        hist += tl.histogram((key >> SHIFT) & (NUM_BINS - 1), NUM_BINS, mask=match)
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(hist_ptr + segment * NUM_BINS + bins, hist, mask=hist > 0)


@triton.jit
def _choose_digit(state_ptr, hist_ptr, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr):
    segment = tl.program_id(0)
    j = tl.arange(0, NUM_BINS)
    # Walk the digits from the largest down: the k-th largest lies in the first digit whose
    # running count reaches k.
    counts = tl.load(hist_ptr + segment * NUM_BINS + (NUM_BINS - 1 - j))
    running = tl.cumsum(counts, 0)
    k = tl.load(state_ptr + 2 * segment + 1)
    first = tl.min(tl.where(running >= k, j, NUM_BINS - 1), 0)
    above = tl.sum(tl.where(j < first, counts, 0), 0)
    prefix = tl.load(state_ptr + 2 * segment)
    tl.store(state_ptr + 2 * segment, prefix | ((NUM_BINS - 1 - first) << SHIFT))
    tl.store(state_ptr + 2 * segment + 1, k - above)


def _work_items(offsets: List[int], chunk: int) -> np.ndarray:
    items = []
    for s in range(len(offsets) - 1):
        starts = np.arange(offsets[s], offsets[s + 1], chunk, dtype=np.int64)
        ends = np.minimum(starts + chunk, offsets[s + 1])
        items.append(np.stack([np.full_like(starts, s), starts, ends], axis=1))
    return np.concatenate(items).reshape(-1)


def _digit_shifts(bits: int) -> List[int]:
    """Shifts of the 8-bit digits from the most significant down (the top one may be short)."""
    return list(range((bits - 1) // RADIX_BITS * RADIX_BITS, -1, -RADIX_BITS))


def select_threshold(x: torch.Tensor, ks: List[int], offsets: List[int]) -> torch.Tensor:
    device = x.device
    num_segments = len(ks)
    items = torch.from_numpy(_work_items(offsets, CHUNK)).to(device, non_blocking=True)
    state_host = np.zeros((num_segments, 2), dtype=np.int32)
    state_host[:, 1] = ks
    state = torch.from_numpy(state_host).to(device, non_blocking=True)
    bits_type, abs_mask, inf_bits = key_params(x.dtype)
    bits = key_bits(x.dtype)
    shifts = _digit_shifts(bits)
    hist = torch.zeros(len(shifts), num_segments, NUM_BINS, dtype=torch.int32, device=device)
    num_items = items.numel() // 3
    for p, shift in enumerate(shifts):
        high = min(shift + RADIX_BITS, bits)
        _histogram_pass[(num_items,)](x, items, state, hist[p], SHIFT=shift, HIGH=high,
                                      BITS_TYPE=bits_type, ABS_MASK=abs_mask, INF_BITS=inf_bits,
                                      NUM_BINS=NUM_BINS, BLOCK=BLOCK, CHUNK=CHUNK,
                                      num_warps=8)
        _choose_digit[(num_segments,)](state, hist[p], SHIFT=shift, NUM_BINS=NUM_BINS)
    return keys_to_values(state[:, 0], x.dtype)
