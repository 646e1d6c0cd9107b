"""Backend "torch": the plain-torch reference. Runs on any device; the oracle for the others.

Every function here receives inputs that the op layer has already validated and flattened
(see ``dct_kernels/ops.py``); the semantics are those of docs/design.md. This backend
favours clarity over speed and may synchronize with the host.
"""

from typing import List, Optional

import torch

from .. import payload as wire
from ..magnitude import (canonical_nan, keys_to_values, magnitude_keys, saturating_cast,
                         threshold_keys, widen)
from ..wire_check import check_rows

NAME = "torch"


def available() -> str:
    """Always "available" (plain torch)."""
    return "available"


def _segment_lengths(offsets: List[int], device) -> torch.Tensor:
    return torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])], dtype=torch.int64,
                        device=device)


def select_threshold(x: torch.Tensor, ks: List[int], offsets: List[int]) -> torch.Tensor:
    """Per segment, the k-th largest magnitude key from a descending sort."""
    keys = magnitude_keys(x)
    kth = []
    for s, k in enumerate(ks):
        seg = keys[offsets[s]:offsets[s + 1]]
        kth.append(torch.sort(seg, descending=True).values[k - 1])
    return keys_to_values(torch.stack(kth), x.dtype)


def _accumulate(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    acc = widen(x)
    return acc + residual if residual is not None else acc


def _kept_mask(acc: torch.Tensor, thresholds: torch.Tensor, offsets: List[int]) -> torch.Tensor:
    tkeys = threshold_keys(thresholds)
    per_element = torch.repeat_interleave(tkeys, _segment_lengths(offsets, acc.device))
    return magnitude_keys(acc) >= per_element


def count_kept(x, thresholds, offsets, seg_dev, residual) -> torch.Tensor:
    """How many entries of x (+ residual) reach their segment's threshold."""
    acc = _accumulate(x, residual)
    return _kept_mask(acc, thresholds, offsets).sum()


def compress(x, thresholds, offsets, seg_dev, residual, payload: wire.SparsePayload) -> None:
    """Kept entries in index order into the payload (the first ``capacity``); the residual
    becomes acc minus what was sent (0 for a sent inf/NaN), all of acc elsewhere."""
    acc = _accumulate(x, residual)
    kept = torch.nonzero(_kept_mask(acc, thresholds, offsets)).flatten()
    sent = kept[:payload.capacity]
    count = sent.numel()
    values = saturating_cast(acc[sent], payload.value_dtype)
    payload.indices[:count] = sent.to(torch.int32)
    payload.values[:count] = values
    payload.count.fill_(count)
    payload.overflow.fill_(kept.numel() - count)
    if residual is not None:
        sent_acc = acc[sent]
        leftover = torch.where(torch.isfinite(sent_acc), sent_acc - values.to(torch.float32),
                               torch.zeros_like(sent_acc))
        residual.copy_(acc)
        residual[sent] = leftover


def _valid_entries(buffer_rows: torch.Tensor, numel: int, capacity: int,
                   value_dtype: torch.dtype, errors: torch.Tensor):
    """Per row: (indices, fp32 values) of the entries to use; bad ones are counted."""
    check = check_rows(buffer_rows, numel, capacity, value_dtype)
    if check.errors:
        errors.add_(check.errors)
    values_offset, _ = wire.layout(capacity, value_dtype)
    itemsize = value_dtype.itemsize
    out = []
    for w in range(buffer_rows.shape[0]):
        row = buffer_rows[w]
        idx = row[wire.HEADER_BYTES:wire.HEADER_BYTES + 4 * capacity].view(torch.int32)
        val = row[values_offset:values_offset + itemsize * capacity].view(value_dtype)
        keep = check.entry_valid[w]
        out.append((idx[keep].to(torch.int64), canonical_nan(val[keep].to(torch.float32))))
    return out


def decompress(out: torch.Tensor, buffer: torch.Tensor, numel: int, capacity: int,
               value_dtype: torch.dtype, accumulate: bool, errors: torch.Tensor) -> None:
    """Overwrite out with the usable entries (zeros elsewhere), or add them in fp32."""
    (idx, val), = _valid_entries(buffer[None], numel, capacity, value_dtype, errors)
    if accumulate:
        out[idx] = canonical_nan((out[idx].to(torch.float32) + val).to(out.dtype))
    else:
        out.zero_()
        out[idx] = canonical_nan(val.to(out.dtype))


def decompress_many(out: torch.Tensor, buffers: torch.Tensor, capacity: int,
                    value_dtype: torch.dtype, accumulate: bool, average: bool,
                    errors: torch.Tensor) -> None:
    """0 + d_0 + d_1 + ... in fp32 (rank order), / W, + out, one rounding to out's dtype."""
    numel = out.numel()
    total = torch.zeros(numel, dtype=torch.float32, device=out.device)
    for idx, val in _valid_entries(buffers, numel, capacity, value_dtype, errors):
        total[idx] = total[idx] + val
    if average:
        # A 0-d device tensor, not a Python number: CUDA turns division by a host scalar into
        # multiplication by its reciprocal, which is not IEEE division.
        total = total / torch.tensor(float(buffers.shape[0]), device=total.device)
    if accumulate:
        total = canonical_nan(out.to(torch.float32)) + total
    out.copy_(canonical_nan(total.to(out.dtype)))


def compress_rows(x: torch.Tensor, k: int, value_dtype: torch.dtype):
    """Per row, the k largest magnitudes (ties to the lower column), columns ascending."""
    keys = magnitude_keys(x)
    # A stable descending sort keeps lower columns first among equal magnitudes.
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
    columns = torch.sort(order, dim=1).values
    values = saturating_cast(torch.gather(x, 1, columns).to(torch.float32), value_dtype)
    return columns.to(wire.row_index_dtype(x.shape[1])), values


def _in_range(indices: torch.Tensor, columns: int):
    idx = indices.to(torch.int64)
    return idx, (idx >= 0) & (idx < columns)


def decompress_rows(indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    """Zeros except the entries whose column is inside [0, D)."""
    idx, ok = _in_range(indices, out.shape[1])
    rows = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(idx)
    out.zero_()
    out[rows[ok], idx[ok]] = canonical_nan(values[ok].to(out.dtype))


def gather_rows(y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y at the given columns; 0 for a column outside [0, D)."""
    idx, ok = _in_range(indices, y.shape[1])
    picked = torch.gather(y, 1, torch.where(ok, idx, 0))
    return torch.where(ok, picked, torch.zeros_like(picked))
