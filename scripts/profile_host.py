"""Where the time of one small op call goes: host microseconds per call, a cProfile of the
Python side, and torch.profiler's table, at n = 2^16 where the ops are bound by host work:

    python scripts/profile_host.py
"""

import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dct_kernels as dk


def main():
    n, k = 1 << 16, 655
    x = torch.randn(n, device="cuda")
    residual = torch.randn(n, device="cuda") * 0.1
    t = dk.select_threshold(x, k)
    p = dk.compress(x, t, capacity=1000)
    buffers = torch.stack([p.buffer] * 8)
    out = torch.empty(n, device="cuda")

    def step():
        dk.select_threshold(x, k)
        dk.compress(x, t, residual=residual, capacity=1000)
        dk.decompress_many(buffers, out=out, average=True, validate=False, capacity=1000,
                           value_dtype=torch.float32)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    for name, fn in (("select_threshold", lambda: dk.select_threshold(x, k)),
                     ("compress", lambda: dk.compress(x, t, residual=residual, capacity=1000)),
                     ("decompress_many", lambda: dk.decompress_many(
                         buffers, out=out, average=True, validate=False, capacity=1000,
                         value_dtype=torch.float32))):
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t0) / 200
        torch.cuda.synchronize()
        print(f"{name}: {host * 1e6:.0f} us of host time per call")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
