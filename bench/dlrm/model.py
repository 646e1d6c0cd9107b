"""The DLRM-style model, split for hybrid parallelism.

- ``EmbeddingShard`` (model parallel, local to one rank, never under DDP): the rank's
  embedding tables (``nn.EmbeddingBag``, one id per bag, sparse gradients) and a tower, one
  fully connected layer with ReLU over the concatenated pooled embeddings. Its ReLU activations
  are the "neurons" DCT-MP thresholds per sample: thresholding the raw pooled embeddings
  destroys them (a measured AUC loss of 0.07 at 5%), a ReLU layer's activations survive it.
  It runs on the ids of the whole global batch and its output crosses to the data-parallel part
  by an all-to-all (``exchange.py``).
- ``DenseArch`` (data parallel, under DDP): the bottom MLP over the dense features, a
  projection of the W received tower outputs to ``vectors`` interaction vectors, the pairwise
  dot products of those and the bottom MLP's output (DLRM's dot interaction), and the top MLP.

Shapes: B local batch, W ranks, T_r tables on rank r, d embedding dim, H tower width,
V interaction vectors of width e.
"""

from typing import List, Sequence

import torch
from torch import nn

from .data import NUM_DENSE


def _mlp(sizes: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class EmbeddingShard(nn.Module):
    """One rank's tables and tower: ids ``[N, T_r]`` (int64, column i in [0, rows of the
    rank's i-th table)) -> ReLU activations ``[N, H]``.

    The rank's tables live in one ``nn.EmbeddingBag`` (rows of table i from ``bases[i]``), one
    bag per (sample, table): with sparse gradients the optimizer then coalesces one gradient
    per step instead of one per table (SparseAdam over 13 separate tables took half the step
    time on the 2-core machine). Each table's initial rows come from a generator seeded with
    (seed, global table index), so a table starts the same whichever rank holds it.
    """

    def __init__(self, table_indices: Sequence[int], table_sizes: Sequence[int], dim: int,
                 tower_width: int, seed: int):
        super().__init__()
        if not table_indices:
            raise ValueError("table_indices: a shard needs at least one table "
                             "(more ranks than tables?)")
        self.table_indices = list(table_indices)
        sizes = [table_sizes[t] for t in self.table_indices]
        bases = [0]
        for n in sizes[:-1]:
            bases.append(bases[-1] + n)
        self.register_buffer("bases", torch.tensor(bases, dtype=torch.int64),
                             persistent=False)
        self.tables = nn.EmbeddingBag(sum(sizes), dim, mode="sum", sparse=True)
        with torch.no_grad():
            for t, base, n in zip(self.table_indices, bases, sizes):
                g = torch.Generator().manual_seed(seed * 1000 + t)
                self.tables.weight[base:base + n].normal_(0.0, 0.05, generator=g)
        g = torch.Generator().manual_seed(seed * 1000 + 999)
        self.tower = nn.Linear(len(self.table_indices) * dim, tower_width)
        with torch.no_grad():
            bound = 1.0 / self.tower.in_features ** 0.5
            self.tower.weight.uniform_(-bound, bound, generator=g)
            self.tower.bias.uniform_(0.0, bound, generator=g)  # most units start active

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, tables = ids.shape
        flat = (ids + self.bases).reshape(-1)
        offsets = torch.arange(0, flat.numel(), device=flat.device)
        pooled = self.tables(flat, offsets).view(n, tables * self.tables.embedding_dim)
        return torch.relu(self.tower(pooled))


class DenseArch(nn.Module):
    """Data-parallel part: dense ``[B, 13]`` and received tower outputs ``[B, W*H]`` ->
    logits ``[B]``.

    The received activations are projected to V vectors of width e (the bottom MLP's output
    width); the dot products of every pair among those V + 1 vectors (upper triangle, no
    diagonal) are concatenated with the bottom output and fed to the top MLP.
    """

    def __init__(self, world: int, tower_width: int, *, bottom=(64,), width: int = 16,
                 vectors: int = 8, top=(128, 64)):
        super().__init__()
        self.width, self.vectors = width, vectors
        self.bottom = _mlp([NUM_DENSE, *bottom, width], last_relu=True)
        self.project = nn.Linear(world * tower_width, vectors * width)
        n = vectors + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.top = _mlp([width + rows.numel(), *top, 1], last_relu=False)

    def forward(self, dense: torch.Tensor, towers: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)
        v = self.project(towers).view(-1, self.vectors, self.width)
        z = torch.cat([x.unsqueeze(1), v], dim=1)
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.pair_rows, self.pair_cols]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)


def shard_tables(table_sizes: Sequence[int], world: int) -> List[List[int]]:
    """Table-wise sharding: tables dealt to ranks largest first, each to the rank with the
    fewest rows so far (ties to the lower rank), so rows (memory and optimizer work) balance.
    Returns each rank's table indices in ascending order. Deterministic; raises ValueError
    when there are fewer tables than ranks."""
    if world > len(table_sizes):
        raise ValueError(f"world size {world}: more ranks than tables ({len(table_sizes)})")
    load = [0] * world
    owned: List[List[int]] = [[] for _ in range(world)]
    for t in sorted(range(len(table_sizes)), key=lambda t: (-table_sizes[t], t)):
        r = min(range(world), key=lambda r: (load[r], r))
        owned[r].append(t)
        load[r] += table_sizes[t]
    return [sorted(o) for o in owned]
