"""Per-parameter state and the flat layout of one DDP bucket.

A ``ParamState`` is the error-feedback state of one sparse parameter, keyed by a stable name:
its residual (fp32, flat), its threshold τ, the step τ was last computed at, whether a refresh
is pending (the single owner of that fact), and, with the ``"reduce_scatter"`` exchange, the
piece of the parameter this rank owns as a shard owner (``ShardPiece``: its position, its
second-level residual and τ', and their schedule).

A ``BucketLayout`` is the flat view of one bucket (the parameters in ``bucket.parameters()``
order, back to back in ``bucket.buffer()``), sized once for the world size by
``sizing.plan``, with the device constants the per-step path needs. The residuals and
thresholds of a bucket's parameters live in the layout's flat tensors, and each ``ParamState``
holds views into them: the layout "owns" those parameters. When DDP rebuilds its buckets, a new
layout adopts each parameter (``adopt``): it copies the residual and τ over and re-points the
views, so nothing is lost and the per-step path never gathers or scatters. A shard piece that
does not fit the new layout's shard is folded into the parameter's own residual (the mass it
holds is then sent again by this rank, and summed once by the new owner: nothing is lost).
"""

import math
from typing import List, Optional

import torch

from .. import ops
from .sizing import Plan, k_of, plan as make_plan, share_of
from .threshold_rule import FLOOR, ThresholdRule

__all__ = ["ParamState", "ShardPiece", "BucketLayout", "k_of", "share_of", "FLOOR"]

class ShardPiece:
    """The piece [start, start + numel) of a parameter (positions within the parameter) that
    this rank owns in the reduce_scatter exchange, with its second-level error feedback."""

    def __init__(self, start: int, residual: torch.Tensor, threshold: torch.Tensor,
                 refreshed_at: int = -1, pending: bool = False,
                 streak: Optional[torch.Tensor] = None, average: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None):
        self.start = start
        self.residual = residual        # fp32 [numel]: a view into the owner's shard residual
        self.threshold = threshold      # fp32 [1]: τ', a view into the owner's shard τ'
        self.refreshed_at = refreshed_at
        self.pending = pending
        # int32 [1] / fp32 [1] / fp32 [1]: the rule's streak, count average and scale for τ'
        # (views into the shard's rule; None: not yet known, the rule starts them at k, 1)
        self.streak = streak if streak is not None else torch.zeros(1, dtype=torch.int32)
        self.average = average
        self.scale = scale

    @property
    def numel(self) -> int:
        """Elements of the piece (of its shard residual)."""
        return self.residual.numel()


class ParamState:
    """Error-feedback state of one sparse parameter (see the module docstring)."""

    def __init__(self, key: str, numel: int, residual: torch.Tensor,
                 threshold: torch.Tensor, refreshed_at: int = -1, pending: bool = False,
                 shard: Optional[ShardPiece] = None, streak: Optional[torch.Tensor] = None,
                 average: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None):
        self.key = key
        self.numel = numel
        self.residual = residual      # fp32 [numel]: a view into owner.residual when owned
        self.threshold = threshold    # fp32 [1]: a view into owner.thresholds when owned
        self.refreshed_at = refreshed_at  # step τ was last computed at; -1: never
        self.pending = pending        # an early refresh of τ is due (a persistent excursion)
        # int32 [1] / fp32 [1] / fp32 [1]: the threshold rule's streak, count average and
        # scale ρ (views into owner.rule when owned; None: not yet known, the rule starts them
        # at k and 1)
        self.streak = streak if streak is not None else torch.zeros(1, dtype=torch.int32)
        self.average = average
        self.scale = scale
        self.shard = shard            # this rank's reduce_scatter piece, or None
        self.owner: Optional["BucketLayout"] = None
        self.slot = -1                # segment index in the owner


