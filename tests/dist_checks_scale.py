"""Checks of DCT-DP at scale, run on every rank of a spawned gloo group
(``dist_harness.run_group``): zeros never sent, the reduce_scatter exchange against an
independent oracle, the collective issue order, bytes counted by wrapping torch.distributed
(``wire_tap``) against ``stats()``, disagreeing ``exchange`` settings, unused parameters and
sparse embeddings under DDP.

Oracles: masks from ``|acc| >= τ`` in plain torch, ``torch.topk`` for thresholds, rank-order
fp32 sums, what each rank put on the wire captured from the wrapped collectives.
"""

import math

import torch
import torch.distributed as dist

import dct_kernels as dk
from dct_kernels.distributed import DCTState, dct_hook, sizing
from dct_kernels.payload import SparsePayload
from dct_kernels.distributed.stand_in import StandInBucket
from dist_checks import (assert_same_on_all_ranks, expect_error, expected_rule, expected_tau,
                         gather, rank_generator)
import oracle_codec as oc
from helpers import assert_bitwise_equal
from wire_tap import WireTap

FLOOR = 2.0 ** -149


def decode(row: torch.Tensor) -> torch.Tensor:
    return dk.decompress(SparsePayload.from_buffer(row), validate=True).float()


def live_values(row: torch.Tensor) -> torch.Tensor:
    payload = SparsePayload.from_buffer(row)
    return payload.values[:int(payload.count)].float()


def kth(acc: torch.Tensor, k: int) -> torch.Tensor:
    """max(k-th largest |acc|, 2^-149) as fp32 [1] (the contract's τ)."""
    tau = torch.topk(acc.abs(), k).values[-1:]
    return torch.clamp_min(tau, FLOOR)


def first_fitting(mask: torch.Tensor, capacity: int) -> torch.Tensor:
    return mask & (mask.cumsum(0) <= capacity)


def run_step(state, buckets):
    """Call the hook on each bucket of a step (the last one marked last), then wait."""
    futures = [dct_hook(state, b) for b in buckets]
    return [f.wait() for f in futures]


# ------------------------------------------------------------------------ zeros never sent


def check_zeros_never_sent(rank, world):
    """An all-zero parameter before a normal one (ratio 0.01): the payload carries no zero
    and the normal parameter sends its k entries (with reduce_scatter, each of its pieces its
    share); a parameter with fewer than k nonzeros
    sends exactly its nonzeros, and none of this triggers early refreshes. Both exchanges."""
    n = 5000
    k = math.ceil(0.01 * n)
    for exchange in ("allgather", "reduce_scatter"):
        params = [torch.nn.Parameter(torch.zeros(n)) for _ in range(3)]
        state = DCTState(ratio=0.01, warmup_steps=0, refresh_every=100, min_numel=16,
                         exchange=exchange,
                         module=[(f"p{i}", p) for i, p in enumerate(params)])
        overflows = 0
        for step in range(6):
            g = rank_generator(20, rank, step)
            normal = torch.randn(n, generator=g)
            few = torch.zeros(n)
            few[torch.randperm(n, generator=g)[:3]] = torch.randn(3, generator=g)
            grads = [torch.zeros(n), few, normal]
            before = state.state_dict()["params"]
            with WireTap(world) as tap:
                out, = run_step(state, [StandInBucket(params, grads)])
            rows = tap.of("all_gather") if exchange == "allgather" else tap.of("all_to_all")
            own = rows[0].view(world, -1) if exchange == "reduce_scatter" else rows[0][None]
            values = torch.cat([live_values(r) for r in own])
            assert bool((values != 0).all()), f"{exchange} step {step}: a zero was sent"
            if exchange == "allgather":
                sent = decode(rows[0])
            else:
                cuts = sizing.plan([n] * 3, [True] * 3, ratio=0.01, capacity_factor=1.5,
                                   world=world, dtype=torch.float32,
                                   value_dtype=torch.float32).cuts
                sent = torch.cat([decode(r)[:cuts[s + 1] - cuts[s]]
                                  for s, r in enumerate(own)])
            assert int(torch.count_nonzero(sent[:n])) == 0, "the zero parameter sent entries"
            acc_few = few + (before["p1"]["residual"] if step else 0)
            assert_bitwise_equal(sent[n:2 * n], acc_few, f"{exchange} step {step}: few")
            acc_normal = normal + (before["p2"]["residual"] if step else 0)
            if step == 0 and exchange == "allgather":
                passing = acc_normal.abs() >= kth(acc_normal, k)
                assert_bitwise_equal(sent[2 * n:], torch.where(passing, acc_normal, 0.0),
                                     "normal parameter at its refresh")
            elif step == 0:  # each piece of it in a shard: its own share of k
                passing = torch.zeros(n, dtype=torch.bool)
                for lo, hi in zip(cuts[:-1], cuts[1:]):
                    a, b = max(lo, 2 * n) - 2 * n, min(hi, 3 * n) - 2 * n
                    if a < b:
                        share = sizing.piece_k(k, n, b - a)
                        passing[a:b] = acc_normal[a:b].abs() >= kth(acc_normal[a:b], share)
                assert_bitwise_equal(sent[2 * n:], torch.where(passing, acc_normal, 0.0),
                                     "normal parameter's pieces at their refresh")
            # Its τ is estimated from a sample between refreshes, so its count varies around
            # k; the zero and the few-nonzeros parameters must not take its slots.
            assert int(torch.count_nonzero(sent[2 * n:])) >= k // 2, "normal parameter starved"
            assert_same_on_all_ranks(out, f"{exchange} result")
            saved = state.state_dict()["params"]
            now = state.stats()
            overflowed = now["overflowed_buckets"] + now["shard_overflow"] > overflows
            overflows = now["overflowed_buckets"] + now["shard_overflow"]
            # Fresh random gradients move the normal parameter's kept count, so the band (or
            # an overflow, which flags the whole bucket) may ask for refreshes; the zero and
            # the few-nonzeros parameters never do by themselves.
            assert overflowed or not (saved["p0"]["refresh_pending"] or
                                      saved["p1"]["refresh_pending"]), step
            if exchange == "reduce_scatter":
                for key in ("p0", "p1"):
                    shard = saved[key]["shard"]
                    assert overflowed or shard is None or not shard["refresh_pending"], key
        assert saved["p0"]["threshold"].item() == FLOOR, saved["p0"]["threshold"]
        # The few-nonzeros parameter sits at the floor when every piece's share of k exceeds
        # the 3 nonzeros it may hold; at tens of ranks a piece's share can be 1 or 2, and a
        # piece holding that many nonzeros gets the smallest of them as its exact τ (it still
        # sends every nonzero: checked above).
        shares = [k] if exchange == "allgather" else [
            sizing.piece_k(k, n, min(hi, 2 * n) - max(lo, n))
            for lo, hi in zip(cuts[:-1], cuts[1:]) if max(lo, n) < min(hi, 2 * n)]
        if min(shares) > 3:
            assert saved["p1"]["threshold"].item() == FLOOR, saved["p1"]["threshold"]


