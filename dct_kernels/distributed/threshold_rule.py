"""The band check behind early refreshes: per-segment kept counts of a step's payload(s),
compared with each segment's band on the device and staged to the host for the next step.

A segment's flag is set when its kept count exceeds ``floor(k x high)``, when it falls below
``ceil(k x low)`` while its (gradient + residual) has at least k nonzeros (fewer nonzeros than k
is not, by itself, a reason to refresh: τ is then at its floor and every nonzero is sent), or
when the overflow condition given with the payload holds. Only the flags travel to the host,
in a non-blocking copy read one step later, so the check never synchronizes.
"""

import math
from typing import List, Optional, Sequence

import torch


class BandCheck:
    """Band check of S segments with host offsets ``offsets`` (S + 1), targets ``ks`` and
    ``sparse`` mask (dense segments never flag), on ``device``."""

    def __init__(self, offsets: Sequence[int], ks: Sequence[int], sparse: Sequence[bool],
                 band, device: torch.device):
        low, high = band
        self.num_segments = len(ks)
        self.numel = offsets[-1]
        self.device = device
        self.starts = torch.tensor(list(offsets[:-1]), dtype=torch.int64).to(device)
        self.offsets = torch.tensor(list(offsets), dtype=torch.int64).to(device)
        self.ks = torch.tensor(list(ks), dtype=torch.int64).to(device)
        self.low = torch.tensor([math.ceil(k * low) for k in ks], dtype=torch.int64).to(device)
        self.high = torch.tensor([math.floor(k * high) for k in ks],
                                 dtype=torch.int64).to(device)
        self.sparse = torch.tensor(list(sparse), dtype=torch.bool).to(device)
        pin = device.type == "cuda"
        self._host = torch.zeros(self.num_segments, dtype=torch.bool, pin_memory=pin)
        self._event = torch.cuda.Event() if pin else None
        self._staged = False

    def counts(self, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """int64 [S]: how many of the valid ``positions`` (any shape) fall in each segment."""
        positions = positions.reshape(-1).to(torch.int64)
        segment = torch.searchsorted(self.starts, positions, right=True) - 1
        segment = torch.where(valid.reshape(-1), segment, self.num_segments)
        counts = torch.zeros(self.num_segments + 1, dtype=torch.int64, device=self.device)
        counts.scatter_add_(0, segment, torch.ones_like(segment))
        return counts[:self.num_segments]

    def nonzeros(self, residual_after: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
        """int64 [S]: nonzeros of (gradient + residual) per segment, from the residual after
        the compress and the sent positions: an entry was nonzero iff it was sent (a sent entry
        passed τ >= 2^-149) or its residual, which then holds all of it, is nonzero."""
        nonzero = torch.zeros(self.numel + 1, dtype=torch.bool, device=self.device)
        nonzero[:self.numel] = residual_after.reshape(-1) != 0
        sent = torch.where(valid.reshape(-1), positions.reshape(-1).to(torch.int64), self.numel)
        nonzero.index_fill_(0, sent, True)
        running = torch.zeros(self.numel + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(nonzero[:self.numel], 0, out=running[1:])
        return running[self.offsets[1:]] - running[self.offsets[:-1]]

    def stage(self, positions: torch.Tensor, valid: torch.Tensor,
              residual_after: torch.Tensor, overflowed: torch.Tensor,
              capped: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Compute the flags of this step and stage them to the host (no synchronization).

        Args:
            positions: int32/int64 positions of the payload slots (relative to the segments'
                range), any shape; ``valid`` (bool, same shape) marks the used slots.
            residual_after: fp32 [numel], the residual after the compress.
            overflowed: 0-d bool device tensor: the overflow condition of this step.
            capped: optional bool [S]: segments whose sent count was cut by a full buffer
                (their count says nothing about τ being too high: the low side is off).

        Returns:
            The int64 [S] kept counts (for statistics).
        """
        counts = self.counts(positions, valid)
        nonzeros = self.nonzeros(residual_after, positions, valid)
        low = (counts < self.low) & (nonzeros >= self.ks)
        if capped is not None:
            low &= ~capped
        flags = (low | (counts > self.high) | overflowed) & self.sparse
        self._host.copy_(flags, non_blocking=True)
        if self._event is not None:
            self._event.record(torch.cuda.current_stream(self.device))
        self._staged = True
        return counts

    def take(self) -> Optional[List[bool]]:
        """The flags staged by the last ``stage`` (None when none are staged since the last
        take). Waits only for the one-step-old copy's event (on CUDA), never for the device."""
        if not self._staged:
            return None
        if self._event is not None:
            self._event.synchronize()
        self._staged = False
        return [bool(f) for f in self._host.tolist()]
