"""``ramp_steps``: DGC's warm-up, the ratio halving in stages after the dense warm-up. The
schedule itself, and the hook through it on one gloo rank: an exact top-k of every stage's k at
the stage's first step, nothing lost across the stages' layouts (gradient + residual before ==
sent + residual after, bitwise, the reduce_scatter shard residual included), and a checkpoint
taken mid-ramp resumes bit for bit. The multi-rank checks are in dist_checks.py."""

import pytest
import torch

from dct_kernels.distributed import DCTState, dct_hook
from dct_kernels.distributed.layout import k_of, share_of
from dct_kernels.distributed.stand_in import StandInBucket
from dct_kernels.distributed.state import RAMP_START, ramp_stages
from dist_harness import one_rank_group


def test_ramp_stages():
    assert RAMP_START == 0.25
    # 0.01: 0.16 (the largest 0.01 x 2^j <= 0.25), 0.08, 0.04, 0.02, 25 steps each, then 0.01.
    assert ramp_stages(0.01, 10, 100) == [(10, 0.16), (35, 0.08), (60, 0.04), (85, 0.02),
                                          (110, 0.01)]
    assert ramp_stages(0.003, 0, 200) == [(0, 0.192), (33, 0.096), (66, 0.048), (100, 0.024),
                                          (133, 0.012), (166, 0.006), (200, 0.003)]
    # Stages shorter than a step are left out; no ramp without steps or above 0.125.
    assert ramp_stages(0.01, 0, 3) == [(0, 0.08), (1, 0.04), (2, 0.02), (3, 0.01)]
    assert ramp_stages(0.01, 10, 0) == [(10, 0.01)]
    assert ramp_stages(0.2, 5, 100) == [(5, 0.2)]
    assert ramp_stages(0.125, 0, 10) == [(0, 0.25), (10, 0.125)]
    state = DCTState(ratio=0.01, warmup_steps=10, ramp_steps=100)
    got = [(state.ratio_at(t), state.stage_start(t)) for t in (0, 9, 10, 34, 35, 109, 110, 9999)]
    assert got == [(0.16, 10), (0.16, 10), (0.16, 10), (0.16, 10), (0.08, 35), (0.02, 85),
                   (0.01, 110), (0.01, 110)]
    plain = DCTState(ratio=0.01, warmup_steps=10)
    assert plain.ramp_steps == 0 and plain.ratio_at(5000) == 0.01 and plain.stage_start(7) == 10


@pytest.mark.parametrize("value", [-1, 2.5, True, "10"])
def test_ramp_steps_must_be_a_count(value):
    with pytest.raises(ValueError, match="ramp_steps"):
        DCTState(ramp_steps=value)


SHAPES = [(3000,), (40, 50), (7,)]  # sparse, sparse, dense (under min_numel)
KWARGS = dict(ratio=0.01, warmup_steps=2, ramp_steps=8, value_dtype=torch.float32,
              refresh_every=1000)
# ramp_stages(0.01, 2, 8): 0.16 from step 2, 0.08 from 4, 0.04 from 6, 0.02 from 8, 0.01 from 10
STAGE_STARTS = {2: 0.16, 4: 0.08, 6: 0.04, 8: 0.02, 10: 0.01}
STEPS = 14


def _gradients(seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (1 + step % 3) for s in SHAPES]
            for step in range(STEPS)]


def _carried(state, key):
    """(parameter residual, the reduce_scatter shard residual in parameter positions) of
    ``key``, from the state's own checkpoint (fp32, host)."""
    entry = state.state_dict()["params"].get(key)
    numel = 1
    for d in SHAPES[int(key.split(".")[1])]:
        numel *= d
    residual = torch.zeros(numel) if entry is None else entry["residual"].clone()
    shard = torch.zeros(numel)
    if entry is not None and entry["shard"] is not None:
        start = entry["shard"]["start"]
        piece = entry["shard"]["residual"]
        shard[start:start + piece.numel()] = piece
    return residual, shard


def _run(exchange, params, grads, steps, state=None, check=None):
    state = state or DCTState(exchange=exchange, **KWARGS)
    outs = []
    for step in steps:
        bucket = StandInBucket(params, [g.clone() for g in grads[step]])
        before = [_carried(state, f"param.{i}") for i in range(len(SHAPES))]
        out = dct_hook(state, bucket).wait().clone()
        outs.append(out)
        if check is not None:
            check(state, step, grads[step], before, out)
    return state, outs


@pytest.fixture
def one_rank():
    with one_rank_group():
        yield


