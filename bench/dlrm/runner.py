"""One rank's part of the comparison: the same data, seeds and model for every run, trained
with hybrid parallelism, evaluated on the held-out split, with bytes counted per step.

Every rank holds the whole data set (generated from the seed, or read from the same file) and
draws the same global batches from the seed: it looks up its own tables for all W*B samples
of the global batch, and takes its own B samples (rows rank*B .. rank*B + B - 1 of the global
batch) for the data-parallel part. So the categorical ids never cross the network (a real
system would exchange them, a few bytes per id, not counted here).
"""

import hashlib
import inspect
import math
import random
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dct_kernels.distributed as dct_dist

from . import dp_traffic
from .checkpoint import Checkpointer
from .config import Config
from .data import ClickLogs
from .exchange import Bf16Exchange, DenseExchange, SparseExchange, scale_grad
from .model import DenseArch, EmbeddingShard, shard_tables
from .optim import RowWiseAdagrad

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float8_e4m3fn": torch.float8_e4m3fn}



def _ratio(baseline: float, sent: float) -> float:
    """baseline / sent; 1.0 when neither moves a byte (one rank: nothing crosses the network,
    so nothing is saved), inf when only the baseline would have moved bytes."""
    if sent:
        return baseline / sent
    return 1.0 if not baseline else float("inf")

class Callbacks:
    """Hooks for a caller that watches training (the smoke test counts bytes with them):
    ``step_begin``/``step_end`` bracket each training step (forward, backward, optimizer; not
    logging or evaluation), ``dp_hook`` may wrap the DDP comm hook before it is registered,
    ``run_end`` sees the trained modules (the data-parallel part, this rank's shard)."""

    def step_begin(self, run: str, step: int) -> None:
        pass

    def step_end(self, run: str, step: int) -> None:
        pass

    def dp_hook(self, run: str, hook):
        return hook

    def run_end(self, run: str, dense_arch: torch.nn.Module,
                shard: torch.nn.Module) -> None:
        pass


def _make_state(cfg: Config, name: str, ddp, group):
    """The DDP comm hook and its state for a run; notes on what was used."""
    if name == "dense":
        return dp_traffic.DenseTraffic(group), dp_traffic.dense_hook, {"exchange": "allreduce"}
    if name == "bf16":
        return dp_traffic.Bf16Traffic(group), dp_traffic.bf16_hook, {"exchange": "allreduce"}
    if name == "powersgd":
        state = dp_traffic.PowerSGDTraffic(group, matrix_approximation_rank=cfg.powersgd_rank,
                                           start_iter=cfg.powersgd_start(), seed=cfg.seed)
        state.name_parameters(ddp.module)
        return state, dp_traffic.powersgd_hook, {"exchange": "powersgd"}
    kwargs = dict(ratio=cfg.dp_ratio, refresh_every=cfg.refresh_every,
                  warmup_steps=cfg.warmup_steps, capacity_factor=cfg.capacity_factor,
                  min_numel=cfg.min_numel, value_dtype=_DTYPES[cfg.dp_value_dtype],
                  module=ddp, backend=cfg.backend)
    if cfg.dp_index_encoding != "int32":
        kwargs["index_encoding"] = cfg.dp_index_encoding
    if cfg.dp_min_k != 1:
        kwargs["min_k"] = cfg.dp_min_k
    notes = {}
    if "exchange" in inspect.signature(dct_dist.DCTState).parameters:
        kwargs["exchange"] = cfg.exchange
        notes["exchange"] = cfg.exchange
    else:
        # DCTState without exchange= (before docs/design.md#exchanges existed): all-gather.
        notes["exchange"] = "allgather"
    return dct_dist.DCTState(group, **kwargs), dct_dist.dct_hook, notes


def _exchange_used(state, configured: str) -> str:
    """The exchange the sparse buckets used (from the counts ``DCTState.stats()`` keeps per
    kind, where it has them), else the configured one."""
    if isinstance(state, dp_traffic.DenseTraffic):
        return configured
    stats = state.stats()
    used = [kind for kind in ("allgather", "reduce_scatter")
            if stats.get(f"buckets_{kind}", 0) > 0]
    return "+".join(used) if used else configured


def _digest(*modules: torch.nn.Module) -> str:
    """sha256 over the names and bytes of every parameter of ``modules``, in order."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            h.update(f"{i}.{name}".encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StopRequested(Exception):
    """Raised on every rank after the step ``stop_after`` names (the tests' stand-in for a
    rank killed mid-run: no report is written, the checkpoints so far stay)."""


def _rng_states() -> dict:
    """Every RNG the training could draw from: torch's (and CUDA's), numpy's global, Python's.
    The batches and the initial weights come from generators seeded afresh from the seed, so
    they need nothing saved."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# The byte counters of the baselines' hook states (dp_traffic), saved and restored as they are.
