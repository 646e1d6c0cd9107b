"""``DCTState``: the configuration of the DCT-DP DDP hook and everything it keeps between steps
(parameter keys, bucket layouts with the per-parameter error feedback and thresholds, the step
counter, statistics) and its checkpoints. The step itself is ``dct_hook``'s (hook.py)."""

import logging
import math
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import ops
from .. import payload as wire
from ..backends import NAMES as BACKEND_NAMES
from . import fingerprint
from .futures import StepOrder
from .layout import BucketLayout, ParamState, ShardPiece
from .regroup import Regroup
from .sizing import EXCHANGES
from .stats import Stats

__all__ = ["DCTState"]

logger = logging.getLogger(__name__)

STATE_DICT_VERSION = 2
# Sparse steps after a load that may still see a fresh DDP's first buckets: a static-graph DDP
# keeps them for its first two iterations, a dynamic one for its first.
_REGROUP_STEPS = 2
_CONFIG_FIELDS = ("ratio", "refresh_every", "warmup_steps", "capacity_factor", "min_numel",
                  "value_dtype", "index_encoding", "refresh_band", "refresh_patience",
                  "exchange", "min_k", "dense_rows", "ramp_steps")


RAMP_START = 0.25  # DGC's first warm-up stage keeps a quarter of the entries


def ramp_stages(ratio: float, warmup_steps: int, ramp_steps: int) -> List[Tuple[int, float]]:
    """(first step, ratio) of every stage after the warm-up: J ramp stages of ratio x 2^J, ...,
    ratio x 2 (J the largest with ratio x 2^J <= RAMP_START), each floor((j + 1) R / J) -
    floor(j R / J) steps long (R = ramp_steps; empty ones left out), then ratio from
    warmup_steps + R. Without a ramp (R = 0, or ratio > RAMP_START / 2): [(warmup_steps,
    ratio)]."""
    doublings = 0
    while ramp_steps and ratio * 2.0 ** (doublings + 1) <= RAMP_START:
        doublings += 1
    stages = []
    for j in range(doublings):
        start = warmup_steps + j * ramp_steps // doublings
        end = warmup_steps + (j + 1) * ramp_steps // doublings
        if end > start:
            stages.append((start, ratio * 2.0 ** (doublings - j)))
    stages.append((warmup_steps + (ramp_steps if doublings else 0), ratio))
    return stages


def _check_number(value, name: str, integral: bool, minimum=None) -> None:
    """A finite int (or number) at least ``minimum``; ValueError naming the argument."""
    kinds = (int,) if integral else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name}: expected {'an int' if integral else 'a number'}, "
                         f"got {value!r}")
    if not integral and not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    if integral and value >= 2 ** 62:  # the cross-rank check carries it in an int64
        raise ValueError(f"{name}: must be < 2^62, got {value}")


def _named_parameters(module) -> List[Tuple[str, torch.Tensor]]:
    """``module``'s (name, parameter) pairs; ValueError naming ``module`` for anything else."""
    if isinstance(module, torch.nn.Module):
        return list(module.named_parameters())
    if isinstance(module, (str, bytes, dict)) or not hasattr(module, "__iter__"):
        raise ValueError(f"module: expected an nn.Module or an iterable of (name, parameter) "
                         f"pairs (of a dict, its .items()), got {type(module).__name__}")
    pairs = list(module)
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and
                isinstance(pair[0], str) and isinstance(pair[1], torch.Tensor)):
            raise ValueError(f"module: expected (name, parameter) pairs, got an item of type "
                             f"{type(pair).__name__}")
    return [(name, param) for name, param in pairs]


def _streak(entry: Dict[str, Any]) -> torch.Tensor:
    return torch.tensor([int(entry.get("excursion_streak", 0))], dtype=torch.int32)


def _saved_scalar(entry: Dict[str, Any], field: str) -> Optional[torch.Tensor]:
    value = entry.get(field)
    return None if value is None else value.to(torch.float32).reshape(1).clone()


def _scalar_of(state, attribute: str) -> Optional[torch.Tensor]:
    value = getattr(state, attribute)
    return None if value is None else value.detach().cpu().clone().reshape(1)


def _dtype_code(dtype: Optional[torch.dtype]) -> int:
    return wire.value_code(dtype) if dtype in wire.WIRE_VALUE_DTYPES else -1


