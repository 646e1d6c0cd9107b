"""Assertion helpers: bitwise comparisons that print the first mismatching elements."""

import torch

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}


def _canonical_bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns with every NaN mapped to one pattern (NaN payloads are not part of the
    contract)."""
    t = t.detach().cpu().contiguous()
    if t.dtype not in _BITS:
        return t
    bits = t.view(_BITS[t.dtype]).clone()
    bits[torch.isnan(t)] = -1
    return bits


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same shape, dtype and bits (NaN == NaN, but -0 != +0)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = _canonical_bits(actual), _canonical_bits(expected)
    if torch.equal(a, e):
        return
    bad = torch.nonzero((a != e).flatten()).flatten()
    first = bad[:8].tolist()
    af, ef = actual.detach().cpu().flatten(), expected.detach().cpu().flatten()
    rows = ", ".join(f"[{i}] {af[i].item()!r} != {ef[i].item()!r}" for i in first)
    raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} elements differ: {rows}")


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Bit for bit, NaN payloads included (where the contract fixes them: assert_bitwise_equal
    takes every NaN as equal)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    assert a.dtype == b.dtype and a.shape == b.shape, what
    a, b = a.reshape(-1).view(ints[a.element_size()]), b.reshape(-1).view(ints[b.element_size()])
    bad = torch.nonzero(a != b).flatten()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} differ, first at {bad[:4].tolist()}: "
                              f"{a[bad[:4]].tolist()} != {b[bad[:4]].tolist()}")
