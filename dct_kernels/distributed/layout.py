"""Per-parameter state and the flat layout of one DDP bucket.

A ``ParamState`` is the error-feedback state of one sparse parameter, keyed by a stable name:
its residual (fp32, flat), its threshold τ, the step τ was last computed at, and whether its
kept count left the band on the last step. A ``BucketLayout`` is the flat view of one bucket
(the parameters in ``bucket.parameters()`` order, back to back in ``bucket.buffer()``) with
everything the per-step path needs precomputed on the device.

The residuals and thresholds of a bucket's parameters live in the layout's flat tensors, and
each ``ParamState`` holds views into them; the layout "owns" those parameters. When DDP
rebuilds its buckets, a new layout adopts each parameter: it copies the residual and τ over and
re-points the views, so nothing is lost and the per-step path never gathers or scatters.
"""

import math
from typing import List, Optional

import torch

from .. import payload as wire


def k_of(numel: int, ratio: float) -> int:
    """k = max(1, ceil(ratio x numel)), the product in Python float as written (so 0.07 x 100,
    which is 7.000000000000001 in float, gives 8): any rank or tool that evaluates the same
    formula gets the same k."""
    return max(1, math.ceil(ratio * numel))


def share_of(k: int, numel: int, capacity_factor: float) -> int:
    """A parameter's share of the wire capacity: ceil(k x capacity_factor), at most numel."""
    return min(numel, math.ceil(capacity_factor * k))


class ParamState:
    """Error-feedback state of one sparse parameter (see the module docstring)."""

    def __init__(self, key: str, numel: int, residual: torch.Tensor,
                 threshold: torch.Tensor, refreshed_at: int = -1, pending: bool = False):
        self.key = key
        self.numel = numel
        self.residual = residual      # fp32 [numel]: a view into owner.residual when owned
        self.threshold = threshold    # fp32 [1]: a view into owner.thresholds when owned
        self.refreshed_at = refreshed_at  # step τ was last computed at; -1: never
        self.pending = pending        # kept count out of band (valid while not owned)
        self.owner: Optional["BucketLayout"] = None
        self.slot = -1                # segment index in the owner


