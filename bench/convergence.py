"""Convergence of DCT-DP on a small recommender-like task, over seeds: the spread that the
suite's convergence checks take their tolerance from.

    python bench/convergence.py                      # W = 2 and 4, 5 seeds, this CPU's kernels
    ATEN_CPU_CAPABILITY=avx2 python bench/convergence.py --tag avx2

The task (``train_task``): a linear model over mean-pooled embedding bags whose ids follow a
Zipf law (hashed, as click logs hash them), fitted by SGD to a planted teacher; the same seed
gives the same data and initial weights for every run. Per seed it trains plain DDP and
DCT-DP with each exchange and records the held-out loss; the output is the loss ratio DCT /
dense per seed and exchange, with its mean, max and standard deviation, in
``bench/results/<device>/convergence.json`` and ``.md``.

Why a spread: a sparse run is chaotic in the last bit (one rounding difference flips which
entries pass τ), so one run on one machine says little about another machine; the checks in
tests/ compare against a bound that the measured spread, over seeds and CPU kinds, leaves room
for.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile

import torch
import torch.distributed as dist

from dct_kernels.distributed import DCTState, dct_hook

from kernel_backend import kernel_backend, warn_if_core_missing  # bench/kernel_backend.py
import ranks  # bench/ranks.py

TASK = dict(rows=20000, dim=4, features=4, batch=16, steps=300, lr=0.5)
DCT = dict(ratio=0.002, warmup_steps=0, refresh_every=50, capacity_factor=1.0,
           value_dtype=torch.bfloat16, min_numel=64)


class _Model(torch.nn.Module):
    def __init__(self, rows, dim, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.EmbeddingBag(rows, dim, mode="mean")
        self.out = torch.nn.Linear(dim, 1)
        torch.nn.init.zeros_(self.emb.weight)

    def forward(self, idx):
        return self.out(self.emb(idx)).squeeze(-1)


def train_task(rank: int, world: int, *, exchange=None, seed: int = 0, steps=None,
               on_step=None):
    """Train the task on this rank of an initialized gloo group: plain DDP when ``exchange``
    is None, else DCT-DP (``DCT`` settings) with that exchange. Collective: every rank calls it
    with the same arguments.

    Returns (initial held-out loss, final held-out loss, the DCTState or None). ``on_step(model,
    step)`` runs after every optimizer step (e.g. to compare ranks)."""
    rows, dim, features = TASK["rows"], TASK["dim"], TASK["features"]
    steps = TASK["steps"] if steps is None else steps
    g = torch.Generator().manual_seed(10 + 100 * seed)
    teacher = torch.randn(rows, dim, generator=g)
    popularity = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.1
    # Hashed ids: contiguous reduce_scatter shards would otherwise put every hot row in the
    # first shard.
    hashed = torch.randperm(rows, generator=torch.Generator().manual_seed(14 + 100 * seed))

    def draw(generator, n):
        return hashed[torch.multinomial(popularity, n * features, replacement=True,
                                        generator=generator)].view(n, features)

    def target(idx):
        return teacher[idx].mean(1).sum(-1)

    test_idx = draw(torch.Generator().manual_seed(12 + 100 * seed), 4096)
    model = _Model(rows, dim, 11 + 100 * seed)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = None
    if exchange is not None:
        state = DCTState(exchange=exchange, module=model, **DCT)
        ddp.register_comm_hook(state, dct_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=TASK["lr"])
    data = torch.Generator().manual_seed(13 + 100 * seed + 1000 * (rank + 1))
    with torch.no_grad():
        initial = (model(test_idx) - target(test_idx)).pow(2).mean().item()
    for step in range(steps):
        idx = draw(data, TASK["batch"])
        loss = (ddp(idx) - target(idx)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(model, step)
    with torch.no_grad():
        final = (model(test_idx) - target(test_idx)).pow(2).mean().item()
    return initial, final, state


def _rank(rank, world, store, seeds, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    for seed in seeds:
        for exchange in (None, "allgather", "reduce_scatter"):
            initial, final, state = train_task(rank, world, exchange=exchange, seed=seed)
            stats = state.stats() if state is not None else {}
            rows.append({"seed": seed, "run": exchange or "dense", "initial": initial,
                         "loss": final, "compression": stats.get("compression"),
                         "early_refreshes": stats.get("early_refreshes"),
                         "overflowed_buckets": stats.get("overflowed_buckets"),
                         "buckets_sparse": stats.get("buckets_sparse")})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def measure(world: int, seeds) -> list:
    """The task's rows (seed, run, loss, ...) for every seed at world size ``world``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        ranks.spawn(_rank, (world, os.path.join(tmp, "store"), list(seeds), out), world)
        with open(out) as f:
            return json.load(f)


def summarize(rows) -> dict:
    """Per exchange: the DCT / dense loss ratios over seeds, with mean, max and stdev."""
    dense = {r["seed"]: r["loss"] for r in rows if r["run"] == "dense"}
    out = {}
    for run in ("allgather", "reduce_scatter"):
        ratios = [r["loss"] / dense[r["seed"]] for r in rows if r["run"] == run]
        out[run] = {"ratios": ratios, "mean": statistics.mean(ratios), "max": max(ratios),
                    "stdev": statistics.stdev(ratios) if len(ratios) > 1 else 0.0}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="2,4", help="world sizes (comma-separated)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--tag", default=os.environ.get("ATEN_CPU_CAPABILITY", "native"),
                   help="a name for this CPU kind (default: ATEN_CPU_CAPABILITY or native)")
    p.add_argument("--out", help="output folder (default bench/results/<device>/)")
    args = p.parse_args()
    warn_if_core_missing("cpu")  # the gloo ranks' tensors are on the CPU
    from dlrm.cli import device_slug
    from dlrm.context import device_name

    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       device_slug(device_name()))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "convergence.json")
    report = json.load(open(path)) if os.path.exists(path) else {"runs": {}}
    for world in (int(w) for w in args.worlds.split(",")):
        rows = measure(world, range(args.seeds))
        report["runs"][f"W{world}_{args.tag}"] = {
            "world_size": world, "cpu_kind": args.tag, "rows": rows,
            "kernel_backend": kernel_backend("cpu"),
            "summary": summarize(rows), "date": datetime.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(), "task": TASK,
            "dct": {k: str(v) for k, v in DCT.items()}}
        for run, s in report["runs"][f"W{world}_{args.tag}"]["summary"].items():
            print(f"W={world} {args.tag:>8} {run:>14}: loss / dense mean {s['mean']:.4f} "
                  f"max {s['max']:.4f} stdev {s['stdev']:.4f}")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "convergence.md"), "w") as f:
        f.write("| world | CPU kernels | exchange | loss / dense: mean | max | stdev | seeds |\n"
                "|---|---|---|---|---|---|---|\n")
        for key, entry in sorted(report["runs"].items()):
            for run, s in entry["summary"].items():
                f.write(f"| {entry['world_size']} | {entry['cpu_kind']} | {run} | "
                        f"{s['mean']:.4f} | {s['max']:.4f} | {s['stdev']:.4f} | "
                        f"{len(s['ratios'])} |\n")


if __name__ == "__main__":
    main()
