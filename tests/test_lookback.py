"""White-box test of the Triton compaction's decoupled look-back.

Under the interpreter programs run in order, so every tile finds its predecessor's inclusive
prefix at once and the aggregate-walking path never runs. Here the scan state is pre-filled as
a GPU would leave it mid-flight (tile 0 holding a prefix, the next tiles only their own counts)
and the ticket counter starts past them, so the remaining tiles must walk back over several
windows of aggregates.
"""

import importlib

import pytest
import torch

import dct_kernels as dk
from dct_kernels import payload as wire
from conftest import TRITON_DEVICE
from helpers import assert_bitwise_equal


@pytest.mark.parametrize("done_tiles", [1, 2, 33, 38, 70])
def test_lookback_walks_over_aggregates(done_tiles):
    compact = importlib.import_module("dct_kernels.backends.triton_kernels.compress")

    block = compact.BLOCK
    tiles = done_tiles + 2
    n = block * tiles - 123
    g = torch.Generator().manual_seed(done_tiles)
    x = torch.randn(n, generator=g).to(TRITON_DEVICE)
    threshold = 1.7
    want = dk.compress(x, threshold, backend="torch")
    kept = (x.abs() >= threshold).to(torch.int64).cpu()
    counts = [int(kept[t * block:(t + 1) * block].sum()) for t in range(tiles)]

    scan = torch.zeros(tiles + 1, dtype=torch.int64)
    scan[0] = (2 << 32) + counts[0]
    for t in range(1, done_tiles):
        scan[t] = (1 << 32) + counts[t]
    scan[tiles] = done_tiles  # the ticket counter (low word) starts past the finished tiles
    scan = scan.to(TRITON_DEVICE)
    payload = wire.new_payload(n, want.capacity, torch.float32, (n,), torch.float32,
                               x.device)
    thresholds = torch.full((1,), threshold, device=x.device)
    compact._compress_kernel[(tiles - done_tiles,)](
        x, x, thresholds, thresholds, 1, n, payload.capacity, payload.indices,
        payload.values, payload.buffer[:wire.HEADER_BYTES].view(torch.int32), scan,
        scan[tiles:].view(torch.int32), tiles, HAS_RESIDUAL=False, SEARCH_STEPS=0, WIRE=0,
        BLOCK=block, LOOKBACK=32, num_warps=compact.NUM_WARPS)

    first_slot = sum(counts[:done_tiles])
    assert int(payload.count) == int(want.count) == sum(counts)
    assert_bitwise_equal(payload.indices[first_slot:], want.indices[first_slot:], "indices")
    assert_bitwise_equal(payload.values[first_slot:], want.values[first_slot:], "values")
    final = scan[:tiles].cpu()
    assert all(int(w) >> 32 == 2 for w in final[done_tiles:]), "tiles must publish prefixes"
    assert int(final[-1]) & 0xFFFFFFFF == sum(counts)
