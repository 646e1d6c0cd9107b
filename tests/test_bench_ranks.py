"""bench/ranks.py: spawned ranks leave no traceback files behind, also when one fails."""

import glob
import os
import tempfile

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
