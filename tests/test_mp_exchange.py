"""dct_kernels.mp.sparse_all_to_all across ranks (gloo), its byte count and its errors.

The ``check_*`` functions run in one spawned gloo group per world size (2 and 3 ranks,
``dist_harness``), every rank in turn; the ``test_*`` functions report them, plus the checks
that need no group (or a group of one) in this process.

Expected values never come from the package: the kept columns of each row are chosen here by
a plain Python sort (NaN first, then larger magnitude, then lower column, as docs/design.md#row-ops
orders them), kept values are rounded with ``oracle.wire_cast``, and they are routed between
the ranks by a plain dense ``all_to_all_single``. The backward pass is checked against the
routed, masked upstream gradient, and by the adjoint identity sum <G, y> = sum <grad x, x>.
Bytes are counted by wrapping ``torch.distributed.all_to_all_single``.
"""

import datetime
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

import oracle
from dist_harness import assert_check_passed, run_group
from helpers import assert_bitwise_equal

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# ------------------------------------------------------------------- independent references


def kept_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """[R, D] bool: each row's k largest magnitudes, NaN largest, ties to the lower column."""
    a = x.detach().cpu().double().numpy()
    mask = np.zeros(a.shape, dtype=bool)
    for r, row in enumerate(a):
        def rank_of(c, row=row):
            value = row[c]
            return (0, 0.0, c) if math.isnan(value) else (1, -abs(value), c)
        mask[r, sorted(range(a.shape[1]), key=rank_of)[:k]] = True
    return torch.from_numpy(mask)


def on_the_wire(x: torch.Tensor, wire_dtype: torch.dtype) -> torch.Tensor:
    """x as sent on a wire_dtype wire (saturating finite values), back in x.dtype."""
    sent = oracle.wire_cast(oracle.f32(x), wire_dtype).reshape(x.shape)
    return sent.to(x.dtype)


def dense_route(t: torch.Tensor) -> torch.Tensor:
    """Block j of t to rank j, by a plain dense all-to-all (in fp32: exact for fp16/bf16)."""
    t32 = t.float().contiguous()
    out = torch.empty_like(t32)
    dist.all_to_all_single(out, t32)
    return out.to(t.dtype)


def expected_exchange(x, k, value_dtype, upstream):
    """(forward, gradient of x) of the exchange, from the references above."""
    wire = value_dtype or x.dtype
    mask = kept_mask(x, k)
    zero = torch.zeros((), dtype=x.dtype)
    forward = dense_route(torch.where(mask, on_the_wire(x, wire), zero))
    routed_grad = dense_route(upstream)
    gradient = torch.where(mask, on_the_wire(routed_grad, wire), zero)
    return forward, gradient


def _data(kind, rows, columns, dtype, seed):
    return oracle.make_tensor(kind, rows * columns, dtype, seed).reshape(rows, columns)


def _run(x, k, value_dtype, upstream, **kwargs):
    from dct_kernels.mp import sparse_all_to_all
    xg = x.clone().requires_grad_(True)
    y = sparse_all_to_all(xg, k, value_dtype=value_dtype, **kwargs)
    y.backward(upstream)
    return y.detach(), xg.grad


# (x dtype, value_dtype, B, D, k, data kind, upstream kind); B rows for each rank.
CASES = [
    (FP32, None, 3, 50, 5, "normal", "normal"),        # fp32 + int16, odd k: padded rows
    (FP32, BF16, 4, 200, 10, "normal", "normal"),      # the 5% configuration
    (FP32, FP16, 2, 64, 7, "wide", "wide"),            # saturation on the wire, both ways
    (BF16, None, 2, 33, 4, "ties", "normal"),
    (FP16, None, 3, 17, 3, "specials", "specials"),    # NaN, inf, +-0, subnormals
    (FP32, None, 2, 9, 9, "specials", "normal"),       # k = D
    (FP32, BF16, 3, 7, 1, "ties", "normal"),           # k = 1
    (FP32, None, 2, 12, 4, "equal", "normal"),         # every magnitude tied
    (BF16, BF16, 1, 40000, 5, "normal", "normal"),     # int32 indices, odd k: padded rows
    (FP32, None, 1, 33000, 2, "specials", "normal"),   # int32 indices, fp32 values
]


