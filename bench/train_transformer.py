"""DCT-DP on transformers: a small BERT-style classifier and a small GPT-2-style language model,
built from ``transformers`` configs (nothing downloaded), trained with DDP on W gloo ranks with
plain DDP, torch's fp16 compress hook, torch's PowerSGD and ``dct_hook`` with
``DCTState(ratio=...)`` and its other settings at their defaults.

    python bench/train_transformer.py                 # every task and run, W = 2
    python bench/train_transformer.py --ranks 4 --tasks classify --runs dense,dct
    python bench/train_transformer.py --lr-schedule cosine --seed 1   # AdamW 1e-3, decayed

AdamW at a constant lr of 1e-3 by default (the setting the comparison was first made at);
``--lr-schedule cosine`` warms up linearly over 5% of the steps and decays to 0, which settles
the classifier's accuracy (with a constant lr it swings by up to 0.1 between evaluations).

Tasks (all data made here or read from this machine, seeded):

- ``classify``: sequences of 32 tokens (vocabulary 256; 16 sequences per rank and step)
  labelled by the sign of a fixed random +-1 weight summed over their tokens (a bag-of-words
  "sentiment"); held-out accuracy.
- ``lm_text``: byte-level language modelling (sequences of 32 bytes) of real text that every
  machine has: the Python standard library's own source files (sorted, concatenated, the first 2
  MiB; the last tenth held out); held-out loss (nats per byte). The Python version is recorded,
  as its sources differ between versions.
- ``lm_synthetic``: byte sequences of a fixed random Markov chain (64 states, 4 successors
  each); held-out loss.

Runs: ``dense`` (plain DDP), ``fp16`` (torch's fp16_compress_hook), ``powersgd`` (torch's
PowerSGD, rank 4, one bucket on a group of its own, see bench/dlrm/runner.py), ``dct``
(``DCTState(ratio=0.01)``, defaults otherwise: exchange "auto"), ``dct_rs`` (the same with
``exchange="reduce_scatter"``), ``dct_bf16`` (``ratio=0.003, value_dtype=torch.bfloat16``).
Bytes are the traffic statistics' terms (``DCTState.stats()``; the baselines count their
all-reduces as rings the same way); compression = ring bytes / bytes moved.

Writes ``transformers.json`` (per task and run: quality against steps, final quality, bytes,
compression, step ms, DCT's statistics), ``transformers.md`` and ``transformers.png`` (quality
against steps, and final quality against DP compression) into ``--out`` (default
bench/results/<device>/transformers_w<W>/).
"""

import argparse
import ast
import datetime
import json
import math
import os
import platform
import sysconfig
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dct_kernels.distributed import DCTState, dct_hook
from dlrm import dp_traffic
from dlrm.cli import device_slug
from dlrm.context import device_name
from kernel_backend import kernel_backend, warn_if_core_missing  # bench/kernel_backend.py
import ranks  # bench/ranks.py
from report_files import write_json_and_markdown  # bench/report_files.py

TASKS = ("classify", "lm_text", "lm_synthetic")
RUNS = ("dense", "fp16", "powersgd", "dct", "dct_rs", "dct_bf16")
# Further runs, registered by scripts that reuse this benchmark (bench/ef_variants.py): name ->
# factory(group, world, overrides) returning (state, hook, notes) as make_hook does. A state
# needs ``stats()`` with bytes_sent, bytes_received and bytes_ring.
EXTRA_RUNS: Dict[str, Callable] = {}
STEPS = {"classify": 1000, "lm_text": 500, "lm_synthetic": 500}
SEQ = {"classify": 32, "lm_text": 32, "lm_synthetic": 32}
HELDOUT = 1024      # held-out sequences
TEXT_BYTES = 2 << 20


# ----------------------------------------------------------------------------- data

