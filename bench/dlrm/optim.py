"""Row-wise Adagrad for the embedding tables (sparse gradients).

Production DLRM trainers update embedding tables with row-wise Adagrad (one accumulator per
row: the mean of the squared gradient over the row's entries), which touches only the rows a
batch used and keeps one float of state per row. ``torch.optim.SparseAdam`` does the same job
with two full-size moment tables and took most of the step time here (coalescing, dense-size
adds), so the tables use this instead; the MLPs and towers use Adam.
"""

import torch


class RowWiseAdagrad:
    """Row-wise Adagrad over 2-D parameters with sparse (COO) gradients.

    For each row r that the step's gradient touches (duplicates summed): g_r its gradient,
    s_r += mean(g_r^2), w_r -= lr * g_r / (sqrt(s_r) + eps). Rows not touched are left alone.
    Deterministic (the duplicates are summed by ``coalesce``, in index order).

    Args:
        params: 2-D tensors whose ``.grad`` is sparse (``nn.EmbeddingBag(sparse=True)``).
        lr: step size (> 0). eps: added to the root (> 0).
    Raises:
        ValueError for a bad lr/eps or a parameter that is not 2-D.
    """

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8):
        if not lr > 0 or not eps > 0:
            raise ValueError(f"lr, eps: expected > 0, got {lr}, {eps}")
        self.params = list(params)
        for p in self.params:
            if p.dim() != 2:
                raise ValueError(f"params: expected 2-D tables, got shape {tuple(p.shape)}")
        self.lr, self.eps = lr, eps
        self.state = [torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                      for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, s in zip(self.params, self.state):
            if p.grad is None:
                continue
            grad = p.grad.coalesce()
            rows = grad.indices()[0]
            values = grad.values()
            s.index_add_(0, rows, values.float().pow(2).mean(dim=1))
            scale = (s.index_select(0, rows).sqrt_().add_(self.eps)).reciprocal_().mul_(-self.lr)
            p.index_add_(0, rows, values * scale.unsqueeze(1).to(values.dtype))

    def state_dict(self) -> dict:
        """The accumulators (copies) and settings, for a checkpoint."""
        return {"lr": self.lr, "eps": self.eps,
                "state": [s.detach().clone() for s in self.state]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``'s accumulators; ValueError when their number or shapes
        differ from this optimizer's tables (another sharding or table sizes)."""
        saved = state_dict["state"]
        if len(saved) != len(self.state) or any(a.shape != b.shape
                                                for a, b in zip(saved, self.state)):
            raise ValueError(f"state_dict: accumulators of shapes "
                             f"{[tuple(a.shape) for a in saved]}, this optimizer has "
                             f"{[tuple(b.shape) for b in self.state]}")
        self.lr, self.eps = state_dict["lr"], state_dict["eps"]
        for mine, s in zip(self.state, saved):
            mine.copy_(s)