def check_few_nonzeros_no_refresh(rank, world):
    """Only parameters with fewer than k nonzeros (and an all-zero one): no early refresh in
    20 steps even with a patience of one step (their τ sits at the floor, so the band's low
    side leaves them out), every nonzero sent every step, nothing left in the residuals."""
    n = 4000
    for exchange in ("allgather", "reduce_scatter"):
        params = [torch.nn.Parameter(torch.zeros(n)) for _ in range(2)]
        state = DCTState(ratio=0.02, warmup_steps=0, refresh_every=1000, min_numel=16,
                         refresh_patience=1, exchange=exchange,
                         module=[(f"p{i}", p) for i, p in enumerate(params)])
        for step in range(20):
            g = rank_generator(21, rank, step)
            grad = torch.zeros(n)
            grad[torch.randperm(n, generator=g)[:10 + step]] = torch.randn(10 + step,
                                                                           generator=g)
            out, = run_step(state, [StandInBucket(params, [torch.zeros(n), grad])])
            want = sum(gather(grad)) / world if world > 1 else grad
            assert torch.allclose(out[n:], want, rtol=1e-6, atol=1e-7), f"step {step}"
        stats = state.stats()
        assert stats["early_refreshes"] == 0 and stats["bucket_refreshes"] == 1, stats
        for key, entry in state.state_dict()["params"].items():
            assert int(torch.count_nonzero(entry["residual"])) == 0, key


# --------------------------------------------------------------- reduce_scatter, audited


def _buckets_of(params, grads, groups):
    """StandInBuckets over consecutive groups of parameters, the last one marked last."""
    out, i = [], 0
    for j, size in enumerate(groups):
        out.append(StandInBucket(params[i:i + size], grads[i:i + size],
                              last=j == len(groups) - 1))
        i += size
    return out


def check_reduce_scatter_audited(rank, world, steps=6):
    """Three buckets per step with the reduce_scatter exchange, bf16 on the wire, every step
    against an oracle written from the contract: stage 1 (each rank's rows: entries with
    |grad + residual| >= the τ of each piece of a parameter in a shard, the first that fit;
    that τ at a refresh the piece's exact k-th magnitude for its share of k, else the sampled
    estimate times the parameter's scale (expected_tau); the scale
    corrections and count averages as expected_rule has them), stage 2 (the shard owner's
    rank-order sum + shard residual, τ' the exact k-th of each piece at a refresh, else
    estimated and corrected likewise; the first that fit),
    the result (sum of the shard
    payloads / W, small parameters all-reduced), EF at both levels bit for bit, the result
    identical on every rank; shards balanced by k."""
    shapes = [(60, 50), (7,), (2000,), (4000,), (1500,), (30,)]
    groups = [3, 1, 2]
    ratio, cf, min_numel = 0.02, 1.5, 16
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    names = [f"p{i}" for i in range(len(params))]
    state = DCTState(ratio=ratio, warmup_steps=1, refresh_every=3, min_numel=min_numel,
                     value_dtype=torch.bfloat16, exchange="reduce_scatter",
                     module=list(zip(names, params)))
    for step in range(steps):
        g = rank_generator(22, rank, step)
        grads = [torch.randn(s, generator=g) * (1 + step % 2) for s in shapes]
        buckets = _buckets_of(params, grads, groups)
        locals_ = [b.buffer().clone() for b in buckets]
        before = state.state_dict()["params"] if step else None
        with WireTap(world) as tap:
            results = run_step(state, buckets)
        after = state.state_dict()["params"]
        if step == 0:
            continue  # warm-up: dense
        a2a, ag = tap.of("all_to_all"), tap.of("all_gather")
        assert len(a2a) == len(ag) == len(buckets), (len(a2a), len(ag))
        first = 0
        for b, (bucket, local, result) in enumerate(zip(buckets, locals_, results)):
            keys = names[first:first + groups[b]]
            numels = [p.numel() for p in params[first:first + groups[b]]]
            first += groups[b]
            _audit_bucket(rank, world, step, keys, numels, local, result, before, after,
                          a2a[b], ag[b], ratio, cf, min_numel)
    stats = state.stats()
    assert stats["buckets_reduce_scatter"] == 3 * (steps - 1) and stats["overflow"] >= 0
    assert stats["shard_refreshes"] >= 2, stats


def check_small_k_over_many_pieces(rank, world, steps=40):
    """A parameter with fewer entries of k than reduce_scatter pieces (n = 400 at ratio
    0.005: k = 2, over W shards): every piece keeps its one entry, so the rule counts it
    against the sum of the shares, and the kept count stays there step after step instead of
    swinging between nothing and all of them (it did while the rule counted against k)."""
    n = 400
    p = torch.nn.Parameter(torch.zeros(n))
    state = DCTState(ratio=0.005, warmup_steps=0, min_numel=100, refresh_every=1000,
                     exchange="reduce_scatter", module=[("p", p)])
    kept = []
    for step in range(steps):
        before = state.stats()["kept"]
        g = rank_generator(26, rank, step)
        run_step(state, [StandInBucket([p], [torch.randn(n, generator=g)], last=True)])
        kept.append(state.stats()["kept"] - before)
    layout = next(iter(state.layouts.values()))
    target = sum(q.k for pieces in layout.plan.shards for q in pieces if q.sparse)
    assert target == min(world, n) and layout.ks == [2], (target, layout.ks)
    assert min(kept) > 0, kept
    assert abs(sum(kept) / steps - target) <= 0.5 * target, (kept, target)
    assert state.stats()["early_refreshes"] == 0, state.stats()


