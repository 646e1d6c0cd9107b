"""``HookTap``: tests/wire_tap.py's ``WireTap``, recording only the collectives issued from
inside given functions (a DDP comm hook), so that TorchRec's own all-to-alls of the same
process group are left out of the data-parallel bytes."""

import sys

import torch

from wire_tap import WireTap


class HookTap(WireTap):
    """``with HookTap(world, [dct_hook]) as tap:`` counts, as ``WireTap`` does, the
    collectives called while one of ``functions`` is on the Python call stack."""

    def __init__(self, world: int, functions):
        super().__init__(world)
        self.codes = {f.__code__ for f in functions}

    def _record(self, op: str, tensor: torch.Tensor) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code not in self.codes:
            frame = frame.f_back
        if frame is not None:
            super()._record(op, tensor)
