"""The threshold rule between exact refreshes (dct_kernels/distributed/threshold_rule.py):
the cpu core's fused ``rule_estimate`` / ``rule_step`` against the torch composition, bit for
bit, over many steps of random state; and both against an oracle written from
docs/design.md ("Refresh and band") in numpy fp32, Python floats and exact fractions."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import dct_kernels as dk
from dct_kernels import payload as wire
from dct_kernels.distributed.threshold_rule import FLOOR, Kept, ThresholdRule
from dist_checks import expected_rule, expected_tau
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.skipif(dk.available_backends()["cpu"] != "available",
                                reason="the cpu core is not built")

CPU = torch.device("cpu")


def _layout(g: torch.Generator, pieces: bool):
    """Random segments (numels 1..3000, not multiples of anything), ks with k = 1 and
    k = numel among them, some dense; units per segment or per piece (reduce_scatter)."""
    S = int(torch.randint(3, 9, (1,), generator=g))
    numels = [int(n) for n in torch.randint(1, 3000, (S,), generator=g)]
    numels[0], numels[1] = 1, 2999
    ks = [max(1, int(n * float(r))) for n, r in zip(numels, torch.rand(S, generator=g) * 0.05)]
    ks[1], ks[2] = 1, numels[2]  # k = 1; k = numel (kept at the floor)
    sparse = [True] * S
    sparse[-1] = False
    keep_all = [k == n for k, n in zip(ks, numels)]
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    units = None
    if pieces:  # two pieces per segment where it has room, each with its share of k
        units, slot = [], 0
        for s in range(S):
            lo, hi, k = offsets[s], offsets[s + 1], ks[s]
            cuts = [lo, hi] if hi - lo < 4 else [lo, (lo + hi) // 2, hi]
            for a, b in zip(cuts[:-1], cuts[1:]):
                units.append((a, b, max(1, k * (b - a) // (hi - lo)), s, slot))
                slot += 1
    return offsets, ks, sparse, keep_all, units


def _acc(g, n, dtype):
    """x (in ``dtype``) and a residual with the hard cases: exact zeros, ±0, denormals, inf,
    NaN, ties."""
    x = torch.randn(n, generator=g)
    special = torch.rand(n, generator=g)
    x = torch.where(special < 0.05, 0.0, x)
    x = torch.where((special > 0.05) & (special < 0.07), -0.0, x)
    x = torch.where((special > 0.07) & (special < 0.09), 1e-42, x)
    x = torch.where((special > 0.09) & (special < 0.1), 1.0, x)  # ties
    if n > 50:
        x[7], x[11] = float("inf"), float("nan")
    residual = torch.randn(n, generator=g) * 0.3
    return x.to(dtype), residual


def _rows(g, offsets, capacity: int, W: int):
    """W version-1 rows (a real wire header and int32 indices) holding random sorted
    positions of their shard, the count in the header, and the shards' starts."""
    n = offsets[-1]
    cuts = [n * w // W for w in range(W + 1)]
    row_bytes = -(-(wire.HEADER_BYTES + 6 * capacity) // 16) * 16  # rows are 16-byte aligned
    rows = torch.zeros(W, row_bytes, dtype=torch.uint8)
    for w in range(W):
        size = cuts[w + 1] - cuts[w]
        count = int(torch.randint(0, min(capacity, size) + 1, (1,), generator=g))
        where = torch.randperm(size, generator=g)[:count].sort().values.to(torch.int32)
        words = rows[w, :wire.HEADER_BYTES].view(torch.int32)
        words[wire.WORD_COUNT] = count
        rows[w, wire.HEADER_BYTES:wire.HEADER_BYTES + 4 * count].view(torch.int32)[:] = where
    return rows, torch.tensor(cuts[:-1], dtype=torch.int64)


def _kept(g, offsets, mode: str):
    n = offsets[-1]
    if mode == "rows":
        capacity = int(torch.randint(1, 200, (1,), generator=g))
        rows, shift = _rows(g, offsets, capacity, W=int(torch.randint(1, 5, (1,), generator=g)))
        return Kept.of_rows(rows, capacity, shift)
    count = int(torch.randint(0, 300, (1,), generator=g))
    positions = torch.randint(0, n, (count,), generator=g) + 1000  # shifted back below
    valid = torch.rand(count, generator=g) < 0.8
    return Kept.of_positions(positions.view(-1, 1), valid.view(-1, 1), -1000)


def _state(rule: ThresholdRule):
    return (rule.averages.clone(), rule.scales.clone(), rule.streaks.clone(),
            rule.host_flags.clone())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pieces", [False, True], ids=["per_segment", "per_piece"])
def test_fused_rule_is_the_composition_bit_for_bit(seed, pieces):
    g = torch.Generator().manual_seed(seed)
    offsets, ks, sparse, keep_all, units = _layout(g, pieces)
    patience = 1 + seed % 3
    band = (0.5, 1.5)
    rules = {b: ThresholdRule(offsets, ks, sparse, keep_all, band, patience, CPU, units=units)
             for b in ("cpu", "torch")}
    slots = len(units) if units else len(ks)
    taus = {b: torch.zeros(slots) for b in rules}
    S = len(ks)
    dtype = (torch.float32, torch.bfloat16, torch.float16)[seed % 3]
    flagged = 0
    for step in range(40):
        if step % 13 == 0:  # an exact refresh: random k-th magnitudes, some zero
            selected = torch.rand(S, generator=g) * (torch.rand(S, generator=g) > 0.2)
            for b, rule in rules.items():
                rule.refresh(taus[b][:S] if units is None else torch.zeros(S), selected)
        x, residual = _acc(g, offsets[-1], dtype)
        for b, rule in rules.items():
            rule.estimate(taus[b], x, residual, backend=b)
        assert_bitwise_equal(taus["cpu"], taus["torch"], f"τ at step {step}")
        mode = "rows" if step % 2 else "positions"
        kept = _kept(g, offsets, mode)
        overflowed = torch.tensor(bool(torch.rand(1, generator=g) < 0.15))
        capped = (torch.rand(S, generator=g) < 0.1) if step % 3 == 0 else None
        thresholds = torch.where(torch.rand(S, generator=g) < 0.2, FLOOR, 1.0)
        thresholds[0] = float("nan") if step % 5 == 0 else thresholds[0]
        counts = {b: rule.step(thresholds, kept, overflowed, capped, backend=b).clone()
                  for b, rule in rules.items()}
        assert_bitwise_equal(counts["cpu"], counts["torch"], f"counts at step {step} ({mode})")
        for what, a, e in zip(("averages", "scales", "streaks", "flags"),
                              _state(rules["cpu"]), _state(rules["torch"])):
            assert_bitwise_equal(a, e, f"{what} at step {step}")
        assert rules["cpu"].take() == rules["torch"].take()
        flagged += int(rules["cpu"].host_flags.any())
    assert flagged > 0, "no step flagged an early refresh: the band was not exercised"


def _band_oracle(averages, ks, sparse, live, overflowed, high_total_exact, low):
    """Whether a step is out of band, by docs/design.md: sums of floor(a x 2^24) (exact
    fractions here), against floor(high k) summed and ceil(low k) summed, times 2^24."""
    fixed = [math.floor(Fraction(float(a)) * 2 ** 24) for a in averages]
    total = sum(f for f, s in zip(fixed, sparse) if s)
    live_total = sum(f for f, s in zip(fixed, live) if s)
    live_low = sum(math.ceil(low * k) for k, s in zip(ks, live) if s)
    return (total > high_total_exact * 2 ** 24 or overflowed
            or live_total < live_low * 2 ** 24)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_rule_step_against_the_oracle(backend):
    """Scales, averages, counts and flags against the formulas of the design, including
    averages whose fp32 sum would round (2^30 beside 2^-20) right at the band's edges."""
    g = torch.Generator().manual_seed(7)
    ks = [1 << 20, 3, 40, 1]
    numels = [1 << 21, 10, 400, 5]
    sparse = [True, True, True, False]
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    band = (0.5, 1.5)
    rule = ThresholdRule(offsets, ks, sparse, [False] * 4, band, 2, CPU)
    high_total = sum(math.floor(k * band[1]) for k, s in zip(ks, sparse) if s)
    streak = 0
    for step in range(60):
        # Averages from all over the range, some exactly at the band's edges.
        before = rule.averages.clone()
        if step % 4 == 0:
            # a0' = 1572928 - 39.5 + c0 / 8, a2' = 38.5 + c2 / 8: the summed average lands on
            # high_total (1572928) give or take the counts and a tiny a1'.
            before = torch.tensor([1797632.0 - 8 * 39.5, 2.0 ** -20, 44.0, 0.0])
        elif step % 4 == 1:
            before = torch.tensor([float(ks[0]) * 0.5, 1.0, 20.0, 0.0])
        rule.averages.copy_(before)
        scales = rule.scales.clone()
        positions = torch.cat([torch.randint(offsets[s], offsets[s + 1],
                                             (int(torch.randint(0, 30, (1,), generator=g)),),
                                             generator=g) for s in range(4)])
        kept = Kept.of_positions(positions, torch.ones_like(positions, dtype=torch.bool))
        overflowed = step % 7 == 3
        thresholds = torch.tensor([1.0, FLOOR if step % 3 == 0 else 0.5, 0.25, float("inf")])
        counts = rule.step(thresholds, kept, torch.tensor(overflowed), backend=backend)
        want_counts = [int(((positions >= offsets[s]) & (positions < offsets[s + 1])).sum())
                       for s in range(4)]
        assert counts.tolist() == want_counts
        averages = []
        for s in range(3):
            scale, average = expected_rule(float(scales[s]), want_counts[s], ks[s],
                                           float(before[s]), overflowed)
            averages.append(average)
            assert rule.averages[s].item() == float(average), (step, s)
            assert rule.scales[s].item() == float(np.float32(scale)), (step, s)
        live = [s and float(t) > FLOOR for s, t in zip(sparse, thresholds)]
        out = _band_oracle(averages + [0.0], ks, sparse, live, overflowed, high_total, band[0])
        streak = streak + 1 if out else 0
        assert rule.streaks[:3].tolist() == [streak] * 3, step
        assert rule.streaks[3].item() == 0
        assert rule.take() == [streak >= 2] * 3 + [False], step


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_rule_estimate_against_the_oracle(backend):
    g = torch.Generator().manual_seed(3)
    ks = [150, 700, 2]  # for parameters of 5000, 70000 and 33 elements
    offsets = [0, 5000, 75000, 75033]
    rule = ThresholdRule(offsets, ks, [True] * 3, [False] * 3, (0.5, 1.5), 4, CPU)
    rule.scales.copy_(torch.tensor([1.0, 2.0 ** -8, 3.5]))
    x = torch.randn(offsets[-1], generator=g).to(torch.bfloat16)
    residual = torch.randn(offsets[-1], generator=g) * 1e-3
    residual[5000:75000] = 0
    taus = torch.zeros(3)
    rule.estimate(taus, x, residual, backend=backend)
    acc = x.float() + residual
    for s in range(3):
        want = expected_tau(acc[offsets[s]:offsets[s + 1]], ks[s], rule.scales[s].item())
        assert taus[s].item() == float(want), s
