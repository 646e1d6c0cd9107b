"""sparse_all_reduce against a dense all_reduce on gloo ranks of this machine (CPU), and a
refresh's select_threshold against the same all_reduce.

Spawns W ranks (gloo, a file:// store), each with an fp32 tensor of n random values; times
(median of --reps, after warm-up, every rank between barriers) a dense ``all_reduce``, a
``sparse_all_reduce`` at the given kept ratio (capacity 1.5 k, error-feedback residual restored
before every call so each call keeps the same fraction) and ``select_threshold`` of k, on the
given backend. Loopback makes communication almost free, so this is the worst case for the
sparse path; on a real network the gain follows the bytes.

    python bench/allreduce_gloo.py                       # W = 2, n = 2^22, 1%, cpu backend
    python bench/allreduce_gloo.py --backend torch --threads 1
"""

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ranks  # bench/ranks.py


def _rank(rank, args, path, queue):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                            world_size=args.world)
    import dct_kernels as dk
    from dct_kernels.distributed import sparse_all_reduce
    n = 1 << args.log2n
    k = max(1, int(args.ratio * n))
    x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
    residual = torch.randn(n, generator=torch.Generator().manual_seed(100 + rank)) * 0.01
    saved = residual.clone()
    threshold = dk.select_threshold(x + residual, k, backend=args.backend)
    capacity = int(1.5 * k)
    out = torch.empty(n)
    dense = x.clone()

    def timed(fn):
        for _ in range(3):
            residual.copy_(saved)
            fn()
        samples = []
        for _ in range(args.reps):
            residual.copy_(saved)
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3
    result = {
        "all_reduce": timed(lambda: dist.all_reduce(dense)),
        "sparse_all_reduce": timed(lambda: sparse_all_reduce(
            x, threshold, capacity=capacity, residual=residual, out=out, backend=args.backend)),
        "select_threshold": timed(lambda: dk.select_threshold(x, k, backend=args.backend)),
    }
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--log2n", type=int, default=22)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    path = tempfile.mktemp(prefix="dct_gloo_")
    queue = mp.get_context("spawn").Queue()
    ranks.spawn(_rank, (args, path, queue), args.world)
    r = queue.get()
    print(f"W={args.world} n=2^{args.log2n} kept={args.ratio:g} backend={args.backend} "
          f"threads/rank={args.threads}: all_reduce {r['all_reduce']:.2f} ms, "
          f"sparse_all_reduce {r['sparse_all_reduce']:.2f} ms "
          f"({r['all_reduce'] / r['sparse_all_reduce']:.2f}x), select_threshold "
          f"{r['select_threshold']:.2f} ms ({r['select_threshold'] / r['all_reduce']:.2f} of "
          "the all_reduce)")


if __name__ == "__main__":
    main()
