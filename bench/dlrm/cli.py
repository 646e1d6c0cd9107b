"""Command line and launch: spawns its own ranks, joins the group torchrun made, or, with
``--link``, builds an emulated cluster (bench/cluster.py) and starts one rank per network
namespace on it."""

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import tempfile
import time
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

import ranks  # bench/ranks.py

from . import report as report_mod
from .checkpoint import Checkpointer, CheckpointError
from .config import DEFAULT_RUNS, RUNS, TARGET_MARGIN, Config, quick, tiny
from .context import device_name, kernel_backends, load_data, rank_device, teacher_auc
from .data import ClickLogs
from .runner import Callbacks, RankRunner, StopRequested

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_DLRM = os.path.join(BENCH_DIR, "train_dlrm.py")
# Set by the --link launcher in its ranks' environment: the link's description (JSON), which
# rank 0 writes into dlrm.json. Its presence also tells a rank it runs on the emulated cluster.
LINK_ENV = "DCT_DLRM_LINK"
# How long a collective waits for a peer before it fails (--pg-timeout): a rank that died is
# usually noticed at once (gloo sees its connections close), a rank that hangs only then.
DEFAULT_PG_TIMEOUT_S = 300
# Steps between checkpoints within a run (--checkpoint-every) when --checkpoint-dir is given.
DEFAULT_CHECKPOINT_EVERY = 100
# At most this many ranks on the emulated cluster: every rank is a process on this machine's
# cores, and with several ranks per core the step times show the scheduler more than the link.
MAX_LINK_RANKS = 8


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


def time_to_target(evals: dict, target: Optional[float]) -> Tuple[Optional[float],
                                                                  Optional[int]]:
    """(training time, step) at the first evaluation whose AUC reaches ``target``; (None, None)
    when none does or there is no target."""
    if target is None:
        return None, None
    for step, auc, seconds in zip(evals["step"], evals["auc"], evals["train_s"]):
        if auc >= target:
            return seconds, step
    return None, None


def add_time_to_target(runs: dict) -> Optional[float]:
    """Set every run's ``time_to_target_s`` and ``steps_to_target`` against the target AUC,
    the dense run's final AUC - TARGET_MARGIN (None, and so are the times, without a dense
    run); returns the target."""
    target = runs["dense"]["auc"] - TARGET_MARGIN if "dense" in runs else None
    for run in runs.values():
        run["time_to_target_s"], run["steps_to_target"] = time_to_target(run["evals"], target)
    return target


