"""dct_kernels.distributed on CPU: argument checks and layout arithmetic in this process, and
the multi-process checks (tests/dist_checks.py) in one spawned gloo group of 2 ranks and one
of 4, each running several checks (process start-up dominates the time)."""

import pickle

import pytest
import torch

from dct_kernels.distributed import DCTState, dct_hook, sparse_all_reduce
from dct_kernels.distributed.layout import BucketLayout, k_of, share_of
from dct_kernels.distributed.stand_in import StandInBucket
from dist_harness import one_rank_group, spawned_checks

# ---------------------------------------------------------------------- in this process


@pytest.mark.parametrize("kwargs, name", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.01), "ratio"), (dict(ratio=float("nan")), "ratio"),
    (dict(ratio="0.1"), "ratio"), (dict(refresh_every=0), "refresh_every"),
    (dict(refresh_every=2.0), "refresh_every"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(capacity_factor=0.99), "capacity_factor"), (dict(min_numel=-1), "min_numel"),
    (dict(value_dtype=torch.float64), "value_dtype"), (dict(value_dtype="fp16"), "value_dtype"),
    (dict(refresh_band=(1.1, 2.0)), "refresh_band"), (dict(refresh_band=(0.5, 0.9)),
                                                       "refresh_band"),
    (dict(refresh_band=0.5), "refresh_band"), (dict(backend="numpy"), "backend"),
    (dict(refresh_patience=0), "refresh_patience"), (dict(refresh_patience=2.5),
                                                     "refresh_patience"),
    (dict(refresh_patience=True), "refresh_patience"),
    (dict(min_k=0), "min_k"), (dict(min_k=2.5), "min_k"), (dict(min_k=True), "min_k"),
    (dict(dense_rows=-1), "dense_rows"), (dict(dense_rows=1.5), "dense_rows"),
    (dict(dense_rows=True), "dense_rows"),
    (dict(refresh_every=2 ** 63), "refresh_every"), (dict(min_numel=2 ** 62), "min_numel"),
    (dict(validate="no"), "validate"), (dict(validate=1), "validate"),
    (dict(process_group="world"), "process_group"),
    (dict(module=5), "module"), (dict(module="ab"), "module"),
    (dict(module={"w": torch.zeros(2)}), "module"),
    (dict(module=[torch.nn.Parameter(torch.zeros(2, 3))]), "module"),
    (dict(module=[("w", 3.0)]), "module"), (dict(module=[(1, torch.zeros(2))]), "module"),
])
def test_state_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DCTState(**kwargs)


def test_checkpoint_names_must_be_the_models():
    """With module=, a checkpoint whose parameter names are not the model's (the DDP wrapper's
    "module." prefix against the bare model's names) or whose sizes differ is refused at
    load_state_dict, not found out later with the residuals lost; a malformed entry raises
    ValueError naming the parameter."""
    lin = torch.nn.Linear(3, 2)
    saved = {"version": 1, "config": DCTState().config(), "step": 5,
             "params": {"module.weight": {"numel": 6, "residual": torch.arange(6.0),
                                          "threshold": torch.tensor([0.5]),
                                          "refreshed_at": 4, "refresh_pending": False}}}
    with pytest.raises(ValueError, match=r"not among the named parameters.*module\.weight"):
        DCTState(module=lin).load_state_dict(saved)
    wrapped = torch.nn.Sequential()
    wrapped.add_module("module", lin)
    state = DCTState(module=wrapped)
    state.load_state_dict(saved)
    assert torch.equal(state.state_dict()["params"]["module.weight"]["residual"],
                       torch.arange(6.0))
    entry = saved["params"]["module.weight"]
    grown = dict(saved, params={"module.weight": dict(entry, numel=7,
                                                      residual=torch.arange(7.0))})
    with pytest.raises(ValueError, match="has 7 elements, this model's has 6"):
        DCTState(module=wrapped).load_state_dict(grown)
    for broken in ({k: v for k, v in entry.items() if k != "refresh_pending"},
                   dict(entry, threshold=torch.tensor([0.5, 0.5])),
                   dict(entry, residual=None)):
        with pytest.raises(ValueError, match="'module.weight': malformed"):
            DCTState(module=wrapped).load_state_dict(dict(saved,
                                                          params={"module.weight": broken}))


