"""What a run stands on, for the comparison (``cli``) and the sweep (``sweep``) alike: this
rank's device, the device's name, the kernel backend the ops run on there, the data set of a
configuration and the teacher's AUC on it.

Its own module so that ``cli`` (which starts the sweep) and ``sweep`` both import it and
neither imports the other.
"""

import os
import platform
import sys
from typing import List, Optional, Union

import torch
import torch.distributed as dist

# bench/kernel_backend.py: bench/ is on sys.path wherever dlrm imports.
from kernel_backend import kernel_backend, missing_core_note

from .config import Config
from .data import ClickLogs, generate


def device_name() -> str:
    """The card's name, or the CPU's, as the results folder is named."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def rank_device() -> torch.device:
    """This rank's device in the initialized process group: its GPU under NCCL (made the
    current device), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def kernel_backends(device: torch.device, backend: Optional[str] = None
                    ) -> Union[str, List[str]]:
    """The dct_kernels backend the ops run on (``backend``, else the default for the device) on
    every rank: its name ("cpu", "cuda", "triton", "torch") when all ranks agree, else the list
    of names in rank order. Rank 0 prints each rank's line about a compiled core that is not
    built (bench/kernel_backend.py), once per distinct line.

    Collective: every rank calls it."""
    mine = (kernel_backend(device, backend), missing_core_note(device, backend))
    everyone: List[Optional[tuple]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        for note in dict.fromkeys(note for _, note in everyone if note):
            print(note, file=sys.stderr, flush=True)
    names = [name for name, _ in everyone]
    return names[0] if len(set(names)) == 1 else names


def load_data(cfg: Config) -> ClickLogs:
    """The data set of a configuration: a Criteo file, or the synthetic logs of the seed
    (``steps * batch_size`` training and ``heldout`` held-out samples)."""
    if cfg.data_file:
        from .criteo import read_criteo

        return read_criteo(cfg.data_file, hash_size=cfg.hash_size)
    return generate(cfg.steps * cfg.batch_size, cfg.heldout, seed=cfg.seed,
                    num_tables=cfg.num_tables, min_rows=cfg.min_rows, max_rows=cfg.max_rows)


def teacher_auc(data: ClickLogs) -> Optional[float]:
    """The held-out AUC of the planted teacher's own probabilities (the ceiling a model can
    reach), or None for data without a teacher (a Criteo file)."""
    if data.teacher_prob is None:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(data.labels[data.num_train:],
                               data.teacher_prob[data.num_train:]))
