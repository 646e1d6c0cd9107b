"""Microbenchmarks of the dct_kernels ops against the torch code a user would write.

For each op, backend, n and kept ratio: the median (and p20/p80) of many CUDA-event timings,
after warm-up, on random data (never zeros), rotating among several input sets when one set
would fit in L2. Every time is also given as a fraction of the bandwidth floor: the fewest
bytes the op must move (DESIGN.md section 5) over the device-to-device copy bandwidth measured
at the start of the run.

Writes ``results.json`` (one row per measurement), ``results.md`` (a table) and ``time_vs_n.png``
into ``--out`` (default ``bench/results/<gpu name>``).

    python bench/run.py                       # full sweep (GPU)
    python bench/run.py --quick               # small sweep, for a smoke run
    python bench/run.py --device cpu --quick  # CPU demo (torch backend, wall clock)
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dct_kernels as dk  # noqa: E402

L2_FLUSH_BYTES = 256 << 20  # rotate inputs until one round touches this much memory


# ------------------------------------------------------------------------------------ timing

def _percentiles(samples):
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return pick(0.2), statistics.median(s), pick(0.8)


def time_op(fn, sets, device, min_reps=10, max_reps=200, budget_s=1.0, setup=None):
    """p20/p50/p80 milliseconds of fn(*set), cycling through the input sets. ``setup(*set)``,
    when given, runs before each call, outside the timed region (e.g. to restore state that
    fn updates in place)."""
    setup = setup or (lambda *args: None)
    for i in range(3):
        setup(*sets[i % len(sets)])
        fn(*sets[i % len(sets)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    # Estimate one call to size the repetitions to the budget.
    setup(*sets[0])
    t0 = time.perf_counter()
    fn(*sets[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / one)))
    samples = []
    for r in range(reps):
        args = sets[r % len(sets)]
        setup(*args)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            samples.append((time.perf_counter() - t0) * 1e3)
    return _percentiles(samples)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    _, p50, _ = time_op(lambda: dst.copy_(src), [()], device)
    return 2 * src.numel() * 4 / (p50 * 1e-3)


def num_sets(bytes_per_set: int) -> int:
    return max(1, min(8, math.ceil(L2_FLUSH_BYTES / max(bytes_per_set, 1))))


# ------------------------------------------------------------------------------ the workloads

def random_tensor(n, device, dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(n, device=device, dtype=torch.float32, generator=g).to(dtype)


def bench_select(n, ratio, device, backends):
    k = max(1, int(ratio * n))
    sets = [(random_tensor(n, device, seed=s),) for s in range(num_sets(4 * n))]
    floor = 4 * n
    rows = []
    for b in backends:
        rows.append(("select_threshold", b, floor,
                     time_op(lambda x: dk.select_threshold(x, k, backend=b), sets, device)))
    rows.append(("select_threshold", "torch.topk", floor,
                 time_op(lambda x: torch.topk(x.abs(), k, sorted=False).values.min(), sets,
                         device)))
    return rows


def bench_compress(n, ratio, device, backends, with_residual):
    k = max(1, int(ratio * n))
    capacity = int(1.5 * k) + 1
    sets = []
    for s in range(num_sets(12 * n)):
        x = random_tensor(n, device, seed=2 * s)
        residual = random_tensor(n, device, seed=2 * s + 1) * 0.1
        threshold = torch.topk((x + residual).abs(), k).values[-1] if with_residual \
            else torch.topk(x.abs(), k).values[-1]
        saved = residual.clone() if with_residual else None
        sets.append((x, residual if with_residual else None, threshold, saved))
    op = "compress+residual" if with_residual else "compress"
    floor = (12 if with_residual else 4) * n + 8 * k

    def restore(x, r, t, saved):
        # Every call must see the same residual, or the kept fraction drifts away from k / n.
        if r is not None:
            r.copy_(saved)
    rows = []
    for b in backends:
        fn = lambda x, r, t, _: dk.compress(x, t, residual=r, capacity=capacity,  # noqa
                                            backend=b)
        rows.append((op, b, floor, time_op(fn, sets, device, setup=restore)))

    def torch_baseline(x, r, t, _):
        acc = x + r if r is not None else x
        mask = acc.abs() >= t
        idx = mask.nonzero().squeeze(1)
        vals = acc[idx]
        if r is not None:
            r.copy_(acc.masked_fill(mask, 0))
        return idx, vals
    rows.append((op, "torch (abs,ge,nonzero,index)", floor,
                 time_op(torch_baseline, sets, device, setup=restore)))
    return rows


def bench_decompress_many(n, ratio, device, backends, ranks=8):
    k = max(1, int(ratio * n))
    capacity = int(1.5 * k) + 1
    payloads = []
    for w in range(ranks):
        x = random_tensor(n, device, seed=100 + w)
        t = torch.topk(x.abs(), k).values[-1]
        payloads.append(dk.compress(x, t, capacity=capacity, backend="torch"
                                    if device.type == "cpu" else None))
    buffers = torch.stack([p.buffer for p in payloads])
    indices = torch.cat([p.indices[:int(p.count)].long() for p in payloads])
    values = torch.cat([p.values[:int(p.count)] for p in payloads])
    out = torch.empty(n, device=device)
    floor = 4 * n + 8 * k * ranks
    sets = [(buffers,)]
    rows = []
    for b in backends:
        fn = lambda bufs: dk.decompress_many(bufs, out=out, average=True, validate=False,  # noqa
                                             capacity=capacity, value_dtype=torch.float32,
                                             backend=b)
        rows.append(("decompress_many(W=8)", b, floor, time_op(fn, sets, device)))

    def torch_baseline(_):
        out.zero_()
        out.index_put_((indices,), values, accumulate=True)
        out.div_(ranks)
    rows.append(("decompress_many(W=8)", "torch (index_put_ accumulate)", floor,
                 time_op(torch_baseline, sets, device)))
    return rows


def bench_rows(n, ratio, device, backends, columns=4096):
    rows_count = max(1, n // columns)
    k = max(1, int(ratio * columns))
    sets = [(random_tensor(rows_count * columns, device, seed=7 + s).view(rows_count, columns),)
            for s in range(num_sets(4 * rows_count * columns))]
    floor = 4 * rows_count * columns + rows_count * k * (2 + 4)
    out = []
    for b in backends:
        out.append(("compress_rows(D=4096)", b, floor,
                    time_op(lambda x: dk.compress_rows(x, k, backend=b), sets, device)))

    def torch_baseline(x):
        idx = torch.topk(x.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
        return idx.to(torch.int16), torch.gather(x, 1, idx)
    out.append(("compress_rows(D=4096)", "torch.topk", floor,
                time_op(torch_baseline, sets, device)))
    return out


# ------------------------------------------------------------------------------------ report

def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_markdown(path, rows, meta):
    lines = [f"# dct_kernels microbenchmarks: {meta['gpu']}", "",
             f"{meta['date']}, dct_kernels {meta['version']}, torch {meta['torch']}, "
             f"triton {meta['triton']}; copy bandwidth {meta['copy_gbps']:.0f} GB/s "
             "(read + write). Times are CUDA-event medians (p20-p80 in brackets); "
             "% floor = minimal bytes / copy bandwidth / time.", "",
             "| op | backend | n | kept | p50 ms | [p20, p80] | GB/s | % floor | vs torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    baseline = {}
    for r in rows:
        if r["backend"].startswith("torch") and r["backend"] != "torch":
            baseline[(r["op"], r["n"], r["ratio"])] = r["p50_ms"]
    for r in rows:
        base = baseline.get((r["op"], r["n"], r["ratio"]))
        speedup = f"{base / r['p50_ms']:.1f}x" if base and r["p50_ms"] > 0 else ""
        lines.append(f"| {r['op']} | {r['backend']} | 2^{int(math.log2(r['n']))} | "
                     f"{r['ratio'] * 100:g}% | {r['p50_ms']:.3f} | "
                     f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] | {r['gbps']:.0f} | "
                     f"{r['pct_floor']:.0f}% | {speedup} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for backend in sorted({r["backend"] for r in rows if r["op"] == op}):
            pts = sorted((r["n"], r["p50_ms"]) for r in rows
                         if r["op"] == op and r["backend"] == backend and r["ratio"] == 0.01)
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_title(f"{op} (1% kept)")
        ax.set_xlabel("n (elements)")
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few small sizes only")
    parser.add_argument("--sizes", type=int, nargs="*", help="log2 of the sizes to run")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.001, 0.01, 0.1])
    parser.add_argument("--ops", nargs="*",
                        default=["select", "compress+residual", "compress", "decompress_many",
                                 "rows"])
    parser.add_argument("--backends", nargs="*", default=None,
                        help="backends to time (default: every available one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.sizes:
        sizes = [1 << s for s in args.sizes]
    elif args.quick:
        sizes = [1 << 16, 1 << 20] if device.type == "cuda" else [1 << 16, 1 << 18]
    else:
        sizes = [1 << s for s in (16, 20, 24, 26, 28)]
    backends = [b for b, why in dk.available_backends().items() if why == "available"
                and (device.type == "cuda" or b == "torch")]
    if device.type == "cuda":
        backends = [b for b in backends if b != "torch"]  # the torch baselines stand for it
    if args.backends is not None:
        backends = [b for b in backends if b in args.backends]
    gpu = device_name(device)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       gpu.replace(" ", "_"))
    os.makedirs(out_dir, exist_ok=True)
    bandwidth = copy_bandwidth(device)
    meta = {"gpu": gpu, "date": datetime.date.today().isoformat(), "version": dk.__version__,
            "torch": torch.__version__, "copy_gbps": bandwidth / 1e9}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = "-"
    print(f"{gpu}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; backends {backends}; "
          f"sizes {sizes}", flush=True)

    rows = []
    for n in sizes:
        for ratio in args.ratios:
            results = []
            if "select" in args.ops:
                results += bench_select(n, ratio, device, backends)
            if "compress+residual" in args.ops:
                results += bench_compress(n, ratio, device, backends, with_residual=True)
            if "compress" in args.ops:
                results += bench_compress(n, ratio, device, backends, with_residual=False)
            if "decompress_many" in args.ops:
                results += bench_decompress_many(n, ratio, device, backends)
            if "rows" in args.ops:
                results += bench_rows(n, ratio, device, backends)
            for op, backend, floor_bytes, (p20, p50, p80) in results:
                row = dict(op=op, backend=backend, dtype="float32", n=n, ratio=ratio,
                           p20_ms=p20, p50_ms=p50, p80_ms=p80, floor_bytes=floor_bytes,
                           gbps=floor_bytes / (p50 * 1e-3) / 1e9,
                           pct_floor=100 * floor_bytes / bandwidth / (p50 * 1e-3), **meta)
                rows.append(row)
                print(f"{op:24s} {backend:30s} n=2^{int(math.log2(n)):2d} kept={ratio:<6g} "
                      f"{p50:9.3f} ms  {row['pct_floor']:5.1f}% of floor", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_markdown(os.path.join(out_dir, "results.md"), rows, meta)
    plot(os.path.join(out_dir, "time_vs_n.png"), rows)
    with open(os.path.join(out_dir, "results.md")) as f:
        print("\n" + f.read())
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
