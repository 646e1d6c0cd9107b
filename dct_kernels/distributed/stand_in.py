"""A stand-in for DDP's ``GradBucket`` over given parameters and gradients, so that
``dct_hook`` can be called outside DDP, e.g. in tests and benchmarks."""

from typing import List, Sequence, Union

import torch


class StandInBucket:
    """A stand-in for DDP's ``torch.distributed.GradBucket`` over given parameters and
    gradients, so that ``dct_hook`` (or any DDP comm hook) can be called outside DDP, e.g. in
    tests and benchmarks. It offers the bucket's methods: ``buffer()``, ``gradients()``,
    ``parameters()``, ``is_last()``, ``index()`` and ``set_buffer()``.

    Args:
        params: the bucket's parameters, in bucket order.
        grads: one flat tensor, used as the bucket's buffer as it is (not copied: a hook that
            writes into the buffer writes into this tensor), or one gradient per parameter,
            flattened and concatenated into a new contiguous buffer (DDP's bucket holds its
            own flat copy too).
        last: whether this is the step's last bucket (the hook finishes the step on it).
        index: the bucket's index.

    Nothing checks that the buffer is as long as the parameters, so that a test can hand the
    hook a malformed bucket; ``gradients()`` needs them to agree.
    """

    def __init__(self, params: Sequence[torch.Tensor],
                 grads: Union[torch.Tensor, Sequence[torch.Tensor]], last: bool = True,
                 index: int = 0):
        self._params = list(params)
        if isinstance(grads, torch.Tensor):
            self._buffer = grads
        else:
            self._buffer = torch.cat([g.reshape(-1) for g in grads]).contiguous()
        self._last = last
        self._index = index

    def buffer(self) -> torch.Tensor:
        """The flat buffer of the bucket's gradients."""
        return self._buffer

    def set_buffer(self, buffer: torch.Tensor) -> None:
        """Replace the bucket's buffer (as ``GradBucket.set_buffer`` does)."""
        self._buffer = buffer

    def gradients(self) -> List[torch.Tensor]:
        """One view of the buffer per parameter, shaped like the parameter."""
        sizes = [p.numel() for p in self._params]
        if sum(sizes) != self._buffer.numel():
            raise ValueError(f"bucket: the buffer holds {self._buffer.numel()} elements, the "
                             f"parameters {sum(sizes)}")
        flat = self._buffer.reshape(-1)
        return [g.view(p.shape) for g, p in zip(flat.split(sizes), self._params)]

    def parameters(self) -> List[torch.Tensor]:
        """The bucket's parameters, in bucket order."""
        return self._params

    def is_last(self) -> bool:
        """Whether this is the last bucket of the step."""
        return self._last

    def index(self) -> int:
        """The bucket's index."""
        return self._index
