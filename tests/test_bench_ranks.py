"""bench/ranks.py: spawned ranks leave no traceback files behind, also when one fails."""

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch.multiprocessing as mp

import ranks  # bench/ranks.py


def _fail_on_rank_one(rank, message):
    if rank == 1:
        raise RuntimeError(message)


def _error_files():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pytorch-errorfile-*")))


def test_a_failing_rank_raises_and_leaves_nothing():
    before = _error_files()
    with pytest.raises(mp.ProcessRaisedException, match="rank one says no"):
        ranks.spawn(_fail_on_rank_one, ("rank one says no",), 2)
    assert _error_files() - before == set()


def test_ranks_that_succeed_leave_nothing():
    before = _error_files()
    ranks.spawn(_fail_on_rank_one, ("unused",), 1)
    assert _error_files() - before == set()


def _record_cache_dir(rank, path):
    with open(path, "w") as f:
        f.write(os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))


def test_the_ranks_inductor_cache_is_their_own_and_goes(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    record = tmp_path / "cache_dir.txt"
    ranks.spawn(_record_cache_dir, (str(record),), 1)
    used = record.read_text()
    assert used and os.path.basename(used).startswith("dct_kernels_inductor_")
    assert not os.path.exists(used) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def _sleep_and_record(rank, folder):
    with open(os.path.join(folder, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    import time
    time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a parent that is gone) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_launcher_stops_its_ranks_and_leaves_nothing(tmp_path, signum):
    """SIGTERM or SIGINT sent to the launcher alone (a scheduler, ``timeout``): the launcher
    stops its ranks at once (they would sleep for two minutes) and removes their inductor
    folder; nothing is left in its temporary folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    bench = os.path.join(os.path.dirname(here), "bench")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    code = (f"import sys; sys.path[:0] = [{here!r}, {bench!r}]\n"
            "import ranks, test_bench_ranks as t\n"
            f"ranks.spawn(t._sleep_and_record, ({str(tmp_path)!r},), 2)\n")
    launcher = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 120
        pids = {}
        while len(pids) < 2 and time.monotonic() < deadline:
            for rank in (0, 1):
                path = tmp_path / f"{rank}.pid"
                if path.exists() and path.read_text():
                    pids[rank] = int(path.read_text())
            time.sleep(0.1)
        assert len(pids) == 2, "the ranks did not start"
        launcher.send_signal(signum)
        assert launcher.wait(timeout=60) != 0
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids.values()), "a rank outlived its launcher"
        assert os.listdir(temp) == [], os.listdir(temp)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
