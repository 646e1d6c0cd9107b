"""One small run of every CUDA-backend kernel, checked against the torch reference, for
``compute-sanitizer`` (memcheck, racecheck, synccheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_cuda.py

Sizes span several tiles and blocks of every kernel so that cross-block paths run; payloads
include corrupted ones (the kernels must not read or write out of bounds whatever they say).
Exits non-zero on a mismatch.
"""

import torch

import dct_kernels as dk

DEV = "cuda"


def same(a, b, what):
    a, b = a.cpu(), b.cpu()
    if a.dtype.is_floating_point:
        ok = torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(b, 7.0)) and \
            torch.equal(torch.isnan(a), torch.isnan(b))
    else:
        ok = torch.equal(a, b)
    if not ok:
        raise SystemExit(f"mismatch: {what}")


def main():
    g = torch.Generator(device=DEV).manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        n = 70001
        x = torch.randn(n, device=DEV, generator=g).to(dtype)
        x[::997] = float("nan")
        offsets = torch.tensor([0, 5, 20000, 20001, n], dtype=torch.int64, device=DEV)
        ks = torch.tensor([2, 300, 1, 500])
        for seg in (None, offsets):
            k = 700 if seg is None else ks
            t = dk.select_threshold(x, k, segments=seg, backend="cuda")
            same(t, dk.select_threshold(x, k, segments=seg, backend="torch"), f"select {dtype}")
            r1 = torch.randn(n, device=DEV, generator=g)
            r2 = r1.clone()
            p1 = dk.compress(x, t, segments=seg, residual=r1, capacity=900, backend="cuda")
            p2 = dk.compress(x, t, segments=seg, residual=r2, capacity=900, backend="torch")
            same(p1.buffer, p2.buffer, f"compress {dtype}")
            same(r1, r2, f"residual {dtype}")
            # No capacity: a counting pass sizes the payload first (its own kernel).
            same(dk.compress(x, t, segments=seg, backend="cuda").buffer,
                 dk.compress(x, t, segments=seg, backend="torch").buffer,
                 f"compress without capacity {dtype}")
        p = dk.compress(x, 1.0, capacity=n // 3, value_dtype=torch.float16, backend="cuda")
        out = torch.randn(n, device=DEV, generator=g).to(dtype)
        same(dk.decompress(p, out=out.clone(), accumulate=True, backend="cuda"),
             dk.decompress(p, out=out.clone(), accumulate=True, backend="torch"), "decompress")
        rows = torch.stack([p.buffer] * 3)
        bad = rows[1, 32:32 + 4 * p.capacity].view(torch.int32)
        bad[5] = -3
        bad[9] = n + 100
        bad[20:40] = 17
        rows[2, 20:24].view(torch.int32)[0] = p.capacity + 5  # count past the capacity
        for backend in ("cuda", "torch"):
            dk.reset_payload_errors(DEV)
            o = torch.zeros(n, dtype=dtype, device=DEV)
            dk.decompress_many(rows, out=o, average=True, validate=False, backend=backend)
            if backend == "cuda":
                got, got_errors = o, int(dk.payload_errors(DEV))
            else:
                same(got, o, "decompress_many")
                if got_errors != int(dk.payload_errors(DEV)):
                    raise SystemExit("decompress_many error counts differ")
        # A sparse merge (1% kept, 8 rows): decompress_many's other merge configuration,
        # the one that stages several ranks' entries of a tile at once.
        sparse = dk.compress(x, dk.select_threshold(x, 700, backend="cuda"), capacity=700,
                             backend="cuda")
        rows8 = torch.stack([sparse.buffer] * 8)
        rows8[3, 32:32 + 4 * sparse.capacity].view(torch.int32)[7] = n + 1  # a bad index
        merged = [dk.decompress_many(rows8, out=torch.zeros(n, dtype=dtype, device=DEV),
                                     average=True, validate=False, backend=backend)
                  for backend in ("cuda", "torch")]
        same(merged[0], merged[1], f"decompress_many sparse {dtype}")
        for columns in (300, 40000):
            xr = torch.randn(64, columns, device=DEV, generator=g).to(dtype)
            rp = dk.compress_rows(xr, 17, backend="cuda")
            rq = dk.compress_rows(xr, 17, backend="torch")
            same(rp.indices, rq.indices, "compress_rows indices")
            same(rp.values, rq.values, "compress_rows values")
            same(dk.decompress_rows(rp, backend="cuda"), dk.decompress_rows(rq, backend="torch"),
                 "decompress_rows")
            same(dk.gather_rows(xr, rp, backend="cuda"), dk.gather_rows(xr, rq, backend="torch"),
                 "gather_rows")
    torch.cuda.synchronize()
    print("sanitize_cuda: all kernels ran and matched the reference")


if __name__ == "__main__":
    main()
