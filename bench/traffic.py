"""Bytes per rank and step of DCT-DP's exchanges against a dense ring all-reduce, modelled for
W = 2 ... 1024 with the sizing code the hook runs (``dct_kernels.distributed.sizing``), and
measured on gloo for small W by wrapping torch.distributed's collectives.

    python bench/traffic.py                       # the default model, ratio 0.003, bf16
    python bench/traffic.py --ratio 0.003 --widths 512,2048,2048,512 --measure 2,4,8

Bytes are counted as docs/design.md (Traffic statistics) counts them, per rank, sent plus
received: an all-gather of N bytes per rank is N sent and (W - 1) N received; an all-to-all of W
rows of R bytes, (W - 1) R each way; a ring all-reduce of M bytes, 2 (W - 1) / W M each way. The
dense baseline is the ring all-reduce of every bucket in the gradient dtype (fp32):
4 (W - 1) / W x bucket bytes.

The model: an MLP of the given widths (weights and biases, fp32), bucketed as DDP buckets a
model after its first iteration (parameters in reverse order, 25 MiB per bucket), or with
``--numels`` one bucket of parameters of the given sizes. Parameters
below ``--min-numel`` go dense (their ring all-reduce is counted in every exchange).

Writes ``traffic.md`` (table), ``traffic.json`` (every figure) and ``traffic.png`` (needs
matplotlib, the ``bench`` extra) into ``--out`` (default bench/results/<machine>/).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

import torch

from dct_kernels.distributed import sizing
from dct_kernels.distributed.stand_in import StandInBucket

import ranks  # bench/ranks.py
from dlrm.cli import device_slug
from dlrm.context import device_name

BUCKET_BYTES = 25 * 1024 * 1024
WORLDS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
EXCHANGES = ("allgather", "reduce_scatter", "auto")


def mlp_numels(widths):
    """Parameter sizes of an MLP (weight, bias per layer), in registration order."""
    out = []
    for a, b in zip(widths[:-1], widths[1:]):
        out += [a * b, b]
    return out


def buckets_of(numels, itemsize=4, cap=BUCKET_BYTES):
    """DDP's buckets after its rebuild: parameters in reverse order, up to ``cap`` bytes."""
    buckets, current, size = [], [], 0
    for n in reversed(numels):
        if current and size + n * itemsize > cap:
            buckets.append(current)
            current, size = [], 0
        current.append(n)
        size += n * itemsize
    if current:
        buckets.append(current)
    return buckets


def model_bytes(buckets, world, *, ratio, capacity_factor, min_numel, value_dtype,
                index_encoding="int32"):
    """{exchange or "dense": bytes per rank and step (sent + received)} from sizing."""
    out = {"dense": 0.0, "ring": 0.0}
    for e in EXCHANGES:
        out[e] = 0.0
    for numels in buckets:
        sparse = [n >= min_numel for n in numels]
        plan = sizing.plan(numels, sparse, ratio=ratio, capacity_factor=capacity_factor,
                           world=world, dtype=torch.float32, value_dtype=value_dtype,
                           index_encoding=index_encoding)
        out["dense"] += sum(plan.dense())
        out["ring"] += plan.ring()
        if not any(sparse):
            for e in EXCHANGES:
                out[e] += sum(plan.dense())
            continue
        costs = {"allgather": sum(plan.allgather()),
                 "reduce_scatter": sum(plan.reduce_scatter())}
        for e in ("allgather", "reduce_scatter"):
            out[e] += costs[e]
        out["auto"] += costs[plan.choose("auto")]
    return out


# ------------------------------------------------------------------------ measured on gloo