class DCTState:
    """State of the DCT-DP communication hook: configuration, per-parameter error feedback and
    thresholds, step counter and statistics. Pass it with ``dct_hook`` to
    ``DistributedDataParallel.register_comm_hook``.

    Args:
        process_group: the group to communicate in (default: the world, looked up at the first
            step).
        ratio: fraction of each parameter's entries to send, in (0, 1]: each sparse parameter
            of n elements gets k = min(n, max(min_k, ceil(ratio x n))) (the product in
            float64) and a
            threshold τ, the exact k-th largest magnitude of its (gradient + residual) at an
            exact refresh and in between a per-step estimate of it from a fixed sample of
            about 32 / ratio entries, scaled by a factor corrected from the kept counts toward
            k (see ``threshold_rule``); never below 2^-149 (so exact zeros are never sent).
        refresh_every: recompute every τ exactly at least every this many steps (>= 1).
        warmup_steps: the first steps are plain dense all-reduces (>= 0).
        ramp_steps: after the warm-up, the ratio falls geometrically over this many steps
            (>= 0; 0: no ramp), DGC's warm-up: in stages of equal length whose ratios halve
            from the largest ratio x 2^j that is at most 0.25 down to 2 x ratio, then ratio
            (at ratio 0.01: 0.16, 0.08, 0.04, 0.02). Each stage sizes its own bucket layouts
            (wire capacities, shards) and starts with an exact refresh of every τ; residuals
            carry over. It costs bytes (the J stages keep (2^(J + 1) - 2) / J times the ratio's
            entries on average: 7.5x at ratio 0.01, J = 4) and buys the early curve back
            (docs/distributed.md, "Quality on transformers").
        capacity_factor: the wire buffer of a bucket holds the sum of
            min(n, ceil(k x capacity_factor)) entries over its sparse parameters (>= 1);
            entries that pass τ but do not fit stay in the residual and are counted as
            overflow.
        min_numel: parameters with fewer elements are sent dense, in one batched all-reduce per
            bucket (>= 0). 0 sends every parameter sparse (``dense_rows`` included).
        dense_rows: with min_numel > 0, a parameter of two or more dimensions whose first
            dimension (its rows) is at most this is sent dense too, whatever its size (>= 0;
            0: by size alone). Such tables are a few vectors, each a bias of many inputs: a
            token-type embedding [2, hidden], a classifier head [classes, hidden]. Sent sparse
            at ratio 0.01, the [2, 512] token-type table of a BERT-style classifier alone kept
            it at chance for 1000 steps where plain DDP reached 0.955 (0.930 with the table
            dense; docs/distributed.md, "Quality on transformers"). 1-D parameters are decided
            by size.
        min_k: every sparse parameter keeps at least min(min_k, n) entries a step (>= 1): at a
            small ratio a bias or a small layer would otherwise move one entry a step (in the
            DLRM at ratio 0.003, min_k = 4 took the 4-rank AUC gap from -0.0023 to -0.0015 over
            three seeds for 1% more bytes; docs/distributed.md). No extra collective, unlike
            min_numel.
        value_dtype: wire dtype of the sent values: None (the gradient's dtype), torch.float32,
            torch.float16, torch.bfloat16 or torch.float8_e4m3fn (one power-of-two scale per
            parameter, chosen so that nothing saturates; see docs/design.md, "Wire format
            version 2"). fp16/bf16 saturate finite values; the rounding error stays in the
            residual.
        index_encoding: "int32" (default) or "delta": uint16 gaps between the kept positions
            (with escapes for gaps beyond 65535), half the index bytes. With fp8 values and
            "delta" a kept entry costs 3 bytes on the wire instead of 6 (int32 + bf16).
        refresh_band: (low, high) with 0 <= low <= 1 <= high: a bucket's step is out of band
            when its summed kept-count average exceeds the sum of floor(high x k) over its
            sparse parameters, or its payload overflowed, or the average summed over the
            parameters whose τ is above 2^-149 falls below their sum of ceil(low x k).
            high=None means capacity_factor.
        refresh_patience: a bucket's τ are recomputed exactly ahead of schedule (on the next
            step) once the bucket has been out of band for this many consecutive steps
            (>= 1); between refreshes the per-step correction keeps kept counts near k.
        exchange: "allgather", "reduce_scatter" or "auto" (default): how a bucket's payloads
            cross the network (see docs/distributed.md). "auto" takes, per bucket, whichever
            moves fewer bytes per rank for its layout and the world size
            (``sizing.Plan.choose``: reduce_scatter only when it moves at most 0.9 of
            allgather's bytes, as allgather needs one collective instead of two).
        module: optional ``nn.Module`` (the model or the DDP wrapper) or iterable of
            (name, parameter): parameters are then keyed by name. Without it they are keyed
            "param.0", "param.1", ... in the order the hook first sees them, which is the same
            in every run of the same model and DDP configuration; names are sturdier for
            checkpoints.
        validate: check received payloads on the host (synchronizes every step; for
            debugging). By default bad payloads are skipped and counted in the ops' device-side
            error counter (``dct_kernels.payload_errors``), which ``stats()`` reports as
            ``payload_errors``.
        backend: kernel backend for the ops (one of ``dct_kernels.backends.NAMES``; default:
            chosen per device as the ops choose it). Not part of the cross-rank check: backends
            are bitwise interchangeable.

    Raises:
        ValueError naming the argument for a value out of range or of the wrong type.

    Every rank must use the same arguments (except ``backend`` and ``validate``): the first
    step of every bucket layout checks it and raises on every rank when they differ.
    Checkpointing: ``state_dict()`` / ``load_state_dict()`` (the process group is not saved).
    Statistics: ``stats()``.
    """

    def __init__(self, process_group=None, *, ratio: float = 0.01, refresh_every: int = 1000,
                 warmup_steps: int = 10, ramp_steps: int = 0, capacity_factor: float = 1.5,
                 min_numel: int = 1024, min_k: int = 1, dense_rows: int = 8,
                 value_dtype: Optional[torch.dtype] = None, index_encoding: str = "int32",
                 refresh_band: Tuple[float, Optional[float]] = (0.5, None),
                 refresh_patience: int = 32, exchange: str = "auto",
                 module: Union[torch.nn.Module, Iterable[Tuple[str, torch.Tensor]], None] = None,
                 validate: bool = False, backend: Optional[str] = None):
        _check_number(ratio, "ratio", integral=False)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
        _check_number(refresh_every, "refresh_every", integral=True, minimum=1)
        _check_number(warmup_steps, "warmup_steps", integral=True, minimum=0)
        _check_number(ramp_steps, "ramp_steps", integral=True, minimum=0)
        _check_number(capacity_factor, "capacity_factor", integral=False, minimum=1)
        _check_number(min_numel, "min_numel", integral=True, minimum=0)
        _check_number(min_k, "min_k", integral=True, minimum=1)
        _check_number(dense_rows, "dense_rows", integral=True, minimum=0)
        _check_number(refresh_patience, "refresh_patience", integral=True, minimum=1)
        if value_dtype is not None and \
                not any(value_dtype is d for d in wire.WIRE_VALUE_DTYPES):
            raise ValueError(f"value_dtype: expected None, torch.float32, torch.float16, "
                             f"torch.bfloat16 or torch.float8_e4m3fn, got {value_dtype!r}")
        if index_encoding not in wire.INDEX_ENCODINGS:
            raise ValueError(f"index_encoding: expected 'int32' or 'delta', "
                             f"got {index_encoding!r}")
        if backend is not None and backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected None or one of {BACKEND_NAMES}, "
                             f"got {backend!r}")
        if not isinstance(exchange, str) or exchange not in EXCHANGES:
            raise ValueError(f"exchange: expected one of {EXCHANGES}, got {exchange!r}")
        if not isinstance(refresh_band, (tuple, list)) or len(refresh_band) != 2:
            raise ValueError(f"refresh_band: expected (low, high), got {refresh_band!r}")
        low, high = refresh_band
        high = capacity_factor if high is None else high
        _check_number(low, "refresh_band", integral=False)
        _check_number(high, "refresh_band", integral=False)
        if not 0 <= low <= 1 <= high:
            raise ValueError(f"refresh_band: expected 0 <= low <= 1 <= high, got "
                             f"({low}, {high})")
        if not isinstance(validate, bool):
            raise ValueError(f"validate: expected True or False, got {validate!r}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(f"process_group: expected None or a ProcessGroup, got "
                             f"{type(process_group).__name__}")
        pairs = _named_parameters(module) if module is not None else []

        # Tunables (identical on every rank: checked at the first step of every bucket layout).
        self.process_group = process_group
        self.ratio = float(ratio)
        self.refresh_every = int(refresh_every)
        self.warmup_steps = int(warmup_steps)
        self.ramp_steps = int(ramp_steps)
        self._stages = ramp_stages(self.ratio, self.warmup_steps, self.ramp_steps)
        self.capacity_factor = float(capacity_factor)
        self.min_numel = int(min_numel)
        self.min_k = int(min_k)
        self.dense_rows = int(dense_rows)
        self.value_dtype = value_dtype
        self.index_encoding = index_encoding
        self.refresh_band = (float(low), float(high))
        self.refresh_patience = int(refresh_patience)
        self.exchange = exchange
        self.validate = bool(validate)
        self.backend = backend

        # Parameter keys: by name when given, else by order of first appearance. The
        # parameters are held so that their ids stay theirs.
        self._named = module is not None
        self._unpickled = False  # keyed by name, but the names' parameters are not known
        self._key_of: Dict[int, str] = {}
        self._numel_of: Dict[str, int] = {}  # name -> elements, with module=
        self._held: List[torch.Tensor] = []
        for name, param in pairs:
            self._key_of.setdefault(id(param), name)
            self._numel_of.setdefault(name, param.numel())
            self._held.append(param)

        # What the hook keeps between steps (read and advanced by dct_hook).
        self.step = 0  # completed iterations (the hook advances it at each last bucket)
        self._states: Dict[str, ParamState] = {}  # key -> residual, τ, schedule
        # (keys, dtype, device, ratio: None for a bucket of dense parameters) -> layout
        self.layouts: Dict[tuple, BucketLayout] = {}
        self.exchanges: Dict[int, object] = {}  # id(layout) -> its exchange object
        self.order: Optional[StepOrder] = None  # the current step's issue order
        self.statistics = Stats()
        # The bucket layouts a loaded checkpoint had (their keys in order, in the saved order:
        # a dict, so that every rank iterates them alike) and the step they apply to: the
        # first after ``load_state_dict`` (see ``regroup_for_step``), with the buckets held on
        # that step.
        self._saved_layouts: Dict[tuple, None] = {}
        self._saved_layouts_step = -1
        self._regroup: Optional[Regroup] = None
        self._regroup_step = -1

        logger.info("DCTState: %s", self.config())

    # ------------------------------------------------------------------------ configuration

    def config(self) -> Dict[str, Any]:
        """The tunables, as saved in ``state_dict`` (value_dtype as a string)."""
        return {"ratio": self.ratio, "refresh_every": self.refresh_every,
                "warmup_steps": self.warmup_steps, "capacity_factor": self.capacity_factor,
                "min_numel": self.min_numel, "value_dtype": str(self.value_dtype),
                "index_encoding": self.index_encoding,
                "refresh_band": list(self.refresh_band),
                "refresh_patience": self.refresh_patience, "exchange": self.exchange,
                "min_k": self.min_k, "dense_rows": self.dense_rows,
                "ramp_steps": self.ramp_steps}

    def group(self):
        """The process group the hook communicates in."""
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def fingerprint(self, layout: BucketLayout) -> List[int]:
        """The int64 words of the cross-rank check of ``layout`` (see ``fingerprint.FIELDS``):
        the tunables, the bucket's layout as this rank sees them, and the step (ranks that
        resumed from different checkpoints would otherwise pass, one of them in its warm-up
        while another sends sparse)."""
        codes = fingerprint.EXCHANGE_CODES
        return [fingerprint.MAGIC, fingerprint.VERSION, fingerprint.float_bits(self.ratio),
                self.refresh_every, self.warmup_steps,
                fingerprint.float_bits(self.capacity_factor), self.min_numel,
                _dtype_code(self.value_dtype),
                fingerprint.float_bits(self.refresh_band[0]),
                fingerprint.float_bits(self.refresh_band[1]), layout.numel,
                layout.num_segments, fingerprint.checksum(layout.numels),
                fingerprint.checksum(layout.keys) if self._named else 0,
                _dtype_code(layout.dtype), layout.capacity, codes[self.exchange],
                codes[layout.exchange], layout.plan.shard_capacity, self.refresh_patience,
                wire.index_code(self.index_encoding), self.min_k, self.dense_rows,
                self.ramp_steps, fingerprint.float_bits(layout.ratio), self.step]

    # ------------------------------------------------------------------ the ratio's schedule

    def ratio_at(self, step: int) -> float:
        """The ratio the bucket layouts of ``step`` are sized for: a ramp stage's, else
        ``ratio``."""
        return self._stage_of(step)[1]

    def stage_start(self, step: int) -> int:
        """The first step of ``step``'s stage (the ramp's stages, then the steady one from
        warmup_steps + ramp_steps): every τ is recomputed exactly at its first sparse step."""
        return self._stage_of(step)[0]

    def _stage_of(self, step: int) -> Tuple[int, float]:
        current = self._stages[0]
        for stage in self._stages[1:]:
            if stage[0] > step:
                break
            current = stage
        return current

    # ------------------------------------------------------------------ parameters, layouts

    def sends_sparse(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s gradient is thresholded (else it travels dense, in the bucket's
        batched all-reduce): at least ``min_numel`` elements and, with min_numel > 0, not a
        table of at most ``dense_rows`` rows (two or more dimensions, the first at most
        dense_rows). Depends on the shape only, so a parameter is sparse or dense in every
        bucket layout it ever lands in."""
        if param.numel() < self.min_numel:
            return False
        few_rows = param.dim() >= 2 and param.shape[0] <= self.dense_rows
        return not (self.min_numel > 0 and few_rows)

    def key_of(self, param: torch.Tensor) -> str:
        """The stable key of a parameter: its name (with ``module=``), else "param.<i>" in
        order of first sight.

        Raises:
            ValueError when names were given and ``param`` is not among them.
        """
        key = self._key_of.get(id(param))
        if key is not None:
            return key
        if self._unpickled:
            raise ValueError("module: this DCTState was unpickled from one that keyed its "
                             "parameters by name, and a pickle does not hold the model: make "
                             "DCTState(..., module=model) and load_state_dict(the unpickled "
                             "state's state_dict()) into it")
        if self._named:
            raise ValueError(f"module: a bucket holds a parameter of shape "
                             f"{tuple(param.shape)} that is not among the named parameters "
                             f"DCTState was given")
        key = f"param.{len(self._key_of)}"
        self._key_of[id(param)] = key
        self._held.append(param)
        return key

    def _param_state(self, key: str, numel: int, device: torch.device) -> ParamState:
        state = self._states.get(key)
        if state is None:
            state = ParamState(key, numel,
                               torch.zeros(numel, dtype=torch.float32, device=device),
                               torch.zeros(1, dtype=torch.float32, device=device))
            self._states[key] = state
        elif state.numel != numel:
            raise ValueError(f"parameter {key!r}: {numel} elements, but its saved state has "
                             f"{state.numel}")
        return state

    def is_saved_layout(self, keys: List[str]) -> bool:
        """Whether ``keys`` (in order) are a bucket layout of the loaded checkpoint."""
        return tuple(keys) in self._saved_layouts

    def regroup_for_step(self) -> Optional[Regroup]:
        """The held buckets of this step (see ``regroup``) while the steps after
        ``load_state_dict`` still see buckets other than the checkpoint's layouts, else None.

        A fresh DDP runs its first iteration (a static-graph DDP its first two) with its
        initial buckets (registration order) and only then rebuilds them as the checkpointed
        run had them; until then each step steps the checkpoint's layouts, so that it cuts the
        same reduce_scatter shards and an overflowing payload keeps the same entries as the
        uninterrupted run. The first step whose buckets are all saved layouts ends this, and so
        does the third sparse step after the load whatever DDP does (buckets that never
        become the saved ones, e.g. another ``bucket_cap_mb``, are then stepped as they are)."""
        if (not self._saved_layouts or self.step < self.warmup_steps
                or self.step >= self._saved_layouts_step + _REGROUP_STEPS
                + max(0, self.warmup_steps - self._saved_layouts_step)):
            return None
        if self._regroup is None or self._regroup_step != self.step:
            self._regroup = Regroup({key: keys for keys in self._saved_layouts
                                     for key in keys})
            self._regroup_step = self.step
        return self._regroup

    def end_regroup(self) -> None:
        """A step saw only the checkpoint's layouts: DDP has rebuilt its buckets; no more
        regrouping."""
        self._saved_layouts = {}
        self._regroup = None

    def adopt(self, layout: BucketLayout) -> None:
        """Make ``layout`` the owner of its sparse parameters' states (created at their first
        sight), moving residuals, thresholds and pending flags out of the layouts that held
        them; layouts left owning nothing (buckets DDP rebuilt away) are dropped."""
        if not layout.has_sparse or layout.owns_all():
            return
        # Flags staged by the old owners are collected before their states move.
        for other in self.layouts.values():
            other.collect_flags()
        layout.adopt([self._param_state(key, n, layout.device) if s else None
                      for key, n, s in zip(layout.keys, layout.numels, layout.sparse)])
        for ident, other in list(self.layouts.items()):
            if other.has_sparse and other.owned == 0 and other is not layout:
                self.exchanges.pop(id(other), None)
                del self.layouts[ident]

    def add_layout(self, ident: tuple, layout: BucketLayout) -> None:
        """Keep a new ``layout`` under ``ident``, dropping the layouts of dense parameters only
        that it replaces (any holding one of its parameters: DDP rebuilt its buckets). Those
        have no state to hand over; layouts with sparse parameters are dropped by ``adopt``
        once they own nothing."""
        keys = set(layout.keys)
        for old, other in list(self.layouts.items()):
            if not other.has_sparse and keys.intersection(other.keys):
                self.exchanges.pop(id(other), None)
                del self.layouts[old]
        self.layouts[ident] = layout

    # -------------------------------------------------------------------------- statistics

    def stats(self) -> Dict[str, float]:
        """Totals since construction, ``reset_stats`` or the loaded checkpoint (except
        ``steps``, the hook's step counter, which ``reset_stats`` leaves alone, and
        ``payload_errors``, read from the process's device counters and not checkpointed).

        Traffic, per rank, as docs/design.md counts it, over every collective of the hook (dense
        warm-up steps and small dense parameters included; not the one-off agreement check of
        a new bucket layout): ``bytes_sent``, ``bytes_received`` (an all-gather of N bytes per
        rank: N sent, (W - 1) N received; an all-to-all: the rows to and from the other ranks;
        an all-reduce of M bytes as a ring: 2 (W - 1) / W M each way), ``bytes_ring`` (what a
        ring all-reduce of the same buckets in their dtype would send plus receive,
        4 (W - 1) / W x bucket bytes) and ``compression`` = bytes_ring / (bytes_sent +
        bytes_received) (0.0 when nothing moved; at W = 1 the ring moves nothing, so 0.0).

        Other keys: ``steps`` (completed iterations); ``buckets_sparse`` / ``buckets_dense``
        and ``buckets_allgather`` / ``buckets_reduce_scatter`` (bucket exchanges of each
        kind); ``elements_sparse`` (elements of sparse parameters in the sparse exchanges);
        ``kept`` (entries this rank sent in the first stage) and ``kept_density`` (kept /
        elements_sparse); ``refreshes`` (τ computations, per parameter), ``bucket_refreshes``,
        ``early_refreshes`` (bucket refreshes triggered by the band or by overflow);
        ``overflow`` (entries that passed τ but did not fit) and ``overflowed_buckets``;
        ``shard_kept``, ``shard_overflow``, ``shard_refreshes`` (the second stage of
        reduce_scatter on this rank's shards; refreshes per bucket); ``payload_errors`` (bad
        received entries skipped, from ``dct_kernels.payload_errors`` of the devices used).

        Sync: reads device counters, so it synchronizes; call it when logging.
        """
        out = self.statistics.as_dict()
        out["steps"] = self.step
        devices = {layout.device for layout in self.layouts.values()}
        out["payload_errors"] = sum(int(ops.payload_errors(d)) for d in devices)
        return out

    def reset_stats(self) -> None:
        """Zero the statistics (not the step counter or any error-feedback state), and the
        payload error counters of the devices in use."""
        world = self.statistics.world
        self.statistics.reset()
        self.statistics.world = world
        for device in {layout.device for layout in self.layouts.values()}:
            ops.reset_payload_errors(device)

    # ------------------------------------------------------------------------ checkpointing

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit, on the CPU.

        Format (version 2)::

            {"version": 2, "config": {...the tunables...}, "step": int,
             "params": {key: {"numel": int, "residual": fp32 tensor [numel],
                              "threshold": fp32 tensor [1], "refreshed_at": int (-1: never),
                              "refresh_pending": bool, "excursion_streak": int,
                              "count_average": fp32 tensor [1] or None,
                              "threshold_scale": fp32 tensor [1] or None,
                              "shard": None or {"start": int, "residual": fp32 [n],
                                                "threshold": fp32 [1], "refreshed_at": int,
                                                "refresh_pending": bool,
                                                "excursion_streak": int,
                                                "count_average": fp32 [1] or None,
                                                "threshold_scale": fp32 [1] or None}}},
             "stats": {counter: int}, "layouts": [[key, ...], ...]}

        "layouts" is the parameter order of each bucket layout (see ``regroup_for_step``).
        "excursion_streak", "count_average" and "threshold_scale" are the threshold rule's
        state (consecutive out-of-band steps of the bucket; the parameter's kept-count
        average and the scale ρ of its sampled τ, None before its first sparse step);
        "threshold" is the τ of the last step. Version 1 (before the per-step correction)
        loads with streaks of 0, averages started at k and scales at 1, as does a version 2
        without "threshold_scale".

        Keys are parameter names (with ``module=``) or "param.<i>" in order of first sight.
        "shard" is this rank's reduce_scatter piece of the parameter (its second-level error
        feedback), so each rank saves its own state_dict. Reads device state (synchronizes).
        """
        for layout in self.layouts.values():
            layout.collect_flags()
        params = {}
        for key, state in self._states.items():
            piece = state.shard
            shard = None if piece is None else {
                "start": piece.start, "residual": piece.residual.detach().cpu().clone(),
                "threshold": piece.threshold.detach().cpu().clone().reshape(1),
                "refreshed_at": piece.refreshed_at, "refresh_pending": bool(piece.pending),
                "excursion_streak": int(piece.streak.item()),
                "count_average": _scalar_of(piece, "average"),
                "threshold_scale": _scalar_of(piece, "scale")}
            params[key] = {"numel": state.numel,
                           "residual": state.residual.detach().cpu().clone().reshape(-1),
                           "threshold": state.threshold.detach().cpu().clone().reshape(1),
                           "refreshed_at": state.refreshed_at,
                           "refresh_pending": bool(state.pending),
                           "excursion_streak": int(state.streak.item()),
                           "count_average": _scalar_of(state, "average"),
                           "threshold_scale": _scalar_of(state, "scale"), "shard": shard}
        layouts = [list(layout.keys) for layout in self.layouts.values() if layout.has_sparse]
        if not self.layouts:  # loaded and saved again before a step: the loaded layouts
            layouts = [list(keys) for keys in self._saved_layouts]
        return {"version": STATE_DICT_VERSION, "config": self.config(), "step": self.step,
                "params": params, "stats": self.statistics.state_dict(),
                "layouts": layouts}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a ``state_dict()``: step, statistics and every parameter's residual, τ,
        shard piece and refresh schedule. Call it between steps (e.g. before the first step of
        the resumed run) on every rank: the bucket layouts are rebuilt, and checked across
        ranks, at the next step.

        Raises:
            ValueError when the saved configuration differs from this state's (a resumed run
            must use the same tunables to continue exactly), the version is unknown, an entry
            is malformed, a parameter's size differs, or (with ``module=``) a saved parameter
            is not among the named ones: its residual would be lost without a word (names
            from the DDP wrapper are "module."-prefixed, the model's are not; to drop the
            state of a parameter the model no longer has, delete its entry from
            ``state_dict["params"]`` first).
        """
        if state_dict.get("version") not in (1, STATE_DICT_VERSION):
            raise ValueError(f"state_dict: version {state_dict.get('version')!r}, expected "
                             f"1 or {STATE_DICT_VERSION}")
        saved, mine = state_dict["config"], self.config()
        # A field missing from an older checkpoint has the value that checkpoint ran with:
        # min_k 1, dense_rows 0 (size alone), ramp_steps 0; "exchange" predates nothing a
        # resumed run could differ in.
        older = {"min_k": 1, "dense_rows": 0, "ramp_steps": 0}
        was = {name: saved.get(name, older.get(name, mine[name])) for name in _CONFIG_FIELDS}
        differing = [f"{name}: saved {was[name]!r}, this state {mine[name]!r}"
                     for name in _CONFIG_FIELDS if was[name] != mine[name]]
        if differing:
            raise ValueError("state_dict: the saved configuration differs: " +
                             "; ".join(differing))
        if self._named and not self._unpickled:
            unknown = sorted(key for key in state_dict["params"] if key not in self._numel_of)
            if unknown:
                raise ValueError(f"state_dict: {len(unknown)} saved parameters are not among "
                                 f"the named parameters (module=), e.g. {unknown[:3]}; their "
                                 f"residuals would be lost")
        loaded = {}
        for key, entry in state_dict["params"].items():
            try:
                loaded[key] = self._loaded_param(key, entry)
            except (KeyError, TypeError, AttributeError, RuntimeError) as error:
                raise ValueError(f"state_dict: parameter {key!r}: malformed entry "
                                 f"({type(error).__name__}: {error})") from error
        # The layouts are rebuilt at the next step and adopt the loaded states.
        for state in self._states.values():
            state.owner, state.slot = None, -1
        self.layouts.clear()
        self.exchanges.clear()
        self._states.update(loaded)
        self.step = int(state_dict["step"])
        # With names, a saved layout holding a parameter the model no longer has cannot be
        # stepped again (the model changed: there is no uninterrupted run to follow); its
        # other parameters are stepped in the fresh buckets' own layouts.
        self._saved_layouts = {
            tuple(keys): None for keys in state_dict.get("layouts", [])
            if not (self._named and not self._unpickled)
            or all(key in self._numel_of for key in keys)}
        self._saved_layouts_step = self.step
        self._regroup = None
        self.statistics.load_state_dict(state_dict.get("stats", {}))

    def _loaded_param(self, key: str, entry: Dict[str, Any]) -> ParamState:
        """One saved parameter's state, checked against its size here (ValueError)."""
        numel = int(entry["numel"])
        residual = entry["residual"].to(torch.float32).reshape(-1)
        if residual.numel() != numel:
            raise ValueError(f"state_dict: parameter {key!r} has a residual of "
                             f"{residual.numel()} elements, expected {numel}")
        current = self._states.get(key)
        mine = current.numel if current is not None else self._numel_of.get(key, numel)
        if mine != numel:
            raise ValueError(f"state_dict: parameter {key!r} has {numel} elements, "
                             f"this model's has {mine}")
        shard = entry.get("shard")
        piece = None
        if shard is not None:
            piece = ShardPiece(int(shard["start"]),
                               shard["residual"].to(torch.float32).reshape(-1).clone(),
                               shard["threshold"].to(torch.float32).reshape(1).clone(),
                               int(shard["refreshed_at"]), bool(shard["refresh_pending"]),
                               _streak(shard), _saved_scalar(shard, "count_average"),
                               _saved_scalar(shard, "threshold_scale"))
            if piece.start < 0 or piece.start + piece.numel > numel:
                raise ValueError(f"state_dict: parameter {key!r} has a shard piece "
                                 f"outside its {numel} elements")
        return ParamState(key, numel, residual.clone(),
                          entry["threshold"].to(torch.float32).reshape(1).clone(),
                          int(entry["refreshed_at"]), bool(entry["refresh_pending"]), piece,
                          _streak(entry), _saved_scalar(entry, "count_average"),
                          _saved_scalar(entry, "threshold_scale"))

    def __getstate__(self) -> Dict[str, Any]:
        """Pickle support (e.g. a checkpoint holding the state object): the tunables,
        ``validate``, ``backend`` and ``state_dict()``; the process group and the parameters
        are not kept. A state keyed by name (``module=``) comes back keyed by name: stepping
        it raises ValueError naming ``module`` (a pickle has no model to map names to);
        load its ``state_dict()`` into ``DCTState(..., module=model)``."""
        return {"config": self.config(), "named": self._named,
                "validate": self.validate, "backend": self.backend,
                "state_dict": self.state_dict()}

    def __setstate__(self, saved: Dict[str, Any]) -> None:
        config = dict(saved["config"])
        dtypes = {str(d): d for d in (None,) + wire.WIRE_VALUE_DTYPES}
        config["value_dtype"] = dtypes[config["value_dtype"]]
        config["refresh_band"] = tuple(config["refresh_band"])
        self.__init__(**config, validate=saved.get("validate", False),
                      backend=saved.get("backend"))
        self._named = self._unpickled = bool(saved["named"])
        self.load_state_dict(saved["state_dict"])