class _LineProgress:
    """Progress as a plain line every fifth of a run, for output that is not a terminal (the
    emulated cluster forwards the ranks' output line by line, where tqdm's carriage returns
    would pile up into one line)."""

    def __init__(self, steps: int):
        self.steps, self.done, self.postfix = steps, 0, {}
        self.every = max(1, steps // 5)

    def update(self, n: int) -> None:
        self.done += n
        step = (self.done - 1) % self.steps + 1
        if step % self.every == 0 or step == self.steps:
            extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            print(f"dlrm: step {step}/{self.steps} {extra}", file=sys.stderr, flush=True)

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs

    def close(self) -> None:
        pass


def train(cfg: Config, out_dir: Optional[str], *, callbacks: Optional[Callbacks] = None,
          progress: bool = True, started: Optional[float] = None, write_plots: bool = True,
          data: Optional[ClickLogs] = None, link: Optional[dict] = None,
          checkpoint_dir: Optional[str] = None,
          checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
          stop_after: Optional[tuple] = None) -> dict:
    """Run the comparison on this rank of an initialized process group; rank 0 writes the
    report into ``out_dir`` (None: nothing written). Returns the report (every rank).

    Time to accuracy: ``target_auc`` is the dense run's final held-out AUC minus
    TARGET_MARGIN (None without a dense run), and every run gets ``time_to_target_s``, the
    training time (``train_s`` so far: the steps, no evaluation) at its first evaluation
    whose AUC reaches it, and ``steps_to_target`` (both None if none does). Times are rank
    0's. ``link`` describes the emulated cluster's link (the report's ``link``: None on
    loopback).

    Besides the runs, the report records where they ran: ``device`` (the card's or CPU's
    name), ``backend`` (torch.distributed's), and ``kernel_backend``, the dct_kernels backend
    the ops resolved to on each rank's device ("cpu" or "cuda" for the compiled cores,
    "triton", or "torch" for the reference): one name when every rank agrees, else the list in
    rank order. A run whose compiled core is not built says so in one line before training.

    ``checkpoint_dir``: checkpoints every ``checkpoint_every`` steps of a run and after each
    run (bench/dlrm/checkpoint.py), and a resume from the newest complete one there (a
    checkpoint of another configuration raises CheckpointError naming the differing fields).
    ``stop_after`` (run name, step): raise StopRequested after that step, as a killed job
    would stop (no report).

    Collective: every rank calls it with the same ``cfg``."""
    started = time.time() if started is None else started
    cfg.validate()
    if dist.get_world_size() != cfg.ranks:
        cfg = dataclasses.replace(cfg, ranks=dist.get_world_size())
        cfg.validate()
    # The device first: under NCCL the object collective of the config check runs on the
    # current GPU, which must be this rank's own before any collective.
    device = rank_device()
    _check_same_config(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    kernels = kernel_backends(device, cfg.backend)
    data = load_data(cfg) if data is None else data
    bar = None
    if progress and rank == 0:
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps * len(cfg.runs), desc="dlrm", unit="step",
                       dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        else:
            bar = _LineProgress(cfg.steps)
    checkpointer = (Checkpointer(checkpoint_dir, checkpoint_every, cfg.as_dict())
                    if checkpoint_dir is not None else None)
    runs = RankRunner(cfg, data, device, callbacks=callbacks, progress=bar).run(
        checkpointer, stop_after)
    if bar is not None:
        bar.close()
    target = add_time_to_target(runs)
    name = device_name()
    result = {
        "world_size": world,
        "link": link,
        "target_auc": target,
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


def default_threads(ranks_on_host: int) -> int:
    """Torch threads per rank when ``ranks_on_host`` ranks share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, ranks_on_host))


def _worker(rank: int, world: int, store: str, cfg: Config, out_dir: str, started: float,
            sweep: bool, threads: Optional[int], options: dict) -> None:
    backend = _pick_backend(world)
    if backend == "gloo":
        torch.set_num_threads(threads or default_threads(world))
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=options["pg_timeout"]))
    try:
        status = _main_rank(cfg, out_dir, started, sweep, options=options)
    finally:
        dist.destroy_process_group()
    if status:
        sys.exit(status)


def _init_torchrun_group(backend: str, timeout: datetime.timedelta) -> None:
    """The process group of a rank that torchrun (or the --link launcher) started.

    torchrun's workers share the agent's store, and it keeps its keys when the agent restarts
    the workers (--max-restarts): a restarted rank could read the address a killed rank had
    published in the attempt before and wait on it until the timeout (seen: "Gloo
    connectFullMesh failed ... Connection refused" after a SIGKILL, or a hang for the whole
    timeout). Under the agent's store the group's keys are therefore kept under a prefix of
    the attempt (TORCHELASTIC_RESTART_COUNT); elsewhere the usual env:// initialization."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"train_dlrm/attempt_{attempt}/",
                                                            store),
                            rank=rank, world_size=world, timeout=timeout)


def _main_rank(cfg: Config, out_dir: str, started: float, sweep: bool,
               link: Optional[dict] = None, options: Optional[dict] = None) -> int:
    """This rank's part of the command; the exit status (0, or 2 for a checkpoint of another
    configuration, 3 for a requested stop)."""
    options = options or {}
    if sweep:
        from .sweep import run_sweep

        run_sweep(cfg, out_dir, started)
        return 0
    try:
        result = train(cfg, out_dir, started=started, link=link,
                       checkpoint_dir=options.get("checkpoint_dir"),
                       checkpoint_every=options.get("checkpoint_every",
                                                    DEFAULT_CHECKPOINT_EVERY),
                       stop_after=options.get("stop_after"))
    except CheckpointError as exc:
        if dist.get_rank() == 0:
            print(f"train_dlrm.py: {exc}", file=sys.stderr, flush=True)
        return 2
    except StopRequested as exc:
        if dist.get_rank() == 0:
            print(f"train_dlrm.py: {exc}", file=sys.stderr, flush=True)
        return 3
    # On the emulated cluster the launcher prints the table (the ranks' lines carry prefixes).
    if dist.get_rank() == 0 and link is None:
        print()
        print(_summary_text(result, out_dir))
    return 0


def _summary_text(result: dict, out_dir: str) -> str:
    """The table of a report and a line about where it ran."""
    link = result.get("link")
    where = "loopback" if not link else (
        f"emulated links of {link['rate']} (measured "
        + (f"{link['measured_bit_s'] / 1e6:.0f} Mbit/s" if link.get("measured_bit_s") else
           "not measured") + ")")
    target = result.get("target_auc")
    return "\n".join(
        [report_mod.TABLE_HEADER, "|---" * (report_mod.TABLE_HEADER.count("|") - 1) + "|"]
        + report_mod.table_rows(result)
        + ["", f"teacher AUC {result['teacher_auc']}, target AUC "
               + (f"{target:.4f}" if target is not None else "none (no dense run)")
               + f", world size {result['world_size']} ({result['backend']}, {where}), "
               f"dct_kernels backend {report_mod.kernel_backend_text(result)}, wall "
               f"{result['wall_s']:.0f} s; written to {out_dir}"])


def parse_args(argv=None):
    """The command line, parsed (exits with a usage error for a bad one)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick and args.tiny:
        p.error("--quick and --tiny: give one of them")
    return args


def _delay_ms(text):
    """--link-delay in ms, written as bench/cluster.py's --delay takes it (5, 5ms, 500us)."""
    import cluster  # bench/cluster.py, imported only by the runs that use it

    return cluster.delay_argument(text)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's argument parser (every option, with its help)."""
    # No abbreviations: the --link launcher hands its command line on to the ranks without the
    # --link options, which it finds by their full names.
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Hybrid-parallel DLRM on synthetic (or Criteo) click logs: dense vs "
                    "the bf16 and PowerSGD baselines vs DCT-DP vs DCT-DP+MP, with held-out "
                    "AUC, bytes per step and time to accuracy. Spawns --ranks processes, "
                    "joins the group when started by torchrun, or runs the ranks on an "
                    "emulated cluster with --link (root).")
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
    p.add_argument("--dp-value-dtype",
                   choices=["float32", "float16", "bfloat16", "float8_e4m3fn"],
                   help="DCT-DP: dtype of the sent values (default bfloat16; float8_e4m3fn: "
                        "one power-of-two scale per parameter)")
    p.add_argument("--dp-index-encoding", choices=["int32", "delta"],
                   help="DCT-DP: sent positions as int32 (default) or as uint16 gaps "
                        "(\"delta\", wire format version 2)")
    p.add_argument("--warmup-steps", type=int, help="DCT-DP dense warm-up steps")
    p.add_argument("--min-numel", type=int, help="DCT-DP: smaller parameters go dense")
    p.add_argument("--dp-min-k", type=int,
                   help="DCT-DP: entries a sparse parameter keeps at least (default 4)")
    p.add_argument("--capacity-factor", type=float)
    p.add_argument("--refresh-every", type=int)
    p.add_argument("--runs", help=f"comma-separated subset of {','.join(RUNS)} (default "
                                  f"{','.join(DEFAULT_RUNS)})")
    p.add_argument("--powersgd-rank", type=int,
                   help="PowerSGD baseline: matrix approximation rank (default 2)")
    p.add_argument("--powersgd-start-iter", type=int,
                   help="PowerSGD baseline: plain all-reduce steps before compression "
                        "(default 10%% of the steps, at least 2)")
    p.add_argument("--threads", type=int,
                   help="torch threads per rank (default: the cores divided by the ranks "
                        "on this machine)")
    p.add_argument("--link", metavar="RATE",
                   help="run the ranks on an emulated cluster (bench/cluster.py; needs root): "
                        "one network namespace per rank, links shaped to RATE as tc writes "
                        "it (1gbit, 500mbit, 2.5gbit)")
    p.add_argument("--link-delay", type=_delay_ms, metavar="MS",
                   help="with --link: one-way delay of every packet a rank sends, in ms (5 or "
                        "5ms; 500us; needs the kernel's netem)")
    p.add_argument("--link-loss", type=float, metavar="PCT",
                   help="with --link: random loss of the packets a rank sends, in percent "
                        "(netem, or a BPF dropper on a kernel without netem)")
    p.add_argument("--data-file", help="a Criteo-format TSV file instead of synthetic data")
    p.add_argument("--hash-size", type=int, help="rows per table for --data-file")
    p.add_argument("--out", help="output folder (default bench/results/<device>/dlrm, and "
                                 "bench/results/<device> for --sweep)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write checkpoints into DIR and resume from the newest complete one "
                        "there (same settings only); README 'Checkpoints and restarts'")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help=f"with --checkpoint-dir: steps between checkpoints within a run "
                        f"(default {DEFAULT_CHECKPOINT_EVERY}; one more after each run)")
    p.add_argument("--pg-timeout", type=float, metavar="SECONDS", default=DEFAULT_PG_TIMEOUT_S,
                   help=f"how long a collective waits for the other ranks before it fails "
                        f"(default {DEFAULT_PG_TIMEOUT_S}); spawned ranks and torchrun alike")
    # Stops every rank after RUN's STEP as a killed job would (no report): for tests.
    p.add_argument("--stop-after", metavar="RUN:STEP", help=argparse.SUPPRESS)
    return p