class BucketLayout:
    """The flat layout of one bucket, its plan for the world size, and its device storage.

    Segments: one per parameter of the bucket, in order. A segment is *sparse* (thresholded,
    with a ``ParamState``) when ``DCTState.sends_sparse`` says so for its parameter (at least
    ``min_numel`` elements, not a table of a few rows), else *dense* (all-reduced in one
    batch). Dense segments get the threshold +inf and zeroed inputs in the compress, so they
    never enter a payload. A layout is sized for one ``ratio`` (a stage of ``ramp_steps`` has
    layouts of its own).

    ``exchange`` is the exchange this bucket uses ("allgather" or "reduce_scatter", resolved
    from "auto" by ``Plan.choose``); with "reduce_scatter" the layout also holds this rank's
    shard: its pieces, ``Segments`` and second-level residual and thresholds.
    """

    def __init__(self, keys: List[str], numels: List[int], sparse: List[bool], *,
                 ratio: float, capacity_factor: float, band: tuple, patience: int = 32,
                 dtype: torch.dtype,
                 device: torch.device, world: int = 1, rank: int = 0,
                 value_dtype: Optional[torch.dtype] = None, index_encoding: str = "int32",
                 exchange: str = "allgather", min_k: int = 1):
        self.keys = keys
        self.numels = numels
        self.ratio = ratio
        self.no_shift = torch.zeros(1, dtype=torch.int64, device=device)  # see hook._kept_of
        self.sparse = sparse
        self.dtype = dtype
        self.device = device
        self.world, self.rank = world, rank
        self.value_dtype = value_dtype or dtype
        self.index_encoding = index_encoding
        self.numel = sum(numels)
        self.plan: Plan = make_plan(numels, sparse, ratio=ratio,
                                    capacity_factor=capacity_factor, world=world,
                                    dtype=dtype, value_dtype=self.value_dtype,
                                    index_encoding=index_encoding, min_k=min_k)
        self.exchange = self.plan.choose(exchange)
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        self.offsets_list = offsets
        self.offsets = torch.tensor(offsets, dtype=torch.int64)  # host copy, for reference
        self.segments = ops.Segments(offsets, device=device)
        self.ks = [k_of(n, ratio, min_k) if s else 1 for n, s in zip(numels, sparse)]
        self.num_segments = len(numels)
        self.sparse_numel = sum(n for n, s in zip(numels, sparse) if s)
        self.has_sparse = self.sparse_numel > 0
        self.capacity = self.plan.capacity
        dense_positions = [i for (a, b), s in zip(zip(offsets[:-1], offsets[1:]), sparse)
                           if not s for i in range(a, b)]
        self.dense_numel = len(dense_positions)
        self.dense_index = (torch.tensor(dense_positions, dtype=torch.int64).to(device)
                            if dense_positions and self.has_sparse else None)
        self.states: List[Optional[ParamState]] = [None] * self.num_segments
        self.owned = 0
        self.shard = None
        if not self.has_sparse:
            return
        self.residual = torch.zeros(self.numel, dtype=torch.float32, device=device)
        # Dense segments keep +inf (their zeroed entries must never take a slot); sparse ones
        # get their parameter's τ at adoption.
        self.thresholds = torch.tensor([0.0 if s else math.inf for s in sparse],
                                       dtype=torch.float32).to(device)
        keep_all = [s and k == n for s, k, n in zip(sparse, self.ks, numels)]
        self.keep_all = keep_all
        units, targets = None, self.ks
        # What stage 1 may pass in all before its step counts as overflowed (see
        # hook._record_sparse): one allgather payload, or with reduce_scatter its pieces' rows.
        self.stage1_capacity = self.capacity
        if self.exchange == "reduce_scatter":
            # Stage 1 estimates one τ per piece of a parameter in a shard (see ThresholdRule).
            flat = [q for pieces in self.plan.shards for q in pieces]
            units = [(q.start, q.end, q.k, q.segment, i) for i, q in enumerate(flat)]
            # Every piece keeps at least one entry, so a parameter's pieces aim at the sum of
            # their shares, above k_p where shares round up (and a parameter with fewer
            # entries of k than pieces aims at one per piece). The rule counts against that
            # sum: against k_p it would push τ above every piece of such a parameter and
            # then let it fall back, step after step.
            shares = [0] * len(numels)
            for q in flat:
                shares[q.segment] += q.k
            targets = [shares[i] if s else k for i, (k, s) in enumerate(zip(self.ks, sparse))]
            self.stage1_capacity = max(self.capacity,
                                       sum(q.capacity for q in flat if q.sparse))
        self.rule = ThresholdRule(offsets, targets, sparse, keep_all, band, patience, device,
                                  units)
        if self.exchange == "reduce_scatter":
            self.shard = _Shard(self, band, patience)

    # ------------------------------------------------------------------ ownership of states

    def adopt(self, states: List[Optional[ParamState]]) -> None:
        """Make this layout the owner of the given states (one per segment, None for dense
        segments): copy each residual, τ and shard piece in and re-point the views."""
        for slot, state in enumerate(states):
            if state is None or state.owner is self:
                continue
            old = state.owner
            if old is not None:
                old.owned -= 1
                old.states[state.slot] = None
            a, b = self.offsets_list[slot], self.offsets_list[slot + 1]
            self.residual[a:b].copy_(state.residual.reshape(-1))
            self.thresholds[slot:slot + 1].copy_(state.threshold.reshape(-1))
            self.rule.streaks[slot:slot + 1].copy_(state.streak.reshape(-1))
            if state.average is not None:
                self.rule.averages[slot:slot + 1].copy_(state.average.reshape(-1))
            if state.scale is not None:
                self.rule.scales[slot:slot + 1].copy_(state.scale.reshape(-1))
            state.residual = self.residual[a:b]
            state.threshold = self.thresholds[slot:slot + 1]
            state.streak = self.rule.streaks[slot:slot + 1]
            state.average = self.rule.averages[slot:slot + 1]
            state.scale = self.rule.scales[slot:slot + 1]
            state.owner, state.slot = self, slot
            self.states[slot] = state
            self.owned += 1
            piece = self.shard.piece_of(slot) if self.shard is not None else None
            old_piece = state.shard
            if old_piece is not None and (piece is None or piece != (old_piece.start,
                                                                     old_piece.numel)):
                # The shard moved: this rank sends the piece's mass again itself.
                lo = old_piece.start
                state.residual[lo:lo + old_piece.numel] += old_piece.residual.reshape(-1)
                old_piece = None
            state.shard = self.shard.adopt(slot, old_piece) if piece is not None else None

    def thresholds_from_pieces(self) -> None:
        """With reduce_scatter: each parameter's τ := the largest stage-1 τ of its pieces (what
        the band's "at the floor" test and the saved state see)."""
        self.thresholds.scatter_reduce_(0, self.shard.piece_param,
                                        self.shard.stage1_thresholds, "amax",
                                        include_self=False)

    def owns_all(self) -> bool:
        """Whether every sparse parameter's state is held by this layout."""
        return self.owned == sum(self.sparse)

    # ------------------------------------------------------------------ pending refreshes

    def collect_flags(self) -> None:
        """Move the band flags staged on this layout's last step into its states' ``pending``
        (the one place a pending refresh is kept), the shard pieces' included."""
        if not self.has_sparse:
            return
        flags = self.rule.take()
        if flags is not None:
            for state in self.states:
                if state is not None:
                    state.pending = flags[state.slot]
        if self.shard is not None:
            self.collect_shard_flags()

    def collect_shard_flags(self) -> None:
        """The same for this rank's shard pieces (second stage of reduce_scatter)."""
        rule = self.shard.rule
        flags = rule.take() if rule is not None else None
        if flags is not None:
            for i, piece in enumerate(self.shard.states):
                if piece is not None:
                    piece.pending = flags[i]

    @property
    def band_low(self) -> torch.Tensor:
        """int64 [S]: ceil(k x low) per segment (the band's low side)."""
        return self.rule.low

    @property
    def band_high(self) -> torch.Tensor:
        """int64 [S]: floor(k x high) per segment (the band's high side)."""
        return self.rule.high


