"""Which changes to top-k sparsification with error feedback could close DCT-DP's quality gap on
the byte-level GPT-2 LM of bench/train_transformer.py? Each variant is a plain torch comm hook
(an exact ``torch.topk`` per parameter, the kept entries all-reduced as a dense tensor with zeros
elsewhere: this measures quality, not bytes or time), trained exactly like that benchmark's runs:

    python bench/ef_variants.py                          # lm_text, every variant, W = 2
    python bench/ef_variants.py --tasks lm_synthetic --runs ef,ef_global

Variants (k = ceil(ratio x n) per parameter of n >= 1024 elements, smaller ones dense, 10 dense
warm-up steps, ratio 0.01 unless named):

- ``ef``: classic error feedback, acc = g + e, send top-k(acc), e = acc - sent: what DCT-DP does
  with an exact threshold at every step (the reference: it should match the ``dct`` run).
- ``ef_global``: the same kept count per bucket, but one top-k over all of the bucket's sparse
  parameters, so the budget goes where the magnitudes are.
- ``ef21``: EF21 (Richtarik et al., 2021): each rank keeps an estimate h of its gradient and
  sends top-k(g - h); every rank applies the same dense estimate H = mean h (Adam sees a nonzero
  gradient everywhere at every step); h and H start from the last dense warm-up step.
- ``ef21_momentum``: EF21 on a momentum of the gradient (eta 0.1, as in EF21-SGDM).
- ``ef_release``: classic error feedback, but the aggregated sparse gradient is released into the
  optimizer over several steps (30% of what is pending per step; rank-identical), so that a
  rarely sent entry is seen by Adam at more than one step.
- ``ef_ramp``: no dense warm-up; the kept fraction falls geometrically from 0.25 to the ratio
  over the first 200 steps (DGC's warm-up schedule).
- ``ef_flush_geo``, ``ef_flush_50``: no warm-up at the start; instead 10 (geometrically spaced:
  steps 0, 1, 2, 4, ..., 256) or every 50th step dense, each sending gradient + residual (the
  residual emptied): the default warm-up's dense steps, placed elsewhere.
- ``ef_spread``: classic error feedback, but each entry's aggregated sum is released into the
  optimizer over as many steps as it took to arrive (a fraction 1/T of what is pending per step,
  T = steps since the entry last arrived; rank-identical): a rarely sent entry reaches Adam as
  the steady rate it accumulated at, not as one burst.
- ``pc_dense``, ``pc_ef``: diagnostics, run with ``--optimizer sgd_ema``: the hook divides what
  it delivers by the square root of a running mean (beta 0.999, bias-corrected) of the squared
  *local, dense* gradient, averaged over the ranks every step (a dense all-reduce that is not
  counted), and the optimizer is SGD with Adam's first moment: Adam whose second moment sees
  every entry at every step, whatever error feedback delivers. ``pc_dense`` sends everything
  (the control: it should train like AdamW), ``pc_ef`` is classic error feedback at 0.01. If
  error feedback's bursts meeting Adam's second moment were the gap, ``pc_ef`` would close it.
- ``ef_norm``, ``ef_norm_global``: classic error feedback, but the entries chosen by |acc| over
  the square root of a running mean (beta 0.999, bias-corrected) of this rank's own squared
  gradient, per parameter or per bucket: the entries whose pending move is largest in Adam's
  own scale, where the plain selection favours parameters of large gradients.
- ``ef_decay_0``, ``ef_decay_50``, ``ef_decay_90``, ``ef_decay_99``: the residual multiplied by
  0, 0.5, 0.9 or 0.99 after each step, so that what was not sent is forgotten (0: plain top-k,
  no error feedback); ``ef_ramp_decay_0``, ``ef_ramp_decay_50``: the same with ``ef_ramp``'s
  schedule. Diagnostics of how much the delayed part of the gradient helps or hurts: the
  package's residual never loses a value.
- ``ef_3pct``, ``ef_10pct``: classic error feedback at ratio 0.03 and 0.1 (what more density buys).

Writes bench/train_transformer.py's report (``transformers.json``/``.md``/``.png``) into
bench/results/<device>/ef_variants_w<W>/; the variants' compression column is empty.
"""

import math
import sys
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import train_transformer  # bench/ (the script's folder, or the tests' pythonpath)

