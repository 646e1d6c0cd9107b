"""Counters a user can log: what was kept, what crossed the network, how often τ was recomputed.

Host counters are plain ints (known without looking at the data); the data-dependent ones
(entries kept, overflow) accumulate on the device, so updating them never synchronizes and
reading them does. Bytes are counted per rank as docs/design.md and ``sizing`` define them; the
fractional ring shares (2 (W - 1) / W x M) are kept exactly, as integer multiples of 1 / W.
Updates may come from collective callbacks on other threads, hence the lock.
"""

import threading
from typing import Dict, Optional

import torch

HOST_FIELDS = ("buckets_sparse", "buckets_dense", "elements_sparse", "refreshes",
               "bucket_refreshes", "early_refreshes", "shard_refreshes",
               "buckets_allgather", "buckets_reduce_scatter")
# Bytes, stored times the world size (exact).
BYTE_FIELDS = ("bytes_sent", "bytes_received", "bytes_ring")
DEVICE_FIELDS = ("kept", "overflow", "overflowed_buckets", "shard_kept", "shard_overflow")


class Stats:
    """Running totals since construction (or ``reset``); see ``DCTState.stats``."""

    def __init__(self, world: int = 1):
        self.world = world
        self._lock = threading.Lock()
        self._indices = {}
        self.reset()

    def reset(self) -> None:
        """Every counter to zero (the world size is the caller's to keep)."""
        for name in HOST_FIELDS:
            setattr(self, name, 0)
        self._bytes = {name: 0 for name in BYTE_FIELDS}  # x world
        self._device: Optional[torch.Tensor] = None  # int64 [len(DEVICE_FIELDS)]
        self._device_base = [0] * len(DEVICE_FIELDS)  # totals loaded from a checkpoint

    def add(self, **counts: int) -> None:
        """Add to host counters."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + int(value))

    def add_bytes(self, sent: float, received: float, ring: float) -> None:
        """Add bytes (each a multiple of 1 / world, as sizing computes them)."""
        w = self.world
        with self._lock:
            self._bytes["bytes_sent"] += round(sent * w)
            self._bytes["bytes_received"] += round(received * w)
            self._bytes["bytes_ring"] += round(ring * w)

    def add_device(self, **values: torch.Tensor) -> None:
        """Add 0-d device tensors to the device counters (no sync; one indexed add, not one
        small kernel per counter). CPU tensors are read right away: there the data is in host
        memory, and a read is cheaper than the stack and the add."""
        with self._lock:
            device = next(iter(values.values())).device
            if device.type == "cpu":
                for name, value in values.items():
                    self._device_base[DEVICE_FIELDS.index(name)] += int(value)
                return
            if self._device is None or self._device.device != device:
                if self._device is not None:
                    self._device_base = self._device_totals()
                self._device = torch.zeros(len(DEVICE_FIELDS), dtype=torch.int64,
                                           device=device)
            where = self._index_of(tuple(values), device)
            self._device.index_add_(0, where, torch.stack([v.reshape(()).to(torch.int64)
                                                           for v in values.values()]))

    def _index_of(self, names, device) -> torch.Tensor:
        # Cached per (names, device): the positions of the counters in the device tensor.
        key = (names, device)
        where = self._indices.get(key)
        if where is None:
            where = torch.tensor([DEVICE_FIELDS.index(n) for n in names],
                                 dtype=torch.int64).to(device)
            self._indices[key] = where
        return where

    def _device_totals(self) -> list:
        values = self._device.tolist() if self._device is not None else [0] * len(DEVICE_FIELDS)
        return [base + v for base, v in zip(self._device_base, values)]

    def _byte_values(self) -> Dict[str, float]:
        w = self.world
        return {name: (v // w if v % w == 0 else v / w) for name, v in self._bytes.items()}

    def as_dict(self) -> Dict[str, float]:
        """All counters and the derived ratios (reads the device counters: synchronizes)."""
        with self._lock:
            out: Dict[str, float] = {name: getattr(self, name) for name in HOST_FIELDS}
            out.update(self._byte_values())
            out.update(zip(DEVICE_FIELDS, self._device_totals()))
        out["kept_density"] = out["kept"] / out["elements_sparse"] \
            if out["elements_sparse"] else 0.0
        moved = out["bytes_sent"] + out["bytes_received"]
        out["compression"] = out["bytes_ring"] / moved if moved else 0.0
        return out

    def state_dict(self) -> Dict[str, int]:
        """The counters as plain ints (bytes as their exact multiples of the world size)."""
        with self._lock:
            values = {name: getattr(self, name) for name in HOST_FIELDS}
            values.update({f"{name}_x_world": v for name, v in self._bytes.items()})
            values["world"] = self.world
            values.update(zip(DEVICE_FIELDS, self._device_totals()))
        return values

    def load_state_dict(self, values: Dict[str, int]) -> None:
        """Counters from ``state_dict()``; a counter it lacks (an older checkpoint) is 0."""
        self.reset()
        for name in HOST_FIELDS:
            setattr(self, name, int(values.get(name, 0)))
        self.world = int(values.get("world", self.world))
        for name in BYTE_FIELDS:
            self._bytes[name] = int(values.get(f"{name}_x_world", 0))
        self._device_base = [int(values.get(name, 0)) for name in DEVICE_FIELDS]

    def set_world(self, world: int) -> None:
        """The group's size, known at the first step (rescales totals of another size)."""
        with self._lock:
            if world != self.world:
                for name in BYTE_FIELDS:
                    self._bytes[name] = round(self._bytes[name] * world / self.world)
                self.world = world