@pytest.mark.parametrize("exchange", ["allgather", "reduce_scatter"])
def test_ramp_through_the_hook(one_rank, exchange):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    grads = _gradients(3)
    sizes = [p.numel() for p in params]

    def check(state, step, grad, before, out):
        pieces = torch.split(out, sizes)
        kept, capacity = 0, 0
        for i, (g, got) in enumerate(zip(grad, pieces)):
            g = g.reshape(-1)
            if i == 2 or step < KWARGS["warmup_steps"]:
                assert torch.equal(got, g + before[i][0] + before[i][1]), (step, i)
                continue
            acc = g + before[i][0]
            residual, shard = _carried(state, f"param.{i}")
            # Nothing is lost: what arrived plus what waits is what there was (W = 1: the
            # shard owner's sum is this rank's own payload).
            assert torch.equal(got + residual + shard, acc + before[i][1]), (step, i)
            ratio = state.ratio_at(step)
            k = k_of(g.numel(), ratio)
            kept += int((got != 0).sum())
            capacity += share_of(k, g.numel(), 1.5)
            if step in STAGE_STARTS and exchange == "allgather":
                # Each stage starts with an exact top-k of its own k.
                assert ratio == STAGE_STARTS[step]
                want = torch.zeros_like(acc)
                top = acc.abs().topk(k).indices
                want[top] = acc[top]
                assert torch.equal(got, want), (step, i, k)
        assert kept <= capacity, (step, kept, capacity)  # the stage's wire capacity

    state, _ = _run(exchange, params, grads, range(STEPS), check=check)
    stats = state.stats()
    assert stats["bucket_refreshes"] == len(STAGE_STARTS) and stats["early_refreshes"] == 0
    if exchange == "reduce_scatter":
        assert stats["shard_refreshes"] == len(STAGE_STARTS)
    # The stages' layouts are gone; the steady ratio's alone holds the residuals.
    sparse = [layout for layout in state.layouts.values() if layout.has_sparse]
    assert [layout.ratio for layout in sparse] == [0.01]
    # Over the run the ramp kept more than the ratio, as it should.
    assert stats["kept_density"] > 0.02


def test_a_bucket_of_dense_parameters_keeps_one_layout(one_rank):
    """A bucket whose parameters all go dense has one layout through the ramp's stages (made,
    and checked across ranks, once), and a layout that DDP's rebuilt buckets replace (one
    holding a parameter of a new layout) is dropped."""
    small = [torch.nn.Parameter(torch.zeros(s)) for s in ((7,), (30,))]
    big = torch.nn.Parameter(torch.zeros(3000))
    state = DCTState(**KWARGS)
    g = torch.Generator().manual_seed(4)
    seen = []
    for step in range(STEPS):
        grads = [torch.randn(p.shape, generator=g) for p in small]
        out = dct_hook(state, StandInBucket(small, [x.clone() for x in grads])).wait()
        assert torch.equal(out, torch.cat(grads)), step  # dense: the gradient itself (W = 1)
        seen.append(next(iter(state.layouts.values())))
    assert all(layout is seen[0] for layout in seen) and len(state.layouts) == 1
    # Rebuilt: the small parameters now share a bucket with a sparse one.
    params = small + [big]
    dct_hook(state, StandInBucket(params, [torch.randn(p.shape, generator=g)
                                           for p in params])).wait()
    assert list(state.layouts.values())[0].keys == ["param.0", "param.1", "param.2"]
    assert len(state.layouts) == 1


@pytest.mark.parametrize("exchange", ["allgather", "reduce_scatter"])
@pytest.mark.parametrize("split", [5, 6, 10])
def test_ramp_resumes_bit_for_bit(one_rank, exchange, split):
    """Checkpoints mid-stage (5), at a stage's first step (6) and at the steady ratio's (10)."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    grads = _gradients(4)
    straight, outs = _run(exchange, params, grads, range(STEPS))
    first, _ = _run(exchange, params, grads, range(split))
    saved = first.state_dict()
    resumed = DCTState(exchange=exchange, **KWARGS)
    resumed.load_state_dict(saved)
    resumed, rest = _run(exchange, params, grads, range(split, STEPS), state=resumed)
    for step, (a, b) in enumerate(zip(rest, outs[split:]), start=split):
        assert torch.equal(a, b), step
    a, b = resumed.state_dict(), straight.state_dict()
    assert a["stats"] == b["stats"]
    for key in b["params"]:
        assert torch.equal(a["params"][key]["residual"], b["params"][key]["residual"]), key
    # Another ramp is another configuration.
    with pytest.raises(ValueError, match="ramp_steps"):
        DCTState(exchange=exchange, **dict(KWARGS, ramp_steps=9)).load_state_dict(saved)
