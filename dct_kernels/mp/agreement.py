"""The cross-rank agreement check of ``sparse_all_to_all``: before the first exchange of a new
(shape, k, dtypes, group), every rank gathers every rank's fingerprint of it and every rank
raises the same ValueError when they differ.

The fingerprint has a fixed size (10 int64) because collectives of unequal sizes are exactly
what must not run while ranks disagree: gloo raises on some, NCCL can hang or read garbage.
"""

import numbers
from typing import Optional

import torch
import torch.distributed as dist

from .. import payload as wire

MAGIC = 0x44435441  # "DCTA"
VERSION = 2

# (what the value describes, the argument to name in the error).
FIELDS = (
    ("magic", "sparse_all_to_all"),
    ("version", "sparse_all_to_all"),
    ("world size", "group"),
    ("dimensions", "x"),
    ("rows (W*B)", "x"),
    ("columns (D)", "x"),
    ("k", "k"),
    ("dtype", "x"),
    ("value dtype", "value_dtype"),
)  # then one word more, not compared but read: whether the rank has an argument error
_UNSUPPORTED = -1  # the code of a dtype, k or shape the exchange does not take

# Keys already agreed on, per process. A key holds its group object, so a group created after
# an old one was destroyed can never be mistaken for it (ids would be reused, objects are not).
_AGREED = set()



def _all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    # torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single, which older
    # releases (2.11 on the GPU machines) lack; both take (output, input, group). Looked up at
    # each call, so that a caller who wraps the collective to count it sees this one too.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _code(dtype) -> int:
    return wire.value_code(dtype) if dtype in wire.VALUE_DTYPES else _UNSUPPORTED


def _fingerprint(world: int, x: torch.Tensor, k, value_dtype, problem) -> list:
    """What this rank was given, as int64s; arguments the exchange rejects still get a value
    (``_UNSUPPORTED`` or their raw shape), so that the ranks can compare them, and whether it
    has an argument error of its own (one the other fields may not show, such as a backend
    that cannot run here): a rank alone with one then fails the others too."""
    rows = x.shape[0] if x.dim() >= 1 else _UNSUPPORTED
    columns = x.shape[-1] if x.dim() >= 2 else _UNSUPPORTED
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not -2**62 < k < 2**62:
        k = _UNSUPPORTED
    value_code = _code(x.dtype if value_dtype is None else value_dtype)
    return [MAGIC, VERSION, world, x.dim(), rows, columns, int(k), _code(x.dtype), value_code,
            int(problem is not None)]


def _shown(field: str, value: int):
    if field in ("dtype", "value dtype"):
        return "an unsupported dtype" if value == _UNSUPPORTED else str(wire.dtype_of_code(value))
    return value


def agree_once(group, world: int, x: torch.Tensor, k, value_dtype,
               problem: Optional[Exception]) -> None:
    """Check, once per (group, shape, k, dtypes), that every rank of ``group`` was given the
    same exchange; then raise ``problem`` (this rank's own argument error), if any.

    Cost at a new key: one all-gather of 10 int64 per rank on x's device and a host read of the
    W x 10 result (synchronizes). Known keys cost nothing. When the ranks disagree, raises
    ValueError on every rank naming the arguments that differ and each rank's value; when they
    agree but the arguments are bad, every rank raises its own TypeError/ValueError (the same
    one for the same arguments; unsupported dtypes all compare as one, so two ranks given two
    different unsupported dtypes each name their own); a rank with an error the other fields
    do not show (a backend it cannot run) raises it, and the others a ValueError naming that
    rank. Only agreed, valid keys are cached.
    """
    mine = _fingerprint(world, x, k, value_dtype, problem)
    key = (group, *mine)
    if problem is None and key in _AGREED:
        return
    sent = torch.tensor(mine, dtype=torch.int64).to(x.device)
    everyone = torch.empty(world * sent.numel(), dtype=torch.int64, device=x.device)
    _all_gather_flat(everyone, sent, group=group)
    rows = everyone.view(world, sent.numel()).cpu().tolist()
    differences = []
    for column, (field, argument) in enumerate(FIELDS):
        seen = [row[column] for row in rows]
        if len(set(seen)) > 1:
            differences.append(f"{argument} ({field}): " + ", ".join(
                f"rank {r} has {_shown(field, v)}" for r, v in enumerate(seen)))
    if differences:
        raise ValueError("sparse_all_to_all: the ranks disagree on the exchange; every rank "
                         "must pass x of the same shape and dtype, the same k and the same "
                         "value_dtype. Differences: " + "; ".join(differences)) from problem
    if problem is not None:
        raise problem
    failing = [r for r, row in enumerate(rows) if row[len(FIELDS)]]
    if failing:
        raise ValueError(f"sparse_all_to_all: rank(s) {failing} refused their own arguments "
                         f"(e.g. a backend that cannot run there; each names it in its own "
                         f"error); nothing was exchanged")
    _AGREED.add(key)
