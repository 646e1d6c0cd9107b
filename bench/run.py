"""Microbenchmarks of the dct_kernels ops against the torch code a user would write.

For each op, backend, n and kept ratio: the median (and p20/p80) of many timings (CUDA events on
a GPU, wall clock on a CPU), after warm-up, on random data (never zeros), rotating among several
input sets when one set would fit in L2. Every time is also given as a fraction of the
bandwidth floor: the fewest bytes the op must move (docs/design.md#performance-model) over
the device-to-device copy bandwidth measured at the start of the run.

Every available backend that runs on the device is timed (``dk.available_backends()``), next
to the torch baselines of bench/results_table.py. The rows go into the card's results file,
``bench/results/<card>/results.csv`` (or ``--csv``), updated by key: a rerun replaces the rows
it measures again and keeps the others. ``--out DIR`` also writes this run's table
(``results.md``), a copy of the updated results file and its plot (bench/plot.py) into DIR.

    python bench/run.py                       # full sweep (GPU)
    python bench/run.py --quick               # small sweep, for a smoke run (GPU or CPU)
    python bench/run.py --device cpu --quick  # CPU demo (wall clock)
    python bench/run.py --sizes 22 --ratios 0.01 --ops compress+residual decompress_many \
        --wire int32/bf16 delta/fp8           # wire format 2 against int32 + bf16
"""

import argparse
import datetime
import math
import os
import platform
import statistics
import time

import torch

import dct_kernels as dk

import results_table
from kernel_backend import warn_if_core_missing
from results_table import BASELINES

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


def measure(op, provider, floor_bytes, timing, **config):
    """One result row (the fixed fields of bench/results_table.py), less the run's metadata."""
    p20, p50, p80 = timing
    return dict(op=op, provider=provider, dtype="float32", p20_ms=p20, p50_ms=p50, p80_ms=p80,
                floor_bytes=floor_bytes, **config)


def bench_select(n, ratio, device, backends):
    k = max(1, int(ratio * n))
    sets = [(random_tensor(n, device, seed=s),) for s in range(num_sets(4 * n))]
    floor = 4 * n
    config = dict(n=n, ratio=ratio, k=k)
    rows = [measure("select_threshold", b, floor,
                    time_op(lambda x: dk.select_threshold(x, k, backend=b), sets, device),
                    **config) for b in backends]
    rows.append(measure("select_threshold", BASELINES["select_threshold"], floor,
                        time_op(lambda x: torch.topk(x.abs(), k, sorted=False).values.min(),
                                sets, device), **config))
    return rows


# Wire formats to time compress and decompress_many with (``--wire``): (value dtype, index
# encoding); the provider of a row other than the default's is "<backend> (<wire>)".
WIRES = {"fp32": (None, "int32"), "int32/bf16": (torch.bfloat16, "int32"),
         "delta/fp8": (torch.float8_e4m3fn, "delta")}
_wires = ["fp32"]


def _provider(backend: str, wire: str) -> str:
    return backend if wire == "fp32" else f"{backend} ({wire})"


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
    floor = (12 if with_residual else 4) * n + 8 * k
    config = dict(n=n, ratio=ratio, k=k, residual=int(with_residual))

    def restore(x, r, t, saved):
        # Every call must see the same residual, or the kept fraction drifts away from k / n.
        if r is not None:
            r.copy_(saved)
    rows = []
    for wire in _wires:
        value_dtype, encoding = WIRES[wire]
        for b in backends:
            fn = lambda x, r, t, _: dk.compress(x, t, residual=r, capacity=capacity,  # noqa
                                                value_dtype=value_dtype,
                                                index_encoding=encoding, backend=b)
            rows.append(measure("compress", _provider(b, wire), floor,
                                time_op(fn, sets, device, setup=restore), **config))

    def torch_baseline(x, r, t, _):
        acc = x + r if r is not None else x
        mask = acc.abs() >= t
        idx = mask.nonzero().squeeze(1)
        vals = acc[idx]
        if r is not None:
            r.copy_(acc.masked_fill(mask, 0))
        return idx, vals
    rows.append(measure("compress", BASELINES["compress"], floor,
                        time_op(torch_baseline, sets, device, setup=restore), **config))
    return rows


