"""DCT-DP at scale on CPU: the checks of tests/dist_checks_scale.py (zeros never sent, the
reduce_scatter exchange against an oracle, the collective issue order, bytes counted by
wrapping torch.distributed, disagreeing exchanges, unused parameters and sparse embeddings
under DDP) in one spawned gloo group of 2 ranks and one of 8 (whose bytes are compared with a
subgroup of 4), with deadlines so that nothing hangs."""

import pytest
import torch

from dct_kernels.distributed import DCTState, sizing
from dist_harness import spawned_checks

CHECKS_2 = ["check_zeros_never_sent", "check_few_nonzeros_no_refresh",
            "check_reduce_scatter_audited", "check_issue_order",
            "check_refused_row_keeps_the_order", "check_small_k_over_many_pieces",
            "check_bytes_counted", "check_mismatched_exchange",
            "check_sparse_all_reduce_reduce_scatter",
            "check_sparse_all_reduce_refuses_before_sending", "check_unused_and_embedding",
            "check_resume_reduce_scatter", "check_wire_v2"]
CHECKS_8 = ["check_zeros_never_sent", "check_reduce_scatter_audited", "check_issue_order",
            "check_refused_row_keeps_the_order", "check_small_k_over_many_pieces",
            "check_bytes_counted", "check_scale_bytes", "check_mismatched_exchange",
            "check_sparse_all_reduce_reduce_scatter",
            "check_sparse_all_reduce_refuses_before_sending", "check_resume_reduce_scatter",
            "check_wire_v2"]

group_of_2, test_two_ranks = spawned_checks("dist_checks_scale", 2, CHECKS_2)
group_of_8, test_eight_ranks = spawned_checks("dist_checks_scale", 8, CHECKS_8, deadline_s=400)


# ---------------------------------------------------------------------- in this process


def test_exchange_is_validated():
    for bad in ("ring", None, 3, "AllGather"):
        with pytest.raises(ValueError, match="exchange"):
            DCTState(exchange=bad)
    assert DCTState().exchange == "auto"
    assert DCTState().config()["exchange"] == "auto"


def test_shard_cuts_balance_k():
    """Cuts cover the range in order and put about K / W of the k mass in each shard; dense
    parameters carry none; more ranks than positions gives empty shards."""
    numels, sparse = [10000, 30, 5000, 20000], [True, False, True, True]
    for world in (1, 2, 3, 8, 64):
        plan = sizing.plan(numels, sparse, ratio=0.01, capacity_factor=1.5, world=world,
                           dtype=torch.float32, value_dtype=torch.bfloat16)
        cuts = plan.cuts
        assert cuts[0] == 0 and cuts[-1] == sum(numels) and list(cuts) == sorted(cuts)
        ks = [100, 0, 50, 200]
        offsets = [0, 10000, 10030, 15030, 35030]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            mass = sum(k * max(0, min(hi, b) - max(lo, a)) / (b - a)
                       for k, a, b in zip(ks, offsets[:-1], offsets[1:]))
            assert abs(mass - 350 / world) <= 2, (world, lo, hi, mass)
        assert sum(len(p) for p in plan.shards) >= len(numels)
    tiny = sizing.plan([5], [True], ratio=1.0, capacity_factor=1.0, world=8,
                       dtype=torch.float32, value_dtype=torch.float32)
    assert tiny.cuts[0] == 0 and tiny.cuts[-1] == 5 and len(tiny.cuts) == 9
    assert sum(1 for p in tiny.shards if not p) == 3


def _cuts_by_definition(offsets, ks, sparse, world):
    """c_s = the first position where the k mass (each sparse parameter's k spread evenly over
    its elements) reaches s / W of the total, in exact rationals, by bisection."""
    from fractions import Fraction

    spans = [(a, b, k) for a, b, k, s in zip(offsets[:-1], offsets[1:], ks, sparse) if s]
    total = sum(k for _, _, k in spans)

    def mass(p):
        return sum(Fraction(k * max(0, min(p, b) - a), b - a) for a, b, k in spans)

    cuts = [0]
    for s in range(1, world):
        lo, hi = 0, offsets[-1]
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if mass(mid) >= Fraction(total * s, world) else (mid + 1, hi)
        cuts.append(lo)
    return cuts + [offsets[-1]]


def test_shard_cuts_follow_their_definition_exactly():
    """shard_cuts against its definition in exact rationals, on random buckets and on one where
    a float quotient put the cut one position late ([4096, 7] at ratio 0.001, W = 7)."""
    import random

    rng = random.Random(5)
    cases = [([4096, 7], [True, True], 0.001, 7)]
    for _ in range(400):
        count = rng.randint(1, 4)
        numels = [rng.choice([1, 3, 7, 50, 999, 4096, 10**5]) for _ in range(count)]
        sparse = [rng.random() < 0.7 for _ in numels]
        sparse[0] = True
        cases.append((numels, sparse, rng.choice([0.001, 0.003, 0.07, 0.3, 1.0]),
                      rng.choice([2, 3, 4, 7, 16, 64])))
    for numels, sparse, ratio, world in cases:
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        ks = [sizing.k_of(n, ratio) for n in numels]
        assert sizing.shard_cuts(offsets, ks, sparse, world) == \
            _cuts_by_definition(offsets, ks, sparse, world), (numels, sparse, ratio, world)


def test_traffic_model():
    """Bytes per rank as docs/design.md counts them, for concrete numbers: allgather grows with W,
    reduce_scatter does not; "auto" prefers allgather near a tie."""
    numels, sparse = [1_000_000], [True]
    rows = {}
    for world in (2, 4, 8, 64, 1024):
        plan = sizing.plan(numels, sparse, ratio=0.01, capacity_factor=1.5, world=world,
                           dtype=torch.float32, value_dtype=torch.float32)
        assert plan.capacity == 15000
        n = plan.allgather_row_bytes
        assert n == 32 + 60000 + 60000  # header, int32 indices, fp32 values (16-aligned)
        assert plan.allgather() == (n, (world - 1) * n)
        r = plan.shard_row_bytes
        assert plan.reduce_scatter() == (world * r, 2 * (world - 1) * r)
        assert plan.ring() == 4 * (world - 1) / world * 4_000_000
        rows[world] = plan
    assert rows[2].choose("auto") == "allgather"
    assert rows[8].choose("auto") == "reduce_scatter"
    rs = {w: sum(p.reduce_scatter()) for w, p in rows.items()}
    assert rs[8] <= 1.25 * rs[4]
    # At W = 1024 a row holds 15 entries: the 32-byte headers and padding of 3W rows
    # dominate (about 4x the allgather buffer), still 250x below allgather's W buffers.
    assert rs[1024] <= 4.1 * rows[1024].allgather_row_bytes
    assert rs[1024] * 250 <= sum(rows[1024].allgather())
