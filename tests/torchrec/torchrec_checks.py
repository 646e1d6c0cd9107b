"""Checks run on every rank of a spawned gloo group (tests/dist_harness.py) against the real
TorchRec: a small DLRM (bench/train_torchrec.py's model) under DistributedModelParallel with
``DCTDataParallelWrapper``.

Bytes are counted by wrapping torch.distributed's collectives (``hook_tap.HookTap``: the calls
made from inside a given comm hook), not from the package's counters; the oracles for the
gradients are the other rank (bitwise equal dense parts) and TorchRec's own DDP all-reduce
(``DefaultDataParallelWrapper``), which DCT-DP at ratio 1 must reproduce bit for bit.
"""

import copy
import dataclasses
import hashlib
import io
from typing import Dict, List

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.types import ShardingEnv

import train_torchrec as example
from dct_kernels.distributed import DCTState, dct_hook
from dct_kernels.distributed.torchrec import DCTDataParallelWrapper, dct_state
from hook_tap import HookTap

SMALL = example.Settings(steps=12, batch_size=64, heldout=256, num_tables=4, min_rows=50,
                         max_rows=2000, dense_arch=(32,), over_arch=(64, 32), ratio=0.02,
                         value_dtype="float32", refresh_every=4, warmup_steps=2,
                         min_numel=0)
_DATA = {}


def _data(settings):
    key = (settings.steps, settings.batch_size, settings.heldout, settings.num_tables,
           settings.min_rows, settings.max_rows, settings.seed)
    if key not in _DATA:
        _DATA[key] = example.load_data(settings)
    return _DATA[key]


def _dense(dmp) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in dmp.named_parameters()
            if ".embedding_bags." not in n}


def _tables(dmp) -> Dict[str, torch.Tensor]:
    """This rank's rows of every table (its local shards), copied."""
    out = {}
    for name, value in dmp.state_dict().items():
        if ".embedding_bags." in name:
            for i, shard in enumerate(value.local_shards()):
                out[f"{name}.{i}"] = shard.tensor.detach().clone()
    return out


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _step(dmp, opt, settings, data, step, rank, world) -> None:
    rows = example.train_order(settings, data.num_train)[
        step * settings.batch_size:(step + 1) * settings.batch_size]
    dense, kjt, labels = example.local_batch(data, rows, rank, world)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(dense, kjt).squeeze(1),
                                                                labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _same_on_every_rank(value: str, world: int) -> List[str]:
    everyone = [None] * world
    dist.all_gather_object(everyone, value)
    return everyone


def _ddp(dmp):
    return next(m for m in dmp.modules()
                if isinstance(m, torch.nn.parallel.DistributedDataParallel))


# ----------------------------------------------------------------------------- the checks

def check_hook_registered_and_counted(rank, world):
    """The wrapper registers dct_hook on DMP's DDP with a DCTState keyed by the dense names;
    the hook is called every step; the bytes it moves, counted on the wire, are the state's
    and, against a ring all-reduce of the DDP's own parameters, compressed."""
    settings, data = SMALL, _data(SMALL)
    wrapper = example.make_wrapper(settings, "dct_dp")
    assert wrapper.state is None
    dmp, opt = example.build(settings, data.table_sizes, world, wrapper)
    state = wrapper.state
    assert isinstance(state, DCTState) and dct_state(dmp) is state
    assert _ddp(dmp)._get_ddp_logging_data().get("comm_hook") == dct_hook.__qualname__
    assert state.process_group is not None and dist.get_world_size(state.process_group) == world
    # The dense part is the DLRM's MLPs: every parameter but the tables'.
    dense = [(n, p) for n, p in dmp.named_parameters() if ".embedding_bags." not in n]
    assert [state.key_of(p) for _, p in dense] == [n for n, _ in dense]
    assert dense[0][0].startswith("dense_arch.") and dense[-1][0].startswith("over_arch.")
    ring_per_step = 4 * (world - 1) / world * sum(p.numel() * 4 for _, p in dense)

    per_step = []
    with HookTap(world, [dct_hook]) as tap:
        for step in range(settings.steps):
            before = len(tap.calls)
            _step(dmp, opt, settings, data, step, rank, world)
            per_step.append(len(tap.calls) - before)
    assert all(n > 0 for n in per_step), f"collectives issued by dct_hook per step: {per_step}"
    stats = state.stats()
    assert stats["steps"] == settings.steps
    assert stats["bytes_sent"] == tap.sent and stats["bytes_received"] == tap.received, \
        (stats, tap.sent, tap.received)
    assert stats["bytes_ring"] == ring_per_step * settings.steps
    # Warm-up buckets are all-reduced whole; the others go as one all-gather of wire
    # buffers (allgather, W = 2; min_numel=0 leaves no small parameter all-reduced).
    reduces = [c for c in tap.calls if c.op == "all_reduce"]
    gathers = [c for c in tap.calls if c.op == "all_gather" and c.input.dtype == torch.uint8]
    assert len(reduces) == stats["buckets_dense"] >= settings.warmup_steps
    assert len(gathers) == stats["buckets_sparse"] >= settings.steps - settings.warmup_steps
    assert all(c.input.dtype == torch.float32 for c in reduces)
    assert tap.sent + tap.received < ring_per_step * settings.steps / 2


