"""Per-kernel GPU time of each CUDA-backend op at one size, from torch.profiler.

    python scripts/profile_cuda.py [--log2n 28] [--ratio 0.01]

Shows where an op's time goes (which of its kernels, and the memsets between them) so that
the slow stage is measured, not guessed.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import dct_kernels as dk


def kernel_table(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = event.cuda_time_total
        if total > 0:
            rows.append((total / reps / 1000.0, event.count // reps, event.key))
    return sorted(rows, reverse=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log2n", type=int, default=28)
    parser.add_argument("--ratio", type=float, default=0.01)
    args = parser.parse_args()
    n = 1 << args.log2n
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, device="cuda", generator=g)
    k = max(1, int(n * args.ratio))
    t = dk.select_threshold(x, k, backend="cuda")
    residual = torch.randn(n, device="cuda", generator=g) * 1e-3
    capacity = int(k * 1.25)
    payloads = [dk.compress(torch.randn(n, device="cuda", generator=g), t, capacity=capacity,
                            backend="cuda") for _ in range(8)]
    buffers = torch.stack([p.buffer for p in payloads])
    out = torch.empty(n, device="cuda")
    rows = x.view(-1, 4096)
    ops = {
        "select_threshold": lambda: dk.select_threshold(x, k, backend="cuda"),
        "compress+residual": lambda: dk.compress(x, t, residual=residual, capacity=capacity,
                                                 backend="cuda"),
        "compress": lambda: dk.compress(x, t, capacity=capacity, backend="cuda"),
        "decompress_many(W=8)": lambda: dk.decompress_many(buffers, out=out, average=True,
                                                           validate=False, capacity=capacity,
                                                           value_dtype=torch.float32,
                                                           backend="cuda"),
        "compress_rows(D=4096)": lambda: dk.compress_rows(rows, max(1, int(4096 * args.ratio)),
                                                          backend="cuda"),
    }
    for name, fn in ops.items():
        table = kernel_table(fn)
        total = sum(r[0] for r in table)
        print(f"\n{name}: n=2^{args.log2n}, kept {args.ratio:g}: "
              f"{total:.3f} ms of GPU time per call")
        for ms, count, key in table[:8]:
            print(f"  {ms:8.3f} ms  x{count:<3d} {key[:90]}")


if __name__ == "__main__":
    main()