def _audit_bucket(rank, world, step, keys, numels, local, result, before, after, a2a_row,
                  ag_row, ratio, cf, min_numel):
    sparse = [n >= min_numel for n in numels]
    plan = sizing.plan(numels, sparse, ratio=ratio, capacity_factor=cf, world=world,
                       dtype=torch.float32, value_dtype=torch.bfloat16)
    cuts, cap = plan.cuts, plan.shard_capacity
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    numel = offsets[-1]
    # Shards: contiguous, covering, balanced by k (within one piece's rounding).
    ks = [sizing.k_of(n, ratio) if s else 0 for n, s in zip(numels, sparse)]
    mass = [sum(k * max(0, min(hi, offsets[i + 1]) - max(lo, offsets[i])) / numels[i]
                for i, k in enumerate(ks)) for lo, hi in zip(cuts[:-1], cuts[1:])]
    assert cuts[0] == 0 and cuts[-1] == numel and list(cuts) == sorted(cuts)
    # Each cut lies within one element's share of k (k / n <= 1) of its target s K / W.
    assert all(abs(m - sum(ks) / world) <= 2 + 1e-9 for m in mass), (mass, sum(ks) / world)
    # Stage 1 oracle for every rank (accs and τ gathered from the ranks). Each piece of a
    # parameter in a shard has its own τ for its share of k: the exact k-th magnitude of the
    # piece at a refresh, else the sampled estimate times the parameter's scale; 2^-149 where
    # the share is the whole piece. The saved τ of a parameter is the largest of its pieces'.
    acc = torch.zeros(numel)
    tau = torch.full((numel,), math.inf)
    used = {}
    # The rule counts a parameter against the sum of its pieces' shares (what stage 1 aims
    # at), and a step overflowed when it passed more than one allgather buffer or, if more,
    # the pieces' capacities together.
    targets = [0] * len(keys)
    piece_capacity = 0
    for i, s in enumerate(sparse):
        for t in range(world):
            pa, pb = max(offsets[i], cuts[t]), min(offsets[i + 1], cuts[t + 1])
            if s and pa < pb:
                share = sizing.piece_k(ks[i], numels[i], pb - pa)
                targets[i] += share
                piece_capacity += min(pb - pa, math.ceil(cf * share))
    for i, (key, s) in enumerate(zip(keys, sparse)):
        if not s:
            continue
        a, b = offsets[i], offsets[i + 1]
        acc[a:b] = local[a:b] + before[key]["residual"]
        refreshed = after[key]["refreshed_at"] == step
        scale = 1.0 if refreshed else before[key]["threshold_scale"].item()
        for t in range(world):
            pa, pb = max(a, cuts[t]), min(b, cuts[t + 1])
            if pa >= pb:
                continue
            k = sizing.piece_k(ks[i], numels[i], pb - pa)
            if k == pb - pa:
                tau[pa:pb] = FLOOR
            elif refreshed:
                tau[pa:pb] = max(kth(acc[pa:pb], k).item(), FLOOR)
            else:
                tau[pa:pb] = float(expected_tau(acc[pa:pb], k, scale))
        used[key] = (None, targets[i] if refreshed else before[key]["count_average"].item(),
                     scale)
        assert_bitwise_equal(after[key]["threshold"], tau[a:b].max().reshape(1),
                             f"step {step} {key}: largest τ of its pieces")
    accs, taus = gather(acc), gather(tau)
    sent1 = torch.zeros(world, numel)
    row_full = torch.zeros(world, world, dtype=torch.bool)  # [rank, row]: a cut row
    passing_total = torch.zeros(world, dtype=torch.int64)
    for r in range(world):
        for s in range(world):
            lo, hi = cuts[s], cuts[s + 1]
            passing = accs[r, lo:hi].abs() >= taus[r, lo:hi]
            kept = first_fitting(passing, cap)
            row_full[r, s] = int(passing.sum()) > cap
            passing_total[r] += int(passing.sum())
            sent1[r, lo:hi] = torch.where(kept, accs[r, lo:hi].bfloat16().float(), 0.0)
    # The rule on this rank's stage-1 counts: held when a row holding a piece of the
    # parameter was cut, or when the rows together passed more than one allgather buffer
    # (or the pieces' capacities, if more).
    overflowed = int(passing_total[rank]) > max(plan.capacity, piece_capacity)
    for i, (key, s) in enumerate(zip(keys, sparse)):
        if not s:
            continue
        a, b = offsets[i], offsets[i + 1]
        capped = any(bool(row_full[rank, t]) for t in range(world)
                     if max(a, cuts[t]) < min(b, cuts[t + 1]))
        count = int(torch.count_nonzero(sent1[rank, a:b]))
        want_scale, want_average = expected_rule(used[key][2], count, targets[i],
                                                 used[key][1], overflowed or capped)
        assert_bitwise_equal(after[key]["threshold_scale"], torch.tensor([want_scale]),
                             f"step {step} {key}: scale after the correction")
        assert_bitwise_equal(after[key]["count_average"], torch.tensor([want_average]),
                             f"step {step} {key}: count average")
    rows = a2a_row.view(world, -1)
    for s in range(world):
        lo, hi = cuts[s], cuts[s + 1]
        if hi > lo:
            assert_bitwise_equal(decode(rows[s]), sent1[rank, lo:hi],
                                 f"step {step}: stage-1 row {s}")
    for i, (key, s) in enumerate(zip(keys, sparse)):
        if s:
            a, b = offsets[i], offsets[i + 1]
            assert_bitwise_equal(sent1[rank, a:b] + after[key]["residual"], acc[a:b],
                                 f"step {step} {key}: EF level 1")
    # Stage 2 on this rank's shard.
    lo, hi = cuts[rank], cuts[rank + 1]
    total = torch.zeros(hi - lo)
    for r in range(world):
        total = total + sent1[r, lo:hi]
    res2 = torch.zeros(hi - lo)
    tau2 = torch.full((hi - lo,), math.inf)
    used2 = {}
    for i, (key, s) in enumerate(zip(keys, sparse)):
        a, b = max(lo, offsets[i]), min(hi, offsets[i + 1])
        if not s or a >= b:
            continue
        shard_before, shard_after = before[key]["shard"], after[key]["shard"]
        assert shard_after["start"] == a - offsets[i] and shard_after["residual"].numel() == b - a
        if shard_before is not None:
            res2[a - lo:b - lo] = shard_before["residual"]
        piece_acc = total[a - lo:b - lo] + res2[a - lo:b - lo]
        k = sizing.piece_k(ks[i], numels[i], b - a)
        if shard_after["refreshed_at"] == step:
            want = torch.tensor([FLOOR]) if k == b - a else kth(piece_acc, k)
            used2[key] = (want, k, k, 1.0)
        elif k == b - a:  # every nonzero: τ' stays at the floor
            used2[key] = (shard_before["threshold"], shard_before["count_average"].item(), k,
                          shard_before["threshold_scale"].item())
        else:
            scale = shard_before["threshold_scale"].item()
            used2[key] = (torch.tensor([expected_tau(piece_acc, k, scale)]),
                          shard_before["count_average"].item(), k, scale)
        assert_bitwise_equal(shard_after["threshold"], used2[key][0].reshape(1),
                             f"step {step} {key}: τ' used")
        tau2[a - lo:b - lo] = used2[key][0]
    acc2 = total + res2
    passing2 = acc2.abs() >= tau2
    kept2 = first_fitting(passing2, cap)
    sent2 = torch.where(kept2, acc2.bfloat16().float(), 0.0)
    for i, (key, s) in enumerate(zip(keys, sparse)):
        a, b = max(lo, offsets[i]), min(hi, offsets[i + 1])
        if not s or a >= b:
            continue
        _, average, k, scale = used2[key]
        count = int(kept2[a - lo:b - lo].sum())
        want_scale, want_average = expected_rule(scale, count, k, average,
                                                 int(passing2.sum()) > cap,
                                                 keep_all=k == b - a)
        assert_bitwise_equal(after[key]["shard"]["threshold_scale"],
                             torch.tensor([want_scale]),
                             f"step {step} {key}: τ' scale after the correction")
        assert_bitwise_equal(after[key]["shard"]["count_average"],
                             torch.tensor([want_average]), f"step {step} {key}: τ' average")
    own = decode(ag_row)
    assert_bitwise_equal(own[lo:hi], sent2, f"step {step}: stage-2 payload")
    assert int(torch.count_nonzero(own[:lo])) + int(torch.count_nonzero(own[hi:])) == 0
    for i, (key, s) in enumerate(zip(keys, sparse)):
        a, b = max(lo, offsets[i]), min(hi, offsets[i + 1])
        if s and a < b:
            assert_bitwise_equal(sent2[a - lo:b - lo] + after[key]["shard"]["residual"],
                                 acc2[a - lo:b - lo], f"step {step} {key}: EF level 2")
    # The result: the shard payloads' sum / W; the small parameters' all-reduce / W.
    shards = gather(own)
    want = torch.zeros(numel)
    for row in shards:
        want = want + row
    want = want / torch.tensor(float(world))
    small = torch.cat([local[offsets[i]:offsets[i + 1]] for i, s in enumerate(sparse)
                       if not s]) if not all(sparse) else None
    if small is not None:
        dist.all_reduce(small)
        small = small / world
        j = 0
        for i, s in enumerate(sparse):
            if not s:
                n = numels[i]
                want[offsets[i]:offsets[i] + n] = small[j:j + n]
                j += n
    assert_bitwise_equal(result, want, f"step {step}: result")
    assert_same_on_all_ranks(result, f"step {step}: result")