class _Shard:
    """This rank's shard of a reduce_scatter bucket: position, pieces, second-level storage."""

    def __init__(self, layout: BucketLayout, band, patience: int):
        plan = layout.plan
        device = layout.device
        self.start, self.end = plan.cuts[layout.rank], plan.cuts[layout.rank + 1]
        self.numel = self.end - self.start
        self.pieces = list(plan.shards[layout.rank])
        # Every shard's pieces and thresholds for stage 1 (compress shard by shard).
        self.all_pieces = [list(p) for p in plan.shards]
        self.all_segments = [ops.Segments([0] + [q.end - lo for q in pieces], device=device)
                             if pieces else None
                             for pieces, lo in zip(self.all_pieces, plan.cuts[:-1])]
        flat = [q.segment for pieces in self.all_pieces for q in pieces]
        self.piece_param = torch.tensor(flat, dtype=torch.int64).to(device)
        bounds = [0]
        for pieces in self.all_pieces:
            bounds.append(bounds[-1] + len(pieces))
        self.piece_bounds = bounds
        self.cut_starts = torch.tensor(list(plan.cuts[:-1]), dtype=torch.int64).to(device)
        # Stage-2 payloads carry bucket positions; the rule counts them from the shard's start.
        self.to_shard = torch.tensor([-self.start], dtype=torch.int64).to(device)
        # Stage 1's τ, one per piece of every shard (the pieces tile the bucket): +inf for
        # dense pieces, 2^-149 where the piece's k is its length or its parameter's k = numel,
        # else estimated (or recomputed exactly) at every sparse step.
        every = [q for pieces in self.all_pieces for q in pieces]
        self.stage1_ks = [q.k for q in every]
        self.stage1_segments = ops.Segments([0] + [q.end for q in every], device=device)
        stage1_keep_all = [q.sparse and (layout.keep_all[q.segment] or q.k == q.end - q.start)
                           for q in every]
        self.stage1_sparse = torch.tensor([q.sparse for q in every]).to(device)
        self.stage1_keep_all = torch.tensor(stage1_keep_all).to(device)
        self.stage1_thresholds = torch.tensor(
            [FLOOR if a else 0.0 if q.sparse else math.inf
             for q, a in zip(every, stage1_keep_all)], dtype=torch.float32).to(device)
        self.capacity = plan.shard_capacity
        # Second level: only this rank's shard.
        self.residual = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.thresholds = torch.tensor([0.0 if q.sparse else math.inf for q in self.pieces],
                                       dtype=torch.float32).to(device)
        self.ks = [q.k for q in self.pieces]
        offsets = [0] + [q.end - self.start for q in self.pieces]
        self.segments = ops.Segments(offsets, device=device) if self.pieces else None
        keep_all = [q.sparse and q.k == q.end - q.start for q in self.pieces]
        self.rule = ThresholdRule(offsets, self.ks, [q.sparse for q in self.pieces], keep_all,
                                  band, patience, device) if self.pieces else None
        self.piece_slot = {q.segment: i for i, q in enumerate(self.pieces)}
        self.param_start = layout.offsets_list
        self.states: List[Optional[ShardPiece]] = [None] * len(self.pieces)

    def refresh_stage1(self, selected: torch.Tensor) -> None:
        """An exact refresh of stage 1: every piece's τ := its k-th largest magnitude
        ``selected`` (fp32 [pieces]), at least 2^-149 (exactly that where the piece keeps
        all), +inf for dense pieces."""
        taus = torch.where(self.stage1_keep_all, FLOOR,
                           torch.clamp_min(selected.to(torch.float32), FLOOR))
        self.stage1_thresholds.copy_(torch.where(self.stage1_sparse, taus, math.inf))

    def piece_of(self, slot: int):
        """(start within the parameter, numel) of parameter ``slot``'s piece here, or None."""
        i = self.piece_slot.get(slot)
        if i is None or not self.pieces[i].sparse:
            return None
        q = self.pieces[i]
        return q.start - self.param_start[slot], q.end - q.start

    def adopt(self, slot: int, old: Optional[ShardPiece]) -> ShardPiece:
        i = self.piece_slot[slot]
        q = self.pieces[i]
        a, b = q.start - self.start, q.end - self.start
        piece = ShardPiece(q.start - self.param_start[slot], self.residual[a:b],
                           self.thresholds[i:i + 1], streak=self.rule.streaks[i:i + 1],
                           average=self.rule.averages[i:i + 1],
                           scale=self.rule.scales[i:i + 1])
        if old is not None:
            piece.residual.copy_(old.residual.reshape(-1))
            piece.threshold.copy_(old.threshold.reshape(-1))
            piece.streak.copy_(old.streak.reshape(-1))
            if old.average is not None:
                piece.average.copy_(old.average.reshape(-1))
            if old.scale is not None:
                piece.scale.copy_(old.scale.reshape(-1))
            piece.refreshed_at, piece.pending = old.refreshed_at, old.pending
        self.states[i] = piece
        return piece
