"""How much of the gradient exchange the backward pass hides, on gloo: on loopback, or on the
emulated cluster's shaped links (bench/cluster.py; needs root).

    python bench/overlap.py [--world 2] [--widths 512,2048,2048,2048,512] [--steps 20]
    python bench/overlap.py --link 1gbit --steps 10          # one namespace per rank

Per mode, the median time of a training step (forward, backward, optimizer step) of the same
MLP under DDP on ``--world`` gloo ranks:

- ``none``: DDP with a hook that communicates nothing (the bucket's local gradient is the
  result): the compute alone;
- ``dense``: an all-reduce hook (what DDP does by default: all-reduce, divide by W);
- ``bf16``: torch's ``bf16_compress_hook`` (under a wrapper of another name: DDP refuses the
  hook itself on gloo, see bench/dlrm/dp_traffic.py);
- ``powersgd``: torch's ``powerSGD_hook``, rank 2, compressing from the third step, with one
  bucket (its chained all-reduces need one bucket on gloo, see bench/dlrm/runner.py);
- ``dct/allgather`` and ``dct/reduce_scatter``: ``dct_hook`` with that exchange.

and the time of the same communication alone (the hook called on DDP's buckets, as its last
step had them, with no backward pass: for DCT-DP this includes the compress and decompress
work the hook does). The fraction hidden is 1 - (step - none) / alone: 1 when the
communication costs the step nothing, 0 when it is fully exposed, below 0 when running it
beside the backward pass slows both (on a 2-core machine the ranks' compute and gloo's threads
share the cores). Timings are medians of ``--steps`` steps after 3 warm-up steps, on every rank
(the slowest rank's median is reported). ``--modes`` picks some of the modes (``none`` always
runs). Writes overlap.md and overlap.json, or overlap_<rate>.md and .json with ``--link``.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from dct_kernels.distributed.stand_in import StandInBucket

from kernel_backend import kernel_backend, warn_if_core_missing  # bench/kernel_backend.py
import ranks  # bench/ranks.py

MODES = ("none", "dense", "bf16", "powersgd", "dct/allgather", "dct/reduce_scatter")
# Rank 2 and a start after two plain steps: PowerSGD's usual rank, compressing in every timed
# step (the first 3 steps are warm-up).
POWERSGD_RANK = 2
POWERSGD_START = 2


def _model(widths):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _local(state, bucket):
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _bf16(process_group, bucket):
    """torch's bf16_compress_hook under a name DDP does not refuse on gloo."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.bf16_compress_hook(process_group, bucket)