def stdlib_text(limit: int = TEXT_BYTES) -> bytes:
    """The first ``limit`` bytes of the standard library's .py files, sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    out = bytearray()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        dirs[:] = [d for d in dirs if d not in ("site-packages", "test", "__pycache__")]
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    out += f.read()
                if len(out) >= limit:
                    return bytes(out[:limit])
    return bytes(out)


class Task:
    """Batches of one task: ``batch(rank, step, size)`` for training (each rank its own, drawn
    from the seed, the rank and the step) and ``heldout`` (inputs, targets)."""

    def __init__(self, name: str, seed: int):
        self.name, self.seed = name, seed
        g = torch.Generator().manual_seed(seed)
        self.seq = SEQ[name]
        if name == "classify":
            self.weights = torch.randint(0, 2, (256,), generator=g) * 2 - 1
        elif name == "lm_synthetic":
            self.successors = torch.randint(0, 64, (64, 4), generator=g)
        else:
            data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
            cut = len(data) * 9 // 10
            self.train, self.test = data[:cut], data[cut:]
        self.heldout = self._draw(torch.Generator().manual_seed(seed + 1), HELDOUT, heldout=True)

    def _draw(self, g: torch.Generator, size: int, heldout: bool = False):
        if self.name == "classify":
            x = torch.randint(0, 256, (size, self.seq), generator=g)
            return x, (self.weights[x].sum(1) > 0).long()
        if self.name == "lm_synthetic":
            states = [torch.randint(0, 64, (size,), generator=g)]
            for _ in range(self.seq - 1):
                pick = torch.randint(0, 4, (size,), generator=g)
                states.append(self.successors[states[-1], pick])
            x = torch.stack(states, 1)
            return x, x
        source = self.test if heldout else self.train
        starts = torch.randint(0, len(source) - self.seq, (size,), generator=g)
        x = torch.stack([source[s:s + self.seq] for s in starts.tolist()])
        return x, x

    def batch(self, rank: int, step: int, size: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + rank * 1009 + step * 7 + 3)
        return self._draw(g, size)


def build_model(task: str, seed: int, hidden: int = 128) -> torch.nn.Module:
    """A 2-layer BERT classifier or GPT-2 LM (hidden 128 by default, 4 heads, an MLP twice as
    wide in the BERT, tied embeddings in the LM), no dropout, initialised from ``seed`` (the
    same weights on every rank)."""
    import transformers

    torch.manual_seed(seed)
    if task == "classify":
        config = transformers.BertConfig(
            vocab_size=256, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * hidden, max_position_embeddings=SEQ[task], num_labels=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return transformers.BertForSequenceClassification(config)
    config = transformers.GPT2Config(vocab_size=256, n_positions=SEQ[task], n_embd=hidden,
                                     n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, tie_word_embeddings=True)
    return transformers.GPT2LMHeadModel(config)


# ------------------------------------------------------------------------------- runs

def make_hook(run: str, ddp_group, world: int, overrides: Dict[str, object]):
    """(state, hook, notes) of a run; ``overrides`` are DCTState settings for the dct runs
    (``--dct-set``)."""
    if run in EXTRA_RUNS:
        return EXTRA_RUNS[run](ddp_group, world, overrides)
    if run == "dense":
        return dp_traffic.DenseTraffic(ddp_group), dp_traffic.dense_hook, {}
    if run == "fp16":
        return dp_traffic.Fp16Traffic(ddp_group), dp_traffic.fp16_hook, {}
    if run == "powersgd":
        state = dp_traffic.PowerSGDTraffic(ddp_group, matrix_approximation_rank=4,
                                           start_iter=10, seed=0)
        return state, dp_traffic.powersgd_hook, {"powersgd_rank": 4, "start_iter": 10}
    kwargs = {"dct": dict(ratio=0.01), "dct_rs": dict(ratio=0.01, exchange="reduce_scatter"),
              "dct_bf16": dict(ratio=0.003, value_dtype=torch.bfloat16)}[run]
    kwargs.update(overrides)
    return DCTState(ddp_group, **kwargs), dct_hook, {
        k: str(v) for k, v in kwargs.items()}


def lr_schedule(opt, name: str, steps: int):
    """torch's LambdaLR for ``name``: "constant", or "cosine" (a linear warm-up over the first
    5% of the steps, then a cosine decay to 0 at ``steps``, the usual transformer recipe)."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def evaluate(model, task: Task, rank: int, world: int) -> float:
    """Held-out accuracy (classify) or mean loss per token (LM), over every rank's share of
    the held-out set, the same on every rank."""
    x, y = task.heldout
    share = slice(rank * HELDOUT // world, (rank + 1) * HELDOUT // world)
    x, y = x[share], y[share]
    model.eval()
    with torch.no_grad():
        total = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(x), 256):
            xb, yb = x[i:i + 256], y[i:i + 256]
            if task.name == "classify":
                logits = model(input_ids=xb).logits
                total += torch.tensor([(logits.argmax(1) == yb).sum().item(), len(xb)],
                                      dtype=torch.float64)
            else:
                loss = model(input_ids=xb, labels=yb).loss
                tokens = xb.numel() - len(xb)
                total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64)
    model.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    """``adamw``: AdamW (torch's defaults otherwise); ``sgd``: SGD with momentum 0.9;
    ``sgd_ema``: SGD whose momentum is a running mean (momentum 0.9, dampening 0.9; torch starts
    it at the first gradient), i.e. Adam's first moment without its second, for hooks that
    precondition what they deliver (bench/ef_variants.py's ``pc_`` runs)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.9)


def train_run(task: Task, run: str, rank: int, world: int, args, groups) -> dict:
    model = build_model(task.name, args.seed, args.hidden)
    group = groups["powersgd"] if run == "powersgd" else None
    # PowerSGD: one bucket (several would issue their callback collectives in an order that
    # differs between ranks on gloo; see bench/dlrm/runner.py).
    cap = {"bucket_cap_mb": 1 + sum(p.numel() * 4 for p in model.parameters()) / 2 ** 20} \
        if run == "powersgd" else {}
    ddp = DistributedDataParallel(model, process_group=group, **cap)
    state, hook, notes = make_hook(run, group, world, args.dct_set)
    ddp.register_comm_hook(state, hook)
    opt = make_optimizer(ddp.parameters(), args.optimizer, args.lr)
    steps = args.steps or STEPS[task.name]
    schedule = lr_schedule(opt, args.lr_schedule, steps)
    every = max(1, steps // 10)
    curve = {"step": [], "quality": []}
    step_s: List[float] = []
    for step in range(steps):
        x, y = task.batch(rank, step, args.batch)
        t0 = time.perf_counter()
        loss = ddp(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        step_s.append(time.perf_counter() - t0)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{task.name}/{run}: loss {loss.item()} at step {step}")
        if (step + 1) % every == 0 or step + 1 == steps:
            curve["step"].append(step + 1)
            curve["quality"].append(evaluate(ddp.module, task, rank, world))
    stats = state.stats()
    moved = stats["bytes_sent"] + stats["bytes_received"]
    out = {"quality": curve["quality"][-1], "curve": curve, "steps": steps,
           "step_ms": 1e3 * sorted(step_s)[len(step_s) // 2],
           "dp_bytes_per_step": moved / steps,
           "dp_ring_bytes_per_step": stats["bytes_ring"] / steps,
           "compression": stats["bytes_ring"] / moved if moved else None, "settings": notes}
    if isinstance(state, DCTState):
        keep = ("buckets_sparse", "bucket_refreshes", "early_refreshes", "shard_refreshes",
                "overflowed_buckets", "kept_density", "buckets_allgather",
                "buckets_reduce_scatter")
        out["dp_stats"] = {k: stats[k] for k in keep}
    # Every rank ends with the same parameters (a check, not an assumption).
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat)
    out["ranks_identical"] = all(torch.equal(rows[0], r) for r in rows)
    return out


def worker(rank: int, world: int, store: str, args, result_path: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    groups = {"powersgd": dist.new_group(list(range(world)))}
    results: Dict[str, Dict[str, dict]] = {}
    for name in args.tasks:
        task = Task(name, args.seed)
        results[name] = {}
        for run in args.runs:
            results[name][run] = train_run(task, run, rank, world, args, groups)
            if rank == 0:
                r = results[name][run]
                print(f"{name} {run}: quality {r['quality']:.4f}, compression "
                      f"{r['compression'] or 0:.1f}x, step {r['step_ms']:.1f} ms",
                      flush=True)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- report

def quality_name(task: str) -> str:
    return "held-out accuracy" if task == "classify" else "held-out loss (nats/byte)"


def write_report(report: dict, out: str) -> None:
    lines = [f"# DCT-DP on transformers, W = {report['world_size']}",
             "", f"{report['device']}, {report['date']}, torch {report['torch']}, transformers "
             f"{report['transformers']}, Python {report['python']} (lm_text's source), "
             f"kernel backend {report.get('kernel_backend', 'not recorded')}", "",
             f"{report.get('optimizer', 'adamw')}, lr {report.get('lr')}, "
             f"{report.get('lr_schedule', 'constant')} schedule, seed {report.get('seed')}, "
             f"{report.get('batch_per_rank')} sequences per rank and step", ""]
    for task, runs in report["tasks"].items():
        dense = runs.get("dense", {}).get("quality")
        lines += [f"## {task} ({quality_name(task)})", "",
                  "| run | quality | vs dense | at 30% of steps | DP compression | step ms | "
                  "early refreshes / sparse bucket steps | overflowed | kept density |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for run, r in runs.items():
            at30 = r["curve"]["quality"][max(0, len(r["curve"]["quality"]) * 3 // 10 - 1)]
            s = r.get("dp_stats") or {}
            vs = "" if dense is None else f"{r['quality'] - dense:+.4f}"
            lines.append(
                f"| {run} | {r['quality']:.4f} | {vs} | {at30:.4f} | "
                + (f"{r['compression']:.1f}x" if r["compression"] else "–")
                + f" | {r['step_ms']:.1f} | "
                + (f"{s['early_refreshes']} / {s['buckets_sparse']} | "
                   f"{s['overflowed_buckets']} | {s['kept_density']:.4f} |" if s else "| | |"))
        lines.append("")
    write_json_and_markdown(out, "transformers", report, "\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tasks = list(report["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        for run, r in report["tasks"][task].items():
            axes[0][j].plot(r["curve"]["step"], r["curve"]["quality"], label=run)
            axes[1][j].scatter([r["compression"] or 1], [r["quality"]], label=run)
        axes[0][j].set_title(task)
        axes[0][j].set_xlabel("step")
        axes[0][j].set_ylabel(quality_name(task))
        axes[1][j].set_xscale("log")
        axes[1][j].set_xlabel("DP compression (ring bytes / bytes moved)")
        axes[1][j].set_ylabel(quality_name(task))
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "transformers.png"), dpi=90)
    plt.close(fig)


def main(argv=None, out_name: str = "transformers") -> None:
    """Parse ``argv``, train every task and run on W spawned gloo ranks, write the report into
    --out (default bench/results/<device>/<out_name>_w<W>/)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per run (default: 1000 classify, 500 LM)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=("adamw", "sgd", "sgd_ema"),
                        default="adamw",
                        help="adamw, sgd (momentum 0.9) or sgd_ema (momentum 0.9 as a running "
                        "mean: for bench/ef_variants.py's pc_ runs); default adamw")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="constant, or cosine: 5%% linear warm-up, cosine decay to 0 "
                             "(default constant)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128,
                        help="hidden size of both models (default 128; a multiple of 4)")
    parser.add_argument("--dct-set", action="append", default=[], metavar="NAME=VALUE",
                        help="a DCTState setting for the dct runs, e.g. warmup_steps=100 "
                             "(repeatable; values are Python literals, value_dtype a dtype's name: "
                             "value_dtype='bfloat16')")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.dct_set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--dct-set: expected NAME=VALUE, got {item!r}")
        try:
            overrides[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f"--dct-set: {name}: not a Python literal: {value!r}")
        if name == "value_dtype" and isinstance(overrides[name], str):
            # value_dtype='bfloat16' names a torch dtype.
            dtype = getattr(torch, overrides[name], None)
            if not isinstance(dtype, torch.dtype):
                parser.error(f"--dct-set: value_dtype: not a torch dtype: {value!r}")
            overrides[name] = dtype
    args.dct_set = overrides
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.runs = [r for r in args.runs.split(",") if r]
    for t in args.tasks:
        if t not in TASKS:
            parser.error(f"--tasks: unknown task {t!r} (expected some of {', '.join(TASKS)})")
    for r in args.runs:
        if r not in RUNS and r not in EXTRA_RUNS:
            known = ", ".join(RUNS + tuple(EXTRA_RUNS))
            parser.error(f"--runs: unknown run {r!r} (expected some of {known})")
    if args.ranks < 1:
        parser.error("--ranks: expected >= 1")
    if args.hidden < 4 or args.hidden % 4:
        parser.error("--hidden: expected a positive multiple of 4 (4 attention heads)")
    if args.steps < 0:
        parser.error(f"--steps: expected >= 0 (0: each task's default), got {args.steps}")
    if args.batch < 1:
        parser.error(f"--batch: expected >= 1, got {args.batch}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr: expected a finite number > 0, got {args.lr}")
    if any(r in RUNS and r.startswith("dct") for r in args.runs):
        try:  # the settings' own checks, here rather than in every spawned rank
            DCTState(**overrides)
        except (TypeError, ValueError) as exc:
            parser.error(f"--dct-set: {exc}")
    import transformers  # the optional dependency: fail before spawning

    warn_if_core_missing("cpu")  # the gloo ranks' tensors are on the CPU
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        ranks.spawn(worker, (args.ranks, os.path.join(tmp, "store"), args, result_path),
                    args.ranks)
        with open(result_path) as f:
            tasks = json.load(f)
    device = device_name()
    report = {"world_size": args.ranks, "device": device, "backend": "gloo",
              "kernel_backend": kernel_backend("cpu"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "seed": args.seed, "lr": args.lr,
              "optimizer": args.optimizer, "lr_schedule": args.lr_schedule,
              "batch_per_rank": args.batch, "hidden": args.hidden,
              "dct_set": {k: repr(v) for k, v in args.dct_set.items()},
              "tasks": tasks, "wall_s": time.time() - started}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   device_slug(device), f"{out_name}_w{args.ranks}")
    write_report(report, out)
    print(f"written to {out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
