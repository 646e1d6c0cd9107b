"""The DCT-MP exchange against the dense all-to-all, forward and backward: time and bytes.

Spawns W ranks (gloo on CPU tensors, or NCCL with one GPU per rank) and times, per
configuration (B rows per rank, D, k, x dtype, value dtype), one training step's worth of the
model-parallel boundary:

- ``sparse_all_to_all``: compress_rows + one all_to_all_single + decompress_rows forward,
  gather_rows + one all_to_all_single + decompress_rows backward (dct_kernels.mp);
- ``dense all_to_all_single``: x forward and its gradient backward, the baseline a user writes.

Each repetition starts after a barrier and is timed on every rank (wall clock; on a GPU after a
device synchronize); the repetition's time is the slowest rank's, and p20/p50/p80 are taken
over repetitions. Bytes are what rank 0 sends to the other ranks in one step, counted by
wrapping ``torch.distributed.all_to_all_single`` (the own block is not counted, as
docs/design.md#traffic-statistics counts an all-to-all), next to
``dct_kernels.mp.all_to_all_bytes``.

Rows go to ``bench/results/<card>/mp_exchange.csv`` (replaced per run) and a table to
``mp_exchange.md`` next to it.

    python bench/mp_exchange.py                    # gloo, 2 ranks, CPU
    python bench/mp_exchange.py --world 1 --comm nccl   # NCCL on one GPU
    python bench/mp_exchange.py --quick            # one small configuration
"""

import argparse
import csv
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import dct_kernels as dk
from dct_kernels.mp import all_to_all_bytes, sparse_all_to_all
from dlrm.exchange import DenseAllToAll
import ranks  # bench/ranks.py
from kernel_backend import kernel_backend, warn_if_core_missing
from results_table import RESULTS_DIR, card_dir_name

FIELDS = ("card", "comm", "W", "provider", "kernels", "phase", "B", "D", "k", "ratio", "dtype",
          "value_dtype", "p20_ms", "p50_ms", "p80_ms", "bytes_sent", "bytes_model",
          "dense_over_sparse", "date", "version", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}


class _CountSent:
    """Counts the bytes all_to_all_single sends to the other ranks while active."""

    def __init__(self, world):
        self.world, self.sent = world, 0

    def __enter__(self):
        self.real = dist.all_to_all_single

        def counted(output, input, *args, **kwargs):
            self.sent += input.numel() * input.element_size() * (self.world - 1) // self.world
            return self.real(output, input, *args, **kwargs)
        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.real


def _percentiles(samples):
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return pick(0.2), statistics.median(s), pick(0.8)


def _step(provider, phase, x, upstream, k, value_dtype, backend):
    xg = x.detach().requires_grad_(phase == "fwd+bwd")
    if provider == "sparse_all_to_all":
        y = sparse_all_to_all(xg, k, value_dtype=value_dtype, backend=backend)
    else:
        y = DenseAllToAll.apply(xg, None)
    if phase == "fwd+bwd":
        y.backward(upstream)
    return y


