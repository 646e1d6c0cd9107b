"""bench/hook_cost.py: its rows, and the emulated rank 0 of W (the layout sized for W ranks,
the stand-ins restored afterwards, the hook's result what one rank's exchange gives)."""

import torch
import torch.distributed as dist

import hook_cost
from dct_kernels.distributed import DCTState, collectives, dct_hook
from dct_kernels.distributed.stand_in import StandInBucket
from dist_harness import one_rank_group


def test_measure_rows_and_emulated_worlds():
    with one_rank_group():
        row = hook_cost.measure("allgather", torch.device("cpu"), steps=3)
        assert row["world"] == 1 and row["median_ms"] > 0 and row["aten_ops_per_step"] > 0
        original = collectives.all_to_all_rows_async
        with hook_cost.emulated_world(4):
            assert dist.get_world_size() == 4 and dist.get_rank() == 0
            emulated = hook_cost.measure("reduce_scatter", torch.device("cpu"), steps=3,
                                         world=4)
        assert dist.get_world_size() == 1
        assert collectives.all_to_all_rows_async is original
        assert emulated["world"] == 4 and emulated["median_ms"] > 0
        with hook_cost.emulated_world(64):
            denser = hook_cost.measure("reduce_scatter", torch.device("cpu"), steps=3,
                                       world=64, wire="fp8-delta")
        assert denser["world"] == 64 and denser["median_ms"] > 0


def test_emulated_rank_sizes_for_world_and_averages_its_own_payload():
    """Under the emulation every rank sends what rank 0 sends: with allgather and ratio 1
    (every entry kept, fp32) the average of 4 equal payloads is the gradient itself; the
    reduce_scatter layout is cut into 4 shards and stage 1 fills 4 send rows."""
    with one_rank_group():
        with hook_cost.emulated_world(4):
            params = [torch.nn.Parameter(torch.zeros(s)) for s in [(64, 40), (300,)]]
            g = torch.Generator().manual_seed(0)
            grads = [torch.randn(p.shape, generator=g) for p in params]
            for exchange in ("allgather", "reduce_scatter"):
                state = DCTState(ratio=1.0, warmup_steps=0, min_numel=0,
                                 exchange=exchange)
                bucket = StandInBucket(params, [t.clone() for t in grads])
                flat = bucket.buffer().clone()
                out = dct_hook(state, bucket).wait()
                layout = next(iter(state.layouts.values()))
                assert layout.world == 4
                if exchange == "allgather":
                    torch.testing.assert_close(out, flat, rtol=0, atol=0)
                else:
                    assert len(layout.plan.cuts) == 5
                    sent = next(iter(state.exchanges.values())).send
                    assert sent.shape[0] == 4