def bench_decompress_many(n, ratio, device, backends, ranks=8):
    k = max(1, int(ratio * n))
    capacity = int(1.5 * k) + 1
    xs = [random_tensor(n, device, seed=100 + w) for w in range(ranks)]
    thresholds = [torch.topk(x.abs(), k).values[-1] for x in xs]
    payloads = [dk.compress(x, t, capacity=capacity) for x, t in zip(xs, thresholds)]
    indices = torch.cat([p.indices[:int(p.count)].long() for p in payloads])
    values = torch.cat([p.values[:int(p.count)] for p in payloads])
    floor = 4 * n + 8 * k * ranks
    copies = num_sets(floor)  # rotated, like every op's inputs, so that L2 does not flatter
    outs = [torch.empty(n, device=device) for _ in range(copies)]
    config = dict(n=n, ratio=ratio, k=k, W=ranks)
    rows = []
    for wire in _wires:
        value_dtype, encoding = WIRES[wire]
        payloads = [dk.compress(x, t, capacity=capacity, value_dtype=value_dtype,
                                index_encoding=encoding) for x, t in zip(xs, thresholds)]
        buffers = torch.stack([p.buffer for p in payloads])
        sets = [(buffers.clone(), out) for out in outs]
        first = payloads[0]
        for b in backends:
            fn = lambda bufs, out: dk.decompress_many(  # noqa: E731
                bufs, out=out, average=True, validate=False, capacity=capacity,
                value_dtype=first.value_dtype, index_encoding=first.index_encoding,
                num_scales=first.num_scales or None, backend=b)
            rows.append(measure("decompress_many", _provider(b, wire), floor,
                                time_op(fn, sets, device), **config))
    sets = [(indices.clone(), values.clone(), out) for out in outs]

    def torch_baseline(indices, values, out):
        out.zero_()
        out.index_put_((indices,), values, accumulate=True)
        out.div_(ranks)
    rows.append(measure("decompress_many", BASELINES["decompress_many"], floor,
                        time_op(torch_baseline, sets, device), **config))
    return rows


