"""The benchmark results as data: one long-format CSV per card, rows keyed by fixed fields.

``bench/results/<card>/results.csv`` holds one row per measurement. A row is identified by its
key (``KEY_FIELDS``: the card, the op, who ran it, the dtype and the workload's shape); the
other fields are what was measured and under which versions. A rerun replaces the rows whose
keys it measures and keeps every other row (``update``), so the file always holds the latest
measurement of each configuration; the history of runs is told in bench/NOTES.md.

Fields:

- ``op``: the op's public name (``select_threshold``, ``compress``, ``decompress_many``,
  ``compress_rows``); never a configuration packed into a name.
- ``provider``: a backend name (``cuda``, ``triton``, ``torch``, ``cpu``, whatever
  ``dct_kernels.available_backends()`` names), or the torch code a user would write instead
  (``BASELINES``).
- ``dtype``: the dense tensor's dtype; ``n``: its number of elements; ``ratio``: the kept
  fraction; ``k``: the kept count (per rank for decompress_many, per row for compress_rows);
  ``residual``: 1 when compress also updates an error-feedback residual, 0 without, empty for
  other ops; ``W``: the number of payloads merged (decompress_many); ``D``: the row length
  (compress_rows, whose n is rows x D).
- ``p20_ms``, ``p50_ms``, ``p80_ms``: percentiles of the timings; ``floor_bytes``: the fewest
  bytes the op must move (docs/design.md#performance-model); ``gbps``: floor_bytes / p50;
  ``pct_floor``: the floor time (floor_bytes / copy_gbps) as a percentage of p50;
  ``copy_gbps``: the device-to-device copy bandwidth measured at the start of that run (read +
  write).
- ``card``, ``date``, ``version`` (dct_kernels), ``torch``, ``triton``: where and with what.
"""

import csv
import os
import re

KEY_FIELDS = ("card", "op", "provider", "dtype", "n", "ratio", "residual", "W", "D", "k")
VALUE_FIELDS = ("p20_ms", "p50_ms", "p80_ms", "gbps", "pct_floor", "floor_bytes", "copy_gbps",
                "date", "version", "torch", "triton")
FIELDS = KEY_FIELDS + VALUE_FIELDS

INT_FIELDS = ("n", "residual", "W", "D", "k", "floor_bytes")
FLOAT_FIELDS = ("ratio", "p20_ms", "p50_ms", "p80_ms", "gbps", "pct_floor", "copy_gbps")

# The torch code a user would write for each op (the docs' "Performance model" names these):
# each kernel row is compared with the row of this provider that has the same key otherwise.
BASELINES = {
    "select_threshold": "torch.topk",
    "compress": "torch (abs,ge,nonzero,index)",
    "decompress_many": "torch (index_put_ accumulate)",
    "compress_rows": "torch.topk",
}

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def card_dir_name(card: str) -> str:
    """The folder name of a card under bench/results/ ("NVIDIA H100 80GB HBM3" ->
    "NVIDIA_H100_80GB_HBM3")."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", card).strip("_")


def default_path(card: str) -> str:
    """bench/results/<card>/results.csv."""
    return os.path.join(RESULTS_DIR, card_dir_name(card), "results.csv")


def key(row: dict) -> tuple:
    """The fields that identify a measurement, normalised so a row read back from the file and
    the same row freshly measured compare equal."""
    return tuple(_normalise(f, row.get(f)) for f in KEY_FIELDS)


def _normalise(field, value):
    if value is None or value == "":
        return None
    if field in INT_FIELDS:
        return int(value)
    if field in FLOAT_FIELDS:
        return float(value)
    return str(value)


def _format(field, value) -> str:
    value = _normalise(field, value)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if field in ("ratio", "pct_floor", "gbps", "copy_gbps") \
            else f"{value:.5f}"
    return str(value)


def read(path: str) -> list:
    """Every row of a results file, typed (ints, floats, None for empty fields); [] when the
    file does not exist. Raises ValueError when its columns are not ``FIELDS``."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise ValueError(f"{path}: expected the columns {FIELDS}, got {reader.fieldnames}")
        return [{k: _normalise(k, v) for k, v in r.items()} for r in reader]


def merge(old: list, new: list) -> list:
    """``old`` with every row whose key a row of ``new`` has replaced by that row, plus the new
    rows; sorted by key so that the file's diffs show only what changed."""
    if len({key(r) for r in new}) != len(new):
        raise ValueError("new: two rows share a key")
    replaced = {key(r) for r in new}
    rows = [r for r in old if key(r) not in replaced] + list(new)
    return sorted(rows, key=lambda r: tuple((v is not None, v if v is not None else 0)
                                            for v in key(r)))


def write(path: str, rows: list) -> None:
    """Write ``rows`` as the whole file (atomically: a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(FIELDS)
        for r in rows:
            writer.writerow([_format(k, r.get(k)) for k in FIELDS])
    os.replace(tmp, path)


def update(path: str, rows: list) -> list:
    """Replace the rows of ``path`` that ``rows`` measure again, keep the others; returns the
    file's rows after the update."""
    merged = merge(read(path), rows)
    write(path, merged)
    return merged


def baseline_of(row: dict, rows: list):
    """The baseline row (``BASELINES``) measured for the same card, op, dtype and shape as
    ``row``, or None."""
    name = BASELINES.get(row["op"])
    if name is None or row["provider"] == name:
        return None
    want = key(dict(row, provider=name))
    return next((r for r in rows if key(r) == want), None)


def describe(row: dict) -> str:
    """The op and its configuration in words, for tables and legends."""
    extra = []
    if row.get("residual") is not None:
        extra.append("with residual" if row["residual"] else "no residual")
    if row.get("W") is not None:
        extra.append(f"W={row['W']}")
    if row.get("D") is not None:
        extra.append(f"D={row['D']}")
    return row["op"] + (f" ({', '.join(extra)})" if extra else "")


def markdown(rows: list, all_rows: list = None) -> str:
    """A table of ``rows`` with each row's speed-up over its baseline (found in ``all_rows``,
    default ``rows``)."""
    all_rows = rows if all_rows is None else all_rows
    lines = ["| op | provider | dtype | n | kept | p50 ms | [p20, p80] | GB/s | % floor | "
             "vs baseline |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = baseline_of(r, all_rows)
        speedup = f"{base['p50_ms'] / r['p50_ms']:.1f}x" if base and r["p50_ms"] > 0 else ""
        n = r["n"]
        size = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
        lines.append(f"| {describe(r)} | {r['provider']} | {r['dtype']} | {size} | "
                     f"{r['ratio'] * 100:g}% | {r['p50_ms']:.3f} | "
                     f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] | {r['gbps']:.0f} | "
                     f"{r['pct_floor']:.0f}% | {speedup} |")
    return "\n".join(lines) + "\n"
