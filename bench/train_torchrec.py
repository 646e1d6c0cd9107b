"""TorchRec DLRM, dense vs DCT-DP on DistributedModelParallel's dense part.

    python bench/train_torchrec.py                 # 2 spawned gloo ranks, both runs
    python bench/train_torchrec.py --steps 300 --out /tmp/torchrec.json

TorchRec's own ``DLRM`` (an ``EmbeddingBagCollection`` of 26 tables sharded table-wise, the
dense and over MLPs data-parallel), trained on the synthetic click logs of
bench/train_dlrm.py (``dlrm.data``: the same planted teacher, seed and table sizes) twice:
``dense`` (DDP's all-reduce, as TorchRec's default wrapper does it, written as a comm hook so
its bytes are counted) and ``dct_dp`` (``DCTDataParallelWrapper``). Reports the held-out AUC
(scikit-learn) and the DP bytes per step and rank as bench/dlrm counts them (sent + received,
next to a ring all-reduce of the same buckets; docs/design.md#traffic-statistics). Needs the
TorchRec environment (docs/torchrec.md); writes JSON to --out.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import (DefaultDataParallelWrapper,
                                                 DistributedModelParallel)
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ShardingPlan
from torchrec.models.dlrm import DLRM
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dct_kernels.distributed.torchrec import DCTDataParallelWrapper

# bench/ is sys.path[0] when this runs as a script: dlrm is bench/dlrm.
from dlrm import dp_traffic
from dlrm.data import NUM_DENSE, ClickLogs, generate
from kernel_backend import kernel_backend, warn_if_core_missing  # bench/kernel_backend.py
import ranks  # bench/ranks.py

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RUNS = ("dense", "dct_dp")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Settings:
    """One comparison; the same on every rank. ``steps * batch_size`` training samples (one
    pass), ``heldout`` held-out ones; DCT-DP keeps ``ratio`` of each dense parameter."""

    steps: int = 1000
    batch_size: int = 1024          # global: batch_size / W per rank
    heldout: int = 65536
    seed: int = 0
    num_tables: int = 26
    min_rows: int = 100
    max_rows: int = 100_000
    emb_dim: int = 8
    dense_arch: tuple = (512, 256)  # then emb_dim (DLRM's dense arch ends at the table width)
    over_arch: tuple = (512, 256)   # then 1
    lr: float = 1e-3                # Adam, dense part
    emb_lr: float = 0.05            # row-wise Adagrad fused into the tables' backward
    ratio: float = 0.003
    value_dtype: str = "bfloat16"
    exchange: str = "auto"
    refresh_every: int = 1000
    warmup_steps: int = 0
    capacity_factor: float = 1.5
    min_numel: int = 0
    eval_chunk: int = 8192          # held-out samples per rank and forward

    def validate(self, world: int) -> None:
        """ValueError naming the setting for anything out of range."""
        for name in ("steps", "batch_size", "heldout", "num_tables", "emb_dim", "eval_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.batch_size % world:
            raise ValueError(f"batch_size: {self.batch_size} does not split into {world} ranks")
        if self.heldout < world:
            raise ValueError(f"heldout: need at least one sample per rank, got {self.heldout}")
        if self.value_dtype not in _DTYPES:
            raise ValueError(f"value_dtype: expected one of {list(_DTYPES)}, "
                             f"got {self.value_dtype!r}")


# ------------------------------------------------------------------------------ the model

def make_wrapper(settings: Settings, run: str):
    """The data-parallel wrapper of ``run``: ``DCTDataParallelWrapper`` with the settings'
    DCT-DP arguments for "dct_dp", the counting dense hook's for "dense"."""
    if run == "dense":
        return DenseHookWrapper()
    if run != "dct_dp":
        raise ValueError(f"run: expected one of {RUNS}, got {run!r}")
    return DCTDataParallelWrapper(
        ratio=settings.ratio, refresh_every=settings.refresh_every,
        warmup_steps=settings.warmup_steps, capacity_factor=settings.capacity_factor,
        min_numel=settings.min_numel, value_dtype=_DTYPES[settings.value_dtype],
        exchange=settings.exchange)


