"""The model-parallel boundary: tower activations of the global batch -> each rank's samples.

x ``[W*B, H]`` on every rank, block j (rows j*B .. (j+1)*B) for rank j; the result
``[W*B, H]`` holds in block j what rank j computed for this rank's B samples.

- ``DenseExchange``: the baseline, a dense all-to-all forward and backward
  (``torch.distributed.all_to_all_single``, the process-group collective, so any caller can
  count it by wrapping it).
- ``Bf16Exchange``: the baselines' exchange, the dense all-to-all with bfloat16 on the wire
  (activations forward, gradients backward), half the dense bytes.
- ``SparseExchange``: DCT-MP, ``dct_kernels.mp.sparse_all_to_all`` (top k of each row
  forward, the gradient at the same positions backward).

Both count the bytes this rank sends per call (forward plus backward, the own block not
counted, docs/design.md#dct-mp-model-parallel) as host integers, without looking at the data.
"""

from typing import Optional

import torch
import torch.distributed as dist

from dct_kernels import mp as dct_mp


class DenseAllToAll(torch.autograd.Function):
    """The baseline exchange: a dense all_to_all_single forward and backward (the
    process-group collective, so callers can count it by wrapping)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


class Bf16AllToAll(torch.autograd.Function):
    """The dense all-to-all with bfloat16 on the wire both ways: x cast to bfloat16, exchanged,
    cast back to x's dtype; the gradient likewise."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        wire = x.to(torch.bfloat16).contiguous()
        out = torch.empty_like(wire)
        dist.all_to_all_single(out, wire, group=group)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        wire = grad.to(torch.bfloat16).contiguous()
        out = torch.empty_like(wire)
        dist.all_to_all_single(out, wire, group=ctx.group)
        return out.to(grad.dtype), None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x, with its gradient multiplied by ``scale`` on the way back.

    The data-parallel loss is each rank's mean over its B samples, and DDP averages those over
    the W ranks; the tables and towers receive the gradients of all W ranks' losses through the
    all-to-all, summed. Scaling them by 1/W makes both parts follow the gradient of the same
    global mean loss."""
    return _ScaleGrad.apply(x, scale)


class DenseExchange:
    """Dense all-to-all of ``[W*B, H]`` activations, differentiable (see the module docstring).

    ``bytes_sent`` counts what this rank has sent, forward and backward, in the calls made with
    gradients enabled (training steps); calls under ``torch.no_grad`` (evaluation) are not
    counted.
    """

    sparse = False

    def __init__(self, group=None):
        self.group = group
        self.bytes_sent = 0   # this rank, train calls, forward + backward
        self.bytes_dense = 0  # what the dense exchange of the same calls sends

    def dense_bytes(self, x: torch.Tensor, world: int) -> int:
        """Bytes a dense exchange of x sends from this rank, forward plus backward."""
        return 2 * (world - 1) * (x.shape[0] // world) * x.shape[1] * x.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            nbytes = self.dense_bytes(x, dist.get_world_size(self.group))
            self.bytes_sent += nbytes
            self.bytes_dense += nbytes
        return DenseAllToAll.apply(x, self.group)


class Bf16Exchange(DenseExchange):
    """The dense all-to-all with bfloat16 values on the wire, forward and backward (what a user
    pairs with a 16-bit gradient exchange). ``bytes_sent`` counts the bf16 bytes,
    ``bytes_dense`` the fp32 exchange's."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            world = dist.get_world_size(self.group)
            dense = self.dense_bytes(x, world)
            self.bytes_sent += dense * 2 // x.element_size()
            self.bytes_dense += dense
        return Bf16AllToAll.apply(x, self.group)


class SparseExchange(DenseExchange):
    """DCT-MP: each row's k largest activations cross (``value_dtype`` on the wire), the
    gradient only at those positions (``dct_kernels.mp.sparse_all_to_all``). ``bytes_sent``
    adds ``dct_kernels.mp.all_to_all_bytes`` per train call."""

    sparse = True

    def __init__(self, k: int, group=None, value_dtype: Optional[torch.dtype] = None):
        super().__init__(group)
        self.k = int(k)
        self.value_dtype = value_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            sparse, dense = dct_mp.all_to_all_bytes(x, self.k, dist.get_world_size(self.group),
                                                    value_dtype=self.value_dtype)
            self.bytes_sent += sparse
            self.bytes_dense += dense
        return dct_mp.sparse_all_to_all(x, self.k, group=self.group,
                                        value_dtype=self.value_dtype)
