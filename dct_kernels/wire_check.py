"""Host-side checks of received wire buffers (untrusted input).

Used by ``decompress(validate=True)`` / ``decompress_many(validate=True)`` before any write, and
by the torch reference to decide which entries to skip. Reading the headers and the result is a
device-to-host copy, so these checks synchronize.

Rules (identical to the device-side checks of the kernels):
  * a row whose header does not match (magic, version, dtype codes, numel, capacity) is invalid
    as a whole: none of its entries is used;
  * a count below 0 or above the capacity is an error; the count used is clamped to
    ``[0, capacity]``;
  * an entry ``i < count`` is bad, and skipped, when its index is outside ``[0, numel)`` or is
    not above every in-range index before it. The entries used are then strictly ascending
    whatever the buffer holds, so no two of them write the same output.
"""

from dataclasses import dataclass
from typing import List

import torch

from . import payload as wire


@dataclass
class RowCheck:
    """What ``check_rows`` found in each row, and what the device-side checks would count."""

    problems: List[List[str]]      # per row, human-readable problems (empty when valid)
    entry_valid: torch.Tensor      # [W, capacity] bool, entries to use
    errors: int                    # what the device-side error counter would add

    @property
    def ok(self) -> bool:
        """No row or entry is bad."""
        return self.errors == 0


def usable_slots(indices: torch.Tensor, counts: torch.Tensor, numel: int):
    """(used, usable) masks of [W, capacity] indices: the slots below each row's count, and
    those of them whose index lies in [0, numel)."""
    slot = torch.arange(indices.shape[1], device=indices.device)
    used = slot[None, :] < counts[:, None]
    return used, used & (indices >= 0) & (indices < numel)


def running_highest(indices: torch.Tensor, usable: torch.Tensor, chunk: int = 1024):
    """Per slot of each row: (largest usable index up to and including it, largest usable
    index strictly before it), -1 where there is none.

    A running maximum in two levels (within chunks of ``chunk`` slots, then across chunks), so
    the scans run over many short rows: torch's CUDA scan gives each row one thread block,
    which would leave all but W blocks idle on [W, capacity]."""
    keys = torch.where(usable, indices, torch.full_like(indices, -1))
    rows, capacity = keys.shape
    if capacity <= chunk:
        through = torch.cummax(keys, dim=1).values
    else:
        pad = (-capacity) % chunk
        if pad:
            keys = torch.cat([keys, keys.new_full((rows, pad), -1)], dim=1)
        within = torch.cummax(keys.view(rows, -1, chunk), dim=2).values
        earlier = torch.cummax(within[:, :, -1], dim=1).values
        earlier = torch.cat([earlier.new_full((rows, 1), -1), earlier[:, :-1]], dim=1)
        through = torch.maximum(within, earlier[:, :, None]).view(rows, -1)[:, :capacity]
    before = torch.cat([torch.full_like(through[:, :1], -1), through[:, :-1]], dim=1)
    return through, before


def check_rows(buffers: torch.Tensor, numel: int, capacity: int,
               value_dtype: torch.dtype) -> RowCheck:
    """Check each row of ``buffers`` ([W, nbytes] uint8) against the expected configuration."""
    rows = buffers.shape[0]
    headers = buffers[:, :wire.HEADER_BYTES].cpu().numpy()
    problems: List[List[str]] = []
    counts = []
    errors = 0
    for w in range(rows):
        header = wire.Header.parse(headers[w].tobytes())
        row_problems = header.problems()
        if not row_problems:
            if header.version != wire.FORMAT_VERSION or \
                    header.index_code != wire.INDEX_CODE_INT32:
                row_problems.append(f"format version {header.version} with "
                                    f"{header.index_encoding} indices != expected version "
                                    f"{wire.FORMAT_VERSION} with int32 indices")
            if header.value_code != wire.value_code(value_dtype):
                row_problems.append(f"value dtype {wire.dtype_of_code(header.value_code)} "
                                    f"!= expected {value_dtype}")
            if header.numel != numel:
                row_problems.append(f"numel {header.numel} != expected {numel}")
            if header.capacity != capacity:
                row_problems.append(f"capacity {header.capacity} != expected {capacity}")
        if row_problems:
            errors += 1
            counts.append(0)
        else:
            count = header.count
            if count < 0 or count > capacity:
                row_problems.append(f"count {count} outside [0, capacity={capacity}]")
                errors += 1
                count = min(max(count, 0), capacity)
            counts.append(count)
        problems.append(row_problems)

    device = buffers.device
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    index_bytes = buffers[:, wire.HEADER_BYTES:wire.HEADER_BYTES + wire.INDEX_BYTES * capacity]
    indices = index_bytes.contiguous().view(torch.int32).to(torch.int64)
    used, in_range = usable_slots(indices, counts_t, numel)
    valid = in_range & (indices > running_highest(indices, in_range)[1])
    bad = (used & ~valid).sum(dim=1).cpu().tolist()
    for w in range(rows):
        if bad[w]:
            errors += bad[w]
            problems[w].append(f"{bad[w]} of {counts[w]} indices out of [0, {numel}) or not "
                               "above the indices before them")
    return RowCheck(problems, valid, errors)


def describe(check: RowCheck) -> str:
    """The first few rows' problems, for an error message."""
    parts = [f"row {w}: " + "; ".join(p) for w, p in enumerate(check.problems) if p]
    return ", ".join(parts[:4]) + (" ..." if len(parts) > 4 else "")