_TRAFFIC_COUNTERS = ("bytes_sent", "bytes_received", "bytes_ring", "buckets_plain",
                     "buckets_compressed")


def _dp_state_dict(state) -> dict:
    if isinstance(state, dp_traffic.DenseTraffic):
        saved = {k: getattr(state, k) for k in _TRAFFIC_COUNTERS if hasattr(state, k)}
        if isinstance(state, dp_traffic.PowerSGDTraffic):
            saved["powersgd"] = dp_traffic.powersgd_state_dict(state.powersgd)
            saved["bucket_orders"] = dict(state.bucket_orders)
        return saved
    return state.state_dict()


def _load_dp_state(state, saved: dict, device: torch.device) -> None:
    if isinstance(state, dp_traffic.DenseTraffic):
        for k, v in saved.items():
            if k == "powersgd":
                dp_traffic.load_powersgd_state(state.powersgd, v, device)
            elif k == "bucket_orders":
                state.resume_orders = dict(v)
            else:
                setattr(state, k, v)
    else:
        state.load_state_dict(saved)


class _Batches:
    """Global batches of the training split: one pass per epoch in an order drawn from the
    seed, the same on every rank."""

    def __init__(self, num_train: int, batch: int, seed: int):
        self.num_train, self.batch, self.seed = num_train, batch, seed
        self.per_epoch = num_train // batch
        if self.per_epoch < 1:
            raise ValueError(f"batch_size: {batch} exceeds the {num_train} training samples")
        self._epoch, self._order = -1, None

    def rows(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, 3, epoch]).permutation(
                self.num_train)
            self._epoch = epoch
        return self._order[i * self.batch:(i + 1) * self.batch]


