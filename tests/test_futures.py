"""futures.py and the end of a run: a hook's result completes only after its callback has let go
of everything it captured, so that the collective's thread never drops the last reference to
the hook's state (and through it to a process group the program has destroyed meanwhile: the
group's destructor would join its own thread, and the process aborted with "Resource deadlock
avoided"). Nor does the state keep the world's group itself alive past
destroy_process_group."""

import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.distributed as dist

from dct_kernels.distributed.futures import after
from dist_harness import one_rank_group


class _Token:
    pass


@pytest.mark.parametrize("inputs", [1, 2])
@pytest.mark.parametrize("fails", [False, True])
def test_after_lets_go_before_it_completes(inputs, fails):
    """Deterministic: the result's own callbacks run inside set_result, on the completing
    thread, before ``after``'s callback returns; by then what ``fn`` captured must be free."""
    token = _Token()
    alive = weakref.ref(token)

    def fn(token=token):
        if fails:
            raise ValueError("fn failed")
        return 42

    futures = [torch.futures.Future() for _ in range(inputs)]
    result = after(futures, fn, torch.device("cpu"))
    del fn, token
    seen = []
    result.then(lambda done: seen.append(alive() is None))
    for future in futures:
        future.set_result(None)
    if fails:
        # The error is delivered; its traceback holds fn's frame (and so the token) for the
        # waiter to read, which is what a traceback is for.
        with pytest.raises(ValueError, match="fn failed"):
            result.wait()
    else:
        assert result.wait() == 42
        assert seen == [True]


@pytest.mark.parametrize("exchange", ["allgather", "reduce_scatter"])
def test_the_state_holds_no_reference_to_the_world_group(exchange):
    """Deterministic: with the default group, nothing the hook keeps between steps refers to
    the world's process group, so destroy_process_group frees it then and there (an exchange
    that kept it made the group outlive the program's last statement and abort at exit)."""
    from dct_kernels.distributed import DCTState, dct_hook
    from dct_kernels.distributed.stand_in import StandInBucket

    with one_rank_group():
        world = dist.group.WORLD
        before = sys.getrefcount(world)
        state = DCTState(ratio=0.01, warmup_steps=1, exchange=exchange)
        params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3000,), (40, 50), (7,))]
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            grads = [torch.randn(p.shape, generator=g) for p in params]
            dct_hook(state, StandInBucket(params, grads)).wait()
        assert state.exchanges and sys.getrefcount(world) == before


_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from dct_kernels.distributed import DCTState, dct_hook
    from dct_kernels.distributed.stand_in import StandInBucket

    exchange, own_group = sys.argv[1], sys.argv[2] == "own"
    shapes = [(3000,), (40, 50), (7,)]
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        group = dist.new_group([0]) if own_group else None
        state = DCTState(group, ratio=0.01, warmup_steps=2, exchange=exchange)
        for step in range(14):
            grads = [torch.randn(s, generator=g) for s in shapes]
            dct_hook(state, StandInBucket(params, grads)).wait()
        dist.destroy_process_group()
        del state, group
    print("clean")
""")


@pytest.mark.parametrize("group", ["world", "own"])
@pytest.mark.parametrize("exchange", ["allgather", "reduce_scatter"])
def test_group_destroyed_right_after_the_last_step(exchange, group):
    """The program's end as users write it: the last step's result, then
    destroy_process_group and the state dropped, fifteen times in one process, with the
    world's group or one the user made and passed (which the state holds). Before the
    callbacks let go first, 3 to 5 of 8 such processes aborted; this can pass by chance with
    the bug back (test_after_lets_go_before_it_completes cannot), never fail without it."""
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _SCRIPT, exchange, group],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-2000:]