def _time_interleaved(fns, device, reps, budget_s):
    """p20/p50/p80 ms of each fn, the fns taking turns within every repetition, so that a
    change of load on a shared machine hits all of them alike."""
    def once(fn):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    for _ in range(3):
        for fn in fns:
            once(fn)
    times = [[] for _ in fns]
    # The loop ends on the all-reduced times, the same on every rank: a rank's own clock could
    # end its loop one collective before the others'.
    while len(times[0]) < reps or (sum(map(sum, times)) < budget_s * 1e3
                                   and len(times[0]) < 5 * reps):
        elapsed = torch.tensor([once(fn) for fn in fns], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest
        for series, ms in zip(times, (elapsed * 1e3).tolist()):
            series.append(ms)
    return [_percentiles(series) for series in times]


PROVIDERS = ("sparse_all_to_all", "dense all_to_all_single")


def _worker(rank, world, comm, store, configs, reps, budget_s, backend, out_path):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if comm == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(comm, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    kernels = kernel_backend(device, backend)
    if rank == 0:
        warn_if_core_missing(device, backend)
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    for B, D, k, dtype, value_dtype in configs:
        x = torch.randn(world * B, D, generator=g).relu_().add_(0.01).to(dtype).to(device)
        upstream = torch.randn(world * B, D, generator=g).to(dtype).to(device)
        models = dict(zip(PROVIDERS, all_to_all_bytes(x, k, world, value_dtype=value_dtype)))
        by_phase = {}
        for phase in ("fwd", "fwd+bwd"):
            steps = [lambda p=p: _step(p, phase, x, upstream, k, value_dtype, backend)
                     for p in PROVIDERS]
            sent = []
            for step in steps:
                with _CountSent(world) as counter:
                    step()
                sent.append(counter.sent)
            timings = _time_interleaved(steps, device, reps, budget_s)
            for provider, nbytes, (p20, p50, p80) in zip(PROVIDERS, sent, timings):
                row = dict(comm=comm, W=world, provider=provider,
                           kernels=kernels if provider == PROVIDERS[0] else "-", phase=phase,
                           B=B, D=D, k=k, ratio=round(k / D, 4), dtype=NAMES[dtype],
                           value_dtype=NAMES[value_dtype or dtype], p20_ms=p20, p50_ms=p50,
                           p80_ms=p80, bytes_sent=nbytes,
                           # all_to_all_bytes counts forward plus backward
                           bytes_model=models[provider] if phase == "fwd+bwd" else "")
                by_phase[provider, phase] = row
                rows.append(row)
        sparse_row = by_phase[PROVIDERS[0], "fwd+bwd"]
        dense_row = by_phase[PROVIDERS[1], "fwd+bwd"]
        if models[PROVIDERS[0]]:
            sparse_row["dense_over_sparse"] = round(models[PROVIDERS[1]] / models[PROVIDERS[0]], 2)
        if rank == 0:
            print(f"B={B} D={D} k={k} {NAMES[dtype]}/{NAMES[value_dtype or dtype]}: sparse "
                  f"{sparse_row['p50_ms']:.3f} ms vs dense {dense_row['p50_ms']:.3f} ms "
                  f"(fwd+bwd); {sparse_row['bytes_sent']} vs {dense_row['bytes_sent']} bytes "
                  "sent", flush=True)
    if rank == 0:
        with open(out_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f for f in FIELDS if f not in
                                                   ("card", "date", "version", "torch")])
            writer.writeheader()
            writer.writerows(rows)
    dist.destroy_process_group()


def card_name(comm):
    if comm == "nccl":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _table(rows):
    lines = ["| comm | W | B | D | k | x / wire | sparse fwd ms | dense fwd ms | "
             "sparse fwd+bwd ms | dense fwd+bwd ms | sparse bytes | dense bytes | "
             "fewer bytes |", "|" + "---|" * 13]
    by_key = {}
    for r in rows:
        by_key[(r["B"], r["D"], r["k"], r["dtype"], r["value_dtype"], r["provider"],
                r["phase"])] = r
    seen = []
    for r in rows:
        key = (r["B"], r["D"], r["k"], r["dtype"], r["value_dtype"])
        if key in seen:
            continue
        seen.append(key)
        get = lambda p, ph: by_key[key + (p, ph)]  # noqa: E731
        s, d = get("sparse_all_to_all", "fwd+bwd"), get("dense all_to_all_single", "fwd+bwd")
        ratio = f"{int(d['bytes_sent']) / int(s['bytes_sent']):.1f}x" if int(s["bytes_sent"]) \
            else "-"
        lines.append(
            f"| {r['comm']} | {r['W']} | {r['B']} | {r['D']} | {r['k']} | {r['dtype']} / "
            f"{r['value_dtype']} | {float(get('sparse_all_to_all', 'fwd')['p50_ms']):.3f} | "
            f"{float(get('dense all_to_all_single', 'fwd')['p50_ms']):.3f} | "
            f"{float(s['p50_ms']):.3f} | {float(d['p50_ms']):.3f} | {s['bytes_sent']} | "
            f"{d['bytes_sent']} | {ratio} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--comm", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per timing")
    parser.add_argument("--backend", default=None, help="kernel backend (default: the ops')")
    parser.add_argument("--out", default=None, help="folder (default bench/results/<card>)")
    args = parser.parse_args()

    f32, bf16 = torch.float32, torch.bfloat16
    if args.quick:
        configs = [(256, 1024, 51, f32, bf16)]
    else:
        configs = [(512, 1024, 51, f32, bf16), (512, 1024, 51, f32, None),
                   (512, 1024, 10, f32, bf16), (2048, 1024, 51, f32, bf16),
                   (512, 4096, 205, f32, bf16), (512, 1024, 51, bf16, bf16)]
    card = card_name(args.comm)
    out_dir = args.out or os.path.join(RESULTS_DIR, card_dir_name(card))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "rows.csv")
        ranks.spawn(_worker, (args.world, args.comm, os.path.join(tmp, "store"), configs,
                              args.reps, args.budget, args.backend, raw), args.world)
        with open(raw) as f:
            rows = list(csv.DictReader(f))
    meta = dict(card=card, date=datetime.date.today().isoformat(), version=dk.__version__,
                torch=torch.__version__)
    for r in rows:
        r.update(meta)
        r.setdefault("dense_over_sparse", "")
    with open(os.path.join(out_dir, "mp_exchange.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = _table(rows)
    with open(os.path.join(out_dir, "mp_exchange.md"), "w") as f:
        f.write(f"# sparse_all_to_all vs dense all_to_all_single, {card}\n\n"
                f"{meta['date']}, dct_kernels {meta['version']}, torch {meta['torch']}, "
                f"kernel backend {rows[0]['kernels']}; p50 of the slowest rank per "
                f"step; bytes rank 0 sends to the other ranks per step (forward + backward), "
                f"counted by wrapping all_to_all_single.\n\n{table}\n")
    print(table)
    print(f"wrote {out_dir}/mp_exchange.csv and mp_exchange.md")


if __name__ == "__main__":
    main()
