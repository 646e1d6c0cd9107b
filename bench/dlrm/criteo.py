"""A reader for Criteo-format click logs (the Display Advertising Challenge / Terabyte TSV).

Each line: ``label<TAB>I1 ... I13<TAB>C1 ... C26`` — a 0/1 label, 13 integer features and 26
categorical features as hexadecimal strings (32-bit hashes in the public data); any feature
may be empty (missing).

- Integer features: missing -> 0; negative values (the public data has a few -1, -2) -> 0;
  the student sees ``log1p`` of them, as DLRM's preprocessing does.
- Categorical features: hashed into ``hash_size`` rows per table: missing -> row 0, a value v
  -> 1 + (int(v, 16) mod (hash_size - 1)). Deterministic, the same on every rank and machine.
- The last ``heldout_fraction`` of the lines is the held-out split (the data is in time order,
  so this is a held-out future, as with Criteo's last day).

A malformed line raises ValueError naming the file, the line number (1-based) and what is
wrong; nothing is skipped silently.
"""

import os
import re
from typing import List

import numpy as np

from .data import NUM_DENSE, NUM_SPARSE, ClickLogs

COLUMNS = 1 + NUM_DENSE + NUM_SPARSE
# What the files hold, exactly: int() and int(v, 16) alone would also take " 1", "+1", "1_000",
# "0x1f" and "-1f", none of which a well-formed log has.
_INTEGER = re.compile(r"-?[0-9]+")
_HEX = re.compile(r"[0-9a-fA-F]+")


def hash_id(value: str, hash_size: int) -> int:
    """The row of a categorical value (a hex string, '' for missing) in a table of
    ``hash_size`` rows (see the module docstring)."""
    if value == "":
        return 0
    if not _HEX.fullmatch(value):
        raise ValueError(f"not hexadecimal: {value!r}")
    return 1 + int(value, 16) % (hash_size - 1)


def _parse_line(line: str, where: str, hash_size: int, dense_out, ids_out) -> float:
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != COLUMNS:
        raise ValueError(f"{where}: expected {COLUMNS} tab-separated columns (label, "
                         f"{NUM_DENSE} integer, {NUM_SPARSE} hexadecimal), got {len(fields)}")
    label = fields[0]
    if label not in ("0", "1"):
        raise ValueError(f"{where}: label (column 1) must be 0 or 1, got {label!r}")
    for j in range(NUM_DENSE):
        text = fields[1 + j]
        if text == "":
            dense_out[j] = 0.0
            continue
        if not _INTEGER.fullmatch(text):
            raise ValueError(f"{where}: integer feature I{j + 1} (column {2 + j}) is not an "
                             f"integer: {text!r}")
        dense_out[j] = np.log1p(max(int(text), 0))
    for j in range(NUM_SPARSE):
        text = fields[1 + NUM_DENSE + j]
        try:
            ids_out[j] = hash_id(text, hash_size)
        except ValueError:
            raise ValueError(f"{where}: categorical feature C{j + 1} (column "
                             f"{2 + NUM_DENSE + j}) is not hexadecimal: {text!r}") from None
    return float(label)


def read_criteo(path: str, *, hash_size: int = 100_000, heldout_fraction: float = 0.1,
                max_lines: int = 0) -> ClickLogs:
    """Read a Criteo-format TSV file into ``ClickLogs`` (every table ``hash_size`` rows,
    ``teacher_prob`` None).

    Args:
        path: the file (plain text).
        hash_size: rows per table (>= 2: row 0 is "missing").
        heldout_fraction: the last fraction of the lines held out, in (0, 1); at least one
            line on each side.
        max_lines: read at most this many lines (0: all).

    Raises:
        ValueError naming the file and line for a malformed line, or for bad arguments;
        FileNotFoundError when the file does not exist.
    """
    if hash_size < 2:
        raise ValueError(f"hash_size: expected >= 2 (row 0 is for missing values), "
                         f"got {hash_size}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction: expected in (0, 1), got {heldout_fraction}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data_file: {path} does not exist")
    dense_rows: List[np.ndarray] = []
    id_rows: List[np.ndarray] = []
    labels: List[float] = []
    with open(path, "r", encoding="ascii", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if max_lines and number > max_lines:
                break
            dense = np.empty(NUM_DENSE, dtype=np.float32)
            ids = np.empty(NUM_SPARSE, dtype=np.int64)
            labels.append(_parse_line(line, f"{path}:{number}", hash_size, dense, ids))
            dense_rows.append(dense)
            id_rows.append(ids)
    total = len(labels)
    num_train = total - int(round(total * heldout_fraction))
    if total < 2 or num_train < 1 or num_train >= total:
        raise ValueError(f"data_file: {path} has {total} lines, too few for a training and a "
                         f"held-out split at heldout_fraction={heldout_fraction}")
    return ClickLogs(np.stack(dense_rows), np.stack(id_rows),
                     np.asarray(labels, dtype=np.float32), [hash_size] * NUM_SPARSE,
                     num_train, None)