class RankRunner:
    """Trains and evaluates the configured runs on this rank; see ``run``."""

    def __init__(self, cfg: Config, data: ClickLogs, device: torch.device, group=None,
                 callbacks: Optional[Callbacks] = None, progress=None):
        self.cfg, self.data, self.device, self.group = cfg, data, device, group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.callbacks = callbacks or Callbacks()
        self.progress = progress
        self.tables = shard_tables(data.table_sizes, self.world)[self.rank]
        self.local = cfg.batch_size // self.world
        # Held-out samples in whole per-rank blocks: at most W - 1 left out.
        self.heldout = data.num_heldout - data.num_heldout % self.world
        self.ids = torch.from_numpy(np.ascontiguousarray(data.ids[:, self.tables]))
        self.dense = torch.from_numpy(data.dense)
        self.labels = torch.from_numpy(data.labels)
        self._own_dp_group = None

    def _powersgd_group(self):
        """A process group of the same ranks for the PowerSGD run's data-parallel part, made
        once (collectively: every rank runs the same runs in the same order).

        torch's ``powerSGD_hook`` issues its P and Q all-reduces from the completion callbacks
        of the one before, i.e. from the backend's threads, while the backward pass goes on to
        the MP all-to-all on the calling thread. gloo pairs the collectives of a group by the
        order they are issued in, and that order would differ between ranks: a hang (seen at
        the first compressed step). On a group of its own, with one bucket (see ``_run``),
        each group's order is the same on every rank."""
        if self._own_dp_group is None:
            ranks = (list(range(self.world)) if self.group is None
                     else dist.get_process_group_ranks(self.group))
            self._own_dp_group = dist.new_group(ranks=ranks)
        return self._own_dp_group

    # ------------------------------------------------------------------------------ pieces

    def _inputs(self, shard, exchange, rows: np.ndarray):
        """The data-parallel part's inputs for this rank's block of the global batch ``rows``
        (W equal blocks): its dense features ``[B, 13]`` and the W tower outputs for its
        samples ``[B, W*H]``, received through ``exchange``."""
        block = len(rows) // self.world
        index = torch.from_numpy(rows)
        act = shard(self.ids.index_select(0, index).to(self.device))
        if torch.is_grad_enabled():
            act = scale_grad(act, 1.0 / self.world)
        received = exchange(act)
        towers = received.view(self.world, block, -1).transpose(0, 1).reshape(block, -1)
        mine = index[self.rank * block:(self.rank + 1) * block]
        return self.dense.index_select(0, mine).to(self.device), towers

    def _evaluate(self, shard, arch, exchange, final: bool) -> Dict[str, float]:
        """Held-out AUC and log loss (scikit-learn), identical on every rank: on the whole
        held-out split when ``final``, else on its first ``eval_subset`` samples (to keep the
        curve cheap)."""
        from sklearn.metrics import log_loss, roc_auc_score

        start = self.data.num_train
        heldout = self.heldout if final else min(self.heldout, self.cfg.eval_subset
                                                 // self.world * self.world)
        chunk = max(self.world, (4 * self.cfg.batch_size) // self.world * self.world)
        mine: List[torch.Tensor] = []
        with torch.no_grad():
            for lo in range(0, heldout, chunk):
                rows = np.arange(start + lo, start + min(lo + chunk, heldout))
                logits = arch.module(*self._inputs(shard, exchange, rows))
                mine.append(torch.sigmoid(logits).float())
        local = torch.cat(mine)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local.to(self.device), group=self.group)
        probs = np.empty(heldout, dtype=np.float64)
        labels = self.data.labels[start:start + heldout]
        # Undo the block layout: in each chunk, rank r scored rows r*block .. (r+1)*block - 1.
        offset = [0] * self.world
        for lo in range(0, heldout, chunk):
            n = min(chunk, heldout - lo)
            block = n // self.world
            for r in range(self.world):
                probs[lo + r * block:lo + (r + 1) * block] = \
                    gathered[r][offset[r]:offset[r] + block].cpu().numpy()
                offset[r] += block
        probs = np.clip(probs, 1e-7, 1 - 1e-7)
        return {"auc": float(roc_auc_score(labels, probs)),
                "logloss": float(log_loss(labels, probs, labels=[0, 1]))}

    # -------------------------------------------------------------------------------- runs

    def run(self, checkpointer: Optional[Checkpointer] = None,
            stop_after: Optional[tuple] = None) -> Dict[str, dict]:
        """Every configured run in turn; {run name: results} (the same on every rank except
        the times, ``step_ms``, ``train_s``, ``eval_s``, ``checkpoint_s`` and the evaluations'
        ``train_s``, which are this rank's). Collective: every rank must call it.

        With a ``checkpointer``: resumes from its newest complete checkpoint (the runs that
        had finished are taken from it, the run in progress continues from its step), writes
        a checkpoint every ``checkpointer.every`` steps of a run and one after each run (the
        finished runs' results, so a restart never repeats a finished run). ``stop_after``
        (run name, step): raise StopRequested after that step (and its checkpoint)."""
        finished: Dict[str, dict] = {}
        start_index, resume = 0, None
        marker = checkpointer.latest() if checkpointer is not None else None
        if marker is not None:
            part = checkpointer.load(marker)
            finished = part["finished"]
            start_index, resume = part["run_index"], part["run_state"]
            if self.rank == 0:
                where = (f"run {part['run']} step {part['step']}" if part["step"]
                         else "the start of run " + (self.cfg.runs[start_index]
                                                     if start_index < len(self.cfg.runs)
                                                     else "(none: every run finished)"))
                print(f"checkpoint: resuming from {marker['path']} ({where})",
                      file=sys.stderr, flush=True)
            if self.progress is not None:
                self.progress.update(start_index * self.cfg.steps
                                     + (resume["step"] if resume else 0))
        for index, name in enumerate(self.cfg.runs):
            if index < start_index:
                continue
            finished[name] = self._run(name, index, finished, checkpointer, stop_after,
                                       resume if index == start_index else None)
            if checkpointer is not None:
                checkpointer.save(index + 1, None, 0, {"finished": finished, "run_state": None})
        if checkpointer is not None:
            checkpointer.wait()
        return {name: finished[name] for name in self.cfg.runs}

    def _run(self, name: str, index: int = 0, finished: Optional[Dict[str, dict]] = None,
             checkpointer: Optional[Checkpointer] = None,
             stop_after: Optional[tuple] = None, resume: Optional[dict] = None) -> dict:
        cfg, world = self.cfg, self.world
        torch.manual_seed(cfg.seed)
        shard = EmbeddingShard(self.tables, self.data.table_sizes, cfg.emb_dim,
                               cfg.tower_width, cfg.seed).to(self.device)
        torch.manual_seed(cfg.seed)  # the same data-parallel weights on every rank
        arch = DenseArch(world, cfg.tower_width, width=cfg.width,
                         vectors=cfg.vectors).to(self.device)
        dp_group, buckets = self.group, {}
        if name == "powersgd":
            # One bucket: several would run their callback chains side by side, in an order
            # that differs between ranks (see _powersgd_group).
            dp_group = self._powersgd_group()
            param_mb = sum(p.numel() * p.element_size() for p in arch.parameters()) / 2**20
            buckets = {"bucket_cap_mb": param_mb + 1}
        ddp = DistributedDataParallel(arch, device_ids=[self.device] if
                                      self.device.type == "cuda" else None,
                                      process_group=dp_group, **buckets)
        state, hook, notes = _make_state(cfg, name, ddp, dp_group)
        ddp.register_comm_hook(state, self.callbacks.dp_hook(name, hook))
        if name == "dct_dp_mp":
            exchange = SparseExchange(cfg.mp_k, self.group, _DTYPES[cfg.mp_value_dtype])
        elif name in ("bf16", "powersgd"):
            exchange = Bf16Exchange(self.group)
        else:
            exchange = DenseExchange(self.group)
        dense_params = list(arch.parameters()) + list(shard.tower.parameters())
        opt = torch.optim.Adam(dense_params, lr=cfg.lr)
        opt_emb = RowWiseAdagrad(list(shard.tables.parameters()), lr=cfg.emb_lr)
        batches = _Batches(self.data.num_train, cfg.batch_size, cfg.seed)
        loss_fn = torch.nn.BCEWithLogitsLoss()

        series = {"step": [], "train_loss": [], "dp_bytes": [], "dp_ring": [], "mp_bytes": [],
                  "mp_dense": [], "overflowed_buckets": [], "buckets_sparse": []}
        # train_s: the training time (the sum of the step times so far) at each evaluation.
        evals = {"step": [], "auc": [], "logloss": [], "train_s": []}
        step_s: List[float] = []
        eval_s = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_count = 0
        checkpoint_s = 0.0
        start = 0
        if resume is not None:
            ddp.module.load_state_dict(resume["arch"])
            shard.load_state_dict(resume["shard"])
            opt.load_state_dict(resume["opt"])
            opt_emb.load_state_dict(resume["opt_emb"])
            _load_dp_state(state, resume["dp"], self.device)
            exchange.bytes_sent, exchange.bytes_dense = resume["exchange"]
            series, evals = resume["series"], resume["evals"]
            step_s, eval_s = resume["step_s"], resume["eval_s"]
            loss_sum.copy_(resume["loss_sum"])
            loss_count, checkpoint_s = resume["loss_count"], resume["checkpoint_s"]
            start = resume["step"]
            _set_rng_states(resume["rng"])
        every = checkpointer.every if checkpointer is not None else None
        for step in range(start, cfg.steps):
            rows = batches.rows(step)
            self.callbacks.step_begin(name, step)
            t0 = time.perf_counter()
            logits = ddp(*self._inputs(shard, exchange, rows))
            block = rows[self.rank * self.local:(self.rank + 1) * self.local]
            labels = self.labels.index_select(0, torch.from_numpy(block)).to(self.device)
            loss = loss_fn(logits, labels)
            opt.zero_grad(set_to_none=True)
            opt_emb.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            opt_emb.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # to time the step, not the queue
            step_s.append(time.perf_counter() - t0)
            self.callbacks.step_end(name, step)
            loss_sum += loss.detach().double()
            loss_count += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                mean_loss = loss_sum.clone()
                dist.all_reduce(mean_loss, group=self.group)
                dp, ring = dp_traffic.dp_totals(state, world)
                over = dp_traffic.overflow_counts(state)
                series["step"].append(done)
                series["train_loss"].append(float(mean_loss) / (loss_count * world))
                series["dp_bytes"].append(dp)
                series["dp_ring"].append(ring)
                series["mp_bytes"].append(exchange.bytes_sent)
                series["mp_dense"].append(exchange.bytes_dense)
                series["overflowed_buckets"].append(over["overflowed_buckets"])
                series["buckets_sparse"].append(over["buckets_sparse"])
                loss_sum.zero_()
                loss_count = 0
            if done % cfg.eval_every == 0 or done == cfg.steps:
                t_eval = time.perf_counter()
                metrics = self._evaluate(shard, ddp, exchange, final=done == cfg.steps)
                eval_s += time.perf_counter() - t_eval
                evals["step"].append(done)
                evals["auc"].append(metrics["auc"])
                evals["logloss"].append(metrics["logloss"])
                evals["train_s"].append(float(np.sum(step_s)))
            if self.progress is not None:
                self.progress.update(1)
                if done % cfg.log_every == 0:
                    self.progress.set_postfix(run=name, loss=f"{series['train_loss'][-1]:.4f}")
            # The last step needs none: the checkpoint after the run follows.
            if every is not None and done % every == 0 and done < cfg.steps:
                run_state = {
                    "step": done, "arch": ddp.module.state_dict(), "shard": shard.state_dict(),
                    "opt": opt.state_dict(), "opt_emb": opt_emb.state_dict(),
                    "dp": _dp_state_dict(state),
                    "exchange": (exchange.bytes_sent, exchange.bytes_dense),
                    "series": series, "evals": evals, "step_s": step_s, "eval_s": eval_s,
                    "loss_sum": loss_sum.cpu(), "loss_count": loss_count,
                    "checkpoint_s": checkpoint_s, "rng": _rng_states()}
                checkpoint_s += checkpointer.save(index, name, done,
                                                  {"finished": finished or {},
                                                   "run_state": run_state})
            if stop_after is not None and stop_after == (name, done):
                if checkpointer is not None:
                    checkpointer.wait()  # a kill after the checkpoint was complete
                raise StopRequested(f"stopped after run {name} step {done}")
        self.callbacks.run_end(name, ddp.module, shard)
        notes["eval_s"] = eval_s
        notes["checkpoint_s"] = checkpoint_s
        notes["resumed_from_step"] = resume["step"] if resume is not None else None
        return self._summary(name, state, exchange, ddp, series, evals, step_s, notes, shard)

    def _summary(self, name, state, exchange, ddp, series, evals, step_s, notes,
                 shard) -> dict:
        cfg, steps = self.cfg, self.cfg.steps
        dp, ring = series["dp_bytes"][-1], series["dp_ring"][-1]
        mp, mp_dense = series["mp_bytes"][-1], series["mp_dense"][-1]
        over = dp_traffic.overflow_counts(state)
        # Steady state: the second half of the run, from the series (logged totals).
        half = next(i for i, s in enumerate(series["step"]) if s >= steps // 2)
        span = series["step"][-1] - series["step"][half]
        steady_dp = (dp - series["dp_bytes"][half]) / span if span else float("nan")
        steady_ring = (ring - series["dp_ring"][half]) / span if span else float("nan")
        # One gather for both: the data-parallel part's digest (the same on every rank when
        # the ranks agree) and this rank's whole model, shard included.
        digests = [None] * self.world
        dist.all_gather_object(digests, (_digest(ddp.module), _digest(ddp.module, shard)),
                               group=self.group)
        final = hashlib.sha256("".join(whole for _, whole in digests).encode()).hexdigest()
        digests = [dp for dp, _ in digests]
        first100 = next((i for i, s in enumerate(series["step"]) if s >= 100), None)
        out = {
            "steps": steps,
            "auc": evals["auc"][-1],
            "logloss": evals["logloss"][-1],
            "dp_bytes_per_step": dp / steps,
            "dp_bytes_ring_per_step": ring / steps,
            "dp_compression": 1.0 if name == "dense" else _ratio(ring, dp),
            "dp_compression_steady": 1.0 if name == "dense" else
            _ratio(steady_ring, steady_dp),
            "mp_bytes_per_step": mp / steps,
            "mp_bytes_dense_per_step": mp_dense / steps,
            "mp_compression": _ratio(mp_dense, mp),
            "step_ms": 1000 * float(np.median(step_s)),
            "step_ms_mean": 1000 * float(np.mean(step_s)),
            "train_s": float(np.sum(step_s)),
            "eval_s": notes["eval_s"],
            "checkpoint_s": notes["checkpoint_s"],
            "dp_overflow_frequency": (over["overflowed_buckets"] / over["buckets_sparse"]
                                      if over["buckets_sparse"] else 0.0),
            "dp_overflowed_buckets": over["overflowed_buckets"],
            "dp_sparse_buckets": over["buckets_sparse"],
            "dp_overflow_entries": over["overflow"],
            "dp_overflowed_buckets_first_100_steps":
                series["overflowed_buckets"][first100] if first100 is not None else None,
            "dp_exchange": _exchange_used(state, notes["exchange"]),
            "ranks_identical": all(d == digests[0] for d in digests),
            # sha256 of the W ranks' digests (rank order) of every parameter they hold.
            "final_params_sha256": final,
            "resumed_from_step": notes["resumed_from_step"],
            "series": series,
            "evals": evals,
        }
        if name == "powersgd":
            out["powersgd"] = {"matrix_approximation_rank": cfg.powersgd_rank,
                               "start_powerSGD_iter": cfg.powersgd_start(),
                               "min_compression_rate": state.powersgd.min_compression_rate,
                               "buckets_plain": state.buckets_plain,
                               "buckets_compressed": state.buckets_compressed}
        if name not in ("dense", "bf16", "powersgd"):
            stats = state.stats()
            out["dp_stats"] = {k: (float(v) if isinstance(v, float) else v)
                               for k, v in stats.items()
                               if isinstance(v, (int, float)) and math.isfinite(v)}
        return out