class BucketLayout:
    """The flat layout of one bucket and its device-side constants and buffers.

    Segments: one per parameter of the bucket, in order. A segment is *sparse* (thresholded,
    with a ``ParamState``) when its parameter has at least ``min_numel`` elements, else *dense*
    (all-reduced in one batch). Dense segments get the threshold +inf and zeroed inputs in the
    compress, so they never enter the payload.
    """

    def __init__(self, keys: List[str], numels: List[int], sparse: List[bool], *,
                 ratio: float, capacity_factor: float, band: tuple,
                 dtype: torch.dtype, device: torch.device):
        self.keys = keys
        self.numels = numels
        self.sparse = sparse
        self.dtype = dtype
        self.device = device
        self.numel = sum(numels)
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        self.offsets_list = offsets
        # Host offsets and k: the op layer reads both on the host, so CPU tensors cost no sync.
        self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self.ks = [k_of(n, ratio) if s else 1 for n, s in zip(numels, sparse)]
        self.ks_host = torch.tensor(self.ks, dtype=torch.int64)
        self.num_segments = len(numels)
        self.sparse_numel = sum(n for n, s in zip(numels, sparse) if s)
        self.has_sparse = self.sparse_numel > 0
        self.capacity = sum(share_of(k, n, capacity_factor)
                            for k, n, s in zip(self.ks, numels, sparse) if s)
        dense_positions = [i for (a, b), s in zip(zip(offsets[:-1], offsets[1:]), sparse)
                           if not s for i in range(a, b)]
        self.dense_numel = len(dense_positions)
        self.dense_index = (torch.tensor(dense_positions, dtype=torch.int64).to(device)
                            if dense_positions and self.has_sparse else None)
        self.states: List[Optional[ParamState]] = [None] * self.num_segments
        self.owned = 0
        if not self.has_sparse:
            return
        # Device-side state, allocated once: residuals, thresholds, and the band check inputs.
        self.residual = torch.zeros(self.numel, dtype=torch.float32, device=device)
        # Dense segments keep +inf (their zeroed entries must never take a slot); sparse ones
        # get their parameter's τ at adoption.
        self.thresholds = torch.tensor([0.0 if s else math.inf for s in sparse],
                                       dtype=torch.float32).to(device)
        self.sparse_mask = torch.tensor(sparse, dtype=torch.bool).to(device)
        # k = numel keeps everything: τ = -inf does so at every step, where the exact
        # k-th magnitude would go stale (ratio = 1 then reproduces a dense all-reduce).
        self.keep_all_mask = torch.tensor([s and k == n for s, k, n in
                                           zip(sparse, self.ks, numels)],
                                          dtype=torch.bool).to(device)
        low, high = band
        lows = [math.ceil(k * low) for k in self.ks]
        highs = [math.floor(k * high) for k in self.ks]
        self.band_low = torch.tensor(lows, dtype=torch.int64).to(device)
        self.band_high = torch.tensor(highs, dtype=torch.int64).to(device)
        self.segment_starts = torch.tensor(offsets[:-1], dtype=torch.int64).to(device)
        self.slot_numbers = torch.arange(self.capacity, dtype=torch.int32, device=device)
        # Out-of-band flags of the last step, staged for a one-step-delayed host read.
        pin = device.type == "cuda"
        self.host_flags = torch.zeros(self.num_segments, dtype=torch.bool, pin_memory=pin)
        self.flags_event = torch.cuda.Event() if pin else None
        self.flags_valid = False

    # ------------------------------------------------------------------ ownership of states

    def adopt(self, states: List[Optional[ParamState]]) -> None:
        """Make this layout the owner of the given states (one per segment, None for dense
        segments): copy each residual and τ into the flat tensors and re-point the views."""
        if all(state is None or state.owner is self for state in states):
            return
        if self.flags_valid:
            # The staged flags are about to describe a different set of parameters: keep those
            # of the parameters owned so far with their states.
            for state in self.states:
                if state is not None:
                    state.pending = self.flag(state.slot)
            self.flags_valid = False
        for slot, state in enumerate(states):
            if state is None or state.owner is self:
                continue
            old = state.owner
            if old is not None:
                state.pending = old.flag(state.slot)
                old.owned -= 1
                old.states[state.slot] = None
            a, b = self.offsets_list[slot], self.offsets_list[slot + 1]
            self.residual[a:b].copy_(state.residual.reshape(-1))
            self.thresholds[slot:slot + 1].copy_(state.threshold.reshape(-1))
            state.residual = self.residual[a:b]
            state.threshold = self.thresholds[slot:slot + 1]
            state.owner, state.slot = self, slot
            self.states[slot] = state
            self.owned += 1

    def owns_all(self) -> bool:
        return self.owned == sum(self.sparse)

    # ------------------------------------------------------------- the out-of-band flags

    def _wait_flags(self) -> None:
        if self.flags_event is not None:
            # Recorded one step ago, so normally long complete: this waits only when the host
            # runs more than a step ahead of the device. Not a stream/device sync.
            self.flags_event.synchronize()

    def flag(self, slot: int) -> bool:
        """Whether segment ``slot``'s kept count left its band on the last step."""
        state = self.states[slot]
        if not self.flags_valid:
            return bool(state.pending) if state is not None else False
        self._wait_flags()
        return bool(self.host_flags[slot])

    def any_flag(self) -> bool:
        """Whether any segment's kept count left its band (or the payload overflowed) on the
        last step."""
        if not self.flags_valid:
            return any(s.pending for s in self.states if s is not None)
        self._wait_flags()
        return bool(self.host_flags.any())

    def stage_flags(self, payload: wire.SparsePayload) -> None:
        """Per-segment kept counts of ``payload``, compared with the band, staged to the host
        without synchronizing (read on the next step by ``flag``/``any_flag``)."""
        indices = payload.indices.to(torch.int64)
        used = self.slot_numbers < payload.count
        segment = torch.searchsorted(self.segment_starts, indices, right=True) - 1
        # Unused slots count into an extra bin that is dropped.
        segment = torch.where(used, segment, self.num_segments)
        counts = torch.zeros(self.num_segments + 1, dtype=torch.int64, device=self.device)
        counts.scatter_add_(0, segment, torch.ones_like(segment))
        counts = counts[:self.num_segments]
        flags = (counts < self.band_low) | (counts > self.band_high) | (payload.overflow > 0)
        flags &= self.sparse_mask
        self.host_flags.copy_(flags, non_blocking=True)
        if self.flags_event is not None:
            self.flags_event.record(torch.cuda.current_stream(self.device))
        self.flags_valid = True
