"""``DCTState``: the configuration and all per-parameter state of the DCT-DP DDP hook."""

import logging
import math
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .. import payload as wire
from . import fingerprint
from .layout import BucketLayout, ParamState
from .stats import Stats

__all__ = ["DCTState"]

logger = logging.getLogger(__name__)

STATE_DICT_VERSION = 1
_VALUE_DTYPE_CODES = {None: -1, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CONFIG_FIELDS = ("ratio", "refresh_every", "warmup_steps", "capacity_factor", "min_numel",
                  "value_dtype", "refresh_band")


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


class DCTState:
    """State of the DCT-DP communication hook: configuration, per-parameter error feedback and
    thresholds, step counter and statistics. Pass it with ``dct_hook`` to
    ``DistributedDataParallel.register_comm_hook``.

    Args:
        process_group: the group to communicate in (default: the world, looked up at the first
            step).
        ratio: fraction of each parameter's entries to send, in (0, 1]: each sparse parameter
            of n elements gets k = max(1, ceil(ratio x n)) (the product in float64) and a
            threshold τ, the exact k-th largest magnitude of its (gradient + residual) when τ
            is computed.
        refresh_every: recompute every τ at least every this many steps (>= 1).
        warmup_steps: the first steps are plain dense all-reduces (>= 0).
        capacity_factor: the wire buffer of a bucket holds the sum of
            min(n, ceil(k x capacity_factor)) entries over its sparse parameters (>= 1);
            entries that pass τ but do not fit stay in the residual and are counted as
            overflow.
        min_numel: parameters with fewer elements are sent dense, in one batched all-reduce per
            bucket (>= 0).
        value_dtype: wire dtype of the sent values: None (the gradient's dtype), torch.float32,
            torch.float16 or torch.bfloat16. fp16/bf16 saturate finite values; the rounding
            error stays in the residual.
        refresh_band: (low, high) with 0 <= low <= 1 <= high: a bucket's τ are recomputed
            early (on the next step) when a parameter's kept count falls below low x k or rises
            above high x k, or when the bucket's payload overflowed. high=None means
            capacity_factor.
        module: optional ``nn.Module`` (the model or the DDP wrapper) or iterable of
            (name, parameter): parameters are then keyed by name. Without it they are keyed
            "param.0", "param.1", ... in the order the hook first sees them, which is the same
            in every run of the same model and DDP configuration; names are sturdier for
            checkpoints.
        validate: check received payloads on the host (synchronizes every step; for
            debugging). By default bad payloads are skipped and counted in the device-side
            error counter that ``stats()`` reports as ``payload_errors``.
        backend: kernel backend for the ops ("cuda", "triton", "torch"; default: chosen per
            device as the ops choose it). Not part of the cross-rank check: backends are
            bitwise interchangeable.

    Raises:
        ValueError naming the argument for a value out of range or of the wrong type.

    Checkpointing: ``state_dict()`` / ``load_state_dict()`` (the process group is not saved).
    Statistics: ``stats()``.
    """

    def __init__(self, process_group=None, *, ratio: float = 0.01, refresh_every: int = 1000,
                 warmup_steps: int = 10, capacity_factor: float = 1.5, min_numel: int = 1024,
                 value_dtype: Optional[torch.dtype] = None,
                 refresh_band: Tuple[float, Optional[float]] = (0.5, None),
                 module: Union[torch.nn.Module, Iterable[Tuple[str, torch.Tensor]], None] = None,
                 validate: bool = False, backend: Optional[str] = None):
        _check_number(ratio, "ratio", integral=False)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
        _check_number(refresh_every, "refresh_every", integral=True, minimum=1)
        _check_number(warmup_steps, "warmup_steps", integral=True, minimum=0)
        _check_number(capacity_factor, "capacity_factor", integral=False, minimum=1)
        _check_number(min_numel, "min_numel", integral=True, minimum=0)
        if not any(value_dtype is known for known in _VALUE_DTYPE_CODES):
            raise ValueError(f"value_dtype: expected None, torch.float32, torch.float16 or "
                             f"torch.bfloat16, got {value_dtype!r}")
        if backend is not None and backend not in ("cuda", "triton", "torch"):
            raise ValueError(f"backend: expected None, 'cuda', 'triton' or 'torch', "
                             f"got {backend!r}")
        if not isinstance(refresh_band, (tuple, list)) or len(refresh_band) != 2:
            raise ValueError(f"refresh_band: expected (low, high), got {refresh_band!r}")
        low, high = refresh_band
        high = capacity_factor if high is None else high
        _check_number(low, "refresh_band", integral=False)
        _check_number(high, "refresh_band", integral=False)
        if not 0 <= low <= 1 <= high:
            raise ValueError(f"refresh_band: expected 0 <= low <= 1 <= high, got "
                             f"({low}, {high})")

        # Tunables (identical on every rank: checked at the first step of every bucket layout).
        self.process_group = process_group
        self.ratio = float(ratio)
        self.refresh_every = int(refresh_every)
        self.warmup_steps = int(warmup_steps)
        self.capacity_factor = float(capacity_factor)
        self.min_numel = int(min_numel)
        self.value_dtype = value_dtype
        self.refresh_band = (float(low), float(high))
        self.validate = bool(validate)
        self.backend = backend

        # Parameter keys: by name when given, else by order of first appearance. The
        # parameters are held so that their ids stay theirs.
        self._named = module is not None
        self._key_of: Dict[int, str] = {}
        self._held: List[torch.Tensor] = []
        if module is not None:
            pairs = module.named_parameters() if isinstance(module, torch.nn.Module) \
                else module
            for name, param in pairs:
                self._key_of.setdefault(id(param), name)
                self._held.append(param)

        # Internal state.
        self.step = 0  # completed iterations (the hook advances it at each last bucket)
        self._states: Dict[str, ParamState] = {}
        self._layouts: Dict[tuple, BucketLayout] = {}
        self._errors: Dict[torch.device, torch.Tensor] = {}
        self._stats = Stats()

        logger.info("DCTState: %s", self.config())

    # ------------------------------------------------------------------------ configuration

    def config(self) -> Dict[str, Any]:
        """The tunables, as saved in ``state_dict`` (value_dtype as a string)."""
        return {"ratio": self.ratio, "refresh_every": self.refresh_every,
                "warmup_steps": self.warmup_steps, "capacity_factor": self.capacity_factor,
                "min_numel": self.min_numel, "value_dtype": str(self.value_dtype),
                "refresh_band": list(self.refresh_band)}

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _fingerprint(self, layout: BucketLayout, keys: List[str]) -> List[int]:
        dtype_code = wire.value_code(layout.dtype) if layout.dtype in wire.VALUE_DTYPES else -1
        return [fingerprint.MAGIC, fingerprint.VERSION, fingerprint.float_bits(self.ratio),
                self.refresh_every, self.warmup_steps,
                fingerprint.float_bits(self.capacity_factor), self.min_numel,
                _VALUE_DTYPE_CODES[self.value_dtype],
                fingerprint.float_bits(self.refresh_band[0]),
                fingerprint.float_bits(self.refresh_band[1]), layout.numel,
                layout.num_segments, fingerprint.checksum(layout.numels),
                fingerprint.checksum(keys) if self._named else 0, dtype_code,
                layout.capacity]

    # ------------------------------------------------------------------ parameters, layouts

    def _key(self, param: torch.Tensor) -> str:
        key = self._key_of.get(id(param))
        if key is not None:
            return key
        if self._named:
            raise ValueError(f"module: a bucket holds a parameter of shape "
                             f"{tuple(param.shape)} that is not among the named parameters "
                             f"DCTState was given")
        key = f"param.{len(self._key_of)}"
        self._key_of[id(param)] = key
        self._held.append(param)
        return key

    def _state(self, key: str, numel: int, device: torch.device) -> ParamState:
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

    def _layout(self, buffer: torch.Tensor, params: List[torch.Tensor]) -> BucketLayout:
        """The layout of a bucket, created (and checked across ranks) at its first sight, and
        made the owner of its parameters' states."""
        keys = [self._key(p) for p in params]
        numels = [p.numel() for p in params]
        ident = (tuple(keys), buffer.dtype, buffer.device)
        layout = self._layouts.get(ident)
        if layout is None:
            if sum(numels) != buffer.numel():
                raise ValueError(f"bucket: its buffer has {buffer.numel()} elements but its "
                                 f"parameters {sum(numels)}; dct_hook expects DDP's flat "
                                 f"bucket layout (parameters back to back)")
            sparse = [n >= self.min_numel for n in numels]
            layout = BucketLayout(keys, numels, sparse, ratio=self.ratio,
                                  capacity_factor=self.capacity_factor,
                                  band=self.refresh_band, dtype=buffer.dtype,
                                  device=buffer.device)
            fingerprint.verify_across_ranks(
                self._fingerprint(layout, keys), self._group(), buffer.device,
                f"bucket of {len(params)} parameters, {buffer.numel()} elements")
            self._layouts[ident] = layout
        if layout.has_sparse and not layout.owns_all():
            layout.adopt([self._state(key, n, buffer.device) if s else None
                          for key, n, s in zip(keys, numels, layout.sparse)])
            # Layouts that own nothing any more (buckets DDP rebuilt away) are dropped.
            for other_ident, other in list(self._layouts.items()):
                if other.has_sparse and other.owned == 0 and other is not layout:
                    del self._layouts[other_ident]
        return layout

    def _error_counter(self, device: torch.device) -> torch.Tensor:
        counter = self._errors.get(device)
        if counter is None:
            counter = torch.zeros((), dtype=torch.int32, device=device)
            self._errors[device] = counter
        return counter

    # -------------------------------------------------------------------------- statistics

    def stats(self) -> Dict[str, float]:
        """Totals since construction, ``reset_stats`` or the loaded checkpoint.

        Keys: ``steps`` (completed iterations); ``buckets_sparse`` / ``buckets_dense``
        (bucket exchanges of each kind); ``elements_sparse`` (elements of sparse parameters in
        the sparse exchanges); ``kept`` (entries sent) and ``kept_density`` (kept /
        elements_sparse); ``bytes_sent`` (bytes this rank contributed: wire buffers at their
        fixed capacity, dense all-reduces at the gradient dtype) vs ``bytes_dense`` (what a
        dense all-reduce of every bucket would have contributed) and their ratio
        ``compression``; ``refreshes`` (τ computations, per parameter), ``bucket_refreshes``,
        ``early_refreshes`` (bucket refreshes triggered by the band or by overflow);
        ``overflow`` (entries that passed τ but did not fit) and ``overflowed_buckets``;
        ``payload_errors`` (bad received entries skipped).

        Sync: reads device counters, so it synchronizes; call it when logging.
        """
        out = self._stats.as_dict()
        out["steps"] = self.step
        out["payload_errors"] = sum(int(c) for c in self._errors.values())
        return out

    def reset_stats(self) -> None:
        """Zero the statistics (not the step counter or any error-feedback state)."""
        self._stats.reset()
        for counter in self._errors.values():
            counter.zero_()

    # ------------------------------------------------------------------------ checkpointing

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit, on the CPU.

        Format (version 1)::

            {"version": 1, "config": {...the tunables...}, "step": int,
             "params": {key: {"numel": int, "residual": fp32 tensor [numel],
                              "threshold": fp32 tensor [1], "refreshed_at": int (-1: never),
                              "refresh_pending": bool}},
             "stats": {counter: int}}

        Keys are parameter names (with ``module=``) or "param.<i>" in order of first sight.
        Reads device state (synchronizes).
        """
        params = {}
        for key, state in self._states.items():
            pending = state.owner.flag(state.slot) if state.owner is not None \
                else state.pending
            params[key] = {"numel": state.numel,
                           "residual": state.residual.detach().cpu().clone().reshape(-1),
                           "threshold": state.threshold.detach().cpu().clone().reshape(1),
                           "refreshed_at": state.refreshed_at,
                           "refresh_pending": bool(pending)}
        return {"version": STATE_DICT_VERSION, "config": self.config(), "step": self.step,
                "params": params, "stats": self._stats.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a ``state_dict()``: step, statistics and every parameter's residual, τ and
        refresh schedule. Call it before the first step of the resumed run (or between steps).

        Raises:
            ValueError when the saved configuration differs from this state's (a resumed run
            must use the same tunables to continue exactly), the version is unknown, or a
            parameter's size differs.
        """
        if state_dict.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"state_dict: version {state_dict.get('version')!r}, expected "
                             f"{STATE_DICT_VERSION}")
        saved, mine = state_dict["config"], self.config()
        differing = [f"{name}: saved {saved.get(name)!r}, this state {mine[name]!r}"
                     for name in _CONFIG_FIELDS if saved.get(name) != mine[name]]
        if differing:
            raise ValueError("state_dict: the saved configuration differs: " +
                             "; ".join(differing))
        for key, entry in state_dict["params"].items():
            numel = int(entry["numel"])
            residual = entry["residual"].to(torch.float32).reshape(-1)
            if residual.numel() != numel:
                raise ValueError(f"state_dict: parameter {key!r} has a residual of "
                                 f"{residual.numel()} elements, expected {numel}")
            state = self._states.get(key)
            if state is None:
                self._states[key] = ParamState(key, numel, residual.clone(),
                                               entry["threshold"].to(torch.float32)
                                               .reshape(1).clone(),
                                               int(entry["refreshed_at"]),
                                               bool(entry["refresh_pending"]))
                continue
            if state.numel != numel:
                raise ValueError(f"state_dict: parameter {key!r} has {numel} elements, "
                                 f"this model's has {state.numel}")
            state.residual.copy_(residual)
            state.threshold.copy_(entry["threshold"].reshape(1))
            state.refreshed_at = int(entry["refreshed_at"])
            state.pending = bool(entry["refresh_pending"])
            if state.owner is not None:
                owner = state.owner
                # The owner's staged flags predate the load: use the loaded ones.
                for other in owner.states:
                    if other is not None and other is not state and owner.flags_valid:
                        other.pending = owner.flag(other.slot)
                owner.flags_valid = False
        self.step = int(state_dict["step"])
        self._stats.load_state_dict(state_dict.get("stats", {}))

    def __getstate__(self) -> Dict[str, Any]:
        """Pickle support (e.g. a checkpoint holding the state object): the tunables and
        ``state_dict()``; the process group and parameter references are not kept."""
        return {"config": self.config(), "named": self._named,
                "state_dict": self.state_dict()}

    def __setstate__(self, saved: Dict[str, Any]) -> None:
        config = dict(saved["config"])
        dtypes = {str(d): d for d in _VALUE_DTYPE_CODES}
        config["value_dtype"] = dtypes[config["value_dtype"]]
        config["refresh_band"] = tuple(config["refresh_band"])
        self.__init__(**config)
        self.load_state_dict(saved["state_dict"])
        if saved["named"]:
            logger.warning("DCTState restored from a pickle keys parameters by order of "
                           "first appearance; pass module= to a new DCTState and use "
                           "load_state_dict to keep keys by name")
