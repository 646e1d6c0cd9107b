"""Count and capture what crosses the network, by wrapping torch.distributed's process-group
collectives (independent of the package's own counters).

``with WireTap(world) as tap:`` replaces ``all_gather_single`` / ``all_gather_into_tensor``,
``all_to_all_single`` and ``all_reduce`` on the ``torch.distributed`` module with recording
wrappers. Each call is recorded as a ``Call`` (the op, a clone of the input as issued, its
bytes) and counted as docs/design.md counts bytes per rank: an all-gather of N bytes per rank is N
sent and (W - 1) N received; an all-to-all of W equal chunks of R bytes is (W - 1) R each way;
an all-reduce of M bytes is 2 (W - 1) / W M each way. int64 collectives (the agreement check
of a new bucket layout) are recorded but not counted.
"""

from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist

_NAMES = ("all_gather_single", "all_gather_into_tensor", "all_to_all_single", "all_reduce")


@dataclass
class Call:
    op: str          # "all_gather", "all_to_all" or "all_reduce"
    input: torch.Tensor
    sent: float
    received: float


class WireTap:
    def __init__(self, world: int):
        self.world = world
        self.calls: List[Call] = []
        self._saved = {}

    # -------------------------------------------------------------------- totals
    @property
    def sent(self) -> float:
        return sum(c.sent for c in self.calls)

    @property
    def received(self) -> float:
        return sum(c.received for c in self.calls)

    def of(self, op: str, dtype=torch.uint8) -> List[torch.Tensor]:
        return [c.input for c in self.calls if c.op == op and c.input.dtype == dtype]

    def clear(self) -> None:
        self.calls.clear()

    # ------------------------------------------------------------------- wrapping
    def _record(self, op: str, tensor: torch.Tensor) -> None:
        w = self.world
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.dtype == torch.int64:
            sent = received = 0.0
        elif op == "all_gather":
            sent, received = nbytes, (w - 1) * nbytes
        elif op == "all_to_all":
            sent = received = (w - 1) * nbytes / w
        else:
            sent = received = 2 * (w - 1) * nbytes / w
        self.calls.append(Call(op, tensor.detach().clone(), sent, received))

    def __enter__(self):
        for name in _NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def _wrap(self, name, original):
        def wrapper(*args, **kwargs):
            if name.startswith("all_gather"):
                self._record("all_gather", args[1] if len(args) > 1 else kwargs["input_tensor"])
            elif name == "all_to_all_single":
                self._record("all_to_all", args[1] if len(args) > 1 else kwargs["input"])
            else:
                self._record("all_reduce", args[0] if args else kwargs["tensor"])
            return original(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()
        return False
