"""Counters a user can log: what was kept, what was sent, how often τ was recomputed.

Host counters are plain ints (known without looking at the data); the data-dependent ones
(entries kept, overflow) accumulate on the device, so updating them never synchronizes and
reading them does.
"""

from typing import Dict, Optional

import torch

HOST_FIELDS = ("buckets_sparse", "buckets_dense", "elements_sparse", "bytes_sent",
               "bytes_dense", "refreshes", "bucket_refreshes", "early_refreshes")
DEVICE_FIELDS = ("kept", "overflow", "overflowed_buckets")


class Stats:
    """Running totals since construction (or ``reset``); see ``DCTState.stats``."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        for name in HOST_FIELDS:
            setattr(self, name, 0)
        self._device: Optional[torch.Tensor] = None  # int64 [len(DEVICE_FIELDS)]
        self._device_base = [0] * len(DEVICE_FIELDS)  # totals loaded from a checkpoint

    def add_payload(self, count: torch.Tensor, overflow: torch.Tensor) -> None:
        """Add one payload's kept and overflowed entries (device tensors; no sync)."""
        if self._device is None or self._device.device != count.device:
            if self._device is not None:
                self._device_base = self._device_totals()
            self._device = torch.zeros(len(DEVICE_FIELDS), dtype=torch.int64,
                                       device=count.device)
        self._device += torch.stack([count, overflow, (overflow > 0).to(count.dtype)]).to(
            torch.int64)

    def _device_totals(self) -> list:
        values = self._device.tolist() if self._device is not None else [0] * len(DEVICE_FIELDS)
        return [base + v for base, v in zip(self._device_base, values)]

    def as_dict(self) -> Dict[str, float]:
        """All counters and the derived ratios (reads the device counters: synchronizes)."""
        out: Dict[str, float] = {name: getattr(self, name) for name in HOST_FIELDS}
        out.update(zip(DEVICE_FIELDS, self._device_totals()))
        out["kept_density"] = out["kept"] / out["elements_sparse"] \
            if out["elements_sparse"] else 0.0
        out["compression"] = out["bytes_dense"] / out["bytes_sent"] \
            if out["bytes_sent"] else 0.0
        return out

    def state_dict(self) -> Dict[str, int]:
        values = {name: getattr(self, name) for name in HOST_FIELDS}
        values.update(zip(DEVICE_FIELDS, self._device_totals()))
        return values

    def load_state_dict(self, values: Dict[str, int]) -> None:
        self.reset()
        for name in HOST_FIELDS:
            setattr(self, name, int(values.get(name, 0)))
        self._device_base = [int(values.get(name, 0)) for name in DEVICE_FIELDS]