def _worker(rank, world, store, config, path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    _measure(rank, world, config, path)


def _measure(rank, world, config, path):
    """Time every mode on this rank of the initialized group; rank 0 writes the slowest rank's
    medians to ``path``."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    from dct_kernels.distributed import DCTState, dct_hook

    widths, steps = config["widths"], config["steps"]
    results = {}
    for mode in config["modes"]:
        torch.manual_seed(0)
        model = _model(widths)
        one_bucket = {}
        if mode == "powersgd":
            size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            one_bucket["bucket_cap_mb"] = size_mb + 1
        ddp = torch.nn.parallel.DistributedDataParallel(model, **one_bucket)
        state = None
        seen = []  # the parameters of each bucket of the last step

        def recorded(hook):
            def run(hook_state, bucket):
                if bucket.index() == 0:
                    seen.clear()
                seen.append(list(bucket.parameters()))
                return hook(hook_state, bucket)
            return run

        def allreduce(_, bucket):
            world_size = dist.get_world_size()
            work = dist.all_reduce(bucket.buffer(), async_op=True)
            return work.get_future().then(lambda f: f.value()[0].div_(world_size))

        if mode == "none":
            ddp.register_comm_hook(None, recorded(_local))
        elif mode == "dense":
            ddp.register_comm_hook(None, recorded(allreduce))
        elif mode == "bf16":
            ddp.register_comm_hook(None, recorded(_bf16))
        elif mode == "powersgd":
            state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=POWERSGD_RANK,
                                                start_powerSGD_iter=POWERSGD_START)
            ddp.register_comm_hook(state, recorded(powerSGD_hook.powerSGD_hook))
        else:
            state = DCTState(ratio=config["ratio"], warmup_steps=0, refresh_every=1000,
                             value_dtype=torch.bfloat16, exchange=mode.split("/")[1],
                             module=model)
            ddp.register_comm_hook(state, recorded(dct_hook))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(rank)
        times = []
        for step in range(steps + 3):
            x = torch.randn(config["batch"], widths[0], generator=g)
            dist.barrier()
            start = time.perf_counter()
            loss = ddp(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        step_time = statistics.median(times[3:])
        # The same communication alone: the hook (or an all-reduce) on buckets of the same
        # sizes, no backward pass.
        alone = None
        if mode != "none":
            buckets = [list(b) for b in seen]  # DDP's buckets, as its last step had them
            alone_times = []
            for step in range(steps + 3):
                grads = [torch.randn(sum(p.numel() for p in b), generator=g) for b in buckets]
                dist.barrier()
                start = time.perf_counter()
                if mode == "dense":
                    works = [dist.all_reduce(t, async_op=True) for t in grads]
                    for w in works:
                        w.wait()
                else:
                    # The hook itself on stand-in buckets (for PowerSGD and DCT-DP this
                    # includes their compression work, for bf16 the casts).
                    hook = {"bf16": _bf16, "powersgd": powerSGD_hook.powerSGD_hook}.get(
                        mode, dct_hook)
                    last = len(buckets) - 1
                    futures = [hook(state, StandInBucket(b, t, i == last, index=i))
                               for i, (b, t) in enumerate(zip(buckets, grads))]
                    for f in futures:
                        f.wait()
                alone_times.append(time.perf_counter() - start)
            alone = statistics.median(alone_times[3:])
        results[mode] = {"step_s": step_time, "alone_s": alone}
    rows = [None] * world
    dist.all_gather_object(rows, results)
    if rank == 0:
        worst = {m: {"step_s": max(r[m]["step_s"] for r in rows),
                     "alone_s": (max(r[m]["alone_s"] for r in rows)
                                 if rows[0][m]["alone_s"] is not None else None)}
                 for m in results}
        with open(path, "w") as f:
            json.dump(worst, f)
    dist.destroy_process_group()


def _on_cluster(args, argv, config, path):
    """Run this script's ranks on the emulated cluster, one per namespace; returns the link's
    description. Raises the cluster's errors (ClusterUnavailable without root)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cluster  # bench/cluster.py

    with cluster.EmulatedCluster(args.world, args.link) as emu:
        rank_argv = [sys.executable, os.path.abspath(__file__), *_without_link(argv),
                     "--result", path]
        emu.launch(rank_argv, env={"PYTHONUNBUFFERED": "1"})
        return {"rate": args.link, "rate_bit_s": emu.rate_bit_s,
                "measured_bit_s": emu.measured_bit_s}


def _without_link(argv):
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--link":
            skip = True
        elif not arg.startswith("--link="):
            out.append(arg)
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--widths", default="512,2048,2048,2048,512")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", default=",".join(MODES[1:]),
                        help=f"comma-separated, some of {','.join(MODES[1:])}")
    parser.add_argument("--link", metavar="RATE",
                        help="run on the emulated cluster with links of RATE (root)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "CPU_x86_64_2_cores"))
    # Set by the --link launcher for its ranks: where rank 0 writes the timings.
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modes = ["none"] + [m.strip() for m in args.modes.split(",") if m.strip() not in ("", "none")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}")
    if args.result is None:  # the launcher, not a rank the cluster started
        warn_if_core_missing("cpu")
    config = dict(widths=[int(w) for w in args.widths.split(",")], steps=args.steps,
                  batch=args.batch, ratio=args.ratio, modes=modes)
    if args.result:  # a rank on the emulated cluster (env:// rendezvous)
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
        _measure(dist.get_rank(), dist.get_world_size(), config, args.result)
        return 0

    link = None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        if args.link:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import cluster  # bench/cluster.py

            try:
                link = _on_cluster(args, argv, config, path)
            except (ValueError, cluster.ClusterError) as exc:
                print(f"overlap.py: {exc}", file=sys.stderr)
                return 1
        else:
            ranks.spawn(_worker, (args.world, os.path.join(tmp, "store"), config, path),
                        args.world)
        with open(path) as f:
            result = json.load(f)
    base = result["none"]["step_s"]
    where = ("loopback" if link is None else
             f"emulated links of {args.link} (bench/cluster.py, measured "
             f"{link['measured_bit_s'] / 1e6:.0f} Mbit/s)")
    lines = [f"# Overlap of the gradient exchange on gloo ({where})", "",
             f"MLP {args.widths}, batch {args.batch}, {args.world} gloo ranks, {where}; DCT-DP "
             f"ratio {args.ratio}, bf16 values; PowerSGD rank {POWERSGD_RANK}, one bucket; "
             f"median step of {args.steps} steps (slowest rank). "
             f"hidden = 1 - (step - step without communication) / communication alone.", "",
             "| mode | step (ms) | communication alone (ms) | exposed (ms) | hidden |",
             "|---|---|---|---|---|"]
    for mode, r in result.items():
        if r["alone_s"] is None:
            lines.append(f"| {mode} (no communication) | {r['step_s'] * 1e3:.1f} | - | - | - |")
            continue
        exposed = r["step_s"] - base
        hidden = 1 - exposed / r["alone_s"]
        r["hidden"] = hidden
        lines.append(f"| {mode} | {r['step_s'] * 1e3:.1f} | {r['alone_s'] * 1e3:.1f} | "
                     f"{exposed * 1e3:.1f} | {hidden:.2f} |")
    lines += ["", f"Generated {datetime.date.today()} by bench/overlap.py, torch "
              f"{torch.__version__}, {os.cpu_count()} cores, kernel backend "
              f"{kernel_backend('cpu')}."]
    os.makedirs(args.out, exist_ok=True)
    stem = "overlap" if link is None else f"overlap_{args.link}"
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump({"config": vars(args), "link": link, "result": result,
                   "kernel_backend": kernel_backend("cpu")}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