VARIANTS: Dict[str, dict] = {
    "ef": {},
    "ef_global": {"selection": "bucket"},
    "ef21": {"feedback": "ef21"},
    "ef21_momentum": {"feedback": "ef21", "momentum": 0.1},
    "ef_release": {"release": 0.3},
    "ef_ramp": {"warmup_steps": 0, "ramp_steps": 200},
    "ef_flush_geo": {"warmup_steps": 0, "flush_steps": (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)},
    "ef_flush_50": {"warmup_steps": 0, "flush_steps": tuple(range(0, 1000, 50))},
    "ef_spread": {"spread": True},
    "pc_dense": {"ratio": 1.0, "precondition": True},
    "pc_ef": {"precondition": True},
    "ef_norm": {"normalize": True},
    "ef_norm_global": {"normalize": True, "selection": "bucket"},
    "ef_decay_0": {"decay": 0.0},
    "ef_decay_50": {"decay": 0.5},
    "ef_decay_90": {"decay": 0.9},
    "ef_ramp_decay_0": {"warmup_steps": 0, "ramp_steps": 200, "decay": 0.0},
    "ef_ramp_decay_50": {"warmup_steps": 0, "ramp_steps": 200, "decay": 0.5},
    "ef_decay_99": {"decay": 0.99},
    "ef_3pct": {"ratio": 0.03},
    "ef_10pct": {"ratio": 0.1},
}


class VariantState:
    """Settings and per-bucket memory of one variant (bucket index -> tensors of its size; a
    size change, as after DDP's first iteration rebuilds its buckets, starts them afresh)."""

    def __init__(self, group, ratio: float = 0.01, warmup_steps: int = 10, min_numel: int = 1024,
                 selection: str = "parameter", feedback: str = "ef", momentum: float = 1.0,
                 release: float = 1.0, ramp_steps: int = 0, ramp_start: float = 0.25,
                 dense_shapes=(), flush_steps=(), spread: bool = False,
                 precondition: bool = False, normalize: bool = False,
                 decay: float = 1.0):
        # dense_shapes: parameters of these shapes are sent dense like small ones (to find
        # which weights' sparsification costs quality: --dct-set "dense_shapes=[(128, 512)]").
        self.dense_shapes = [tuple(shape) for shape in dense_shapes]
        self.group, self.ratio, self.warmup_steps = group, ratio, warmup_steps
        self.min_numel, self.selection, self.feedback = min_numel, selection, feedback
        self.momentum, self.release = momentum, release
        self.ramp_steps, self.ramp_start = ramp_steps, ramp_start
        self.flush_steps = frozenset(flush_steps)
        self.spread, self.precondition = spread, precondition
        self.normalize, self.decay = normalize, decay
        self.step = 0
        self.memory: Dict[int, Dict[str, torch.Tensor]] = {}
        self.started = set()  # buckets whose EF21 momentum has a first value

    def ratio_now(self) -> float:
        t = self.step - self.warmup_steps
        if self.ramp_steps and t < self.ramp_steps:
            return max(self.ratio,
                       self.ramp_start * (self.ratio / self.ramp_start) ** (t / self.ramp_steps))
        return self.ratio

    def buffers(self, index: int, like: torch.Tensor) -> Dict[str, torch.Tensor]:
        held = self.memory.get(index)
        if held is None or next(iter(held.values())).numel() != like.numel():
            held = {name: torch.zeros_like(like) for name in ("e", "h", "H", "v", "pending",
                                                             "square", "local_square")}
            held["period"] = torch.ones_like(like)
            held["last"] = torch.full_like(like, float(self.step - 1))
            held["squares"] = torch.zeros(())
            held["local_squares"] = torch.zeros(())
            self.memory[index] = held
            self.started.discard(index)
        return held

    def stats(self) -> Dict[str, float]:
        return {"bytes_sent": 0, "bytes_received": 0, "bytes_ring": 0}


