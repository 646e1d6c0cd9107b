"""DCT-DP on a GPU with NCCL, world size 1 (NCCL refuses two ranks on one GPU; multi-rank logic
is tested on gloo in test_distributed.py).

Each device backend is compared bitwise with the torch reference on the same data and device,
and the steady state runs under ``torch.cuda.set_sync_debug_mode("error")``, which raises on
any host synchronization made through torch (blocking copies, ``.item()``, stream syncs).
"""

import contextlib

import pytest
import torch

import dct_kernels as dk
from dct_kernels.distributed import DCTState, dct_hook, sparse_all_reduce
from dct_kernels.distributed.stand_in import StandInBucket
from gpu_data import no_host_sync
from helpers import assert_bitwise_equal

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _device_backends():
    if not torch.cuda.is_available():
        return ["cuda"]  # collected, then skipped by the gpu marker
    return [b for b in ("triton", "cuda") if dk.available_backends()[b] == "available"]


@pytest.mark.parametrize("backend", _device_backends())
def test_sparse_all_reduce_steady_state(nccl_group, backend):
    n = (1 << 20) + 3
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(n, device=DEVICE, generator=g)
    residual = torch.randn(n, device=DEVICE, generator=g) * 0.5
    reference_residual = residual.clone()
    taus = torch.tensor([0.5, 1.5, 2.5], device=DEVICE)
    segments = torch.tensor([0, 1000, n // 2, n])  # host offsets: the ops read them there
    capacity = n // 20
    errors = torch.zeros((), dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(x)
    kwargs = dict(segments=segments, capacity=capacity, value_dtype=torch.bfloat16)
    sparse_all_reduce(x, taus, residual=residual, out=out, errors=errors, backend=backend,
                      **kwargs)  # the first NCCL call sets up the communicator
    with no_host_sync():
        for _ in range(3):
            sparse_all_reduce(x, taus, residual=residual, out=out, errors=errors,
                              backend=backend, **kwargs)
    for _ in range(4):
        payload = dk.compress(x, taus, residual=reference_residual, backend="torch", **kwargs)
    want = dk.decompress(payload, backend="torch")
    assert_bitwise_equal(out, want, "average of one rank")
    assert_bitwise_equal(residual, reference_residual, "residual")
    assert int(errors) == 0 and int(payload.count) > 0


def _params(dtype):
    shapes = [(300, 200), (50,), (40000,), (7, 11)]
    return [torch.nn.Parameter(torch.zeros(s, device=DEVICE, dtype=dtype)) for s in shapes]


def _run_hook(backend, params, scales, grad_dtype, guarded_from, **kwargs):
    """Run dct_hook on one bucket per entry of ``scales`` (random gradients of that scale);
    steps from ``guarded_from`` on run with no host synchronization allowed. Returns the
    averaged buckets and the state."""
    state = DCTState(backend=backend, module=[(f"p{i}", p) for i, p in enumerate(params)],
                     **kwargs)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    outputs = []
    for step, scale in enumerate(scales):
        guard = no_host_sync() if step >= guarded_from else contextlib.nullcontext()
        with guard:
            grads = [(torch.randn(p.shape, device=DEVICE, generator=g) * scale)
                     .to(grad_dtype) for p in params]
            bucket = StandInBucket(params, grads)
            outputs.append(dct_hook(state, bucket).wait().clone())
    return outputs, state


@pytest.mark.parametrize("exchange", ["allgather", "reduce_scatter"])
@pytest.mark.parametrize("backend", _device_backends())
@pytest.mark.parametrize("grad_dtype, value_dtype", [(torch.float32, None),
                                                     (torch.float32, torch.bfloat16),
                                                     (torch.float16, None)])
def test_hook_steady_state(nccl_group, backend, grad_dtype, value_dtype, exchange):
    """After the warm-up step and the first refresh, no step synchronizes with the host; the
    results equal the torch reference's bit for bit."""
    params = _params(grad_dtype)
    # No refresh after the first: no schedule, no band, and gradients small enough after it
    # (the residual grows step by step under a fixed τ) that the payload never overflows.
    kwargs = dict(ratio=0.01, warmup_steps=1, refresh_every=1000, refresh_band=(0.0, 100.0),
                  capacity_factor=8.0, min_numel=100, value_dtype=value_dtype,
                  exchange=exchange)
    scales = [1.0, 1.0] + [0.25] * 6
    got, state = _run_hook(backend, params, scales, grad_dtype, guarded_from=2, **kwargs)
    want, reference = _run_hook("torch", params, scales, grad_dtype, guarded_from=99, **kwargs)
    for step, (a, b) in enumerate(zip(got, want)):
        assert_bitwise_equal(a, b, f"step {step}")
    for key, entry in state.state_dict()["params"].items():
        other = reference.state_dict()["params"][key]
        assert_bitwise_equal(entry["residual"], other["residual"], key)
        assert_bitwise_equal(entry["threshold"], other["threshold"], key)
    stats = state.stats()
    assert stats == reference.stats()
    assert stats["buckets_sparse"] == 7 and stats["bucket_refreshes"] == 1, stats
    assert stats[f"buckets_{exchange}"] == 7, stats
    assert stats["overflow"] == 0, stats
    assert 0 < stats["kept_density"] < 0.1 and stats["payload_errors"] == 0


@pytest.mark.parametrize("exchange", ["allgather", "reduce_scatter"])
@pytest.mark.parametrize("backend", _device_backends())
def test_hook_refresh_steps(nccl_group, backend, exchange):
    """Steps that recompute τ (the segmented select_threshold), scheduled and early, make no
    host synchronization either (the early decision reads flags staged one step earlier)."""
    params = _params(torch.float32)
    kwargs = dict(ratio=0.01, warmup_steps=0, refresh_every=3, refresh_band=(0.9, 1.1),
                  min_numel=100, exchange=exchange)
    scales = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0]
    got, state = _run_hook(backend, params, scales, torch.float32, guarded_from=2, **kwargs)
    want, reference = _run_hook("torch", params, scales, torch.float32, guarded_from=99,
                                **kwargs)
    for step, (a, b) in enumerate(zip(got, want)):
        assert_bitwise_equal(a, b, f"step {step}")
    stats = state.stats()
    assert stats == reference.stats()
    assert stats["bucket_refreshes"] >= 3 and stats["early_refreshes"] >= 1, stats


@pytest.mark.parametrize("backend", _device_backends())
def test_ddp_with_nccl(nccl_group, backend):
    """DDP on the GPU with the hook: the hook's steady-state steps make no host sync inside DDP,
    and training goes as DDP without the hook (ratio 1, to rounding) or at least trains."""
    results = {}
    for ratio in (None, 1.0, 0.05):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(),
                                    torch.nn.Linear(256, 32)).to(DEVICE)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        state = None
        if ratio is not None:
            state = DCTState(ratio=ratio, warmup_steps=1, refresh_every=1000,
                             refresh_band=(0.0, 100.0), min_numel=100, backend=backend,
                             module=model)

            def guarded(state, bucket):
                if state.step < 3:
                    return dct_hook(state, bucket)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return dct_hook(state, bucket)
                finally:
                    torch.cuda.set_sync_debug_mode("default")

            ddp.register_comm_hook(state, guarded)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator(device=DEVICE).manual_seed(4)
        losses = []
        for _ in range(12):
            x = torch.randn(32, 64, device=DEVICE, generator=g)
            loss = (ddp(x) - x[:, :32]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        results[ratio] = (torch.cat([p.detach().flatten() for p in model.parameters()]),
                          torch.stack(losses).cpu(), state)
    dense, exact, sparse = results[None], results[1.0], results[0.05]
    assert torch.allclose(exact[0], dense[0], rtol=1e-4, atol=1e-5)
    assert sparse[1][-1] < sparse[1][0], sparse[1]
    stats = sparse[2].stats()
    assert stats["buckets_sparse"] == 11 and stats["payload_errors"] == 0, stats
