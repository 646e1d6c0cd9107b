"""Host arithmetic of DCT-DP: k per parameter, wire capacities, the shards of the
``"reduce_scatter"`` exchange, the bytes each exchange moves per rank, and the ``"auto"`` choice.

Everything here is a pure function of host-known integers (parameter sizes, ratio, capacity
factor, world size, wire dtype), so every rank computes the same numbers, the hook never looks
at the data to size a buffer, and ``bench/traffic.py`` models any world size with exactly the
code the hook runs.

Bytes are counted as docs/design.md counts them, per rank: an all-gather of N bytes per rank is N
sent and (W - 1) N received; an all-to-all of rows of R bytes is (W - 1) R sent and as much
received (the rank's own row does not travel); a ring all-reduce of M bytes is
2 (W - 1) / W M sent and as much received. ``bytes_ring`` of a bucket of B bytes is
4 (W - 1) / W B (sent plus received).
"""

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from .. import payload as wire

EXCHANGES = ("allgather", "reduce_scatter", "auto")

# "auto" takes reduce_scatter only when it moves at most this fraction of allgather's bytes:
# near a tie allgather wins, as it needs one collective (one latency) instead of two.
AUTO_MARGIN = 0.9


def k_of(numel: int, ratio: float, min_k: int = 1) -> int:
    """k = min(numel, max(min_k, ceil(ratio x numel))), the product in Python float as written
    (so 0.07 x 100, which is 7.000000000000001 in float, gives 8): any rank or tool that
    evaluates the same formula gets the same k. ``min_k`` >= 1 keeps small parameters from
    being starved (at ratio 0.003 every parameter below 334 elements would send one entry a
    step)."""
    return min(numel, max(min_k, math.ceil(ratio * numel)))


def share_of(k: int, numel: int, capacity_factor: float) -> int:
    """A parameter's (or piece's) share of the wire capacity: ceil(k x capacity_factor), at
    most numel."""
    return min(numel, math.ceil(capacity_factor * k))


def piece_k(k: int, numel: int, length: int) -> int:
    """The share of a parameter's k that falls to a piece of ``length`` of its ``numel``
    elements: max(1, ceil(k x length / numel)), at most length."""
    return min(length, max(1, math.ceil(k * length / numel)))


def wire_bytes(capacity: int, value_dtype: torch.dtype, index_encoding: str = "int32",
               num_scales: int = 0) -> int:
    """Size of one wire buffer of ``capacity`` slots (header, scales, indices, values,
    padding), in either format version."""
    return wire.wire_layout(capacity, value_dtype, index_encoding, num_scales).nbytes


def ring_bytes(nbytes: int, world: int) -> Tuple[float, float]:
    """(sent, received) of a ring all-reduce of ``nbytes`` per rank: 2 (W - 1) / W each."""
    each = 2 * (world - 1) * nbytes / world
    return each, each


