"""Run named checks in one spawned gloo group, with deadlines so that nothing can hang.

``run_group(world_size, module, names, tmp_path)`` starts ``world_size`` processes (one
process group, ``file://`` store, a collective timeout), runs each check
``module.<name>(rank, world_size)`` on every rank in turn, and returns
``{name: {rank: None or traceback}}``. A check that raises on a rank is recorded and the next
check runs; a group that outlives its deadline is killed and reported. ``spawned_checks`` makes
the fixture and the test a test module binds for one such group.
"""

import contextlib
import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ranks  # bench/ranks.py (the tests' pythonpath)

COLLECTIVE_TIMEOUT_S = 30


@contextlib.contextmanager
def one_rank_group():
    """A gloo group of one rank in this process, on an in-memory store: no file for the
    group's threads to find removed under them (a file:// store in a directory deleted right
    after destroy_process_group aborts the process now and then)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank, world_size, store, module_name, names, result_dir):
    import importlib

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    module = importlib.import_module(module_name)
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            getattr(module, name)(rank, world_size)
            results[name] = {"error": None}
        except Exception:  # recorded, reported by the parent
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        # Written after every check, so a later hang still leaves the earlier results.
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()
    dist.destroy_process_group()


def run_group(world_size, module_name, names, tmp_path, deadline_s=240):
    """Run the checks; return {name: {rank: error text or None}} (see the module docstring).

    Raises RuntimeError when a process fails outside the checks or the group outlives
    ``deadline_s`` (the processes are killed first).
    """
    result_dir = str(tmp_path)
    store = os.path.join(result_dir, "store")
    context = mp.start_processes(_worker, args=(world_size, store, module_name, list(names),
                                                result_dir),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    timed_out = False
    try:
        while True:
            try:
                if context.join(timeout=1.0):
                    break
            except Exception as error:  # a process died outside the checks
                raise RuntimeError(f"distributed group of {world_size} failed: "
                                   f"{error}") from None
            if time.monotonic() > deadline:
                timed_out = True
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                break
    finally:
        ranks.remove_error_files(context)  # torch leaves them in the temporary folder
    results = {name: {} for name in names}
    for rank in range(world_size):
        path = os.path.join(result_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for name, outcome in json.load(f).items():
                results[name][rank] = outcome
    if timed_out:
        done = {n: sorted(r) for n, r in results.items()}
        raise RuntimeError(f"distributed group of {world_size} did not finish within "
                           f"{deadline_s} s; checks completed per rank: {done}")
    return results


def assert_check_passed(results, name, world_size):
    """Fail with every rank's traceback when check ``name`` failed or did not run."""
    outcomes = results[name]
    missing = [r for r in range(world_size) if r not in outcomes]
    failed = {r: o["error"] for r, o in outcomes.items() if o["error"]}
    if missing or failed:
        text = [f"check {name} on {world_size} ranks:"]
        if missing:
            text.append(f"did not run on ranks {missing}")
        for rank, error in sorted(failed.items()):
            text.append(f"--- rank {rank} ---\n{error}")
        raise AssertionError("\n".join(text))


def spawned_checks(module_name, world_size, names, deadline_s=240):
    """(fixture, test) for a test module, to bind as ``group_of_<world_size>`` and a test name:

        group_of_2, test_two_ranks = spawned_checks("dist_checks", 2, CHECKS_2)

    The fixture (module scope, named ``group_of_<world_size>``) runs the checks ``names`` of
    ``module_name`` in one spawned group (``run_group``); the test, parametrized over the
    names, asserts that each check passed on every rank."""
    fixture_name = f"group_of_{world_size}"

    @pytest.fixture(scope="module", name=fixture_name)
    def group(tmp_path_factory):
        return run_group(world_size, module_name, names,
                         tmp_path_factory.mktemp(f"{module_name}_{world_size}"),
                         deadline_s=deadline_s)

    @pytest.mark.parametrize("name", names)
    def test(request, name):
        assert_check_passed(request.getfixturevalue(fixture_name), name, world_size)

    return group, test