# --------------------------------------------------------------------------- issue order


def check_issue_order(rank, world):
    """Several reduce_scatter buckets per step, with ranks slowed down differently between
    buckets: every rank issues the same sequence of collectives (op, bytes), and the results
    agree on every rank; bucket futures complete only after the last bucket is hooked."""
    import time

    shapes = [(3000,), (2500,), (2000,), (1500,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    state = DCTState(ratio=0.02, warmup_steps=0, min_numel=16, exchange="reduce_scatter",
                     module=[(f"p{i}", p) for i, p in enumerate(params)])
    for step in range(4):
        g = rank_generator(23, rank, step)
        grads = [torch.randn(s, generator=g) for s in shapes]
        buckets = _buckets_of(params, grads, [1, 1, 1, 1])
        with WireTap(world) as tap:
            futures = []
            for b, bucket in enumerate(buckets):
                futures.append(dct_hook(state, bucket))
                if b < len(buckets) - 1:
                    assert not futures[0].done(), "stage 3 ran before the last bucket"
                # Odd ranks dawdle between buckets: without a fixed order their callbacks
                # would issue stage 3 before the next bucket's stage 1.
                time.sleep(0.05 if rank % 2 else 0.0)
            results = [f.wait() for f in futures]
        sequence = torch.tensor([[("all_gather", "all_to_all", "all_reduce").index(c.op),
                                  c.input.numel(), c.input.dtype == torch.int64]
                                 for c in tap.calls], dtype=torch.int64)
        rows = gather(sequence)
        for r in range(1, world):
            assert torch.equal(rows[r], rows[0]), f"rank {r} issued {rows[r].tolist()} vs " \
                                                  f"rank 0 {rows[0].tolist()}"
        ops = [op for op, _, check in rows[0].tolist() if not check]
        assert ops == [1, 1, 1, 1, 0, 0, 0, 0], rows[0].tolist()
        for b, result in enumerate(results):
            assert_same_on_all_ranks(result, f"step {step} bucket {b}")


def check_refused_row_keeps_the_order(rank, world):
    """With ``validate=True``, a bad stage-1 row that only one shard owner receives fails that
    rank's bucket, and only it: the rank still takes part in the bucket's stage-3 all-gather
    (with an empty row), so every later bucket is paired with the same bucket on every rank
    and comes out bitwise as in a run where nothing was corrupted."""
    from dct_kernels import payload as wire

    n = 2000

    def step(corrupt):
        params = [torch.nn.Parameter(torch.zeros(n)) for _ in range(2)]
        state = DCTState(ratio=0.01, warmup_steps=0, min_numel=100, validate=True,
                         exchange="reduce_scatter",
                         module=[(f"p{i}", p) for i, p in enumerate(params)])
        g = rank_generator(25, rank, 0)
        grads = [torch.randn(n, generator=g) for _ in params]
        original, calls = dist.all_to_all_single, []

        def tampered(out, inp, *args, **kwargs):
            work = original(out, inp, *args, **kwargs)
            calls.append(out)
            if corrupt and rank == world - 1 and len(calls) == 1:
                work.wait()  # bucket 0: the row from rank 0 gets a count beyond its capacity
                header = out.view(world, -1)[0, :wire.HEADER_BYTES].view(torch.int32)
                header[wire.WORD_COUNT] = 10 ** 6
            return work

        dist.all_to_all_single = tampered
        try:
            futures = [dct_hook(state, b) for b in _buckets_of(params, grads, [1, 1])]
        finally:
            dist.all_to_all_single = original
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.wait().clone())
            except Exception as error:  # noqa: BLE001 - reported below, checked by the caller
                outcomes.append(error)
        return outcomes

    clean = step(corrupt=False)
    tampered = step(corrupt=True)
    for b, result in enumerate(clean):
        assert isinstance(result, torch.Tensor), f"clean bucket {b}: {result!r}"
    if rank == world - 1:
        assert isinstance(tampered[0], Exception) and "invalid payload" in str(tampered[0]), \
            f"the rank that received the bad row: {tampered[0]!r}"
    else:
        assert isinstance(tampered[0], torch.Tensor), f"bucket 0 on rank {rank}: {tampered[0]!r}"
    assert isinstance(tampered[1], torch.Tensor), f"bucket 1 on rank {rank}: {tampered[1]!r}"
    assert_bitwise_equal(tampered[1], clean[1])
    assert_same_on_all_ranks(tampered[1], "bucket 1 after bucket 0's refused row")


# ------------------------------------------------------------------- bytes on the wire


def _bytes_run(rank, world, exchange, group, steps, shapes, **kwargs):
    """(tap sent, tap received, stats) per rank over ``steps`` steps of StandInBuckets."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    state = DCTState(group, exchange=exchange, module=[(f"p{i}", p)
                                                       for i, p in enumerate(params)],
                     **kwargs)
    sent = received = 0.0
    ring = 0.0
    per_step = []
    for step in range(steps):
        g = rank_generator(24, rank, step)
        grads = [torch.randn(s, generator=g) for s in shapes]
        buckets = _buckets_of(params, grads, [len(shapes) - 1, 1])
        with WireTap(world) as tap:
            run_step(state, buckets)
        sent += tap.sent
        received += tap.received
        per_step.append(tap.sent + tap.received)
        ring += sum(4 * (world - 1) / world * b.buffer().numel() * 4 for b in buckets)
    _bytes_run.per_step = per_step
    return sent, received, ring, state.stats()


def _close(a, b):
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


def check_bytes_counted(rank, world):
    """stats() bytes equal what the wrapped collectives moved (dense warm-up and small dense
    parameters included), for both exchanges and "auto"; bytes_ring and compression as
    docs/design.md#traffic-statistics defines them; "auto" picks the exchange the cost model says
    is cheaper."""
    shapes = [(120, 100), (50,), (9000,), (3000,)]
    kwargs = dict(ratio=0.01, warmup_steps=2, refresh_every=4, min_numel=64)
    totals = {}
    for exchange in ("allgather", "reduce_scatter", "auto"):
        sent, received, ring, stats = _bytes_run(rank, world, exchange, None, 6, shapes,
                                                 **kwargs)
        assert _close(stats["bytes_sent"], sent), (exchange, stats["bytes_sent"], sent)
        assert _close(stats["bytes_received"], received), (exchange, stats, received)
        assert _close(stats["bytes_ring"], ring), (exchange, stats["bytes_ring"], ring)
        assert _close(stats["compression"], ring / (sent + received)), stats
        totals[exchange] = sum(_bytes_run.per_step[kwargs["warmup_steps"]:])
    # Both buckets are on the same side of the margin for these sizes, so "auto" moves what
    # the cheaper exchange moves over the sparse steps.
    chosen = "reduce_scatter" if totals["reduce_scatter"] <= 0.9 * totals["allgather"] \
        else "allgather"
    assert _close(totals["auto"], totals[chosen]), (totals, chosen)


def check_scale_bytes(rank, world):
    """Bytes per rank of reduce_scatter at W = world vs W = world / 2 (a subgroup), counted by
    wrapping the collectives: at most 1.25x; compression >= 100 at ratio 0.003, capacity
    factor 1.5, bf16 values; allgather's bytes per rank grow with W."""
    half = world // 2
    subgroup = dist.new_group(list(range(half)))
    shapes = [(400, 500), (400,), (500, 100), (100,)]
    kwargs = dict(ratio=0.003, capacity_factor=1.5, value_dtype=torch.bfloat16,
                  warmup_steps=0, refresh_every=100, min_numel=1024)
    per_rank = {}
    for exchange in ("reduce_scatter", "allgather"):
        for w, group in ((world, None), (half, subgroup)):
            if rank < w:
                sent, received, ring, stats = _bytes_run(rank, w, exchange, group, 3, shapes,
                                                         **kwargs)
                assert _close(stats["bytes_sent"] + stats["bytes_received"], sent + received)
                value = torch.tensor([sent + received, stats["compression"]],
                                     dtype=torch.float64)
            else:
                value = torch.zeros(2, dtype=torch.float64)
            rows = gather(value)[:w]
            per_rank[exchange, w] = (rows[:, 0].max().item(), rows[:, 1].min().item())
    rs_big, rs_small = per_rank["reduce_scatter", world], per_rank["reduce_scatter", half]
    assert rs_big[0] <= 1.25 * rs_small[0], per_rank
    assert rs_big[1] >= 100, per_rank
    ag_big, ag_small = per_rank["allgather", world], per_rank["allgather", half]
    assert ag_big[0] > 1.5 * ag_small[0], per_rank
    if rank == 0:
        print("scale bytes per rank and compression:", per_rank)


# ------------------------------------------------------------------- wire format version 2


def check_wire_v2(rank, world, steps=5):
    """DCTState with fp8 values and/or delta indices, both exchanges, two buckets a step: the
    result is bitwise the same on every rank; the bytes the wrapped collectives moved are the
    statistics' and, with fp8 + delta, at most 0.6x those of int32 + bf16 with allgather, 0.75x
    with reduce_scatter (3 bytes an entry against 6, plus headers, scales and the small
    parameters' dense all-reduce); with
    allgather, each payload has the size of the design's byte table, and the rank's own
    payload (captured on
    the wire, decoded with validation) plus the residual afterwards is gradient + residual
    before, bit for bit, at every step (error feedback exact with fp8 values)."""
    shapes = [(60, 50), (7,), (20000,), (40000,), (15000,), (30,)]
    groups = [3, 3]
    configs = [(torch.bfloat16, "int32"), (torch.float8_e4m3fn, "delta"),
               (torch.bfloat16, "delta"), (torch.float8_e4m3fn, "int32")]
    for exchange in ("allgather", "reduce_scatter"):
        moved = {}
        for value_dtype, encoding in configs:
            params = [torch.nn.Parameter(torch.zeros(sh)) for sh in shapes]
            names = [f"p{i}" for i in range(len(params))]
            state = DCTState(ratio=0.02, warmup_steps=0, refresh_every=3, min_numel=16,
                             value_dtype=value_dtype, index_encoding=encoding,
                             exchange=exchange, module=list(zip(names, params)))
            total = 0.0
            for step in range(steps):
                g = rank_generator(31, rank, step)
                grads = [torch.randn(sh, generator=g) * 10.0 ** (i % 3 - 1)
                         for i, sh in enumerate(shapes)]
                buckets = _buckets_of(params, grads, groups)
                before = state.state_dict()["params"]
                locals_ = [b.buffer().clone() for b in buckets]
                with WireTap(world) as tap:
                    results = run_step(state, buckets)
                total += tap.sent + tap.received
                what = f"{exchange} {value_dtype} {encoding} step {step}"
                for b, result in enumerate(results):
                    assert_same_on_all_ranks(result, f"{what} bucket {b}")
                if exchange != "allgather" or step == 0:
                    continue  # (step 0: DDP's first layout is still being checked)
                after = state.state_dict()["params"]
                rows = tap.of("all_gather")
                assert len(rows) == len(buckets), what
                for row, bucket in zip(rows, buckets):
                    # The row's size from the design's byte table (tests/oracle_codec.py).
                    numels = [p.numel() for p in bucket.parameters()]
                    capacity = sum(min(n, math.ceil(1.5 * math.ceil(0.02 * n)))
                                   for n in numels if n >= 16)
                    scales = len(numels) if value_dtype == torch.float8_e4m3fn else 0
                    want = oc.layout(capacity, value_dtype, encoding == "delta", scales)[4] \
                        if (value_dtype, encoding) != (torch.bfloat16, "int32") else \
                        (32 + 4 * capacity + 15) // 16 * 16 + (2 * capacity + 15) // 16 * 16
                    assert row.numel() == want, (what, row.numel(), want)
                for local, row, bucket in zip(locals_, rows, buckets):
                    sent = dk.decompress(SparsePayload.from_buffer(row), validate=True)
                    offset = 0
                    for p, grad in zip(bucket.parameters(), bucket.gradients()):
                        key = names[[id(q) for q in params].index(id(p))]
                        n = p.numel()
                        if n >= 16:
                            acc = local[offset:offset + n] + before[key]["residual"]
                            assert_bitwise_equal(sent[offset:offset + n] + after[key]["residual"],
                                                 acc, f"{what} {key}: sent + residual")
                        offset += n
            stats = state.stats()
            assert _close(stats["bytes_sent"] + stats["bytes_received"], total), \
                (exchange, value_dtype, encoding, stats, total)
            moved[value_dtype, encoding] = total
        v1 = moved[torch.bfloat16, "int32"]
        if exchange == "reduce_scatter" and world > 8:
            # At tens of ranks these buckets' rows hold a few dozen slots: the fixed part
            # (header, fp8 scale section, 16-byte alignment) is most of a row, and fp8 values
            # stop paying (bench/results/CPU_x86_64_2_cores/traffic_64_ranks/README.md).
            continue
        # reduce_scatter's rows are about 1/W of a bucket each, so their fixed parts (header,
        # scales, alignment) weigh more.
        bound = 0.6 if exchange == "allgather" else 0.75
        assert moved[torch.float8_e4m3fn, "delta"] <= bound * v1, (exchange, moved)
        assert moved[torch.bfloat16, "delta"] < v1, (exchange, moved)
        assert moved[torch.float8_e4m3fn, "int32"] < v1, (exchange, moved)


# ---------------------------------------------------------------- disagreeing exchange


def check_mismatched_exchange(rank, world):
    """A rank configured with another ``exchange`` (or "auto" against the explicit choice it
    would make) gets a ValueError naming it on every rank; a bad value is refused at once."""
    last = world - 1

    def hook_once(**kwargs):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3000,), (7,))]
        g = rank_generator(25, rank)
        bucket = StandInBucket(params, [torch.randn(p.shape, generator=g) for p in params])
        run_step(DCTState(min_numel=16, warmup_steps=0, **kwargs), [bucket])

    expect_error(lambda: hook_once(
        exchange="reduce_scatter" if rank == last else "allgather"),
        "exchange", f"rank {last} has reduce_scatter", "rank 0 has allgather")
    expect_error(lambda: hook_once(exchange="auto" if rank == 0 else "allgather"),
                 "exchange", "rank 0 has auto")
    expect_error(lambda: DCTState(exchange="ring"), "exchange")
    expect_error(lambda: dk.distributed.sparse_all_reduce(torch.ones(8), 0.5, capacity=4,
                                                          exchange="ring"), "exchange")
    probe = torch.tensor([float(rank + 1)])
    dist.all_reduce(probe)
    assert probe.item() == world * (world + 1) / 2
    hook_once(exchange="reduce_scatter")


