"""bench/ef_variants.py: its selection against a sort-based oracle, and a tiny run of every
variant on 2 ranks (ranks end identical, the report is written)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
import ef_variants  # noqa: E402  (bench/ef_variants.py, on the tests' pythonpath)

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "ef_variants.py")


def _oracle(acc: np.ndarray, sizes, ratio, min_numel, selection) -> np.ndarray:
    keep = np.zeros(acc.size, dtype=bool)
    offsets = np.cumsum([0] + list(sizes))
    budget, pool = 0, []
    for (a, b), n in zip(zip(offsets[:-1], offsets[1:]), sizes):
        if n < min_numel:
            keep[a:b] = True
            continue
        k = max(1, math.ceil(ratio * n))
        budget += k
        pool.extend(range(a, b))
        if selection == "parameter":
            keep[a + np.argsort(-np.abs(acc[a:b]), kind="stable")[:k]] = True
    if selection == "bucket" and budget:
        pool = np.array(pool)
        keep[pool[np.argsort(-np.abs(acc[pool]), kind="stable")[:budget]]] = True
    return keep


@pytest.mark.parametrize("selection", ["parameter", "bucket"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_mask_matches_oracle(selection, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [1500, 7, 3001, 1024, 1023, 2049]
    # Distinct magnitudes (a permutation), so the top-k is unique and order-free.
    acc = (torch.randperm(sum(sizes), generator=g).float() + 1) * \
        (torch.randint(0, 2, (sum(sizes),), generator=g) * 2 - 1)
    got = ef_variants.keep_mask(acc, sizes, 0.01, 1024, selection).numpy()
    want = _oracle(acc.numpy(), sizes, 0.01, 1024, selection)
    assert np.array_equal(got, want)
    assert got.sum() == 7 + 1023 + sum(max(1, math.ceil(0.01 * n))
                                        for n in sizes if n >= 1024)


@pytest.mark.parametrize("selection", ["parameter", "bucket"])
def test_keep_mask_by_score_matches_oracle(selection):
    """With a ``score`` the entries are chosen by it, not by |acc|."""
    g = torch.Generator().manual_seed(4)
    sizes = [1500, 7, 3001, 2049]
    acc = torch.randn(sum(sizes), generator=g)
    score = torch.randperm(sum(sizes), generator=g).float() + 1  # distinct, unrelated to acc
    got = ef_variants.keep_mask(acc, sizes, 0.01, 1024, selection, score=score).numpy()
    assert np.array_equal(got, _oracle(score.numpy(), sizes, 0.01, 1024, selection))
    assert not np.array_equal(got, _oracle(acc.numpy(), sizes, 0.01, 1024, selection))


def test_tiny_runs_of_every_variant(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, SCRIPT, "--ranks", "2", "--steps", "14",
                           "--tasks", "lm_synthetic", "--dct-set", "warmup_steps=4",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "transformers.json") as f:
        runs = json.load(f)["tasks"]["lm_synthetic"]
    assert set(runs) == {"dense", "dct"} | set(ef_variants.VARIANTS)
    for name, r in runs.items():
        assert r["ranks_identical"], name
        assert math.isfinite(r["quality"]), name