def _with_flag(message: str) -> str:
    """A Config error ("batch_size: ...") with the command-line option that sets the field
    ("--batch-size (batch_size): ..."), where one does."""
    field, sep, rest = message.partition(":")
    flag = "--" + field.replace("_", "-")
    options = {s for action in build_parser()._actions for s in action.option_strings}
    if sep and field.isidentifier() and flag in options:
        return f"{flag} ({field}):{rest}"
    return message


def run_options(args) -> dict:
    """The options of a rank besides the Config: checkpoints, the process group's timeout and
    the tests' stop. ValueError naming the flag for a bad value."""
    if args.pg_timeout <= 0:
        raise ValueError(f"--pg-timeout: expected > 0 seconds, got {args.pg_timeout}")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        raise ValueError("--checkpoint-every needs --checkpoint-dir")
    every = (DEFAULT_CHECKPOINT_EVERY if args.checkpoint_every is None
             else args.checkpoint_every)
    if every < 1:
        raise ValueError(f"--checkpoint-every: expected >= 1, got {every}")
    if args.checkpoint_dir is not None and args.sweep:
        raise ValueError("--checkpoint-dir checkpoints the comparison, not --sweep")
    if args.runs is not None and args.sweep:
        raise ValueError("--runs picks the comparison's runs; --sweep always runs dense and "
                         "its dct_dp_mp points")
    stop = None
    if args.stop_after:
        run, _, step = args.stop_after.partition(":")
        if not step.isdigit():
            raise ValueError(f"--stop-after: expected RUN:STEP, got {args.stop_after!r}")
        stop = (run, int(step))
    return {"pg_timeout": args.pg_timeout, "stop_after": stop,
            "checkpoint_dir": (os.path.abspath(args.checkpoint_dir)
                               if args.checkpoint_dir else None),
            "checkpoint_every": every}