def build(settings: Settings, table_sizes: List[int], world: int, wrapper):
    """(DMP, the dense part's optimizer), built the same way for every run from the seed:
    TorchRec's DLRM, table t on rank t mod W, row-wise Adagrad fused into the tables' backward,
    Adam on the rest; ``wrapper`` builds the DDP of the dense part. Collective (DMP's and DDP's
    construction)."""
    torch.manual_seed(settings.seed)  # dense weights, and the tables' initial rows
    tables = [EmbeddingBagConfig(name=f"t{t}", embedding_dim=settings.emb_dim,
                                 num_embeddings=rows, feature_names=[f"f{t}"])
              for t, rows in enumerate(table_sizes)]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = DLRM(ebc, NUM_DENSE, [*settings.dense_arch, settings.emb_dim],
                 [*settings.over_arch, 1], dense_device=torch.device("cpu"))
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(),
                                {"lr": settings.emb_lr})
    plan = construct_module_sharding_plan(
        model.sparse_arch.embedding_bag_collection,
        {f"t{t}": table_wise(rank=t % world) for t in range(len(tables))},
        world_size=world, device_type="cpu")
    dmp = DistributedModelParallel(
        model, device=torch.device("cpu"), data_parallel_wrapper=wrapper,
        plan=ShardingPlan({"sparse_arch.embedding_bag_collection": plan}))
    dense_params = [p for name, p in dmp.named_parameters() if not _is_table(name)]
    return dmp, torch.optim.Adam(dense_params, lr=settings.lr)


def _is_table(name: str) -> bool:
    return ".embedding_bags." in name


class DenseHookWrapper(DefaultDataParallelWrapper):
    """TorchRec's default DDP, with DDP's all-reduce written as a comm hook that counts bytes
    (``dp_traffic.dense_hook``), so that the dense run's bytes are counted as DCT-DP's are."""

    def __init__(self):
        super().__init__()
        self.state: Optional[dp_traffic.DenseTraffic] = None

    def wrap(self, dmp, env, device):
        super().wrap(dmp, env, device)
        ddp = next(m for m in dmp.modules() if isinstance(m, DistributedDataParallel))
        self.state = dp_traffic.DenseTraffic(env.process_group)
        ddp.register_comm_hook(self.state, dp_traffic.dense_hook)


# ------------------------------------------------------------------------------ batches

def local_batch(data: ClickLogs, rows: np.ndarray, rank: int, world: int):
    """This rank's block of the global batch ``rows`` (W equal blocks, in rank order): dense
    features [B, 13], the ids as a KeyedJaggedTensor (one id per table and sample), labels."""
    block = len(rows) // world
    mine = rows[rank * block:(rank + 1) * block]
    ids = torch.from_numpy(np.ascontiguousarray(data.ids[mine].T))  # [T, B], feature-major
    tables = ids.shape[0]
    kjt = KeyedJaggedTensor(keys=[f"f{t}" for t in range(tables)], values=ids.reshape(-1),
                            lengths=torch.ones(tables * block, dtype=torch.int32))
    return (torch.from_numpy(data.dense[mine]), kjt,
            torch.from_numpy(data.labels[mine]))


def train_order(settings: Settings, num_train: int) -> np.ndarray:
    """The training rows in the order they are drawn (one pass, shuffled by the seed)."""
    return np.random.default_rng([settings.seed, 3]).permutation(num_train)


def evaluate(dmp, data: ClickLogs, settings: Settings, rank: int, world: int
             ) -> Dict[str, float]:
    """Held-out AUC and log loss (scikit-learn), the same on every rank: the held-out split cut
    into W equal blocks (at most W - 1 samples left out), each rank scoring its block in
    chunks of ``eval_chunk``. Collective."""
    from sklearn.metrics import log_loss, roc_auc_score

    block = data.num_heldout // world
    start = data.num_train + rank * block
    probs = []
    with torch.no_grad():
        for lo in range(0, block, settings.eval_chunk):
            rows = np.arange(start + lo, start + min(lo + settings.eval_chunk, block))
            dense, kjt, _ = local_batch(data, rows, 0, 1)
            probs.append(torch.sigmoid(dmp(dense, kjt).squeeze(1)).float())
    local = torch.cat(probs)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    p = np.clip(torch.cat(gathered).double().numpy(), 1e-7, 1 - 1e-7)
    labels = np.concatenate([data.labels[data.num_train + r * block:
                                         data.num_train + (r + 1) * block]
                             for r in range(world)])
    return {"auc": float(roc_auc_score(labels, p)),
            "logloss": float(log_loss(labels, p, labels=[0, 1]))}


def dense_digest(dmp) -> str:
    """sha256 of the dense part's names and bytes (the same on every rank when they agree)."""
    h = hashlib.sha256()
    for name, p in dmp.named_parameters():
        if not _is_table(name):
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- runs

