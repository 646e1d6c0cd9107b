"""The DDP hook's own cost per bucket and step: host time and the device operations it
launches, against a dense all-reduce hook on the same bucket.

    python bench/hook_cost.py [--steps 200] [--device cpu|cuda] [--emulate 4,64] [--wire fp8-delta]

One process (a gloo group of one rank, or NCCL on a GPU), the dense part of the DLRM of
bench/train_dlrm.py as one bucket (its MLP shapes; ratio 0.003, bf16 values, min_numel 0, as
the quick configuration; ``--wire fp8-delta`` for fp8 values with delta-coded indices),
gradients drawn once and reused (the timing is of the hook, not of the random numbers). Per
mode, the median host time of ``dct_hook(...).wait()`` over ``--steps`` steady-state steps (no
refresh falls in the timed window: refresh_every is larger) and the number of operations it
dispatches per step, counted with torch.profiler:
aten operations on the CPU, CUDA kernels on a GPU. At world size 1 the collectives are local,
so this is the hook's compute and bookkeeping, the floor a real cluster adds its network to.

``--emulate W,...`` adds the sparse modes as rank 0 of a group of W: the hook sizes its layout
for W ranks (shards, capacities), and its collectives are replaced by local copies (every rank
"sends" what rank 0 sends), so the rows show how the hook's own work grows with W without W
processes (the network, and waiting for other ranks, are not in them).
Writes ``hook_cost.json`` / ``.md`` (``hook_cost_fp8_delta.*`` with ``--wire fp8-delta``) under
bench/results/<device>/.
"""

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from dct_kernels.distributed import DCTState, collectives, dct_hook, fingerprint
from dct_kernels.distributed.stand_in import StandInBucket

# The dense part of the quick DLRM (bottom MLP, projection, top MLP), one bucket.
SHAPES = [(64, 13), (64,), (16, 64), (16,), (128, 1024), (128,), (128, 1040), (128,),
          (64, 128), (64,), (1, 64), (1,)]


def _dense_hook(_, bucket):
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future()


@contextlib.contextmanager
def emulated_world(world: int):
    """Rank 0 of ``world`` ranks in this one process (see the module docstring): the group's
    size and rank, the cross-rank check and the sparse exchanges' collectives are stand-ins
    while the block runs, and restored after it."""
    def done():
        future = torch.futures.Future()
        future.set_result(None)
        return future

    def all_gather(buffer, group=None, out=None):
        if out is None:
            out = torch.empty(world, buffer.numel(), dtype=buffer.dtype, device=buffer.device)
        out.copy_(buffer.reshape(1, -1).expand(world, -1))
        return out, done()

    def all_to_all(send, recv, group=None):
        recv.copy_(send[0:1].expand(world, -1))
        return done()

    stand_ins = [(dist, "get_world_size", lambda group=None: world),
                 (dist, "get_rank", lambda group=None: 0),
                 (fingerprint, "verify_across_ranks", lambda *args, **kwargs: None),
                 (collectives, "all_gather_rows_async", all_gather),
                 (collectives, "all_to_all_rows_async", all_to_all)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in stand_ins]
    try:
        for obj, name, value in stand_ins:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# --wire: the sparse modes' wire format (values, index encoding) and the output files' suffix.
WIRES = {"bf16": (torch.bfloat16, "int32", ""),
         "fp8-delta": (torch.float8_e4m3fn, "delta", "_fp8_delta")}


def measure(mode: str, device: torch.device, steps: int, world: int = 1,
            wire: str = "bf16") -> dict:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in SHAPES]
    grads = [torch.randn(s, generator=g).to(device) for s in SHAPES]
    if mode == "dense":
        state, hook = None, _dense_hook
    else:
        value_dtype, index_encoding, _ = WIRES[wire]
        state = DCTState(ratio=0.003, warmup_steps=0, min_numel=0, refresh_every=10 ** 6,
                         value_dtype=value_dtype, index_encoding=index_encoding, exchange=mode)
        hook = dct_hook
    bucket = StandInBucket(params, grads)
    flat = bucket.buffer().clone()

    def step():
        bucket.buffer().copy_(flat)
        hook(state, bucket).wait()

    for _ in range(20):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(10):
            step()
    counted = collections.Counter()
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type.name == "CUDA":
                counted["kernel"] += 1
        elif event.name.startswith("aten::") and event.cpu_parent is None:
            counted["op"] += 1
    per_step = {k: v / 10 for k, v in counted.items()}
    return {"mode": mode, "world": world, "median_ms": statistics.median(times) * 1e3,
            "p20_ms": sorted(times)[len(times) // 5] * 1e3,
            "p80_ms": sorted(times)[4 * len(times) // 5] * 1e3,
            ("kernels_per_step" if device.type == "cuda" else "aten_ops_per_step"):
                per_step.get("kernel", per_step.get("op", 0.0)),
            "bucket_elements": sum(p.numel() for p in params)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="output folder (default bench/results/<device>/)")
    p.add_argument("--emulate", default="",
                   help="comma-separated world sizes W > 1 to emulate as rank 0 of W "
                        "(sparse modes only; see the module docstring)")
    p.add_argument("--wire", choices=sorted(WIRES), default="bf16",
                   help="the sparse modes' values and indices: bf16 values with int32 indices "
                        "(default), or fp8 values with delta-coded indices (wire format "
                        "version 2; written to hook_cost_fp8_delta.*)")
    args = p.parse_args()
    from dlrm.cli import device_slug
    from dlrm.context import device_name
    from kernel_backend import kernel_backend

    device = torch.device(args.device)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{tmp}/store", rank=0, world_size=1)
        rows = [measure(mode, device, args.steps, wire=args.wire)
                for mode in ("dense", "allgather", "reduce_scatter")]
        for world in [int(w) for w in args.emulate.split(",") if w.strip()]:
            if world < 2:
                raise SystemExit(f"--emulate: expected world sizes > 1, got {world}")
            with emulated_world(world):
                rows += [measure(mode, device, args.steps, world, args.wire)
                         for mode in ("allgather", "reduce_scatter")]
        dist.destroy_process_group()
    name = device_name()
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       device_slug(name))
    os.makedirs(out_dir, exist_ok=True)
    report = {"device": name, "machine": platform.processor() or platform.machine(),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "kernel_backend": kernel_backend(device), "threads": 1, "wire": args.wire,
              "rows": rows}
    stem = "hook_cost" + WIRES[args.wire][2]
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    key = "kernels_per_step" if device.type == "cuda" else "aten_ops_per_step"
    lines = [f"| mode | W | median ms | p20 | p80 | {key.replace('_', ' ')} |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        world = str(r["world"]) + (" (emulated)" if r["world"] > 1 else "")
        lines.append(f"| {r['mode']} | {world} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} | "
                     f"{r['p80_ms']:.3f} | {r[key]:.0f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(f"{name}, {report['date']}, kernel backend {report['kernel_backend']}, "
                f"one bucket of {rows[0]['bucket_elements']} elements, wire {args.wire}, "
                f"world size 1 (and rank 0 of W emulated where marked)\n\n" + text)
    print(text, end="")


if __name__ == "__main__":
    main()