def config_from_args(args) -> Config:
    cfg = tiny() if args.tiny else quick()
    fields = {"ranks": args.ranks, "steps": args.steps, "batch_size": args.batch_size,
              "heldout": args.heldout, "dp_ratio": args.dp_ratio, "mp_k": args.mp_k,
              "exchange": args.exchange, "warmup_steps": args.warmup_steps,
              "min_numel": args.min_numel, "capacity_factor": args.capacity_factor,
              "refresh_every": args.refresh_every, "data_file": args.data_file,
              "hash_size": args.hash_size, "seed": args.seed,
              "powersgd_rank": args.powersgd_rank,
              "powersgd_start_iter": args.powersgd_start_iter,
              "dp_value_dtype": args.dp_value_dtype,
              "dp_index_encoding": args.dp_index_encoding, "dp_min_k": args.dp_min_k}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in fields.items() if v is not None})
    if args.runs:
        cfg.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    cfg.validate()
    return cfg


def _link_errors(args, cfg: Config) -> Optional[str]:
    """What is wrong with the --link options (None if nothing); checked before any cluster
    is built."""
    if args.link is None:
        if args.link_delay is not None or args.link_loss is not None:
            return "--link-delay and --link-loss need --link RATE"
        return None
    import cluster  # bench/cluster.py

    try:
        cluster.parse_rate(args.link, "--link")
    except ValueError as exc:
        return str(exc)
    if cfg.ranks < 2:
        return (f"--link needs at least 2 ranks (--ranks {cfg.ranks}): with one rank no byte "
                f"crosses a link")
    if cfg.ranks > MAX_LINK_RANKS:
        return f"--link runs 2 to {MAX_LINK_RANKS} ranks, not {cfg.ranks}"
    if args.sweep:
        return "--link runs the comparison; --sweep is not run on the emulated cluster"
    if "RANK" in os.environ and LINK_ENV not in os.environ:
        return ("--link starts its own ranks on the emulated cluster; run it as a plain "
                "command, not under torchrun")
    return None


def _rank_argv(argv: List[str], out_dir: str, threads: int) -> List[str]:
    """The ranks' command line on the cluster: this one without the --link options (so that
    the ranks join the cluster's group instead of building another), with the output folder
    and the thread count made explicit, and the paths it names made absolute (the ranks start
    in the repository's root, not in the caller's folder)."""
    drop = ("--link", "--link-delay", "--link-loss", "--out", "--threads")
    paths = ("--checkpoint-dir", "--data-file")
    kept, skip, absolute = [], False, False
    for arg in argv:
        if skip:
            skip = False
            continue
        if absolute:
            absolute = False
            kept.append(os.path.abspath(arg))
            continue
        if arg in drop:
            skip = True
            continue
        name, sep, value = arg.partition("=")
        if name in drop:
            continue
        if name in paths:
            if sep:
                kept.append(f"{name}={os.path.abspath(value)}")
            else:
                kept.append(arg)
                absolute = True
            continue
        kept.append(arg)
    return [sys.executable, TRAIN_DLRM, *kept, "--out", os.path.abspath(out_dir),
            "--threads", str(threads)]