# ---------------------------------------------------- sparse_all_reduce, reduce_scatter


def check_sparse_all_reduce_refuses_before_sending(rank, world):
    """sparse_all_reduce refuses bad arguments on every rank, naming them, before it writes the
    residual or sends anything (the group then still works); with reduce_scatter and a
    residual it asks for shard_residual ("auto" takes allgather then, and loses nothing); a
    row that only one shard owner refuses (validate=True) fails that rank alone, after the
    last collective; an empty tensor goes through either exchange."""
    from dct_kernels import payload as wire
    from dct_kernels.distributed import sparse_all_reduce

    n = 2 * world + 1
    x = torch.randn(n, generator=rank_generator(27, rank)) + 3.0  # every entry passes 1.0
    r0 = torch.randn(n, generator=rank_generator(28, rank)) * 0.1
    bad = [  # (call's changes, error type, the argument named)
        (dict(out=torch.zeros(n - 1)), ValueError, "out"),
        (dict(out=torch.zeros(n, dtype=torch.float64)), TypeError, "out"),
        (dict(capacity=2 ** 40), ValueError, "capacity"),
        (dict(capacity="4"), TypeError, "capacity"),
        (dict(value_dtype="bf16"), TypeError, "value_dtype"),
        (dict(average="yes"), TypeError, "average"),
        (dict(shard_threshold="bad"), TypeError, "shard_threshold"),
        (dict(shard_residual=torch.zeros(n - 1)), ValueError, "shard_residual"),
        (dict(exchange="reduce_scatter"), ValueError, "shard_residual"),
    ]
    for change, error, name in bad:
        for exchange in ("allgather", "reduce_scatter", "auto"):
            kwargs = dict(capacity=n, residual=r0.clone(), exchange=exchange)
            kwargs.update(change)
            if "shard_residual" not in kwargs and name != "shard_residual":
                kwargs["shard_residual"] = torch.zeros(n)
            residual = kwargs["residual"]
            try:
                sparse_all_reduce(x, 1.0, **kwargs)
            except error as caught:
                assert str(caught).startswith(f"{name}:"), (change, exchange, str(caught))
            else:
                raise AssertionError(f"{change} with {exchange}: no {error.__name__}")
            assert_bitwise_equal(residual, r0, f"{change} with {exchange}: residual written")
    # "auto" with a residual and no shard_residual: allgather, nothing lost.
    residual = r0.clone()
    out, _ = sparse_all_reduce(x, 1.0, capacity=n, residual=residual, exchange="auto")
    sent = gather((x + r0) - residual)
    mean = torch.zeros(n)
    for row in sent:
        mean = mean + row
    assert_bitwise_equal(out, mean / torch.tensor(float(world)), "auto without shard_residual")
    # A row refused by its shard owner only (the last rank): it raises, the others finish.
    original, calls = dist.all_to_all_single, []

    def tampered(out, inp, *args, **kwargs):
        work = original(out, inp, *args, **kwargs)
        calls.append(1)
        if rank == world - 1 and len(calls) == 1:
            work.wait()
            header = out.view(world, -1)[0, :wire.HEADER_BYTES].view(torch.int32)
            header[wire.WORD_COUNT] = 10 ** 6
        return work

    dist.all_to_all_single = tampered
    try:
        result = sparse_all_reduce(x, 1.0, capacity=n, exchange="reduce_scatter",
                                   validate=True)
    except ValueError as caught:
        result = caught
    finally:
        dist.all_to_all_single = original
    if rank == world - 1:
        assert isinstance(result, ValueError) and "invalid payload" in str(result), result
    else:
        assert isinstance(result, tuple), result
    for exchange in ("allgather", "reduce_scatter", "auto"):
        empty = torch.zeros(0)
        out, payload = sparse_all_reduce(empty, 1.0, capacity=3, residual=torch.zeros(0),
                                         shard_residual=torch.zeros(0), exchange=exchange)
        assert out.numel() == 0 and int(payload.count) == 0, exchange
    out, _ = sparse_all_reduce(x, 1.0, capacity=n, exchange="allgather")  # the group works
    assert_same_on_all_ranks(out, "after the refusals")