def check_dense_part_identical_every_step(rank, world):
    """Every rank's dense parameters are bitwise the same after every step (and they move),
    with either exchange, on TorchRec's static-graph DDP and on the wrapper's default."""
    settings, data = SMALL, _data(SMALL)
    for exchange, static_graph in (("allgather", True), ("reduce_scatter", False)):
        s = dataclasses.replace(settings, exchange=exchange)
        wrapper = DCTDataParallelWrapper(static_graph=static_graph, ratio=s.ratio,
                                         refresh_every=s.refresh_every,
                                         warmup_steps=s.warmup_steps, min_numel=s.min_numel,
                                         exchange=exchange)
        dmp, opt = example.build(s, data.table_sizes, world, wrapper)
        assert _ddp(dmp).static_graph == static_graph
        start = _digest(_dense(dmp))
        seen = set()
        for step in range(s.steps):
            _step(dmp, opt, s, data, step, rank, world)
            digest = _digest(_dense(dmp))
            everyone = _same_on_every_rank(digest, world)
            assert len(set(everyone)) == 1, f"{exchange} step {step}: ranks differ {everyone}"
            seen.add(digest)
        assert start not in seen and len(seen) == s.steps, "the dense part did not train"
        used = wrapper.state.stats()[f"buckets_{exchange}"]
        assert used > 0, f"no bucket went through {exchange}"


def check_ratio_one_is_torchrec_allreduce(rank, world):
    """At ratio 1 (every nonzero sent, fp32, no warm-up) the wrapper's DMP trains bit for bit
    as TorchRec's default wrapper (DDP's own all-reduce), step by step: dense part and
    tables."""
    settings = dataclasses.replace(SMALL, ratio=1.0, warmup_steps=0, value_dtype="float32")
    data = _data(settings)
    runs = {}
    for name, wrapper in (("torchrec", DefaultDataParallelWrapper()),
                          ("dct", example.make_wrapper(settings, "dct_dp"))):
        dmp, opt = example.build(settings, data.table_sizes, world, wrapper)
        digests = []
        for step in range(settings.steps):
            _step(dmp, opt, settings, data, step, rank, world)
            digests.append((_digest(_dense(dmp)), _digest(_tables(dmp))))
        runs[name] = digests
    differ = [i for i, (a, b) in enumerate(zip(runs["torchrec"], runs["dct"])) if a != b]
    assert not differ, f"steps where DCT at ratio 1 differs from DDP's all-reduce: {differ}"
    assert wrapper.state.stats()["buckets_sparse"] == settings.steps


def _checkpoint(dmp, opt, state) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": dmp.state_dict(), "fused": dmp.fused_optimizer.state_dict(),
                "opt": opt.state_dict(), "dct": state.state_dict()}, buffer)
    return buffer.getvalue()


def _snapshot(dmp, opt, state) -> dict:
    return {"dense": _dense(dmp), "tables": _tables(dmp),
            "opt": copy.deepcopy(opt.state_dict()), "dct": state.state_dict()}