def _run_on_cluster(args, argv: List[str], cfg: Config, out_dir: str, started: float) -> int:
    """The --link launcher: build the emulated cluster (its link measured), run the ranks on it
    and print rank 0's table. Returns the exit status. The cluster deletes its namespaces on
    every way out (bench/cluster.py)."""
    import cluster  # bench/cluster.py

    # W ranks share this machine's cores as the spawned ranks do; the cluster tells each rank
    # it is alone on its node (LOCAL_WORLD_SIZE=1), so the count is passed explicitly.
    threads = args.threads or default_threads(cfg.ranks)
    try:
        with cluster.EmulatedCluster(cfg.ranks, args.link, delay_ms=args.link_delay,
                                     loss_pct=args.link_loss) as emu:
            link = {"rate": args.link, "rate_bit_s": emu.rate_bit_s,
                    "measured_bit_s": emu.measured_bit_s, "delay_ms": emu.delay_ms,
                    "loss_pct": emu.loss_pct, "loss_method": emu.loss_method,
                    "measured_netem_bit_s": emu.measured_netem_bit_s}
            print(f"emulated cluster: {cfg.ranks} ranks, links of {args.link}, measured "
                  f"{emu.measured_bit_s / 1e6:.0f} Mbit/s; {threads} torch thread(s) per rank",
                  file=sys.stderr, flush=True)
            emu.launch(_rank_argv(argv, out_dir, threads),
                       env={LINK_ENV: json.dumps(link), "PYTHONUNBUFFERED": "1"},
                       cwd=os.path.dirname(BENCH_DIR))
    except cluster.RankFailed as exc:
        print(f"train_dlrm.py: {exc}", file=sys.stderr)
        return 1
    except cluster.ClusterError as exc:
        print(f"train_dlrm.py: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:  # delay or loss out of range
        print(f"train_dlrm.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train_dlrm.py: interrupted; ranks stopped and namespaces deleted",
              file=sys.stderr)
        return 130
    with open(os.path.join(out_dir, "dlrm.json")) as f:
        result = json.load(f)
    print()
    print(_summary_text(result, out_dir))
    print(f"total wall time {time.time() - started:.0f} s")
    return 0


def main(argv=None) -> None:
    started = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        options = run_options(args)
    except ValueError as exc:
        sys.exit(f"train_dlrm.py: {_with_flag(str(exc))}")
    problem = _link_errors(args, cfg)
    if problem:
        sys.exit(f"train_dlrm.py: {problem}")
    if args.threads is not None and args.threads < 1:
        sys.exit(f"train_dlrm.py: --threads: expected >= 1, got {args.threads}")
    results = os.path.join(BENCH_DIR, "results", device_slug(device_name()))
    out_dir = args.out or (results if args.sweep else os.path.join(results, "dlrm"))
    if args.link is not None:
        sys.exit(_run_on_cluster(args, argv, cfg, out_dir, started))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, or the --link launcher
        world = int(os.environ["WORLD_SIZE"])
        link = json.loads(os.environ[LINK_ENV]) if LINK_ENV in os.environ else None
        # On the emulated cluster the links are TCP between namespaces: gloo.
        backend = "gloo" if link is not None else _pick_backend(world)
        if backend == "gloo":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(args.threads or default_threads(local))
        _init_torchrun_group(backend, datetime.timedelta(seconds=options["pg_timeout"]))
        cfg = dataclasses.replace(cfg, ranks=world)
        try:
            status = _main_rank(cfg, out_dir, started, args.sweep, link, options)
        finally:
            dist.destroy_process_group()
        if status:
            sys.exit(status)
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dlrm_") as tmp:
        try:
            ranks.spawn(_worker, (cfg.ranks, os.path.join(tmp, "store"), cfg, out_dir, started,
                                  args.sweep, args.threads, options), cfg.ranks)
        except mp.ProcessExitedException as exc:
            # The rank said why (a checkpoint refused, a requested stop): keep its status.
            sys.exit(exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1)
    print(f"total wall time {time.time() - started:.0f} s")