def check_sparse_all_reduce_reduce_scatter(rank, world):
    """sparse_all_reduce(exchange="reduce_scatter") against a dense oracle with a generous
    capacity (equal shards; both levels keep what passes), EF at both levels."""
    n = 3001
    g = rank_generator(26, rank)
    x = torch.randn(n, generator=g)
    r0 = torch.randn(n, generator=g) * 0.3
    residual, shard_residual = r0.clone(), torch.zeros(n)
    out, payload = dk.distributed.sparse_all_reduce(
        x, 1.0, capacity=n, residual=residual, exchange="reduce_scatter",
        shard_threshold=0.5, shard_residual=shard_residual)
    accs = gather(x + r0)
    sent1 = torch.where(accs.abs() >= 1.0, accs, 0.0)
    assert_bitwise_equal(residual, (x + r0) - sent1[rank], "level-1 residual")
    total = torch.zeros(n)
    for row in sent1:
        total = total + row
    kept = torch.where(total.abs() >= 0.5, total, 0.0)
    lo, hi = n * rank // world, n * (rank + 1) // world
    assert_bitwise_equal(shard_residual[lo:hi], total[lo:hi] - kept[lo:hi], "level 2")
    assert int(torch.count_nonzero(shard_residual[:lo])) == 0
    assert_bitwise_equal(out, kept / torch.tensor(float(world)), "result")
    assert int(payload.overflow) == 0
    expect_error(lambda: dk.distributed.sparse_all_reduce(
        x, 1.0, capacity=10, segments=torch.tensor([0, 5, n]), exchange="reduce_scatter"),
        "segments")
    expect_error(lambda: dk.distributed.sparse_all_reduce(
        x, 1.0, capacity=n, value_dtype=torch.float8_e4m3fn, exchange="reduce_scatter"),
        "value_dtype")
    # "auto" sends what reduce_scatter does not take (segments, fp8 values) by allgather, at
    # any W (from W = 4 it would otherwise pick reduce_scatter and raise).
    segments = torch.tensor([0, 1000, n])
    taus = torch.tensor([0.8, 1.2])
    for kwargs in (dict(segments=segments), dict(value_dtype=torch.float8_e4m3fn),
                   dict(segments=segments, value_dtype=torch.float8_e4m3fn)):
        threshold = taus if "segments" in kwargs else 1.0
        results = {}
        for exchange in ("allgather", "auto"):
            residual = r0.clone()
            out, payload = dk.distributed.sparse_all_reduce(
                x, threshold, capacity=n, residual=residual, exchange=exchange, **kwargs)
            # Exact error feedback: what each rank sent is its gradient + residual minus
            # what stays; the result is their rank-order mean.
            sent = gather((x + r0) - residual)
            mean = torch.zeros(n)
            for row in sent:
                mean = mean + row
            assert_bitwise_equal(out, mean / torch.tensor(float(world)), f"{kwargs} mean")
            assert int(payload.count) > 0 and int(payload.overflow) == 0
            results[exchange] = (out, residual)
        assert_bitwise_equal(results["auto"][0], results["allgather"][0], f"{kwargs} auto")
        assert_bitwise_equal(results["auto"][1], results["allgather"][1], f"{kwargs} res")


