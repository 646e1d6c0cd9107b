"""Sweep the Triton tile sizes that bound compress and select_threshold at large n.

compress is limited by its look-back chain (one link per tile) and select by its per-item
histogram flushes; both shrink with larger tiles. Prints one line per variant and writes
``sweep.json`` to --out.
"""

import argparse
import importlib
import json
import os

import torch

import dct_kernels as dk
from run import copy_bandwidth, random_tensor, time_op

compact = importlib.import_module("dct_kernels.backends.triton_kernels.compress")
select = importlib.import_module("dct_kernels.backends.triton_kernels.select_threshold")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--log2n", type=int, nargs="*", default=[24, 28])
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = []
    for log2n in args.log2n:
        n = 1 << log2n
        k = n // 100
        x = random_tensor(n, device, seed=1)
        residual = random_tensor(n, device, seed=2) * 0.1
        saved = residual.clone()
        threshold = torch.topk((x + residual).abs(), k).values[-1]
        for block, warps in ((4096, 8), (8192, 8), (16384, 16)):
            compact.BLOCK, compact.NUM_WARPS = block, warps
            for with_res in (True, False):
                res = residual if with_res else None
                fn = lambda: dk.compress(x, threshold, residual=res,  # noqa: B023
                                         capacity=2 * k, backend="triton")
                p20, p50, p80 = time_op(fn, [()], device, setup=lambda: residual.copy_(saved))
                floor = (12 if with_res else 4) * n + 8 * k
                rows.append(dict(op="compress" + ("+residual" if with_res else ""), n=n,
                                 block=block, warps=warps, p50_ms=p50,
                                 pct_floor=100 * floor / bandwidth / (p50 * 1e-3)))
                print(rows[-1], flush=True)
        compact.BLOCK, compact.NUM_WARPS = 4096, 8
        for chunk_blocks in (4, 16, 64):
            select.CHUNK = chunk_blocks * select.BLOCK
            p20, p50, p80 = time_op(lambda: dk.select_threshold(x, k, backend="triton"),
                                    [()], device)
            rows.append(dict(op="select_threshold", n=n, chunk=select.CHUNK, p50_ms=p50,
                             pct_floor=100 * 4 * n / bandwidth / (p50 * 1e-3)))
            print(rows[-1], flush=True)
        select.CHUNK = 4 * select.BLOCK
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