def keep_mask(acc: torch.Tensor, sizes: List[int], ratio: float, min_numel: int,
              selection: str, dense: Optional[List[bool]] = None,
              score: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entries to send: every entry of a parameter under ``min_numel`` (or marked in
    ``dense``); of the others the ceil(ratio x n) largest magnitudes per parameter, or
    (``selection="bucket"``) as many in total, the largest over all of them."""
    if score is not None:
        acc = score  # only magnitudes are compared below
    mask = torch.zeros(acc.numel(), dtype=torch.bool)
    sparse = torch.zeros_like(mask)
    off, budget = 0, 0
    for i, n in enumerate(sizes):
        if n < min_numel or (dense is not None and dense[i]):
            mask[off:off + n] = True
        else:
            k = max(1, math.ceil(ratio * n))
            budget += k
            sparse[off:off + n] = True
            if selection == "parameter":
                mask[off + torch.topk(acc[off:off + n].abs(), k).indices] = True
        off += n
    if selection == "bucket" and budget:
        magnitude = acc.abs().masked_fill(~sparse, -1.0)
        mask[torch.topk(magnitude, budget).indices] = True
    return mask


def _all_mean(t: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(t, group=group)
    return t.div_(dist.get_world_size(group))


def _precondition(state: VariantState, mem: Dict[str, torch.Tensor],
                  grad: torch.Tensor) -> torch.Tensor:
    """sqrt of the bias-corrected running mean of the rank-averaged squared local gradient
    (Adam's second moment, beta 0.999, eps 1e-8), updated with this step's ``grad``."""
    square = _all_mean(grad * grad, state.group)
    mem["square"].mul_(0.999).add_(square, alpha=0.001)
    mem["squares"] += 1
    return (mem["square"] / (1 - 0.999 ** mem["squares"])).sqrt_().add_(1e-8)


def variant_hook(state: VariantState, bucket) -> torch.futures.Future[torch.Tensor]:
    grad = bucket.buffer()
    scale = (_precondition(state, state.buffers(bucket.index(), grad), grad)
             if state.precondition else None)
    if state.step < state.warmup_steps:
        local = grad.clone() if state.feedback == "ef21" else None
        out = _all_mean(grad, state.group)
        if local is not None:
            # EF21 starts from the dense warm-up: every estimate is exact at its last step.
            mem = state.buffers(bucket.index(), grad)
            mem["h"].copy_(local)
            mem["v"].copy_(local)
            mem["H"].copy_(out)
            state.started.add(bucket.index())
    else:
        mem = state.buffers(bucket.index(), grad)
        grads = bucket.gradients()
        sizes = [g.numel() for g in grads]
        dense = [tuple(g.shape) in state.dense_shapes for g in grads]
        ratio = state.ratio_now()
        if state.feedback == "ef21":
            v = mem["v"]
            if state.momentum < 1.0 and bucket.index() in state.started:
                v.mul_(1 - state.momentum).add_(grad, alpha=state.momentum)
            else:
                v.copy_(grad)
            delta = v - mem["h"]
            sent = delta * keep_mask(delta, sizes, ratio, state.min_numel, state.selection,
                                       dense)
            mem["h"] += sent
            mem["H"] += _all_mean(sent, state.group)
            out = mem["H"].clone()
        elif state.step in state.flush_steps:
            # A dense step that also sends every residual: nothing is left waiting.
            out = _all_mean(grad + mem["e"], state.group)
            mem["e"].zero_()
        else:
            acc = grad + mem["e"]
            score = None
            if state.normalize:
                # Local, rank-private: Adam's second moment of this rank's own gradient.
                # Its own running mean: ``precondition``'s is of the rank-averaged square.
                mem["local_square"].mul_(0.999).add_(grad * grad, alpha=0.001)
                mem["local_squares"] += 1
                rms = (mem["local_square"] / (1 - 0.999 ** mem["local_squares"])).sqrt_() \
                    .add_(1e-8)
                score = acc.abs() / rms
            sent = acc * keep_mask(acc, sizes, ratio, state.min_numel, state.selection, dense,
                                   score)
            mem["e"] = (acc - sent).mul_(state.decay)
            out = _all_mean(sent, state.group)
            if state.spread:
                arrived = out != 0
                mem["period"] = torch.where(arrived, state.step - mem["last"], mem["period"])
                mem["last"] = torch.where(arrived, torch.full_like(out, float(state.step)),
                                          mem["last"])
                mem["pending"] += out
                out = mem["pending"] / mem["period"]
                mem["pending"] -= out
            elif state.release < 1.0:
                mem["pending"] += out
                out = mem["pending"] * state.release
                mem["pending"] -= out
        state.started.add(bucket.index())
    if scale is not None:
        out = out / scale
    if bucket.is_last():
        state.step += 1
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(out)
    return done


def _factory(settings: dict):
    def make(group, world: int, overrides: dict):
        kwargs = dict(settings, **overrides)
        return VariantState(group, **kwargs), variant_hook, {k: str(v) for k, v in
                                                              kwargs.items()}
    return make


train_transformer.EXTRA_RUNS.update({name: _factory(s) for name, s in VARIANTS.items()})


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--tasks" or a.startswith("--tasks=") for a in argv):
        argv += ["--tasks", "lm_text"]
    if not any(a == "--runs" or a.startswith("--runs=") for a in argv):
        argv += ["--runs", ",".join(("dense", "dct") + tuple(VARIANTS))]
    train_transformer.main(argv, out_name="ef_variants")


if __name__ == "__main__":
    main()
