"""compress: threshold, index-ordered compaction and error feedback in one pass.

Each program takes the next tile of BLOCK elements (a ticket from an atomic counter, so every
tile's predecessors have started: the look-back below cannot deadlock), forms
``acc = x + residual`` in fp32, marks the entries whose magnitude key reaches their segment's
threshold key, and learns how many entries all earlier tiles kept by decoupled look-back: it
publishes its own count at once (flag AGGREGATE), walks back over the predecessors' published
counts, a window of 32 at a time, until one carries an inclusive prefix (flag PREFIX), then
publishes its own inclusive prefix. Kept entries go straight to their slots of the wire
buffer, the residual is rewritten in the same pass, and the last tile writes count and
overflow into the header. No host synchronization, one read of x and the residual, one write
of the residual and the payload.
"""

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ... import payload as wire
from .common import f32_key, threshold_key, to_f32, to_wire

# Elements per tile and warps per program (module attributes so bench/sweep_blocks.py can sweep
# them). Larger tiles mean fewer links in the look-back chain; the sweep that chose these is in
# bench/NOTES.md ("Triton backend", the tile-size sweep).
BLOCK = 16384
NUM_WARPS = 16
# Header words the last tile writes (payload.py), as constants the kernel can read.
_WORD_COUNT = tl.constexpr(wire.WORD_COUNT)
_WORD_OVERFLOW = tl.constexpr(wire.WORD_OVERFLOW)