def test_an_unpickled_state_keyed_by_name_asks_for_the_model():
    """A pickle keeps the settings (validate and backend too) and the name-keyed states, not
    the model: stepping the copy raises ValueError naming module (before, it re-keyed the
    parameters by order and their residuals were lost); its state_dict loads into a state
    given the model, which then steps exactly as the original does."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3000,), (40, 50))]
    named = [("a", params[0]), ("b", params[1])]
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    with one_rank_group():
        state = DCTState(ratio=0.01, warmup_steps=1, module=named, validate=True,
                         backend="torch")
        for step in range(2):
            dct_hook(state, StandInBucket(params, [x.clone() for x in grads[step]])).wait()
        copy = pickle.loads(pickle.dumps(state))
        assert copy.validate is True and copy.backend == "torch"
        with pytest.raises(ValueError, match="module"):
            dct_hook(copy, StandInBucket(params, [x.clone() for x in grads[2]]))
        resumed = DCTState(ratio=0.01, warmup_steps=1, module=named, validate=True,
                           backend="torch")
        resumed.load_state_dict(copy.state_dict())
        for step in (2, 3):
            want = dct_hook(state, StandInBucket(params, [x.clone() for x in grads[step]]))
            got = dct_hook(resumed, StandInBucket(params, [x.clone() for x in grads[step]]))
            assert torch.equal(want.wait(), got.wait()), step


def test_state_accepts_the_documented_range():
    for value_dtype in (None, torch.float32, torch.float16, torch.bfloat16):
        DCTState(ratio=1, refresh_every=1, warmup_steps=0, capacity_factor=1,
                 min_numel=0, value_dtype=value_dtype)
    state = DCTState(capacity_factor=2.5)
    assert state.refresh_band == (0.5, 2.5)
    assert state.refresh_patience == 32 and DCTState(refresh_patience=1).refresh_patience == 1
    assert state.config()["value_dtype"] == "None"


def test_k_and_capacity_share():
    # Documented k = max(1, ceil(ratio x numel)) with the product in float64, as in the oracle of
    # dist_checks: 0.07 * 100 is 7.000000000000001 there, 0.07 * 200 is 14.000000000000002.
    assert k_of(100, 0.07) == 8
    assert k_of(200, 0.07) == 15
    assert k_of(1000, 0.07) == 70
    assert k_of(300, 0.1) == 30
    assert k_of(1000, 0.01) == 10
    assert k_of(5, 0.01) == 1
    assert k_of(12345, 1.0) == 12345
    # min_k: a floor on k, never above the parameter's size.
    assert k_of(100, 0.003, 4) == 4 and k_of(3, 0.003, 4) == 3 and k_of(1, 0.003, 4) == 1
    assert k_of(10000, 0.003, 4) == 30 and k_of(10000, 0.003, 1) == 30
    assert share_of(10, 1000, 1.5) == 15
    assert share_of(7, 10, 1.5) == 10    # never more than the parameter
    assert share_of(3, 1000, 1.1) == 4   # ceil(3.3)
    assert share_of(50, 1000, 1.1) == 56  # 1.1 * 50 is 55.00000000000001 in float64


def test_bucket_layout():
    layout = BucketLayout(["a", "b", "c", "d"], [1000, 10, 2000, 3], [True, False, True, False],
                          ratio=0.01, capacity_factor=1.5, band=(0.5, 1.5),
                          dtype=torch.float32, device=torch.device("cpu"))
    assert layout.offsets.tolist() == [0, 1000, 1010, 3010, 3013]
    assert layout.ks == [10, 1, 20, 1]
    assert layout.capacity == 15 + 30
    assert layout.sparse_numel == 3000 and layout.dense_numel == 13
    assert layout.dense_index.tolist() == list(range(1000, 1010)) + [3010, 3011, 3012]
    assert layout.band_low.tolist() == [5, 1, 10, 1]
    assert layout.band_high.tolist() == [15, 1, 30, 1]


def test_sends_sparse_by_size_and_by_rows():
    """min_numel decides by size; with min_numel > 0 a table of at most dense_rows rows (two or
    more dimensions) goes dense whatever its size; 1-D parameters are decided by size alone."""
    def sparse(state, *shapes):
        return [state.sends_sparse(torch.nn.Parameter(torch.zeros(s))) for s in shapes]

    shapes = [(2, 512), (8, 200), (9, 200), (2, 100), (1, 5000), (3, 4, 10, 10), (9, 4, 10, 10),
              (1024,), (1023,), (4096,), (30522, 8)]
    assert sparse(DCTState(), *shapes) == [False, False, True, False, False, False, True,
                                           True, False, True, True]
    assert DCTState().dense_rows == 8
    # dense_rows = 0: by size alone (the behaviour before the setting existed).
    assert sparse(DCTState(dense_rows=0), *shapes) == [True, True, True, False, True, True, True,
                                                       True, False, True, True]
    # min_numel = 0: every parameter sparse, few-row tables included.
    assert all(sparse(DCTState(min_numel=0), *shapes, (1, 1), (2,)))
    # The bound is inclusive, and compared with the first dimension only.
    assert sparse(DCTState(dense_rows=2, min_numel=1), (2, 512), (3, 512), (512, 2)) == \
        [False, True, True]


def test_few_row_tables_travel_dense_through_the_hook():
    """One exact step on one rank, ratio 0.01: a [2, 600] table comes back whole (dense), a
    [40, 30] matrix as its 12 largest magnitudes, a 1000-element vector (under min_numel) whole;
    with dense_rows = 0 the table is thresholded like the matrix."""
    shapes = [(2, 600), (40, 30), (1000,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    g = torch.Generator().manual_seed(11)
    grads = [torch.randn(s, generator=g) for s in shapes]

    def top(grad, k):
        flat = grad.reshape(-1)
        want = torch.zeros_like(flat)
        idx = flat.abs().topk(k).indices
        want[idx] = flat[idx]
        return want

    outs = {}
    with one_rank_group():
        for rows in (8, 0):
            state = DCTState(ratio=0.01, warmup_steps=0, exchange="allgather",
                             dense_rows=rows)
            bucket = StandInBucket(params, [x.clone() for x in grads])
            outs[rows] = dct_hook(state, bucket).wait().clone()
    for rows, want in ((8, [grads[0].reshape(-1), top(grads[1], 12), grads[2]]),
                       (0, [top(grads[0], 12), top(grads[1], 12), grads[2]])):
        got = torch.split(outs[rows], [x.numel() for x in grads])
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), (rows, shapes[i])


class _WithEmpty(torch.nn.Module):
    """A layer and a parameter of no elements (a zero-width slot, as a model with an optional
    part switched off has): DDP buckets both."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(40, 50)
        self.none = torch.nn.Parameter(torch.zeros(0, 50))
        self.register_buffer("mix", torch.randn(8, 50))  # no ties among the gradients

    def forward(self, x):
        return (self.lin(x) * self.mix).sum() + self.none.sum()


