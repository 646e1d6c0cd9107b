"""wire_check.running_highest: the blocked running maximum equals a plain one."""

import pytest
import torch

from dct_kernels.wire_check import running_highest
from helpers import assert_bitwise_equal


@pytest.mark.parametrize("rows,capacity,chunk", [(1, 1, 1024), (3, 17, 4), (2, 4096, 1024),
                                                 (5, 5000, 1024), (2, 1025, 1024)])
def test_running_highest_matches_a_plain_running_max(rows, capacity, chunk):
    g = torch.Generator().manual_seed(rows * 100003 + capacity)
    indices = torch.randint(-50, 1 << 20, (rows, capacity), generator=g, dtype=torch.int32)
    usable = torch.rand(rows, capacity, generator=g) < 0.8
    through, before = running_highest(indices, usable, chunk=chunk)
    plain = torch.where(usable, indices, -1).tolist()
    want_through, want_before = [], []
    for row in plain:
        best, t, b = -1, [], []
        for value in row:
            b.append(best)
            best = max(best, value)
            t.append(best)
        want_through.append(t)
        want_before.append(b)
    assert_bitwise_equal(through, torch.tensor(want_through, dtype=torch.int32))
    assert_bitwise_equal(before, torch.tensor(want_before, dtype=torch.int32))
