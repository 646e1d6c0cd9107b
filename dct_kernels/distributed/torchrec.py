"""DCT-DP on the data-parallel part of TorchRec's ``DistributedModelParallel`` (DMP).

DMP shards the embedding tables and wraps the rest of the model (the dense part) in one
``DistributedDataParallel``, built by a data-parallel wrapper. ``DCTDataParallelWrapper`` is
such a wrapper: TorchRec's ``DefaultDataParallelWrapper`` builds the DDP, then ``dct_hook`` is
registered on it with a ``DCTState`` made from the wrapper's arguments, keyed by the dense
parameters' names, on DMP's process group::

    wrapper = DCTDataParallelWrapper(ratio=0.003, value_dtype=torch.bfloat16)
    dmp = DistributedModelParallel(model, device=device, data_parallel_wrapper=wrapper)
    ...                                # train as usual
    wrapper.state.stats()              # or dct_state(dmp).stats()

Imported on its own (``dct_kernels`` and ``dct_kernels.distributed`` never import it): it needs
TorchRec, and TorchRec's kernels (fbgemm) load only against the torch release they were built
for. See docs/torchrec.md.
"""

import logging
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .hook import dct_hook
from .state import DCTState

# What was checked to load and train together; fbgemm is built for one torch release (its
# compatibility table maps 1.9 to torch 2.14), so other torch releases fail to load it.
WORKING_VERSIONS = ("torchrec 1.9.2 with fbgemm-gpu-cpu 1.9.0 (or fbgemm-gpu 1.9.0 on CUDA) "
                    "and torch 2.14.x")
INSTALL = ('pip install torch==2.14.1 fbgemm-gpu-cpu==1.9.0 && '
           'pip install --no-deps torchrec==1.9.2 && '
           'pip install tensordict torchmetrics tqdm pyre-extensions')

try:
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
except Exception as error:  # ImportError, or fbgemm's "undefined symbol" (OSError) and kin
    raise ImportError(
        f"dct_kernels.distributed.torchrec needs TorchRec; the versions that work together "
        f"are {WORKING_VERSIONS} (torch {torch.__version__} is installed). Install with: "
        f"{INSTALL}  (see docs/torchrec.md). Importing TorchRec failed with: "
        f"{type(error).__name__}: {error}") from error

__all__ = ["DCTDataParallelWrapper", "dct_state", "WORKING_VERSIONS"]

logger = logging.getLogger(__name__)

# DCTState's keyword arguments the wrapper passes on; the process group and the parameter
# names are DMP's, so the wrapper sets those itself.
_STATE_OPTIONS = ("ratio", "refresh_every", "warmup_steps", "ramp_steps", "capacity_factor",
                  "min_numel", "min_k", "dense_rows", "value_dtype", "index_encoding",
                  "refresh_band", "refresh_patience", "exchange", "validate", "backend")