def bench_rows(n, ratio, device, backends, columns=4096):
    rows_count = max(1, n // columns)
    k = max(1, int(ratio * columns))
    sets = [(random_tensor(rows_count * columns, device, seed=7 + s).view(rows_count, columns),)
            for s in range(num_sets(4 * rows_count * columns))]
    floor = 4 * rows_count * columns + rows_count * k * (2 + 4)
    config = dict(n=rows_count * columns, ratio=ratio, k=k, D=columns)
    out = [measure("compress_rows", b, floor,
                   time_op(lambda x: dk.compress_rows(x, k, backend=b), sets, device), **config)
           for b in backends]

    def torch_baseline(x):
        idx = torch.topk(x.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
        return idx.to(torch.int16), torch.gather(x, 1, idx)
    out.append(measure("compress_rows", BASELINES["compress_rows"], floor,
                       time_op(torch_baseline, sets, device), **config))
    return out


# ------------------------------------------------------------------------------------ report

def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def backends_for(device, wanted=None):
    """Every available backend (``dk.available_backends()``, whatever names it lists) that
    runs on ``device``, found by trying one small op, so a backend added later is timed without
    a change here; ``wanted`` (names) narrows the list."""
    found = []
    for name, why in dk.available_backends().items():
        if wanted is not None and name not in wanted:
            continue
        if why != "available":
            print(f"backend {name}: not timed ({why})")
            continue
        try:
            dk.select_threshold(random_tensor(64, device), 1, backend=name)
        except ValueError as e:
            print(f"backend {name}: not timed ({e})")
            continue
        found.append(name)
    return found


def run_metadata(device, bandwidth) -> dict:
    meta = {"card": device_name(device), "date": datetime.date.today().isoformat(),
            "version": dk.__version__, "torch": torch.__version__,
            "copy_gbps": bandwidth / 1e9}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = "-"
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few small sizes only")
    parser.add_argument("--sizes", type=int, nargs="*", help="log2 of the sizes to run")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.001, 0.01, 0.1])
    parser.add_argument("--ops", nargs="*", choices=OPS, default=list(OPS))
    parser.add_argument("--wire", nargs="*", choices=list(WIRES), default=["fp32"],
                        help="wire formats for compress and decompress_many (default fp32: "
                             "int32 indices, fp32 values; int32/bf16; delta/fp8 = format "
                             "version 2)")
    parser.add_argument("--backends", nargs="*", default=None,
                        help="backends to time (default: every available one that runs on "
                             "the device)")
    parser.add_argument("--csv", default=None,
                        help="results file to update by key (default: "
                             "bench/results/<card>/results.csv)")
    parser.add_argument("--out", default=None,
                        help="also write this run's table (results.md), a copy of the updated "
                             "results file and its plot into this folder")
    args = parser.parse_args()
    if any(not 0 < r <= 1 for r in args.ratios):  # NaN fails this too
        parser.error(f"--ratios: expected values in (0, 1], got {args.ratios}")
    if args.sizes and any(not 0 <= s <= 30 for s in args.sizes):
        parser.error(f"--sizes: expected log2 sizes in [0, 30], got {args.sizes}")
    if args.backends:
        unknown = [b for b in args.backends if b not in dk.backends.NAMES]
        if unknown:
            parser.error(f"--backends: unknown {unknown} (expected some of "
                         f"{list(dk.backends.NAMES)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")

    device = torch.device(args.device)
    _wires[:] = args.wire
    if args.sizes:
        sizes = [1 << s for s in args.sizes]
    elif args.quick:
        sizes = [1 << 16, 1 << 20] if device.type == "cuda" else [1 << 16, 1 << 18]
    else:
        sizes = [1 << s for s in (16, 20, 24, 26, 28)]
    warn_if_core_missing(device)
    backends = backends_for(device, args.backends)
    bandwidth = copy_bandwidth(device)
    meta = run_metadata(device, bandwidth)
    csv_path = args.csv or results_table.default_path(meta["card"])
    print(f"{meta['card']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; backends {backends}; "
          f"sizes {sizes}", flush=True)

    rows = []
    for n in sizes:
        for ratio in args.ratios:
            for op in args.ops:
                for row in OPS[op](n, ratio, device, backends):
                    row.update(meta,
                               gbps=row["floor_bytes"] / (row["p50_ms"] * 1e-3) / 1e9,
                               pct_floor=100 * row["floor_bytes"] / bandwidth
                               / (row["p50_ms"] * 1e-3))
                    rows.append(row)
                    print(f"{results_table.describe(row):40s} {row['provider']:30s} "
                          f"n=2^{int(math.log2(n)):2d} kept={ratio:<6g} {row['p50_ms']:9.3f} ms"
                          f"  {row['pct_floor']:5.1f}% of floor", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    all_rows = results_table.update(csv_path, rows)
    table = (f"# dct_kernels microbenchmarks: {meta['card']}\n\n"
             f"{meta['date']}, dct_kernels {meta['version']}, torch {meta['torch']}, "
             f"triton {meta['triton']}; copy bandwidth {meta['copy_gbps']:.0f} GB/s "
             f"(read + write). Times: {'CUDA-event' if device.type == 'cuda' else 'wall-clock'}"
             " medians (p20-p80 in brackets); % floor = minimal bytes / copy bandwidth / time; "
             "vs baseline = the torch code a user would write, same run.\n\n"
             + results_table.markdown(rows))
    print("\n" + table)
    print(f"updated {csv_path} ({len(rows)} rows measured, {len(all_rows)} in the file)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(table)
        results_table.write(os.path.join(args.out, "results.csv"), all_rows)
        import plot
        plot.plot(all_rows, os.path.join(args.out, "time_vs_n.png"))
        print(f"wrote {args.out}")


OPS = {
    "select": bench_select,
    "compress+residual": lambda *a: bench_compress(*a, with_residual=True),
    "compress": lambda *a: bench_compress(*a, with_residual=False),
    "decompress_many": bench_decompress_many,
    "rows": bench_rows,
}


if __name__ == "__main__":
    main()