def _assert_equal(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        # Bytes, so that -0.0 and +0.0 (or two NaNs) count as what they are.
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), \
            f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), \
            f"{where}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _round_trip(rank, world, exchange):
    """Train N steps, checkpoint (DMP, fused and dense optimizers, DCTState), train M more;
    a fresh DMP with a fresh wrapper that loads the checkpoint and trains the same M steps ends
    bitwise the same: dense part, tables, Adam, and the DCT state (residuals, thresholds, the
    rule's state, statistics). With the wrapper's default static_graph=True, whose DDP keeps
    its first buckets for two iterations after the load."""
    settings = dataclasses.replace(SMALL, exchange=exchange)
    data, n = _data(settings), 7
    wrapper = example.make_wrapper(settings, "dct_dp")
    dmp, opt = example.build(settings, data.table_sizes, world, wrapper)
    for step in range(n):
        _step(dmp, opt, settings, data, step, rank, world)
    saved = _checkpoint(dmp, opt, wrapper.state)
    for step in range(n, settings.steps):
        _step(dmp, opt, settings, data, step, rank, world)
    expected = _snapshot(dmp, opt, wrapper.state)

    fresh = example.make_wrapper(settings, "dct_dp")
    dmp2, opt2 = example.build(settings, data.table_sizes, world, fresh)
    assert _digest(_dense(dmp2)) != _digest(expected["dense"])
    loaded = torch.load(io.BytesIO(saved), weights_only=False)
    dmp2.load_state_dict(loaded["model"])
    dmp2.fused_optimizer.load_state_dict(loaded["fused"])
    opt2.load_state_dict(loaded["opt"])
    dct_state(dmp2).load_state_dict(loaded["dct"])
    for step in range(n, settings.steps):
        _step(dmp2, opt2, settings, data, step, rank, world)
    got = _snapshot(dmp2, opt2, fresh.state)
    assert got["dct"]["step"] == settings.steps
    assert wrapper.state.stats()[f"buckets_{exchange}"] > 0
    _assert_equal(expected, got, exchange)


def check_round_trip_allgather(rank, world):
    _round_trip(rank, world, "allgather")


def check_round_trip_reduce_scatter(rank, world):
    _round_trip(rank, world, "reduce_scatter")


def check_wrapper_arguments(rank, world):
    """Bad arguments fail at the wrapper's construction, naming themselves."""
    import pytest

    with pytest.raises(TypeError, match="process_group"):
        DCTDataParallelWrapper(process_group=None)
    with pytest.raises(TypeError, match="allreduce_comm_precision"):
        DCTDataParallelWrapper(allreduce_comm_precision="bf16")
    with pytest.raises(ValueError, match="ratio"):
        DCTDataParallelWrapper(ratio=0.0)
    with pytest.raises(ValueError, match="exchange"):
        DCTDataParallelWrapper(exchange="ring")
    with pytest.raises(ValueError, match="dense_rows"):
        DCTDataParallelWrapper(dense_rows=-1)
    with pytest.raises(ValueError, match="min_k"):
        DCTDataParallelWrapper(min_k=0)
    with pytest.raises(ValueError, match="ramp_steps"):
        DCTDataParallelWrapper(ramp_steps=-1)
    wrapper = DCTDataParallelWrapper(ratio=0.5, bucket_cap_mb=1)
    assert wrapper.dct_options == {"ratio": 0.5} and wrapper.state is None
    settings, data = SMALL, _data(SMALL)
    dmp, _ = example.build(settings, data.table_sizes, world, wrapper)
    assert wrapper.state.ratio == 0.5 and _ddp(dmp).static_graph  # TorchRec's default
    with pytest.raises(RuntimeError, match="already serves"):
        wrapper.wrap(dmp, ShardingEnv.from_process_group(dist.group.WORLD), dmp.device)
    dmp, _ = example.build(settings, data.table_sizes, world, DefaultDataParallelWrapper())
    with pytest.raises(ValueError, match="DefaultDataParallelWrapper"):
        dct_state(dmp)