class DCTDataParallelWrapper(DefaultDataParallelWrapper):
    """A TorchRec data-parallel wrapper that sends the dense part's gradients with DCT-DP.

    Pass it as ``DistributedModelParallel(..., data_parallel_wrapper=...)``. When DMP wraps its
    unsharded modules, TorchRec's ``DefaultDataParallelWrapper`` builds the DDP as without it
    (``gradient_as_bucket_view=True``, ``broadcast_buffers=False``, the sharded tables left
    out; ``static_graph`` as below), and ``dct_hook`` is registered on that DDP with a
    ``DCTState`` on DMP's process group, whose parameters are keyed by their names in the
    model (as ``dmp.state_dict()`` names them, e.g.
    ``"over_arch.model.0._mlp.0._linear.weight"``).

    Args:
        bucket_cap_mb, find_unused_parameters, params_to_ignore, ddp_kwargs: as for
            ``DefaultDataParallelWrapper`` (TorchRec's defaults: 25 MB buckets). Its
            ``allreduce_comm_precision`` is not taken: DDP holds one comm hook, and this one is
            ``dct_hook`` (``value_dtype=torch.bfloat16`` or ``torch.float16`` sends the kept
            values in half precision).
        static_graph: as TorchRec's default (True). A static-graph DDP keeps its initial
            bucket order for its first two iterations; a ``DCTState`` loaded from a checkpoint
            steps the checkpoint's bucket layouts until DDP has rebuilt its buckets, so a
            resumed run continues bit for bit either way.
        **dct_options: ``DCTState``'s keyword arguments: ``ratio``, ``refresh_every``,
            ``warmup_steps``, ``ramp_steps``, ``capacity_factor``, ``min_numel``, ``min_k``,
            ``dense_rows``, ``value_dtype``, ``index_encoding``, ``refresh_band``,
            ``refresh_patience``, ``exchange``, ``validate``, ``backend``
            (see docs/distributed.md, "Settings"); DCTState's defaults where not given.

    Raises:
        TypeError for a keyword that is not one of the above (``process_group`` and ``module``
        included: they are DMP's).
        ValueError naming the argument for a value DCTState rejects, here, before any DMP is
        built.

    Attributes:
        state: the ``DCTState`` once DMP has wrapped its dense part (None before, and when DMP
            has no unsharded parameter to wrap, as then no DDP exists). Its ``stats()``,
            ``state_dict()`` and ``load_state_dict()`` are the usual ones. Every rank must
            build its wrapper with the same arguments (checked at the first step of every
            bucket layout, as for any ``DCTState``).

    One wrapper serves one DMP.
    """

    def __init__(self, *, bucket_cap_mb: int = 25, static_graph: bool = True,
                 find_unused_parameters: bool = False,
                 params_to_ignore: Optional[List[str]] = None,
                 ddp_kwargs: Optional[Dict[str, Any]] = None, **dct_options: Any) -> None:
        unknown = sorted(set(dct_options) - set(_STATE_OPTIONS))
        if unknown:
            raise TypeError(f"DCTDataParallelWrapper: unexpected keyword argument(s) "
                            f"{unknown}; it takes {list(_STATE_OPTIONS)} for DCTState and "
                            f"bucket_cap_mb, static_graph, find_unused_parameters, "
                            f"params_to_ignore, ddp_kwargs for the DDP (the process group and "
                            f"the parameter names are DMP's)")
        DCTState(**dct_options)  # the values' checks, now rather than inside DMP's constructor
        super().__init__(bucket_cap_mb=bucket_cap_mb, static_graph=static_graph,
                         find_unused_parameters=find_unused_parameters,
                         allreduce_comm_precision=None, params_to_ignore=params_to_ignore,
                         ddp_kwargs=ddp_kwargs)
        self.dct_options: Dict[str, Any] = dict(dct_options)
        self.state: Optional[DCTState] = None
        self._served = False  # wrap() was called (whether or not it built a DDP)

    def wrap(self, dmp, env, device: torch.device) -> None:
        """Called by DMP (``init_data_parallel``): build the DDP of the dense part as TorchRec's
        default wrapper does, then register ``dct_hook`` on it with a new ``DCTState``.

        Sync: DDP's construction is collective (it broadcasts rank 0's dense parameters);
        every rank's DMP calls this in the same order. Registering the hook is local.

        Raises:
            RuntimeError when this wrapper already wrapped a DMP, or (TorchRec's) when the
            sharding environment has no process group.
        """
        if self._served:
            raise RuntimeError("DCTDataParallelWrapper: this wrapper already serves a "
                               "DistributedModelParallel; give each DMP its own wrapper")
        self._served = True
        before = _data_parallel_module(dmp)
        super().wrap(dmp, env, device)
        ddp = _data_parallel_module(dmp)
        if ddp is None or ddp is before:
            # No unsharded parameter (nothing to wrap), or DMP's module was wrapped already
            # (TorchRec then leaves it alone, and so do we).
            logger.warning("DCTDataParallelWrapper: no DistributedDataParallel was built for "
                           "the dense part; no comm hook registered")
            return
        ignored = set(getattr(ddp, "parameters_to_ignore", ()))
        names = [(name, p) for name, p in ddp.module.named_parameters()
                 if name not in ignored and p.requires_grad]
        state = DCTState(env.process_group, module=names, **self.dct_options)
        ddp.register_comm_hook(state, dct_hook)
        self.state = state


def _data_parallel_module(dmp) -> Optional[DistributedDataParallel]:
    """The DDP among DMP's submodules (its wrapped module once wrapped), or None."""
    return next((m for m in dmp.modules() if isinstance(m, DistributedDataParallel)), None)


def dct_state(dmp) -> DCTState:
    """The ``DCTState`` of a DMP built with ``DCTDataParallelWrapper``: its ``stats()``,
    ``state_dict()`` and ``load_state_dict()``. No communication.

    Raises:
        ValueError when ``dmp`` was built with another data-parallel wrapper, or its wrapper
        registered no hook (no dense parameters, or DMP's ``init_data_parallel=False`` and
        ``dmp.init_data_parallel()`` not called yet).
    """
    wrapper = getattr(dmp, "_data_parallel_wrapper", None)
    if not isinstance(wrapper, DCTDataParallelWrapper):
        raise ValueError(f"dct_state: this DistributedModelParallel's data-parallel wrapper is "
                         f"{type(wrapper).__name__}, not DCTDataParallelWrapper")
    if wrapper.state is None:
        raise ValueError("dct_state: no DCTState yet: DMP has not wrapped its dense part "
                         "(call dmp.init_data_parallel()), or it has no dense parameters")
    return wrapper.state
