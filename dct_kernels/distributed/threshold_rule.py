"""The threshold rule between exact refreshes: every step's τ is a sampled estimate of the
k-th largest |gradient + residual| times a per-parameter scale, the scale is nudged toward the
target count k from the kept counts, and only a persistent excursion of the whole bucket asks
for an early exact refresh (docs/design.md, "Refresh and band").

Why a per-step estimate. A τ held fixed between refreshes keeps a count that follows each
step's gradient norm, and the DLRM's varies up to sixteenfold from one step to the next: a τ
whose average count is near k overflows the payload on the burst steps, one that never
overflows keeps a small fraction of k on average (measured: a fifth of the steps overflowing
at two thirds of the target density under a count-only correction). The estimate looks at the
step itself, at a cost that does not grow with the parameter: the k_s-th largest magnitude of a
fixed sample of about 32 / ratio entries, one per stratum of ``stride`` consecutive entries
(``stride = max(1, floor(k / 32), ceil(numel / 65536))``, k_s = ceil(k m / numel) of the m
sampled, so about 32), at a hashed position inside the stratum: strata of equal phase would alias
with the rows of a weight matrix (one column sampled). Simulated on the DLRM's recorded
gradients with error feedback (ratio 0.003): 0-0.4% of steps overflowing and the kept density
within 3% of the target, against 26% and -29% for the count-only correction.

Why still a correction. The sample quantile is unbiased for the count only on average, and
error feedback piles residual mass up just below τ; the scale ρ_p absorbs what the estimate
gets wrong persistently. Per sparse parameter p with target k_p and this step's kept count c_p:

    a_p  <- a_p + (c_p - a_p) / 8                      (the count average; k_p after a refresh)
    r    =  (a_p + 1) / (k_p + 1)                       (+1: k = 1 parameters do not swing)
    up   =  #{j in 1..8 : r >= 2^(j/4)}        down = #{j in 1..8 : r < 2^(-j/4)}
    ρ_p  <- clamp(ρ_p x 2^(up / 32 - down / 256), 2^-8, 2^8)   (ρ_p = 1 after a refresh)

and the next step uses τ_p = max(ρ_p x q_p, 2^-149), q_p its sample's k_s-th magnitude. The
average looks past single steps; ρ rises faster than it falls, as a τ too high only delays
entries (they stay in the residual) while a τ too low floods the payload. When the payload
overflowed (or, with reduce_scatter, the parameter's stage-1 row did), the counts after the
cut say nothing: ρ then rises by at least one notch and never falls. The clamp keeps a
parameter whose sample is all zeros for a while from driving ρ to 0 or to overflow.

Determinism: the sample positions are integers computed once on the host, the quantile is the
exact ``select_threshold`` of the sample (bitwise the same on every backend), the average is
a + (c - a) x 0.125 in separate fp32 operations (the scaling is exact), the comparisons are
made in float64 against integers ((a + 1) x 1000 against (k + 1) x round(1000 x 2^(j/4))), and
ρ and τ are single fp32 products, so τ is bitwise the same on every machine and backend for
the same inputs. Parameters with k = numel keep τ = 2^-149; dense ones +inf.

Early refresh. The band is the bucket's (a sum over its parameters is steady where one small
parameter's count is mostly noise): a step is *out* when the bucket's summed count average
exceeds sum(floor(high x k_p)), or the payload overflowed, or the count average summed over the
parameters whose τ is above 2^-149 falls below their sum(ceil(low x k_p)) (at the floor every
nonzero is already sent: fewer than k nonzeros is not an excursion). The sums are of
floor(a_p x 2^24) in int64, exact in any order (an fp32 sum's rounding would depend on the
order a library sums in). ``streak`` counts consecutive out steps; an early refresh is flagged
when it reaches ``patience``. Only the flags travel to the host, in a non-blocking copy read
one step later, so the rule never synchronizes.

Backends. ``estimate`` and ``step`` below are the reference: compositions of torch operations,
about ten and thirty of them, whose fixed cost (a few microseconds each, per bucket and step)
is most of the hook's own time on the host. A backend with ``rule_estimate`` / ``rule_step``
(the cpu core) does each in one call, bitwise the same.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import backends, ops
from .. import payload as wire

# The smallest positive fp32 magnitude (a denormal): every τ is at least this, so an entry
# that is exactly ±0 never passes |acc| >= τ and never takes a payload slot.
FLOOR = 2.0 ** -149

OCTAVE_STEPS = 8  # quarter octaves of the count ratio compared, each way
UP_DIVISOR = 32  # τ rises 2^(marks / 32): faster, as a too-high τ only delays entries
DOWN_DIVISOR = 256  # τ falls 2^(-marks / 256): slowly, as a lower τ releases the pile-up
AVERAGE_WEIGHT = 0.125  # the count average's weight of the newest step
SCALE_MIN, SCALE_MAX = 2.0 ** -8, 2.0 ** 8  # the clamp of ρ
SAMPLE_K = 32  # the sample's target k_s: its stride is floor(k / SAMPLE_K) (at least 1)
SAMPLE_MAX = 65536  # at most this many samples per segment (the stride grows past it)
_HASH = 2654435761  # Knuth's multiplicative hash: the sample's position inside its stratum
_RATIO_SCALE = 1000
_RATIO_MARKS = [round(_RATIO_SCALE * 2.0 ** (j / 4)) for j in range(1, OCTAVE_STEPS + 1)]
FIXED = 2 ** 24  # the band sums add floor(a_p x 2^24) in int64


class Kept(NamedTuple):
    """Where the entries a compress kept are, for the rule's counts: version-1 wire ``rows``
    (uint8 [R, B], this rank's own: trusted) of ``capacity`` slots, ``shift`` (int64 [R])
    added to each row's indices; or ``positions`` (int64, any shape) with ``valid`` (bool,
    the same shape), ``shift`` (an int or a one-element int64 tensor) added. Made by
    ``Kept.of_rows`` / ``of_positions``."""
    rows: Optional[torch.Tensor]
    capacity: int
    positions: Optional[torch.Tensor]
    valid: Optional[torch.Tensor]
    shift: object

    @staticmethod
    def of_rows(rows: torch.Tensor, capacity: int, shift: torch.Tensor) -> "Kept":
        """Kept entries as version-1 wire rows (their int32 indices read in place)."""
        return Kept(rows, capacity, None, None, shift)

    @staticmethod
    def of_positions(positions: torch.Tensor, valid: torch.Tensor, shift=0) -> "Kept":
        """Kept entries as decoded positions with a validity mask (delta-coded wire)."""
        return Kept(None, 0, positions, valid, shift)

    def positions_valid(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(positions int64, valid bool), flat, with the shift added (torch operations)."""
        if self.rows is None:
            return (self.positions.reshape(-1).to(torch.int64) + self.shift,
                    self.valid.reshape(-1))
        rows, capacity = self.rows, self.capacity
        words = rows[:, :wire.HEADER_BYTES].view(torch.int32)
        count = words[:, wire.WORD_COUNT].to(torch.int64)
        start = wire.HEADER_BYTES
        indices = rows[:, start:start + wire.INDEX_BYTES * capacity].view(torch.int32)
        slot = torch.arange(capacity, device=rows.device)
        positions = indices.to(torch.int64) + self.shift[:, None]
        return positions.reshape(-1), (slot[None, :] < count[:, None]).reshape(-1)