@pytest.mark.parametrize("exchange", ["allgather", "reduce_scatter"])
def test_a_parameter_of_no_elements_is_carried_through(exchange):
    """Through DDP on one rank: the empty parameter gets no segment and no state, the others
    are sent as without it (warm-up: whole; then the weight's exact top-20 at ratio 0.01, the
    50-element bias under min_numel whole at every step), and a bucket holding nothing comes
    back as is."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = _WithEmpty()
    x = torch.randn(8, 40)
    with one_rank_group():
        ddp = DistributedDataParallel(model)
        state = DCTState(ratio=0.01, warmup_steps=1, exchange=exchange, module=model)
        ddp.register_comm_hook(state, dct_hook)
        for step in range(3):
            weight_grad, bias_grad = torch.autograd.grad(model(x), [model.lin.weight,
                                                                     model.lin.bias])
            ddp.zero_grad()
            ddp(x).backward()
            got = model.lin.weight.grad.reshape(-1)
            assert torch.equal(model.lin.bias.grad, bias_grad)
            want = weight_grad.reshape(-1)
            if step == 1:  # the first sparse step: an exact τ on an empty residual
                top = want.abs().topk(20).indices
                want = torch.zeros_like(want).index_copy_(0, top, want[top])
            if step < 2:
                assert torch.equal(got, want)
            else:  # an estimated τ: within the wire's capacity (1.5 k)
                assert 0 < (got != 0).sum() <= 30
        assert set(state.state_dict()["params"]) == {"lin.weight"}
        empty = torch.nn.Parameter(torch.zeros(0))
        out = dct_hook(state, StandInBucket([empty], [torch.zeros(0)])).wait()
        assert out.numel() == 0


def test_sparse_all_reduce_needs_a_capacity():
    with pytest.raises(ValueError, match="capacity"):
        sparse_all_reduce(torch.randn(10), 0.5, capacity=None)


def test_min_k_floors_each_parameters_kept_count():
    """One exact step on one rank: with min_k = 4 a 64-element parameter at ratio 0.003 sends
    its 4 largest magnitudes (not 1), a 1000-element one 4 (not ceil(3)), a 3000-element one
    ceil(9) = 9, a 2-element one both entries; nothing else arrives."""
    shapes = [(64,), (1000,), (3000,), (2,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(s, generator=g) for s in shapes]
    with one_rank_group():
        state = DCTState(ratio=0.003, min_k=4, warmup_steps=0, min_numel=0,
                         exchange="allgather", value_dtype=torch.float32)
        out = dct_hook(state, StandInBucket(params, grads)).wait()
    offset = 0
    for grad, k in zip(grads, (4, 4, 9, 2)):
        want = torch.zeros_like(grad)
        top = grad.abs().topk(k).indices
        want[top] = grad[top]
        assert torch.equal(out[offset:offset + grad.numel()], want), k
        offset += grad.numel()


def test_state_dict_round_trip_without_a_group():
    state = DCTState(ratio=0.05, module=[("w", torch.nn.Parameter(torch.zeros(3)))])
    saved = {"version": 1, "config": state.config(), "step": 7,
             "params": {"w": {"numel": 3, "residual": torch.tensor([1.0, -2.0, 3.0]),
                              "threshold": torch.tensor([0.5]), "refreshed_at": 4,
                              "refresh_pending": True}},
             "stats": {"refreshes": 2, "kept": 9}}
    state.load_state_dict(saved)
    again = state.state_dict()
    assert again["step"] == 7 and again["params"]["w"]["refresh_pending"] is True
    assert torch.equal(again["params"]["w"]["residual"], torch.tensor([1.0, -2.0, 3.0]))
    assert again["stats"]["refreshes"] == 2 and again["stats"]["kept"] == 9
    assert state.stats()["kept"] == 9
    copy = pickle.loads(pickle.dumps(state))
    assert copy.state_dict()["step"] == 7 and copy.ratio == 0.05
    with pytest.raises(ValueError, match="ratio"):
        DCTState(ratio=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match="version"):
        state.load_state_dict(dict(saved, version=99))
    bad = dict(saved, params={"w": dict(saved["params"]["w"], numel=4)})
    with pytest.raises(ValueError, match="residual"):
        state.load_state_dict(bad)
    # min_k is part of the saved configuration; a checkpoint from before it ran with 1.
    with pytest.raises(ValueError, match="min_k"):
        DCTState(ratio=0.05, min_k=4).load_state_dict(saved)
    older = dict(saved, config={k: v for k, v in saved["config"].items() if k != "min_k"})
    DCTState(ratio=0.05, module=[("w", torch.nn.Parameter(torch.zeros(3)))]).load_state_dict(
        older)
    with pytest.raises(ValueError, match="min_k: saved 1"):
        DCTState(ratio=0.05, min_k=4).load_state_dict(older)
    # So is dense_rows; a checkpoint from before it decided by size alone (dense_rows 0).
    before = dict(saved, config={k: v for k, v in saved["config"].items() if k != "dense_rows"})
    with pytest.raises(ValueError, match="dense_rows: saved 0, this state 8"):
        DCTState(ratio=0.05).load_state_dict(before)
    DCTState(ratio=0.05, dense_rows=0,
             module=[("w", torch.nn.Parameter(torch.zeros(3)))]).load_state_dict(before)


def test_a_loaded_state_saved_again_keeps_the_layouts():
    """state_dict() between load_state_dict() and the first step writes the loaded layouts, in
    their order (a checkpoint of a checkpoint still regroups a fresh DDP's first step); with
    module=, a saved layout holding a name the model lacks is dropped at the load."""
    named = [(name, torch.nn.Parameter(torch.zeros(3))) for name in ("u", "v", "w")]
    entry = {"numel": 3, "residual": torch.tensor([1.0, -2.0, 3.0]),
             "threshold": torch.tensor([0.5]), "refreshed_at": 4, "refresh_pending": False}
    state = DCTState(ratio=0.05, module=named)
    saved = {"version": 2, "config": state.config(), "step": 7,
             "params": {name: dict(entry) for name, _ in named}, "stats": {},
             "layouts": [["w"], ["v", "u"]]}
    state.load_state_dict(saved)
    assert state.state_dict()["layouts"] == [["w"], ["v", "u"]]
    fewer = DCTState(ratio=0.05, module=named[1:])
    fewer.load_state_dict(dict(saved, params={k: v for k, v in saved["params"].items()
                                              if k != "u"}))
    assert fewer.state_dict()["layouts"] == [["w"]]


def test_stand_in_bucket():
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))]
    grads = [torch.arange(6.0).view(2, 3), torch.arange(6.0, 10.0)]
    bucket = StandInBucket(params, grads, last=False, index=3)
    assert torch.equal(bucket.buffer(), torch.arange(10.0)) and bucket.buffer().is_contiguous()
    assert [g.shape for g in bucket.gradients()] == [(2, 3), (4,)]
    assert all(torch.equal(g, want) for g, want in zip(bucket.gradients(), grads))
    assert bucket.parameters() == params and not bucket.is_last() and bucket.index() == 3
    flat = torch.zeros(10)
    bucket = StandInBucket(params, flat)  # a flat tensor is the buffer itself, not a copy
    assert bucket.buffer() is flat and bucket.is_last() and bucket.index() == 0
    bucket.gradients()[1].fill_(1.0)
    assert flat[6:].tolist() == [1.0] * 4
    bucket.set_buffer(torch.ones(10))
    assert bucket.buffer().sum() == 10
    with pytest.raises(ValueError, match="bucket"):
        StandInBucket(params, [torch.zeros(9)]).gradients()


def test_hook_rejects_a_bucket_that_is_not_flat():
    state = DCTState(module=[("w", torch.nn.Parameter(torch.zeros(8)))])
    bucket = StandInBucket(state._held, [torch.zeros(9)])
    with pytest.raises(ValueError, match="bucket"):
        dct_hook(state, bucket)


def test_hook_rejects_an_unnamed_parameter():
    state = DCTState(module=[("w", torch.nn.Parameter(torch.zeros(8)))])
    stranger = torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(ValueError, match="module"):
        dct_hook(state, StandInBucket([stranger], [torch.zeros(8)]))


# ---------------------------------------------------------------------- spawned groups

CHECKS_2 = ["check_sparse_all_reduce", "check_hook_ratio_one",
            "check_hook_ratio_one_reduce_scatter",
            "check_ddp_ratio_one_matches_dense", "check_ddp_sparse_audited",
            "check_hook_band_and_excursions", "check_checkpoint_resume",
            "check_checkpoint_resume_reduce_scatter", "check_checkpoint_resume_regrouped",
            "check_ramp_resume_regrouped", "check_resume_after_model_change",
            "check_mismatched_configurations", "check_convergence"]
CHECKS_4 = ["check_sparse_all_reduce", "check_hook_ratio_one",
            "check_hook_ratio_one_reduce_scatter",
            "check_ddp_ratio_one_matches_dense", "check_ddp_sparse_audited",
            "check_checkpoint_resume_reduce_scatter", "check_checkpoint_resume_regrouped",
            "check_ramp_resume_regrouped", "check_resume_after_model_change",
            "check_mismatched_configurations", "check_convergence_reduce_scatter"]

group_of_2, test_two_ranks = spawned_checks("dist_checks", 2, CHECKS_2)
group_of_4, test_four_ranks = spawned_checks("dist_checks", 4, CHECKS_4)