def check_matches_the_reference(rank, world):
    for case, (dtype, value_dtype, rows, columns, k, kind, grad_kind) in enumerate(CASES):
        seed = oracle.seed_of("exchange", case, rank, world)
        x = _data(kind, world * rows, columns, dtype, seed)
        upstream = _data(grad_kind, world * rows, columns, dtype, seed + 1)
        y, grad = _run(x, k, value_dtype, upstream)
        want_y, want_grad = expected_exchange(x, k, value_dtype, upstream)
        what = f"case {case} {CASES[case]} on rank {rank}"
        assert_bitwise_equal(y, want_y, f"forward, {what}")
        assert_bitwise_equal(grad, want_grad, f"gradient of x, {what}")


def check_every_host_backend(rank, world):
    """The host kernel backends (the torch reference, and the C++ "cpu" backend when built),
    each on a few of the cases. Triton (interpreted here) is held to the reference op by op in
    test_rows.py; the exchange does not depend on which backend runs the ops."""
    import dct_kernels as dk
    backends = [name for name, why in dk.available_backends().items()
                if why == "available" and name in ("torch", "cpu")]
    assert "torch" in backends
    for backend in backends:
        for case in (0, 2, 4):
            dtype, value_dtype, rows, columns, k, kind, grad_kind = CASES[case]
            seed = oracle.seed_of("backends", backend, case, rank)
            x = _data(kind, world * rows, columns, dtype, seed)
            upstream = _data(grad_kind, world * rows, columns, dtype, seed + 1)
            y, grad = _run(x, k, value_dtype, upstream, backend=backend)
            want_y, want_grad = expected_exchange(x, k, value_dtype, upstream)
            assert_bitwise_equal(y, want_y, f"forward, {backend}, case {case}")
            assert_bitwise_equal(grad, want_grad, f"gradient, {backend}, case {case}")


def check_hard_rows(rank, world):
    """Rows of NaN, of +-inf, of +-0 only, and mixed, for every rank."""
    inf, nan = float("inf"), float("nan")
    block = torch.tensor([
        [nan, 1.0, nan, -2.0, nan, 0.5],
        [inf, -inf, 3.0, inf, -0.0, 1.0],
        [-0.0, 0.0, -0.0, 0.0, -0.0, 0.0],
        [1.0, -1.0, 1.0, -1.0, 2.0, -2.0],
        [1e-45, -1e-45, 0.0, 3e38, -3.4e38, nan],
    ])
    x = torch.cat([block * (1 + rank + 10 * j) for j in range(world)])
    upstream = _data("normal", x.shape[0], x.shape[1], FP32, oracle.seed_of("hard", rank))
    for value_dtype in (None, BF16, FP16):
        for k in (1, 2, 6):
            y, grad = _run(x, k, value_dtype, upstream)
            want_y, want_grad = expected_exchange(x, k, value_dtype, upstream)
            assert_bitwise_equal(y, want_y, f"forward, k={k}, {value_dtype}")
            assert_bitwise_equal(grad, want_grad, f"gradient, k={k}, {value_dtype}")


def check_adjoint_and_determinism(rank, world):
    """Backward is the adjoint of forward: sum over ranks of <G, y> equals that of <grad, x>
    (for a fixed mask the exchange is linear); and a second call is bitwise the same."""
    x = _data("normal", world * 5, 96, FP32, oracle.seed_of("adjoint", rank))
    upstream = _data("normal", world * 5, 96, FP32, oracle.seed_of("adjoint G", rank))
    y, grad = _run(x, 8, None, upstream)
    sums = torch.tensor([(upstream.double() * y.double()).sum().item(),
                         (grad.double() * x.double()).sum().item()], dtype=torch.float64)
    dist.all_reduce(sums)
    assert sums[0].item() != 0.0
    assert math.isclose(sums[0].item(), sums[1].item(), rel_tol=1e-12), sums.tolist()
    y2, grad2 = _run(x, 8, None, upstream)
    assert_bitwise_equal(y2, y, "forward, second call")
    assert_bitwise_equal(grad2, grad, "gradient, second call")
    # The module form is the same function.
    from dct_kernels.mp import SparseAllToAll
    module = SparseAllToAll(8)
    assert_bitwise_equal(module(x), y, "SparseAllToAll")
    assert "k=8" in repr(module)