def _count(world, counter):
    """Wrap torch.distributed's collectives to add this rank's bytes into ``counter``."""
    import torch.distributed as dist

    def nbytes(t):
        return t.numel() * t.element_size()

    def wrap(name, kind):
        original = getattr(dist, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            t = args[1] if kind in ("ag", "a2a") else args[0]
            if t.dtype != torch.int64:  # the one-off agreement check of a new layout
                if kind == "ag":
                    counter[0] += nbytes(t) * world
                elif kind == "a2a":
                    counter[0] += 2 * (world - 1) * nbytes(t) / world
                else:
                    counter[0] += 4 * (world - 1) * nbytes(t) / world
            return original(*args, **kwargs)
        setattr(dist, name, wrapper)

    wrap("all_gather_single", "ag")
    wrap("all_gather_into_tensor", "ag")
    wrap("all_to_all_single", "a2a")
    wrap("all_reduce", "ar")


def _measure_worker(rank, world, store, config, result_path):
    import datetime as dt

    import torch.distributed as dist

    from dct_kernels.distributed import DCTState, dct_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=dt.timedelta(seconds=120))
    buckets = config["buckets"]
    results = {}
    for exchange in EXCHANGES:
        params = [[torch.nn.Parameter(torch.zeros(n)) for n in b] for b in buckets]
        named = [(f"b{i}.p{j}", p) for i, b in enumerate(params) for j, p in enumerate(b)]
        state = DCTState(ratio=config["ratio"], capacity_factor=config["capacity_factor"],
                         min_numel=config["min_numel"], warmup_steps=0, refresh_every=100,
                         value_dtype=getattr(torch, config["value_dtype"]),
                         index_encoding=config["index_encoding"],
                         exchange=exchange, module=named)
        counter = [0.0]
        per_step = []
        import torch.distributed as d2
        saved = {n: getattr(d2, n) for n in ("all_gather_single", "all_gather_into_tensor",
                                              "all_to_all_single", "all_reduce")
                 if hasattr(d2, n)}
        _count(world, counter)
        g = torch.Generator().manual_seed(rank)
        for step in range(config["steps"]):
            before = counter[0]
            futures = []
            for i, b in enumerate(params):
                grads = torch.randn(sum(p.numel() for p in b), generator=g)
                last = i == len(params) - 1
                futures.append(dct_hook(state, StandInBucket(b, grads, last)))
            for f in futures:
                f.wait()
            per_step.append(counter[0] - before)
        for n, f in saved.items():
            setattr(d2, n, f)
        stats = state.stats()
        results[exchange] = {"measured_per_step": per_step[-1],
                             "stats_per_step": (stats["bytes_sent"] + stats["bytes_received"])
                             / config["steps"],
                             "compression": stats["compression"]}
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def measure(world, config):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        ranks.spawn(_measure_worker, (world, os.path.join(tmp, "store"), config, path), world)
        with open(path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- report


def _ratio(x: float) -> str:
    """A compression for the table: whole numbers from 10, two digits below (an exchange that
    moves more than the ring shows as 0.58, not 1)."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def machine_name():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="1024,4096,4096,1024",
                        help="MLP widths of the model (default: %(default)s)")
    parser.add_argument("--numels", default="",
                        help="instead of --widths: one bucket of parameters of these sizes "
                             "(comma-separated, in bucket order)")
    parser.add_argument("--ratio", type=float, default=0.003)
    parser.add_argument("--capacity-factor", type=float, default=1.5)
    parser.add_argument("--value-dtype", default="bfloat16",
                        choices=("float32", "float16", "bfloat16", "float8_e4m3fn"))
    parser.add_argument("--index-encoding", default="int32", choices=("int32", "delta"),
                        help="sent positions as int32, or as uint16 gaps (wire format 2)")
    parser.add_argument("--min-numel", type=int, default=1024)
    parser.add_argument("--measure", default="2,4,8",
                        help="world sizes to measure on gloo ('' for none)")
    parser.add_argument("--measure-widths", default="256,1024,1024,256",
                        help="MLP widths of the measured model (smaller, 2-core friendly)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None,
                        help="output folder (default bench/results/<machine>/)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                device_slug(device_name()))
    value_dtype = getattr(torch, args.value_dtype)
    common = dict(ratio=args.ratio, capacity_factor=args.capacity_factor,
                  min_numel=args.min_numel, value_dtype=value_dtype,
                  index_encoding=args.index_encoding)
    if args.numels:
        # One bucket of the given parameter sizes, in bucket order.
        numels = [int(n) for n in args.numels.split(",")]
        buckets, model = [numels], f"one bucket of parameters {args.numels}"
    else:
        numels = mlp_numels([int(w) for w in args.widths.split(",")])
        buckets, model = buckets_of(numels), f"MLP {args.widths}"
    modelled = {w: model_bytes(buckets, w, **common) for w in WORLDS}

    measured = {}
    mwidths = [int(w) for w in args.measure_widths.split(",")]
    mbuckets = buckets_of(mlp_numels(mwidths))
    config = dict(buckets=mbuckets, ratio=args.ratio, capacity_factor=args.capacity_factor,
                  min_numel=args.min_numel, value_dtype=args.value_dtype,
                  index_encoding=args.index_encoding, steps=args.steps)
    for w in [int(x) for x in args.measure.split(",") if x]:
        got = measure(w, config)
        want = model_bytes(mbuckets, w, **common)
        measured[w] = {e: dict(got[e], modelled_per_step=want[e]) for e in EXCHANGES}
        measured[w]["dense"] = want["dense"]
        print(f"W={w}: " + ", ".join(f"{e} {got[e]['measured_per_step']:.0f} B "
                                     f"(model {want[e]:.0f})" for e in EXCHANGES),
              file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    n_params = sum(numels)
    lines = ["# DCT-DP traffic per rank and step", "",
             f"Model: {model} ({n_params:,} fp32 parameters, {len(buckets)} "
             f"DDP bucket(s) of <= 25 MiB), ratio {args.ratio}, capacity factor "
             f"{args.capacity_factor}, {args.value_dtype} values, {args.index_encoding} "
             f"indices, min_numel "
             f"{args.min_numel}. Modelled with dct_kernels.distributed.sizing (the hook's "
             f"code); bytes sent + received per rank and step, docs/design.md terms; compression "
             f"= ring bytes / exchange bytes.", "",
             "| W | dense ring (MB) | allgather (MB) | reduce_scatter (MB) | auto (MB) | "
             "compression allgather | compression reduce_scatter | compression auto |",
             "|---|---|---|---|---|---|---|---|"]
    for w in WORLDS:
        m = modelled[w]
        lines.append(f"| {w} | {m['dense'] / 1e6:.2f} | {m['allgather'] / 1e6:.3f} | "
                     f"{m['reduce_scatter'] / 1e6:.3f} | {m['auto'] / 1e6:.3f} | "
                     f"{_ratio(m['ring'] / m['allgather'])} | "
                     f"{_ratio(m['ring'] / m['reduce_scatter'])} | "
                     f"{_ratio(m['ring'] / m['auto'])} |")
    if measured:
        lines += ["", f"Measured on gloo ({machine_name()}), model MLP {args.measure_widths} "
                  f"({sum(mlp_numels(mwidths)):,} parameters), bytes per rank of one sparse "
                  f"step counted by wrapping torch.distributed's collectives, next to the "
                  f"model's figure for the same model:", "",
                  "| W | exchange | measured (B) | modelled (B) | stats() (B/step) | "
                  "compression (stats) |", "|---|---|---|---|---|---|"]
        for w, row in measured.items():
            for e in EXCHANGES:
                r = row[e]
                lines.append(f"| {w} | {e} | {r['measured_per_step']:.0f} | "
                             f"{r['modelled_per_step']:.0f} | {r['stats_per_step']:.0f} | "
                             f"{r['compression']:.1f} |")
    lines += ["", f"Generated {datetime.date.today()} by bench/traffic.py, torch "
              f"{torch.__version__}."]
    with open(os.path.join(args.out, "traffic.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "traffic.json"), "w") as f:
        json.dump({"config": vars(args), "machine": machine_name(),
                   "modelled": {str(k): v for k, v in modelled.items()},
                   "measured": {str(k): v for k, v in measured.items()}}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (the bench extra): no traffic.png", file=sys.stderr)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label in (("dense", "dense ring all-reduce"), ("allgather", "allgather"),
                           ("reduce_scatter", "reduce_scatter"), ("auto", "auto")):
            ax.plot(WORLDS, [modelled[w][key] / 1e6 for w in WORLDS], marker="o",
                    label=label, linestyle="--" if key == "auto" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("world size W")
        ax.set_ylabel("MB per rank and step (sent + received)")
        ax.set_title(f"DCT-DP traffic, {model}, ratio {args.ratio}, "
                     f"{args.value_dtype}, {args.index_encoding}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "traffic.png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
