"""Synthetic click logs from a planted teacher, and the in-memory dataset both sources fill.

The teacher is a small DLRM-like model with fixed random weights:

- 13 dense features, log-normal "counts" as in Criteo (the student sees ``log1p`` of them);
- 26 categorical features, table sizes log-spaced between ``min_rows`` and ``max_rows``, ids
  drawn with power-law frequencies (p(rank r) about (r + 1)^-alpha, by inverse CDF; the
  ranks shuffled over the table's rows);
- teacher embeddings with shared per-table structure: row i of table t is
  ``mu_t + spread * eps_i`` with one mean vector ``mu_t`` per table. With independent N(0, 1)
  rows no student can learn the rare ids (the per-id effects are pure noise at these sample
  counts); the shared mean makes a table's effect learnable and leaves the frequent ids'
  deviations as what the embeddings have to memorize;
- logit = dense MLP + first-order id terms + pairwise dot products between a fixed set of
  table pairs + a dense x sparse interaction, standardized and scaled so that the teacher's
  own AUC is about 0.8, with a bias for a click rate of about 25%;
- labels drawn as Bernoulli(sigmoid(logit)), so the teacher's AUC on the held-out split is the
  ceiling a student can reach.

Everything is a function of the seed (numpy's PCG64), so every rank builds the same data set
without any exchange; see ``generate``.
"""

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

NUM_DENSE = 13
NUM_SPARSE = 26


@dataclass
class ClickLogs:
    """Training and held-out samples, identical on every rank.

    dense: float32 [N, 13] (already log1p-transformed); ids: int64 [N, 26], ids[:, t] in
    [0, table_sizes[t]); labels: float32 [N] of 0/1. The first ``num_train`` rows are the
    training split, the rest the held-out split. ``teacher_prob`` (float64 [N]) is the
    teacher's click probability where the data is synthetic, else None.
    """

    dense: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    table_sizes: List[int]
    num_train: int
    teacher_prob: Optional[np.ndarray] = None

    @property
    def num_heldout(self) -> int:
        return len(self.labels) - self.num_train


def table_sizes(num_tables: int, min_rows: int, max_rows: int) -> List[int]:
    """Table sizes log-spaced from ``min_rows`` to ``max_rows`` (both included)."""
    if num_tables < 1 or min_rows < 1 or max_rows < min_rows:
        raise ValueError(f"table sizes: need num_tables >= 1 and 1 <= min_rows <= max_rows, "
                         f"got {num_tables}, {min_rows}, {max_rows}")
    return [int(round(v)) for v in np.geomspace(min_rows, max_rows, num_tables)]


def _power_law_ids(rng: np.random.Generator, rows: int, count: int, alpha: float) -> np.ndarray:
    """``count`` ids in [0, rows): rank r = floor(x) - 1 of x drawn from the density
    proportional to x^-alpha on [1, rows + 1) (inverse CDF, so no search over the table),
    then the ranks mapped to rows by a random permutation."""
    u = rng.random(count)
    if alpha == 1.0:
        x = np.exp(u * np.log(rows + 1.0))
    else:
        top = (rows + 1.0) ** (1.0 - alpha)
        x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - alpha))
    ranks = np.minimum(x.astype(np.int64) - 1, rows - 1)
    np.maximum(ranks, 0, out=ranks)
    return rng.permutation(rows)[ranks]