class _Counting:
    """Wraps torch.distributed collectives; records the bytes each call sends to the other
    ranks (an all-to-all with equal splits sends (W - 1)/W of its input)."""

    def __init__(self, world):
        self.world, self.calls, self.real, self.inputs = world, [], {}, []

    def __enter__(self):
        for name in ("all_to_all_single", "all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                self.real[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self.real[name]))
        return self

    def __exit__(self, *exc):
        for name, real in self.real.items():
            setattr(dist, name, real)

    def _wrap(self, name, real):
        def counted(output, input, *args, **kwargs):
            if name == "all_to_all_single":
                splits = [a for a in args[:2]] + [kwargs.get("output_split_sizes"),
                                                  kwargs.get("input_split_sizes")]
                assert all(s is None for s in splits), "unequal splits"
                sent = input.numel() * input.element_size() * (self.world - 1) // self.world
            else:
                sent = input.numel() * input.element_size() * (self.world - 1)
            self.calls.append((name, sent))
            self.inputs.append(input.clone())
            return real(output, input, *args, **kwargs)
        return counted

    def bytes(self, name):
        return sum(sent for n, sent in self.calls if n == name)

    def count(self, name):
        return sum(1 for n, _ in self.calls if n == name)


def check_wire_rows(sent: torch.Tensor, x: torch.Tensor, k: int, value_dtype) -> None:
    """The forward wire rows as docs/mp.md describes them: per row, the wider of (k values,
    k indices) first, then the other, then zero padding to the wider element size."""
    index_dtype = torch.int16 if x.shape[1] <= 32768 else torch.int32
    vsize = torch.empty((), dtype=value_dtype).element_size()
    isize = torch.empty((), dtype=index_dtype).element_size()
    used = k * (vsize + isize)
    assert sent.dtype == torch.uint8 and sent.shape == (x.shape[0], -(-used // max(vsize, isize))
                                                        * max(vsize, isize)), sent.shape
    assert not sent[:, used:].any(), "pad bytes are not zero"
    values_at, indices_at = (0, k * vsize) if vsize >= isize else (k * isize, 0)
    values = sent[:, values_at:values_at + k * vsize].contiguous().view(value_dtype)
    indices = sent[:, indices_at:indices_at + k * isize].contiguous().view(index_dtype)
    mask = kept_mask(x, k)
    columns = torch.arange(x.shape[1]).expand(x.shape)
    assert torch.equal(indices.long(), columns[mask].reshape(-1, k)), "indices on the wire"
    wire_values = oracle.wire_cast(oracle.f32(x), value_dtype).reshape(x.shape)
    assert_bitwise_equal(values, wire_values[mask].reshape(-1, k), "values on the wire")


def check_bytes_on_the_wire(rank, world):
    from dct_kernels.mp import all_to_all_bytes
    configs = [(FP32, BF16, 6, 400, 20),    # k = 5% of D, bf16 values, int16 indices
               (FP32, None, 3, 400, 21),    # fp32 values, padded rows
               (BF16, BF16, 2, 40000, 3),   # int32 indices, padded rows
               (FP16, None, 4, 160, 8)]
    for dtype, value_dtype, rows, columns, k in configs:
        x = _data("normal", world * rows, columns, dtype, oracle.seed_of("bytes", rank, k))
        upstream = _data("normal", world * rows, columns, dtype, oracle.seed_of("G", rank, k))
        with _Counting(world) as first:
            _run(x, k, value_dtype, upstream)
        # The first call of a new shape adds the agreement check, one small all-gather.
        assert first.count("all_to_all_single") == 2
        gathers = first.count("all_gather_single") + first.count("all_gather_into_tensor")
        assert gathers == 1, first.calls
        with _Counting(world) as steady:
            _run(x, k, value_dtype, upstream)
        assert [n for n, _ in steady.calls] == ["all_to_all_single"] * 2, steady.calls
        check_wire_rows(steady.inputs[0], x, k, value_dtype or dtype)
        sparse = steady.bytes("all_to_all_single")
        with _Counting(world) as dense:  # the dense exchange: x forward, its gradient back
            for t in (x, upstream):
                raw = t.contiguous().view(torch.uint8)
                dist.all_to_all_single(torch.empty_like(raw), raw)
        dense_bytes = dense.bytes("all_to_all_single")
        assert (sparse, dense_bytes) == all_to_all_bytes(x, k, world, value_dtype=value_dtype)
        if (dtype, value_dtype, k * 20) == (FP32, BF16, columns):
            assert dense_bytes >= 20 * sparse, (dense_bytes, sparse)
            assert sparse == (world - 1) * rows * 6 * k  # 4 bytes a kept entry forward, 2 back


def check_disagreeing_ranks_raise_everywhere(rank, world):
    """The last rank differs in one argument, in a shape no rank has used yet (the check runs
    at the first call of a shape); every rank raises a ValueError that names the argument."""
    from dct_kernels.mp import sparse_all_to_all
    last = rank == world - 1
    variants = [  # (what the last rank changes, what the error names)
        (dict(rows=world * 4), r"x \(rows"),
        (dict(columns=1), r"x \(columns"),        # D + 1
        (dict(k=5), r"k \(k\)"),
        (dict(dtype=BF16), r"x \(dtype"),
        (dict(value_dtype=FP16), r"value_dtype \(value dtype"),
        (dict(rows=world * 3 + 1), r"x \(rows"),  # not W equal blocks there
        (dict(k=1000), r"k \(k\)"),              # above D there
    ]
    for case, (change, match) in enumerate(variants):
        arguments = dict(rows=world * 3, columns=41 + 10 * case, k=4, dtype=FP32,
                         value_dtype=None)
        if last:
            if "columns" in change:
                arguments["columns"] += change["columns"]
            else:
                arguments.update(change)
        x = _data("normal", arguments["rows"], arguments["columns"], arguments["dtype"],
                  case + rank)
        with pytest.raises(ValueError, match=match):
            sparse_all_to_all(x, arguments["k"], value_dtype=arguments["value_dtype"])
    # The group still works, and the failed shapes were not cached as agreed.
    x = _data("normal", world * 3, 41, FP32, 99 + rank)
    upstream = _data("normal", world * 3, 41, FP32, 199 + rank)
    y, grad = _run(x, 4, None, upstream)
    want_y, want_grad = expected_exchange(x, 4, None, upstream)
    assert_bitwise_equal(y, want_y, "forward after the failures")
    assert_bitwise_equal(grad, want_grad, "gradient after the failures")


def check_bad_arguments_raise_everywhere(rank, world):
    """The same bad arguments on every rank: every rank raises the argument's own error."""
    from dct_kernels.mp import sparse_all_to_all
    x = _data("normal", world * 2, 16, FP32, rank)
    bad = [(lambda: sparse_all_to_all(x[:-1], 2), ValueError, "x"),
           (lambda: sparse_all_to_all(x, 0), ValueError, "k"),
           (lambda: sparse_all_to_all(x, 17), ValueError, "k"),
           (lambda: sparse_all_to_all(x, 2.0), TypeError, "k"),
           (lambda: sparse_all_to_all(x.to(torch.int32), 2), TypeError, "x"),
           (lambda: sparse_all_to_all(x.to(torch.float64), 2), TypeError, "x"),
           (lambda: sparse_all_to_all(x.reshape(-1), 2), ValueError, "x"),
           (lambda: sparse_all_to_all(x, 2, value_dtype=torch.float64), TypeError,
            "value_dtype")]
    for call, error, name in bad:
        with pytest.raises(error, match=f"^{name}:"):
            call()
    # A backend that only the last rank names (one that cannot run on CPU tensors): that
    # rank raises its own error, every other rank one that names it; nobody is left waiting.
    last = world - 1
    if rank == last:
        with pytest.raises(ValueError, match="^backend:"):
            sparse_all_to_all(x, 3, backend="cuda")
    else:
        with pytest.raises(ValueError, match=rf"rank\(s\) \[{last}\] refused"):
            sparse_all_to_all(x, 3)
    y = sparse_all_to_all(x, 2)
    assert_bitwise_equal(y, dense_route(torch.where(kept_mask(x, 2), x, 0.0)), "after")


CHECKS = ["check_matches_the_reference", "check_every_host_backend", "check_hard_rows",
          "check_adjoint_and_determinism", "check_bytes_on_the_wire",
          "check_disagreeing_ranks_raise_everywhere", "check_bad_arguments_raise_everywhere"]

_GROUPS = {}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def group_results(request, tmp_path_factory):
    world = request.param
    if world not in _GROUPS:
        _GROUPS[world] = run_group(world, __name__, CHECKS,
                                   tmp_path_factory.mktemp(f"mp{world}"), deadline_s=300)
    return world, _GROUPS[world]


@pytest.mark.parametrize("name", CHECKS)
def test_across_ranks(group_results, name):
    world, results = group_results
    assert_check_passed(results, name, world)


# ------------------------------------------------------------------------- in this process

def test_reference_tie_rule():
    """The reference of this file against hand-picked rows (guards the oracle itself)."""
    x = torch.tensor([[1.0, -3.0, 3.0, float("nan"), -0.0],
                      [2.0, 2.0, -2.0, 2.0, float("-inf")]])
    assert kept_mask(x, 3).tolist() == [[False, True, True, True, False],
                                        [True, True, False, False, True]]


def test_all_to_all_bytes_values():
    from dct_kernels.mp import all_to_all_bytes
    x = torch.empty(8, 1000)
    # W = 2, B = 4: 4 rows go to the other rank; 50 bf16 + 50 int16 forward, 50 bf16 back.
    assert all_to_all_bytes(x, 50, 2, value_dtype=BF16) == (4 * 200 + 4 * 100, 2 * 4 * 4000)
    # fp32 values, k = 51: 51 * 6 = 306 bytes a row, padded to 308; W = 3, B = 2, 4 rows out.
    assert all_to_all_bytes(torch.empty(6, 1000), 51, 3) == (4 * 308 + 4 * 204, 32000)
    # D > 32768: int32 indices; bf16 values, k = 3: 18 bytes a row, padded to 20.
    assert all_to_all_bytes(torch.empty(2, 40000, dtype=BF16), 3, 2) == (20 + 6, 2 * 80000)
    assert all_to_all_bytes(x, 50, 1) == (0, 0)  # nothing leaves a group of one
    sparse, dense = all_to_all_bytes(torch.empty(64, 2000), 100, 8, value_dtype=BF16)
    assert dense / sparse == pytest.approx(8 / 0.3)


@pytest.mark.parametrize("call, error, name", [
    (lambda f: f(torch.empty(8, 10), 2, 3), ValueError, "x"),
    (lambda f: f(torch.empty(8), 2, 2), ValueError, "x"),
    (lambda f: f([[1.0]], 1, 1), TypeError, "x"),
    (lambda f: f(torch.empty(8, 10, dtype=torch.int64), 2, 2), TypeError, "x"),
    (lambda f: f(torch.empty(8, 10), 0, 2), ValueError, "k"),
    (lambda f: f(torch.empty(8, 10), 11, 2), ValueError, "k"),
    (lambda f: f(torch.empty(8, 10), True, 2), TypeError, "k"),
    (lambda f: f(torch.empty(8, 10), 2, 0), ValueError, "world"),
    (lambda f: f(torch.empty(8, 10), 2, 2.0), TypeError, "world"),
    (lambda f: f(torch.empty(8, 10), 2, 2, value_dtype=torch.int16), TypeError, "value_dtype"),
])
def test_all_to_all_bytes_errors(call, error, name):
    from dct_kernels.mp import all_to_all_bytes
    with pytest.raises(error, match=f"^{name}:"):
        call(all_to_all_bytes)


def test_module_arguments():
    from dct_kernels.mp import SparseAllToAll
    with pytest.raises(ValueError, match="^k:"):
        SparseAllToAll(0)
    with pytest.raises(TypeError, match="^k:"):
        SparseAllToAll(1.5)
    with pytest.raises(TypeError, match="^value_dtype:"):
        SparseAllToAll(3, value_dtype=torch.float64)


def test_needs_a_process_group():
    from dct_kernels.mp import sparse_all_to_all
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(ValueError, match="^group:"):
        sparse_all_to_all(torch.randn(4, 8), 2)
    with pytest.raises(TypeError, match="^x:"):
        sparse_all_to_all("x", 2)


@pytest.fixture
def group_of_one(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_of_one(group_of_one):
    """W = 1: the exchange is sparsify_rows with the values rounded to value_dtype."""
    import dct_kernels as dk
    x = _data("specials", 6, 70, FP32, 3)
    upstream = _data("wide", 6, 70, FP32, 4)
    for value_dtype in (None, FP16):
        y, grad = _run(x, 7, value_dtype, upstream)
        want_y, want_grad = expected_exchange(x, 7, value_dtype, upstream)
        assert_bitwise_equal(y, want_y, "forward")
        assert_bitwise_equal(grad, want_grad, "gradient")
    assert_bitwise_equal(_run(x, 7, None, upstream)[0], dk.sparsify_rows(x, 7), "sparsify_rows")


def test_gradcheck_world_of_one(group_of_one):
    """torch.autograd.gradcheck of the exchange (finite differences in fp32): magnitudes are
    distinct integers, so a perturbation of eps never changes which entries are kept."""
    from dct_kernels.mp import sparse_all_to_all
    g = torch.Generator().manual_seed(5)
    magnitudes = torch.randperm(60, generator=g).float().reshape(4, 15) + 1
    signs = torch.where(torch.rand(4, 15, generator=g) < 0.5, -1.0, 1.0)
    x = (magnitudes * signs).requires_grad_(True)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(lambda t: sparse_all_to_all(t, 4), (x,), eps=1e-2,
                                        atol=1e-3, rtol=1e-3)