def shard_cuts(offsets: Sequence[int], ks: Sequence[int], sparse: Sequence[bool],
               world: int) -> List[int]:
    """W + 1 cut positions 0 = c_0 <= c_1 <= ... <= c_W = numel of a bucket's index range.

    Shard s is [c_s, c_{s+1}). The cuts balance the kept-count targets: the k of each sparse
    parameter is spread evenly over its elements, and c_s is the first position where the
    running sum reaches s / W of the bucket's total k. Dense parameters carry no k. A shard may
    be empty when the bucket has fewer positions than ranks.
    """
    numel = offsets[-1]
    total = sum(k for k, s in zip(ks, sparse) if s)
    cuts = [0]
    if total == 0:
        # No sparse entries to balance: equal lengths.
        cuts += [numel * s // world for s in range(1, world)]
        return cuts + [numel]
    segments = [(offsets[i], offsets[i + 1], ks[i]) for i in range(len(ks)) if sparse[i]]
    before, j = 0, 0  # k mass before segments[j]
    for s in range(1, world):
        # In integers, scaled by W (target = total s / W): a float quotient could put a cut
        # one position past the definition's.
        target = total * s
        while j < len(segments) - 1 and (before + segments[j][2]) * world < target:
            before += segments[j][2]
            j += 1
        a, b, k = segments[j]
        position = a + -(-(target - before * world) * (b - a) // (k * world))
        cuts.append(max(cuts[-1], min(b, max(a, position))))
    return cuts + [numel]


@dataclass(frozen=True)
class Piece:
    """The part [start, end) (bucket positions) of parameter ``segment`` that lies in a
    shard, with its share ``k`` of the parameter's k and its share of the wire capacity."""
    segment: int
    start: int
    end: int
    k: int
    capacity: int
    sparse: bool


def shard_pieces(offsets: Sequence[int], ks: Sequence[int], sparse: Sequence[bool],
                 cuts: Sequence[int], capacity_factor: float) -> List[List[Piece]]:
    """Per shard, the pieces of the parameters it cuts through, in order."""
    shards = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        pieces = []
        for seg in range(len(ks)):
            a, b = max(lo, offsets[seg]), min(hi, offsets[seg + 1])
            if a >= b:
                continue
            n = offsets[seg + 1] - offsets[seg]
            if sparse[seg]:
                k = piece_k(ks[seg], n, b - a)
                pieces.append(Piece(seg, a, b, k, share_of(k, b - a, capacity_factor), True))
            else:
                pieces.append(Piece(seg, a, b, 1, 0, False))
        shards.append(pieces)
    return shards


@dataclass(frozen=True)
class Plan:
    """Sizes and per-rank bytes of one bucket for a world size: what both exchanges allocate
    and move, computed once per bucket layout.

    Attributes:
        world: W. numel, bucket_bytes: the bucket in its gradient dtype.
        dense_numel: elements of the small parameters sent dense (one all-reduce).
        capacity: slots of the allgather wire buffer (sum of the sparse parameters' shares).
        cuts, shards: the reduce_scatter shards and their pieces.
        shard_capacity: slots of every reduce_scatter row (the largest shard's share sum), the
            same for the W rows of stage 1 and the W shard payloads of stage 3.
        value_dtype, index_encoding: the wire format (version 2 for fp8 or "delta").
        num_params: the bucket's parameters (fp8 scale segments of an allgather payload).
    """
    world: int
    numel: int
    bucket_bytes: int
    dense_numel: int
    dense_bytes: int
    capacity: int
    cuts: Tuple[int, ...]
    shards: Tuple[Tuple[Piece, ...], ...]
    shard_capacity: int
    value_dtype: torch.dtype
    index_encoding: str = "int32"
    num_params: int = 1

    @property
    def allgather_scales(self) -> int:
        """Scale segments of an allgather payload (fp8 values): one per parameter."""
        return self.num_params if self.value_dtype == wire.FLOAT8 else 0

    @property
    def shard_scales(self) -> int:
        """Scale segments of every reduce_scatter row (fp8 values): the most pieces a shard
        has, plus the parts of the bucket before and after a shard (stage 3 payloads describe
        the whole bucket), so that all rows have one size."""
        if self.value_dtype != wire.FLOAT8:
            return 0
        return max(len(pieces) for pieces in self.shards) + 2

    @property
    def allgather_row_bytes(self) -> int:
        """Bytes of one rank's all-gather wire buffer."""
        return wire_bytes(self.capacity, self.value_dtype, self.index_encoding,
                          self.allgather_scales)

    @property
    def shard_row_bytes(self) -> int:
        """Bytes of one reduce_scatter row (a stage-1 shard row, or a stage-3 shard payload)."""
        return wire_bytes(self.shard_capacity, self.value_dtype, self.index_encoding,
                          self.shard_scales)

    def dense_part(self) -> Tuple[float, float]:
        """(sent, received) of the small parameters' all-reduce (0 when there are none)."""
        return ring_bytes(self.dense_bytes, self.world) if self.dense_numel else (0.0, 0.0)

    def allgather(self) -> Tuple[float, float]:
        """(sent, received) per rank of one sparse step with the allgather exchange."""
        n = self.allgather_row_bytes
        ds, dr = self.dense_part()
        return n + ds, (self.world - 1) * n + dr

    def reduce_scatter(self) -> Tuple[float, float]:
        """(sent, received) per rank of one sparse step with the reduce_scatter exchange:
        the all-to-all of W rows, then the all-gather of one shard payload."""
        r = self.shard_row_bytes
        w = self.world
        ds, dr = self.dense_part()
        return (w - 1) * r + r + ds, (w - 1) * r + (w - 1) * r + dr

    def dense(self) -> Tuple[float, float]:
        """(sent, received) of a dense step (warm-up): a ring all-reduce of the bucket."""
        return ring_bytes(self.bucket_bytes, self.world)

    def ring(self) -> float:
        """bytes_ring of one step: 4 (W - 1) / W x bucket bytes."""
        return 4 * (self.world - 1) * self.bucket_bytes / self.world

    def choose(self, exchange: str) -> str:
        """The exchange a bucket uses: the configured one, or for "auto" reduce_scatter when
        it moves at most ``AUTO_MARGIN`` of allgather's bytes (sent + received), else
        allgather."""
        if exchange != "auto":
            return exchange
        rs, ag = sum(self.reduce_scatter()), sum(self.allgather())
        return "reduce_scatter" if rs <= AUTO_MARGIN * ag else "allgather"


def plan(numels: Sequence[int], sparse: Sequence[bool], *, ratio: float,
         capacity_factor: float, world: int, dtype: torch.dtype,
         value_dtype: torch.dtype, index_encoding: str = "int32", min_k: int = 1) -> Plan:
    """The ``Plan`` of a bucket of parameters of ``numels`` elements (``sparse[i]``: at least
    min_numel elements), gradient dtype ``dtype`` and wire format (``value_dtype``,
    ``index_encoding``); k of a sparse parameter as ``k_of(n, ratio, min_k)``."""
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    ks = [k_of(n, ratio, min_k) if s else 1 for n, s in zip(numels, sparse)]
    capacity = sum(share_of(k, n, capacity_factor) for k, n, s in zip(ks, numels, sparse) if s)
    cuts = shard_cuts(offsets, ks, sparse, world)
    shards = shard_pieces(offsets, ks, sparse, cuts, capacity_factor)
    shard_capacity = max(sum(p.capacity for p in pieces) for pieces in shards)
    itemsize = dtype.itemsize
    dense_numel = sum(n for n, s in zip(numels, sparse) if not s)
    return Plan(world=world, numel=offsets[-1], bucket_bytes=offsets[-1] * itemsize,
                dense_numel=dense_numel, dense_bytes=dense_numel * itemsize,
                capacity=capacity, cuts=tuple(cuts),
                shards=tuple(tuple(p) for p in shards), shard_capacity=shard_capacity,
                value_dtype=value_dtype, index_encoding=index_encoding,
                num_params=len(numels))