# --------------------------------------------- DDP: unused parameters, sparse embeddings


class _Sparse(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(27)
        self.emb = torch.nn.Embedding(5000, 8)
        self.hidden = torch.nn.Linear(8, 64)
        self.unused = torch.nn.Linear(64, 64)
        self.out = torch.nn.Linear(64, 1)

    def forward(self, idx):
        return self.out(torch.tanh(self.hidden(self.emb(idx).mean(1)))).squeeze(-1)


def check_unused_and_embedding(rank, world, steps=30):
    """DDP with find_unused_parameters=True, an unused layer and an embedding whose batches
    touch few rows (fewer nonzeros than its k): every used parameter's entries are sent every
    step (the embedding's: all its nonzeros), nothing is sent for the unused layer, no zero
    is sent, and early refreshes stay at a few beyond the scheduled ones. Both exchanges."""
    for exchange in ("allgather", "reduce_scatter"):
        model = _Sparse()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        state = DCTState(ratio=0.01, warmup_steps=0, refresh_every=10, min_numel=256,
                         refresh_patience=2, exchange=exchange, module=model)
        ddp.register_comm_hook(state, dct_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        explained = hidden_arrived = 0
        for step in range(steps):
            g = rank_generator(28, rank, step)
            idx = torch.randint(0, 5000, (8, 3), generator=g)
            y = torch.randn(8, generator=g)
            with WireTap(world) as tap:
                loss = (ddp(idx) - y).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
            rows = tap.of("all_gather") if exchange == "allgather" else tap.of("all_to_all")
            values = torch.cat([live_values(r) for row in rows
                                for r in (row.view(world, -1) if exchange != "allgather"
                                          else row[None])])
            assert bool((values != 0).all()), f"step {step}: a zero was sent"
            optimizer.step()
            assert model.unused.weight.grad is None or \
                int(torch.count_nonzero(model.unused.weight.grad)) == 0
            saved = state.state_dict()["params"]
            # Each rank sent all of the embedding's nonzeros (nothing left in its residual).
            assert int(torch.count_nonzero(saved["emb.weight"]["residual"])) == 0, step
            if exchange == "allgather":
                # ... so every touched row arrives (with reduce_scatter the shard owner then
                # keeps k of the sum of W ranks' rows, by design).
                touched = torch.unique(gather(idx).reshape(-1))
                emb_grad = model.emb.weight.grad
                assert bool((emb_grad[touched].abs().sum(1) > 0).all()), step
            hidden_arrived += int(torch.count_nonzero(model.hidden.weight.grad)) > 0
            # The band is the bucket's and leaves out parameters at the floor (the embedding,
            # the unused layer): only the normal parameter (k = 6, fresh random gradients
            # each step) can take the bucket out of it.
            explained += bool(saved["hidden.weight"]["refresh_pending"]) and step + 1 < steps
        stats = state.stats()
        assert saved["emb.weight"]["threshold"].item() == FLOOR, saved["emb.weight"]
        assert saved["unused.weight"]["threshold"].item() == FLOOR
        assert torch.count_nonzero(saved["emb.weight"]["residual"]) == 0
        # The normal parameter is not crowded out: allgather delivers it on all but a few
        # steps (a step right after τ rose may keep everything in the residual);
        # reduce_scatter's second threshold may hold a step's small sum back in the owner's
        # shard residual.
        assert hidden_arrived >= (steps - 3 if exchange == "allgather" else steps // 2), \
            hidden_arrived
        # Every early refresh follows a step where the normal parameter asked for it.
        assert stats["early_refreshes"] <= explained, (explained, stats)
        # Scheduled refreshes count from the last refresh, early ones included.
        assert 1 <= stats["bucket_refreshes"] - stats["early_refreshes"] <= 3, stats
        assert stats["overflow"] == 0, stats
        assert_same_on_all_ranks(torch.cat([p.detach().reshape(-1)
                                            for p in model.parameters()]), exchange)


# ------------------------------------------------------------------ checkpoint and resume


def check_resume_reduce_scatter(rank, world, steps=10, split=4):
    """reduce_scatter, two buckets, bf16 wire: a run checkpointed after ``split`` steps
    (state_dict through torch.save / torch.load(weights_only=True)) and resumed in a fresh
    DCTState continues bit for bit — results every step, level-1 and shard residuals,
    thresholds, schedules, statistics — with the same bucket layouts (with DDP, the first
    iteration of a fresh DDP buckets parameters in registration order, so its shards differ
    from those of the checkpointed run's rebuilt buckets: see docs/distributed.md)."""
    import io

    shapes = [(3000,), (40,), (2500,), (4000,)]
    kwargs = dict(ratio=0.02, warmup_steps=1, refresh_every=3, min_numel=64,
                  value_dtype=torch.bfloat16, exchange="reduce_scatter")

    def fresh():
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        return params, DCTState(module=[(f"p{i}", p) for i, p in enumerate(params)], **kwargs)

    def run(params, state, first, last):
        outs = []
        for step in range(first, last):
            g = rank_generator(29, rank, step)
            grads = [torch.randn(s, generator=g) * (1 + (step % 3 == 0) * 4) for s in shapes]
            outs.append([o.clone() for o in run_step(state, _buckets_of(params, grads,
                                                                        [3, 1]))])
        return outs

    params, straight = fresh()
    want = run(params, straight, 0, steps)
    params, state = fresh()
    got = run(params, state, 0, split)
    blob = io.BytesIO()
    torch.save(state.state_dict(), blob)
    blob.seek(0)
    params, state = fresh()
    state.load_state_dict(torch.load(blob, weights_only=True))
    got += run(params, state, split, steps)
    for step, (a, b) in enumerate(zip(got, want)):
        for bucket, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"step {step} bucket {bucket}")
    a, b = state.state_dict(), straight.state_dict()
    assert a["stats"] == b["stats"] and a["step"] == b["step"] == steps
    for key, entry in a["params"].items():
        other = b["params"][key]
        assert_bitwise_equal(entry["residual"], other["residual"], key)
        assert (entry["shard"] is None) == (other["shard"] is None), key
        if entry["shard"] is not None:
            for field in ("residual", "threshold"):
                assert_bitwise_equal(entry["shard"][field], other["shard"][field], key)
            assert entry["shard"]["refreshed_at"] == other["shard"]["refreshed_at"], key
            assert entry["shard"]["refresh_pending"] == other["shard"]["refresh_pending"]
    assert any(e["shard"] is not None for e in a["params"].values())
    assert state.stats() == straight.stats()
