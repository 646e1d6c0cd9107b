"""The cross-rank agreement check: every rank gathers every rank's small int64 fingerprint of
its configuration and bucket layout, and every rank raises the same error when they differ.

A fixed-size fingerprint is used because collectives of unequal sizes are exactly what must
not happen while ranks disagree (gloo raises, NCCL can hang).
"""

import struct
import zlib
from typing import List, Sequence, Tuple

import torch

from .collectives import all_gather_rows
from .sizing import EXCHANGES

MAGIC = 0x44435444  # "DCTD"
VERSION = 7

# (field name, how to show its value in an error): "int", "float" (bits of a float64) or
# "crc" (a checksum, shown as hex).
FIELDS: Tuple[Tuple[str, str], ...] = (
    ("magic", "int"),
    ("version", "int"),
    ("ratio", "float"),
    ("refresh_every", "int"),
    ("warmup_steps", "int"),
    ("capacity_factor", "float"),
    ("min_numel", "int"),
    ("value_dtype", "int"),
    ("refresh_band low", "float"),
    ("refresh_band high", "float"),
    ("bucket elements", "int"),
    ("bucket parameters", "int"),
    ("bucket parameter sizes (checksum)", "crc"),
    ("bucket parameter keys (checksum)", "crc"),
    ("bucket gradient dtype", "int"),
    ("wire capacity", "int"),
    ("exchange", "exchange"),
    ("exchange chosen for the bucket", "exchange"),
    ("reduce_scatter row capacity", "int"),
    ("refresh_patience", "int"),
    ("index_encoding (0 int32, 1 delta)", "int"),
    ("min_k", "int"),
    ("dense_rows", "int"),
    ("ramp_steps", "int"),
    ("ratio of the bucket layout (the ramp's stage)", "float"),
    ("step the bucket layout is made at", "int"),
)

# Codes of the exchange fields (the order of sizing.EXCHANGES).
EXCHANGE_CODES = {name: i for i, name in enumerate(EXCHANGES)}


def float_bits(value: float) -> int:
    """The bits of a float64 as an int64 (exact, NaN-safe comparison of float settings)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def checksum(items: Sequence) -> int:
    """A stable checksum of a sequence of ints or strings (crc32; the same in every process,
    unlike Python's salted ``hash``)."""
    return zlib.crc32("\x1f".join(str(i) for i in items).encode())


def verify_across_ranks(values: List[int], group, device: torch.device, what: str) -> None:
    """Gather every rank's fingerprint and raise ValueError on every rank when any differ.

    ``values`` follows ``FIELDS``. One all-gather of ``len(FIELDS)`` int64 per rank, then a
    host read (synchronizes; it runs once per new bucket layout, never in the steady state).
    """
    if len(values) != len(FIELDS):
        raise AssertionError("fingerprint does not match FIELDS")
    mine = torch.tensor(values, dtype=torch.int64).to(device)
    rows = all_gather_rows(mine, group).cpu().tolist()
    differences = []
    for column, (name, kind) in enumerate(FIELDS):
        seen = [row[column] for row in rows]
        if len(set(seen)) == 1:
            continue
        if kind == "float":
            shown = [_from_bits(v) for v in seen]
        elif kind == "exchange":
            shown = [EXCHANGES[v] if 0 <= v < len(EXCHANGES) else v for v in seen]
        elif kind == "crc":
            shown = [f"{v:#010x}" for v in seen]
        else:
            shown = seen
        differences.append(f"{name}: " + ", ".join(f"rank {r} has {v}"
                                                    for r, v in enumerate(shown)))
    if differences:
        raise ValueError(f"dct_hook: the ranks disagree on the DCTState configuration or the "
                         f"bucket layout ({what}); every rank must use the same DCTState "
                         f"arguments and the same model and DDP bucketing. Differences: "
                         + "; ".join(differences))