def train(settings: Settings, data: ClickLogs, run: str, rank: int, world: int) -> dict:
    """Train ``run`` ("dense" or "dct_dp") for ``settings.steps`` steps and evaluate it;
    its results (the same on every rank but the times). Collective."""
    wrapper = make_wrapper(settings, run)
    dmp, opt = build(settings, data.table_sizes, world, wrapper)
    state = wrapper.state
    order = train_order(settings, data.num_train)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    step_s: List[float] = []
    for step in range(settings.steps):
        rows = order[step * settings.batch_size:(step + 1) * settings.batch_size]
        dense, kjt, labels = local_batch(data, rows, rank, world)
        t0 = time.perf_counter()
        loss = loss_fn(dmp(dense, kjt).squeeze(1), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # the tables' fused optimizer steps here
        opt.step()
        step_s.append(time.perf_counter() - t0)
    metrics = evaluate(dmp, data, settings, rank, world)
    moved, ring = dp_traffic.dp_totals(state, world)
    digests = [None] * world
    dist.all_gather_object(digests, dense_digest(dmp))
    out = dict(metrics, dp_bytes_per_step=moved / settings.steps,
               dp_bytes_ring_per_step=ring / settings.steps,
               dp_compression=ring / moved if moved else 0.0,
               step_ms=1000 * float(np.median(step_s)), train_s=float(np.sum(step_s)),
               dense_params=sum(p.numel() for n, p in dmp.named_parameters()
                                if not _is_table(n)),
               ranks_identical=len(set(digests)) == 1)
    if run == "dct_dp":
        out["dp_stats"] = {k: v for k, v in state.stats().items()
                           if isinstance(v, (int, float))}
    return out


def load_data(settings: Settings) -> ClickLogs:
    """The synthetic click logs of the settings (bench/train_dlrm.py's generator), the same on
    every rank: ``steps * batch_size`` training samples and ``heldout`` held-out ones."""
    return generate(settings.steps * settings.batch_size, settings.heldout, seed=settings.seed,
                    num_tables=settings.num_tables, min_rows=settings.min_rows,
                    max_rows=settings.max_rows)


def compare(settings: Settings, rank: int, world: int, runs=RUNS) -> dict:
    """Both runs on the same data; the report (rank 0's times). Collective."""
    from dlrm.context import teacher_auc

    settings.validate(world)
    data = load_data(settings)
    results = {run: train(settings, data, run, rank, world) for run in runs}
    report = {"settings": dataclasses.asdict(settings), "world_size": world,
              "backend": dist.get_backend(), "versions": _versions(),
              "teacher_auc": teacher_auc(data), "runs": results,
              "kernel_backend": kernel_backend("cpu")}  # the model's dense part is on the CPU
    if "dense" in results and "dct_dp" in results:
        report["auc_delta"] = results["dct_dp"]["auc"] - results["dense"]["auc"]
        report["dp_bytes_ratio"] = (results["dense"]["dp_bytes_per_step"]
                                    / results["dct_dp"]["dp_bytes_per_step"])
    return report


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out = {}
    for name in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "dct_kernels"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def table(report: dict) -> str:
    """The report as a few lines of text."""
    lines = [f"{'run':8} {'AUC':>7} {'log loss':>9} {'DP bytes/step':>14} "
             f"{'ring bytes/step':>16} {'compression':>12} {'step ms':>8}"]
    for run, r in report["runs"].items():
        lines.append(f"{run:8} {r['auc']:7.4f} {r['logloss']:9.4f} "
                     f"{r['dp_bytes_per_step']:14.0f} {r['dp_bytes_ring_per_step']:16.0f} "
                     f"{r['dp_compression']:11.1f}x {r['step_ms']:8.1f}")
    if "auc_delta" in report:
        lines.append(f"AUC dct_dp - dense: {report['auc_delta']:+.4f}; dense DP bytes / "
                     f"dct_dp DP bytes: {report['dp_bytes_ratio']:.1f}x; teacher AUC "
                     f"{report['teacher_auc']:.4f}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- launch

def _worker(rank: int, world: int, store: str, settings: Settings, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        report = compare(settings, rank, world)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        report["date"] = datetime.date.today().isoformat()
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print(table(report))
        print(f"wrote {out}")


def main(argv=None) -> None:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks to spawn (default 2)")
    for name in ("steps", "batch_size", "heldout", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--ratio", type=float, default=defaults.ratio)
    p.add_argument("--value-dtype", default=defaults.value_dtype, choices=list(_DTYPES))
    p.add_argument("--out", help="the JSON report (default bench/results/<device>/torchrec/"
                                 "torchrec_dlrm.json)")
    args = p.parse_args(argv)
    settings = dataclasses.replace(defaults, steps=args.steps, batch_size=args.batch_size,
                                   heldout=args.heldout, seed=args.seed, ratio=args.ratio,
                                   value_dtype=args.value_dtype)
    try:
        settings.validate(args.ranks)
    except ValueError as exc:
        sys.exit(f"train_torchrec.py: {exc}")
    out = args.out
    if out is None:
        from dlrm.cli import device_slug
        from dlrm.context import device_name

        out = os.path.join(BENCH_DIR, "results", device_slug(device_name()), "torchrec",
                           "torchrec_dlrm.json")

    warn_if_core_missing("cpu")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="torchrec_") as tmp:
        ranks.spawn(_worker, (args.ranks, os.path.join(tmp, "store"), settings, out),
                    args.ranks)
    print(f"total wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