class Teacher:
    """The planted model: fixed random weights drawn from ``seed``; see the module docstring."""

    def __init__(self, sizes: List[int], seed: int, dim: int = 8, spread: float = 0.6,
                 num_pairs: int = 40):
        rng = np.random.default_rng([seed, 1])
        self.sizes = list(sizes)
        self.dim = dim
        tables = len(sizes)
        self.means = rng.standard_normal((tables, dim))
        self.tables = [(self.means[t] + spread * rng.standard_normal((n, dim)))
                       .astype(np.float32) for t, n in enumerate(sizes)]
        self.w1 = rng.standard_normal((NUM_DENSE, 16)) / np.sqrt(NUM_DENSE)
        self.b1 = 0.5 * rng.standard_normal(16)
        self.w2 = rng.standard_normal(16) / 4.0
        self.first_order = rng.standard_normal(dim) / np.sqrt(dim)
        all_pairs = [(a, b) for a in range(tables) for b in range(a + 1, tables)]
        chosen = rng.choice(len(all_pairs), size=min(num_pairs, len(all_pairs)), replace=False)
        self.pairs = [all_pairs[i] for i in sorted(chosen)]
        self.pair_matrix = np.zeros((tables, tables))
        for a, b in self.pairs:
            self.pair_matrix[a, b] = 1.0
        self.pair_matrix = self.pair_matrix.astype(np.float32)
        self.cross = rng.standard_normal((16, dim)) / 4.0
        self.scale = None  # set by calibrate()
        self.bias = None

    def raw_logit(self, dense: np.ndarray, ids: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """Unscaled teacher logits (float64 [N]) of dense [N, 13] features and ids [N, T]."""
        out = np.empty(len(dense))
        for start in range(0, len(dense), chunk):
            stop = min(start + chunk, len(dense))
            out[start:stop] = self._raw_logit(dense[start:stop], ids[start:stop])
        return out

    def _raw_logit(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        h = np.tanh(dense @ self.w1 + self.b1)
        tables, n = len(self.sizes), len(dense)
        emb = np.empty((tables, n, self.dim), dtype=np.float32)  # table-major: fast gathers
        for t in range(tables):
            np.take(self.tables[t], ids[:, t], axis=0, out=emb[t])
        z = h @ self.w2
        z += emb.sum(axis=0) @ self.first_order / np.sqrt(tables)
        # sum over the chosen pairs (a, b) of e_a . e_b, as e . (P e) with P the pair matrix
        paired = (self.pair_matrix @ emb.reshape(tables, -1)).reshape(emb.shape)
        z += np.einsum("tnd,tnd->n", emb, paired) / np.sqrt(self.dim * len(self.pairs))
        z += np.einsum("nd,nd->n", h @ self.cross, emb.mean(axis=0))
        return z

    def calibrate(self, raw: np.ndarray, logit_std: float, click_rate: float) -> None:
        """Scale raw logits to std ``logit_std`` and pick the bias for ``click_rate``."""
        centred = (raw - raw.mean()) / raw.std()
        self.scale = logit_std / raw.std()
        self.offset = raw.mean()
        lo, hi = -10.0, 10.0
        for _ in range(60):  # bisection on the mean click probability
            mid = 0.5 * (lo + hi)
            rate = np.mean(1.0 / (1.0 + np.exp(-(logit_std * centred + mid))))
            lo, hi = (mid, hi) if rate < click_rate else (lo, mid)
        self.bias = 0.5 * (lo + hi)

    def prob(self, raw: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-((raw - self.offset) * self.scale + self.bias)))


def generate(num_train: int, num_heldout: int, *, seed: int, num_tables: int = NUM_SPARSE,
             min_rows: int = 100, max_rows: int = 100_000, alpha: float = 1.05,
             logit_std: float = 1.6, click_rate: float = 0.25) -> ClickLogs:
    """Seeded synthetic click logs (see the module docstring).

    Args:
        num_train, num_heldout: samples in each split (>= 1).
        seed: the only source of randomness: the same seed gives bitwise the same data on every
            rank and machine (numpy PCG64, float64 arithmetic, no threads).
        num_tables, min_rows, max_rows: the categorical features' tables.
        alpha: power-law exponent of the id frequencies.
        logit_std, click_rate: the teacher's logit spread (sets its AUC) and mean click rate.

    Returns:
        ``ClickLogs`` with ``teacher_prob`` set. Costs about 1 s per 100 000 samples on one
        core of the development machine.

    Raises:
        ValueError for sizes below 1.
    """
    if num_train < 1 or num_heldout < 1:
        raise ValueError(f"num_train, num_heldout: expected >= 1, got {num_train}, "
                         f"{num_heldout}")
    sizes = table_sizes(num_tables, min_rows, max_rows)
    teacher = Teacher(sizes, seed)
    total = num_train + num_heldout
    rng = np.random.default_rng([seed, 2])
    counts = np.floor(np.exp(rng.normal(1.0, 1.5, size=(total, NUM_DENSE))))
    dense = np.log1p(counts).astype(np.float32)
    ids = np.empty((total, num_tables), dtype=np.int64)
    for t, rows in enumerate(sizes):
        ids[:, t] = _power_law_ids(rng, rows, total, alpha)
    raw = teacher.raw_logit(dense.astype(np.float64), ids)
    teacher.calibrate(raw[:num_train], logit_std, click_rate)
    prob = teacher.prob(raw)
    labels = (rng.random(total) < prob).astype(np.float32)
    return ClickLogs(dense, ids, labels, sizes, num_train, prob)