@triton.jit
def _tile_keep(x_ptr, res_ptr, thr_ptr, seg_ptr, num_segments, offs, n,
               HAS_RESIDUAL: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """acc (fp32) and the keep mask of one tile."""
    inside = offs < n
    acc = to_f32(tl.load(x_ptr + offs, mask=inside, other=0.0))
    if HAS_RESIDUAL:
        acc = acc + tl.load(res_ptr + offs, mask=inside, other=0.0)
    if SEARCH_STEPS > 0:
        # Segment of each element: the last offset <= its index (binary lifting).
        segment = tl.zeros(offs.shape, dtype=tl.int32)
        for step in tl.static_range(SEARCH_STEPS):
            candidate = segment + (1 << (SEARCH_STEPS - 1 - step))
            usable = candidate < num_segments
            start = tl.load(seg_ptr + candidate, mask=usable & inside, other=n)
            segment = tl.where(usable & (start <= offs), candidate, segment)
        threshold = tl.load(thr_ptr + segment, mask=inside, other=0.0)
    else:
        threshold = tl.load(thr_ptr)
    keep = inside & (f32_key(acc) >= threshold_key(threshold))
    return acc, keep


@triton.jit
def _count_kernel(x_ptr, res_ptr, thr_ptr, seg_ptr, num_segments, n, total_ptr,
                  HAS_RESIDUAL: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _, keep = _tile_keep(x_ptr, res_ptr, thr_ptr, seg_ptr, num_segments, offs, n,
                         HAS_RESIDUAL, SEARCH_STEPS)
    tl.atomic_add(total_ptr, tl.sum(keep.to(tl.int64), 0))


@triton.jit
def _compress_kernel(x_ptr, res_ptr, thr_ptr, seg_ptr, num_segments, n, capacity,
                     idx_ptr, val_ptr, header_ptr, scan_ptr, ticket_ptr, num_tiles,
                     HAS_RESIDUAL: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                     WIRE: tl.constexpr, BLOCK: tl.constexpr, LOOKBACK: tl.constexpr):
    tile = tl.atomic_add(ticket_ptr, 1)
    offs = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc, keep = _tile_keep(x_ptr, res_ptr, thr_ptr, seg_ptr, num_segments, offs, n,
                           HAS_RESIDUAL, SEARCH_STEPS)
    kept = keep.to(tl.int32)
    count = tl.sum(kept, 0).to(tl.int64)
    local = tl.cumsum(kept, 0) - kept

    # Decoupled look-back. A scan word is flag << 32 | count, flag 0 = not yet published,
    # 1 = this tile's own count, 2 = inclusive prefix up to this tile. Read the LOOKBACK
    # nearest predecessors at once; when all of them up to the nearest prefix are published,
    # add them and stop (or move one window back when the window holds no prefix).
    tl.atomic_xchg(scan_ptr + tile, tl.where(tile == 0, 2 << 32, 1 << 32) + count)
    before = count * 0
    j = tile - 1
    window = tl.arange(0, LOOKBACK)
    while j >= 0:
        back = j - window
        # Before tile 0 reads as a published prefix of 0, which ends the walk there.
        words = tl.load(scan_ptr + back, mask=back >= 0, other=2 << 32, volatile=True)
        flags = words >> 32
        nearest_prefix = tl.min(tl.where(flags == 2, window, LOOKBACK), 0)
        nearest_unpublished = tl.min(tl.where(flags == 0, window, LOOKBACK), 0)
        ready = nearest_unpublished > tl.minimum(nearest_prefix, LOOKBACK - 1)
        summed = tl.sum(tl.where(window <= nearest_prefix, words & 0xFFFFFFFF, 0), 0)
        before += tl.where(ready, summed, 0)
        j = tl.where(ready, tl.where(nearest_prefix < LOOKBACK, -1, j - LOOKBACK), j)
    if tile > 0:
        tl.atomic_xchg(scan_ptr + tile, (2 << 32) + before + count)

    slot = before + local
    sent = keep & (slot < capacity)
    values = to_wire(acc, WIRE)
    tl.store(idx_ptr + slot, offs.to(tl.int32), mask=sent)
    tl.store(val_ptr + slot, values, mask=sent)
    if HAS_RESIDUAL:
        leftover = tl.where(tl.abs(acc) < float("inf"), acc - to_f32(values), 0.0)
        tl.store(res_ptr + offs, tl.where(sent, leftover, acc), mask=offs < n)
    if tile == num_tiles - 1:
        total = before + count
        fits = tl.minimum(total, capacity)
        tl.store(header_ptr + _WORD_COUNT, fits.to(tl.int32))
        tl.store(header_ptr + _WORD_OVERFLOW, (total - fits).to(tl.int32))


def _search_steps(offsets: List[int]) -> int:
    segments = len(offsets) - 1
    return 0 if segments == 1 else (segments - 1).bit_length()


def _segment_args(offsets, seg_dev, thresholds):
    # With one segment the offsets are never read; any tensor will do as the pointer.
    return (seg_dev if seg_dev is not None else thresholds), len(offsets) - 1


def count_kept(x: torch.Tensor, thresholds: torch.Tensor, offsets: List[int],
               seg_dev: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> torch.Tensor:
    n = x.numel()
    total = torch.zeros(1, dtype=torch.int64, device=x.device)
    seg_ptr, num_segments = _segment_args(offsets, seg_dev, thresholds)
    _count_kernel[(triton.cdiv(n, BLOCK),)](
        x, residual if residual is not None else x, thresholds, seg_ptr, num_segments, n, total,
        HAS_RESIDUAL=residual is not None, SEARCH_STEPS=_search_steps(offsets), BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return total[0]


def compress(x: torch.Tensor, thresholds: torch.Tensor, offsets: List[int],
             seg_dev: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             payload: wire.SparsePayload) -> None:
    n = x.numel()
    num_tiles = triton.cdiv(n, BLOCK)
    scan = torch.zeros(num_tiles + 1, dtype=torch.int64, device=x.device)
    ticket = scan[num_tiles:].view(torch.int32)  # the spare word, zeroed with the scan
    header = payload.buffer[:wire.HEADER_BYTES].view(torch.int32)
    seg_ptr, num_segments = _segment_args(offsets, seg_dev, thresholds)
    _compress_kernel[(num_tiles,)](
        x, residual if residual is not None else x, thresholds, seg_ptr, num_segments, n,
        payload.capacity, payload.indices, payload.values, header, scan, ticket, num_tiles,
        HAS_RESIDUAL=residual is not None, SEARCH_STEPS=_search_steps(offsets),
        WIRE=wire.value_code(payload.value_dtype), BLOCK=BLOCK, LOOKBACK=32, num_warps=NUM_WARPS)
