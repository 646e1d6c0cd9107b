"""Settings of one trainer invocation, and the presets (``--quick``, the smoke test's tiny)."""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

# Every run the trainer knows, in the order they run: the dense reference, the two baselines
# a user would pick instead of DCT (bf16 and PowerSGD gradients, bf16 activations), and DCT.
RUNS = ("dense", "bf16", "powersgd", "dct_dp", "dct_dp_mp")
# What runs without --runs: all five. The comparison on 1 Gbit/s links at W = 2 is meant to
# finish within 6 minutes on the 2-core machine; the five runs took 5 min 17 s there (--quick
# --link 1gbit, docs/time.md), so the baselines are in by default.
DEFAULT_RUNS = RUNS
# How far below the dense run's final held-out AUC a run may end and still count as reaching
# the dense quality (the goals' margin); time_to_target_s is measured against it.
TARGET_MARGIN = 0.002


@dataclass
class Config:
    """Every setting of a comparison; the same on every rank (checked by the runner).

    Data: ``steps * batch_size`` training samples (one pass, shuffled by the seed) and
    ``heldout`` samples, synthetic unless ``data_file`` names a Criteo-format TSV.
    Model: tables of ``emb_dim``, a ReLU tower of ``tower_width`` per rank, ``vectors``
    interaction vectors. DCT-DP: ``dp_ratio`` of each MLP parameter, layer-wise; DCT-MP:
    ``mp_k`` of the ``tower_width`` activations of each sample.
    """

    runs: List[str] = field(default_factory=lambda: list(DEFAULT_RUNS))
    ranks: int = 2
    steps: int = 1000
    batch_size: int = 1024          # global: batch_size / W samples per rank
    heldout: int = 65536
    eval_every: int = 100
    # Intermediate evaluations use the first this many held-out samples. The whole split (the
    # default) makes every evaluation comparable with the final one, which time to accuracy
    # (time_to_target_s against the dense run's final AUC) needs; smaller is cheaper.
    eval_subset: int = 65536
    log_every: int = 10
    seed: int = 0
    # data
    data_file: Optional[str] = None
    num_tables: int = 26
    min_rows: int = 100
    max_rows: int = 100_000
    hash_size: int = 100_000        # rows per table for a Criteo file
    # model
    emb_dim: int = 8
    width: int = 16                 # bottom MLP output and interaction vectors
    tower_width: int = 512          # the ReLU tower of each rank's shard
    vectors: int = 8
    lr: float = 1e-3                # Adam: MLPs, projection and towers
    emb_lr: float = 0.05            # row-wise Adagrad: embedding rows
    # DCT-DP
    dp_ratio: float = 0.003
    exchange: str = "auto"
    refresh_every: int = 1000
    warmup_steps: int = 0
    capacity_factor: float = 1.5
    min_numel: int = 0
    # At least 4 entries a step for every MLP parameter: at ratio 0.003 the biases and the
    # last layer would send one (over seeds 0-2 at W = 4: -0.0015 AUC against -0.0023 with 1,
    # for 1% more bytes; bench/results/CPU_x86_64_2_cores/threshold_rule/min_k/).
    dp_min_k: int = 4
    dp_value_dtype: str = "bfloat16"
    dp_index_encoding: str = "int32"
    # DCT-MP
    mp_k: int = 32                  # 6.25% of 512: 21.3x fewer bytes with bf16 + int16
    mp_value_dtype: str = "bfloat16"
    backend: Optional[str] = None   # kernel backend for the ops (default: per device)
    # PowerSGD baseline (torch's powerSGD_hook): rank 2, the rank the PowerSGD paper (Vogels et
    # al., NeurIPS 2019) trains at without loss of accuracy, and torch's own warm-up of plain
    # all-reduces for the first ``powersgd_start_iter`` steps (None: 10% of the steps, torch's
    # suggested starting point, at least 2, torch's minimum with error feedback).
    powersgd_rank: int = 2
    powersgd_start_iter: Optional[int] = None

    def powersgd_start(self) -> int:
        """The step from which the PowerSGD run compresses (see ``powersgd_start_iter``)."""
        if self.powersgd_start_iter is not None:
            return self.powersgd_start_iter
        return max(2, self.steps // 10)

    def validate(self) -> None:
        """ValueError naming the setting for anything out of range."""
        for name in self.runs:
            if name not in RUNS:
                raise ValueError(f"runs: unknown run {name!r}; expected some of {RUNS}")
        if not self.runs:
            raise ValueError(f"runs: none given; expected some of {RUNS}")
        if len(set(self.runs)) != len(self.runs):
            raise ValueError(f"runs: {self.runs} names a run twice")
        for name in ("ranks", "steps", "batch_size", "heldout", "eval_every", "log_every",
                     "emb_dim", "width", "tower_width", "vectors", "refresh_every", "mp_k",
                     "eval_subset", "powersgd_rank", "dp_min_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "min_numel", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not 1 <= self.capacity_factor < float("inf"):
            raise ValueError(f"capacity_factor: expected a finite number >= 1, got "
                             f"{self.capacity_factor}")
        if self.hash_size < 1:
            raise ValueError(f"hash_size: expected >= 1, got {self.hash_size}")
        if self.data_file is not None and not os.path.isfile(self.data_file):
            raise ValueError(f"data_file: {self.data_file!r} is not a file")
        if self.batch_size % self.ranks:
            raise ValueError(f"batch_size: {self.batch_size} does not split into {self.ranks} "
                             f"equal per-rank batches")
        if self.heldout < self.ranks:
            raise ValueError(f"heldout: need at least one sample per rank, got {self.heldout}")
        if self.powersgd_start_iter is not None and self.powersgd_start_iter < 2:
            raise ValueError(f"powersgd_start_iter: torch's PowerSGD with error feedback needs "
                             f">= 2 plain steps first, got {self.powersgd_start_iter}")
        if not 0 < self.dp_ratio <= 1:
            raise ValueError(f"dp_ratio: expected in (0, 1], got {self.dp_ratio}")
        if self.mp_k > self.tower_width:
            raise ValueError(f"mp_k: expected <= tower_width ({self.tower_width}), "
                             f"got {self.mp_k}")
        if self.exchange not in ("allgather", "reduce_scatter", "auto"):
            raise ValueError(f"exchange: expected allgather, reduce_scatter or auto, "
                             f"got {self.exchange!r}")
        if self.dp_value_dtype not in ("float32", "float16", "bfloat16", "float8_e4m3fn"):
            raise ValueError(f"dp_value_dtype: expected float32, float16, bfloat16 or "
                             f"float8_e4m3fn, got {self.dp_value_dtype!r}")
        if self.mp_value_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"mp_value_dtype: expected float32, float16 or bfloat16, got "
                             f"{self.mp_value_dtype!r}")
        if self.dp_index_encoding not in ("int32", "delta"):
            raise ValueError(f"dp_index_encoding: expected int32 or delta, got "
                             f"{self.dp_index_encoding!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def quick() -> Config:
    """The README's comparison: 1000 steps of 1024, about a minute per run on 2 CPU cores."""
    return Config()


def tiny() -> Config:
    """The smoke test's size: seconds per run."""
    return Config(steps=24, batch_size=64, heldout=512, eval_every=12, eval_subset=512,
                  log_every=1,
                  num_tables=6, min_rows=20, max_rows=2000, tower_width=64, mp_k=4,
                  vectors=4, refresh_every=8, dp_ratio=0.01)