def sample_positions(numel: int, k: int) -> torch.Tensor:
    """The sampled positions of a segment of ``numel`` entries with target ``k``: one per
    stratum [i s, (i + 1) s) of stride s = max(1, floor(k / 32), ceil(numel / 65536)), at
    i s + floor(h_i s / 2^32) with h_i = (i x 2654435761) mod 2^32, for i < floor(numel / s)
    (all of them when s = 1), as int64 [floor(numel / s)] on the CPU (exact integers)."""
    stride = max(1, k // SAMPLE_K, -(-numel // SAMPLE_MAX))
    i = torch.arange(numel // stride, dtype=torch.int64)
    return i * stride + torch.div((i * _HASH).remainder_(2 ** 32) * stride, 2 ** 32,
                                  rounding_mode="floor")


def sample_k(numel: int, k: int, sampled: int) -> int:
    """k_s = ceil(k x sampled / numel), the sample's order statistic for a target ``k``."""
    return max(1, -(-k * sampled // numel))


class ThresholdRule:
    """The rule for S segments with host offsets ``offsets`` (S + 1), targets ``ks``,
    ``sparse`` mask (dense segments never flag and keep +inf) and ``keep_all`` mask (k = numel:
    τ stays at the floor), on ``device``. ``band`` is (low, high), ``patience`` >= 1.

    ``units`` are the ranges τ is estimated for, (start, end, k, segment, slot) each: the
    estimate of range [start, end) with target k, scaled by its segment's ρ, goes to ``slot``
    of the output of ``estimate``. Default: one per segment (slot = segment); the
    reduce_scatter exchange estimates one τ per piece of a parameter in a shard instead, so
    that a shard holding a parameter's hot rows keeps its own share (the counts and the scale
    stay per parameter). Ranges with k = their length and non-adjustable segments are left
    out (their τ is set at the refresh).

    ``streaks`` (int32 [S]; every sparse segment of a bucket carries the bucket's streak),
    ``averages`` (fp32 [S]) and ``scales`` (ρ, fp32 [S]) are the rule's own state; the
    per-parameter states hold views into them (``ParamState.streak``, ``.average``,
    ``.scale``), so they are checkpointed with them.
    """

    def __init__(self, offsets: Sequence[int], ks: Sequence[int], sparse: Sequence[bool],
                 keep_all: Sequence[bool], band, patience: int, device: torch.device,
                 units: Optional[Sequence[Tuple[int, int, int, int, int]]] = None):
        low, high = band
        self.num_segments = len(ks)
        self.device = device
        self.patience = patience

        def tensor(values, dtype):
            return torch.tensor(list(values), dtype=dtype).to(device)

        self.starts = tensor(offsets[:-1], torch.int64)
        self.low = tensor([math.ceil(k * low) for k in ks], torch.int64)
        self.high = tensor([math.floor(k * high) for k in ks], torch.int64)
        self.sparse = tensor(sparse, torch.bool)
        self.keep_all = tensor([s and a for s, a in zip(sparse, keep_all)], torch.bool)
        self.adjustable = self.sparse & ~self.keep_all
        # The ratio's marks as float64 products of integers (exact), for comparisons with
        # (average + 1) x 1000 and (average + 1) x mark.
        k1 = torch.tensor([k + 1 for k in ks], dtype=torch.float64)
        marks = torch.tensor(_RATIO_MARKS, dtype=torch.float64)
        self.k_scaled = (k1 * _RATIO_SCALE).to(device)                     # [S]
        self.k_marked = (k1[:, None] * marks[None, :]).to(device)          # [S, 8]
        self.marks = marks.to(device)
        self.multipliers = torch.tensor(
            [2.0 ** (s / (UP_DIVISOR if s > 0 else DOWN_DIVISOR))
             for s in range(-OCTAVE_STEPS, OCTAVE_STEPS + 1)], dtype=torch.float32).to(device)
        self.ks_int = tensor(ks, torch.int64)
        self.ks = self.ks_int.to(torch.float32)
        self.scale_min, self.scale_max = SCALE_MIN, SCALE_MAX
        self.high_total = sum(math.floor(k * high) for k, s in zip(ks, sparse) if s)
        self.streaks = torch.zeros(self.num_segments, dtype=torch.int32, device=device)
        self.averages = self.ks.clone()
        self.scales = torch.ones(self.num_segments, dtype=torch.float32, device=device)
        # The sample of every estimated unit, back to back: positions in the rule's
        # range, its Segments and order statistics, the units' segments and output slots.
        if units is None:
            units = [(offsets[i], offsets[i + 1], ks[i], i, i) for i in range(len(ks))]
        units = [u for u in units
                 if sparse[u[3]] and not keep_all[u[3]] and u[2] < u[1] - u[0]]
        positions, bounds, orders = [], [0], []
        for start, end, k, _, _ in units:
            where = sample_positions(end - start, k)
            positions.append(where + start)
            bounds.append(bounds[-1] + where.numel())
            orders.append(sample_k(end - start, k, where.numel()))
        self.sample_bounds = bounds
        self.sample_index = torch.cat(positions).to(device) if units else None
        self.sample_segments = ops.Segments(bounds, device=device) if units else None
        self.sample_ks = orders
        self.sample_segment = tensor([u[3] for u in units], torch.int64)
        self.sample_slots = tensor([u[4] for u in units], torch.int64)
        self.counts_out = torch.zeros(self.num_segments, dtype=torch.int64, device=device)
        pin = device.type == "cuda"
        self.host_flags = torch.zeros(self.num_segments, dtype=torch.bool, pin_memory=pin)
        self._event = torch.cuda.Event() if pin else None
        self._staged = False

    def counts(self, kept: Kept) -> torch.Tensor:
        """int64 [S]: how many of the ``kept`` entries fall in each segment (torch operations:
        the reference of the count inside ``rule_step``)."""
        positions, valid = kept.positions_valid()
        segment = torch.searchsorted(self.starts, positions, right=True) - 1
        segment = torch.where(valid, segment, self.num_segments)
        counts = torch.zeros(self.num_segments + 1, dtype=torch.int64, device=self.device)
        counts.scatter_add_(0, segment, torch.ones_like(segment))
        return counts[:self.num_segments]

    def _fused(self, backend):
        """The backend module when it fuses the rule (``rule_estimate`` / ``rule_step``), else
        None (the torch composition below is used)."""
        impl = backends.resolve(backend, self.device)
        return impl if hasattr(impl, "rule_step") else None

    def estimate(self, thresholds: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                 backend: Optional[str] = None) -> None:
        """This step's τ of every estimated unit, in place in ``thresholds`` (fp32, indexed by
        the units' slots: [S] by default): max(ρ_p x q_u, 2^-149), q_u the unit's sample's
        k_s-th largest |x + residual| (fp32, x converted first, as ``compress`` adds them), ρ_p
        its segment's scale. ``x`` and ``residual`` span the rule's range. Other slots keep
        their τ. No host synchronization."""
        if self.sample_index is None:
            return
        impl = self._fused(backend)
        if impl is not None:
            impl.rule_estimate(self, thresholds, x, residual)
            return
        index = self.sample_index
        acc = x.index_select(0, index).to(torch.float32) + residual.index_select(0, index)
        quantiles = ops.select_threshold(acc, self.sample_ks, segments=self.sample_segments,
                                         backend=backend).to(torch.float32)
        scales = self.scales.index_select(0, self.sample_segment)
        thresholds.index_copy_(0, self.sample_slots,
                               torch.clamp_min(scales * quantiles, FLOOR))

    def step(self, thresholds: torch.Tensor, kept: Kept, overflowed: torch.Tensor,
             capped: Optional[torch.Tensor] = None,
             backend: Optional[str] = None) -> torch.Tensor:
        """One step of the rule after a compress: update the count averages, correct the
        scales ρ, advance the streaks and stage the early-refresh flags to the host (no
        synchronization).

        Args:
            thresholds: fp32 [S], the τ the compress used (read only: which are live).
            kept: where the payload's kept entries are (positions relative to the segments'
                range).
            overflowed: 0-d bool device tensor: the payload overflowed this step.
            capped: optional bool [S]: segments whose sent count a full buffer cut.
            backend: the backend whose fused ``rule_step`` to use, if it has one.

        Returns:
            The int64 [S] kept counts (for statistics; valid until the next step).
        """
        impl = self._fused(backend)
        if impl is not None:
            impl.rule_step(self, thresholds, kept, overflowed, capped)
            counts = self.counts_out
        else:
            counts = self._step(thresholds, kept, overflowed, capped)
        self._staged = True
        return counts

    def _step(self, thresholds, kept, overflowed, capped) -> torch.Tensor:
        """``step`` as torch operations (the reference)."""
        counts = self.counts(kept)
        # The average: a + (c - a) / 8, as separate fp32 operations (the scaling by 1/8 is
        # exact), so that it is the same on every machine.
        averages = self.averages
        averages.add_((counts - averages).mul_(AVERAGE_WEIGHT))
        held = overflowed if capped is None else (capped | overflowed)
        a1 = averages.double().add_(1)
        up = (a1.mul(_RATIO_SCALE)[:, None] >= self.k_marked).sum(1)
        down = (a1[:, None] * self.marks < self.k_scaled[:, None]).sum(1)
        # An overflow hides the counts after the cut: τ then rises by at least one notch and
        # never falls (otherwise a payload capped at capacity could never push τ up).
        up = torch.where(held, up.clamp_min(1), up)
        down = down.masked_fill(held, 0)
        # The band is the bucket's: a sum over its parameters is steady where one small
        # parameter's count is mostly noise. Parameters at the floor send every nonzero they
        # have; they are left out of the low side. Sums in int64 fixed point: exact.
        fixed = averages.double().mul_(FIXED).floor_().to(torch.int64)
        live = self.sparse & (thresholds > FLOOR)
        zero = torch.zeros_like(fixed)  # where(), not a mask index: no host synchronization
        high = (torch.where(self.sparse, fixed, zero).sum() > self.high_total * FIXED) \
            | overflowed
        low = torch.where(live, fixed, zero).sum() < torch.where(live, self.low, 0).sum() * FIXED
        out = (high | low) & self.sparse
        self.streaks.copy_(torch.where(out, self.streaks + 1, 0))
        flags = self.streaks >= self.patience
        corrected = torch.clamp(self.scales * self.multipliers[up - down + OCTAVE_STEPS],
                                SCALE_MIN, SCALE_MAX)
        self.scales.copy_(torch.where(self.adjustable, corrected, self.scales))
        self.host_flags.copy_(flags, non_blocking=True)
        if self._event is not None:
            self._event.record(torch.cuda.current_stream(self.device))
        return counts

    def refresh(self, thresholds: torch.Tensor, selected: torch.Tensor) -> None:
        """An exact refresh of every segment: ``thresholds`` (fp32 [S]) := the k-th largest
        magnitudes ``selected`` (from ``select_threshold``), never below the floor (exact
        zeros never pass; ``torch.clamp_min`` keeps a NaN), the floor itself where k = numel
        (every nonzero, at every step, where the exact k-th would go stale), +inf for dense
        segments. Excursions start over, the count averages from the target (an exact τ
        keeps k entries at its own step) and the scales from 1."""
        taus = torch.where(self.keep_all, FLOOR,
                           torch.clamp_min(selected.to(torch.float32), FLOOR))
        thresholds.copy_(torch.where(self.sparse, taus, float("inf")))
        self.restart()

    def restart(self) -> None:
        """After an exact refresh: streaks 0, count averages k, scales 1."""
        self.streaks.zero_()
        self.averages.copy_(self.ks)
        self.scales.fill_(1.0)

    def take(self) -> Optional[List[bool]]:
        """The flags staged by the last ``step`` (None when none are staged since the last
        take). Waits only for the one-step-old copy's event (on CUDA), never for the device."""
        if not self._staged:
            return None
        if self._event is not None:
            self._event.synchronize()
        self._staged = False
        return [bool(f) for f in self.host_flags.tolist()]
