"""Command line and launch: spawns its own ranks, or joins the group torchrun made."""

import argparse
import dataclasses
import datetime
import os
import re
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import report as report_mod
from .config import RUNS, Config, quick, tiny
from .context import device_name, kernel_backends, load_data, rank_device, teacher_auc
from .data import ClickLogs
from .runner import Callbacks, RankRunner

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_slug(name: str) -> str:
    """The folder name under bench/results/, as bench/results_table.py names card folders."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def _check_same_config(cfg: Config, group=None) -> None:
    """Raise on every rank when the ranks were given different settings."""
    mine = repr(sorted(cfg.as_dict().items()))
    everyone: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if any(other != mine for other in everyone):
        raise ValueError("config: the ranks were started with different settings")


def train(cfg: Config, out_dir: Optional[str], *, callbacks: Optional[Callbacks] = None,
          progress: bool = True, started: Optional[float] = None, write_plots: bool = True,
          data: Optional[ClickLogs] = None) -> dict:
    """Run the comparison on this rank of an initialized process group; rank 0 writes the
    report into ``out_dir`` (None: nothing written). Returns the report (every rank).

    Besides the runs, the report records where they ran: ``device`` (the card's or CPU's
    name), ``backend`` (torch.distributed's), and ``kernel_backend``, the dct_kernels backend
    the ops resolved to on each rank's device ("cpu" or "cuda" for the compiled cores,
    "triton", or "torch" for the reference): one name when every rank agrees, else the list in
    rank order. A run whose compiled core is not built says so in one line before training.

    Collective: every rank calls it with the same ``cfg``."""
    started = time.time() if started is None else started
    cfg.validate()
    if dist.get_world_size() != cfg.ranks:
        cfg = dataclasses.replace(cfg, ranks=dist.get_world_size())
        cfg.validate()
    _check_same_config(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    kernels = kernel_backends(device, cfg.backend)
    data = load_data(cfg) if data is None else data
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps * len(cfg.runs), desc="dlrm", unit="step",
                   dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    runs = RankRunner(cfg, data, device, callbacks=callbacks, progress=bar).run()
    if bar is not None:
        bar.close()
    name = device_name()
    result = {
        "world_size": world,
        "device": name,
        "backend": dist.get_backend(),
        "kernel_backend": kernels,
        "teacher_auc": teacher_auc(data),
        "num_train": data.num_train,
        "num_heldout": data.num_heldout - data.num_heldout % world,
        "table_sizes": list(data.table_sizes),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "config": cfg.as_dict(),
        "runs": runs,
    }
    result["wall_s"] = time.time() - started
    if rank == 0 and out_dir is not None:
        report_mod.write(result, out_dir, with_plots=write_plots)
    return result


def _pick_backend(world: int) -> str:
    """NCCL when every rank has a GPU of its own, else gloo (CPU tensors)."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world \
        else "gloo"


def _worker(rank: int, world: int, store: str, cfg: Config, out_dir: str, started: float,
            sweep: bool) -> None:
    backend = _pick_backend(world)
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        _main_rank(cfg, out_dir, started, sweep)
    finally:
        dist.destroy_process_group()


def _main_rank(cfg: Config, out_dir: str, started: float, sweep: bool) -> None:
    if sweep:
        from .sweep import run_sweep

        run_sweep(cfg, out_dir, started)
        return
    result = train(cfg, out_dir, started=started)
    if dist.get_rank() == 0:
        print()
        print("\n".join([report_mod.TABLE_HEADER,
                         "|---" * (report_mod.TABLE_HEADER.count("|") - 1) + "|"]
                        + report_mod.table_rows(result)))
        print(f"\nteacher AUC {result['teacher_auc']}, world size {result['world_size']} "
              f"({result['backend']}), dct_kernels backend "
              f"{report_mod.kernel_backend_text(result)}, wall {result['wall_s']:.0f} s; "
              f"written to {out_dir}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Hybrid-parallel DLRM on synthetic (or Criteo) click logs: dense vs "
                    "DCT-DP vs DCT-DP+MP, with held-out AUC and bytes per step. Spawns "
                    "--ranks processes, or joins the group when started by torchrun.")
    p.add_argument("--quick", action="store_true",
                   help="the README's comparison (the default sizes; 1000 steps of 1024)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration")
    p.add_argument("--sweep", action="store_true",
                   help="sweep DP ratio and MP k (dct_dp_mp runs next to one dense run); "
                        "writes dlrm_sweep.* next to the dlrm folder")
    p.add_argument("--ranks", type=int, help="processes to spawn (default 2)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (split over the ranks)")
    p.add_argument("--heldout", type=int, help="held-out samples (synthetic data)")
    p.add_argument("--dp-ratio", type=float, help="DCT-DP: fraction of each MLP parameter sent")
    p.add_argument("--mp-k", type=int, help="DCT-MP: activations kept per sample and rank")
    p.add_argument("--exchange", choices=["allgather", "reduce_scatter", "auto"])
    p.add_argument("--warmup-steps", type=int, help="DCT-DP dense warm-up steps")
    p.add_argument("--min-numel", type=int, help="DCT-DP: smaller parameters go dense")
    p.add_argument("--capacity-factor", type=float)
    p.add_argument("--refresh-every", type=int)
    p.add_argument("--runs", help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--data-file", help="a Criteo-format TSV file instead of synthetic data")
    p.add_argument("--hash-size", type=int, help="rows per table for --data-file")
    p.add_argument("--out", help="output folder (default bench/results/<device>/dlrm, and "
                                 "bench/results/<device> for --sweep)")
    p.add_argument("--seed", type=int)
    return p.parse_args(argv)


def config_from_args(args) -> Config:
    cfg = tiny() if args.tiny else quick()
    fields = {"ranks": args.ranks, "steps": args.steps, "batch_size": args.batch_size,
              "heldout": args.heldout, "dp_ratio": args.dp_ratio, "mp_k": args.mp_k,
              "exchange": args.exchange, "warmup_steps": args.warmup_steps,
              "min_numel": args.min_numel, "capacity_factor": args.capacity_factor,
              "refresh_every": args.refresh_every, "data_file": args.data_file,
              "hash_size": args.hash_size, "seed": args.seed}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in fields.items() if v is not None})
    if args.runs:
        cfg.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    cfg.validate()
    return cfg


def main(argv=None) -> None:
    started = time.time()
    args = parse_args(argv)
    cfg = config_from_args(args)
    results = os.path.join(BENCH_DIR, "results", device_slug(device_name()))
    out_dir = args.out or (results if args.sweep else os.path.join(results, "dlrm"))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        world = int(os.environ["WORLD_SIZE"])
        backend = _pick_backend(world)
        if backend == "gloo":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        dist.init_process_group(backend)
        cfg = dataclasses.replace(cfg, ranks=world)
        try:
            _main_rank(cfg, out_dir, started, args.sweep)
        finally:
            dist.destroy_process_group()
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dlrm_") as tmp:
        mp.start_processes(_worker, args=(cfg.ranks, os.path.join(tmp, "store"), cfg, out_dir,
                                          started, args.sweep),
                           nprocs=cfg.ranks, join=True, start_method="spawn")
    print(f"total wall time {time.time() - started:.0f} s")
