"""Which dct_kernels backend a benchmark's ops run on, and one line when that is not the
compiled core of their device.

A benchmark of the installed package measures whatever its ops resolve to: a CPU run without
``dct_kernels._cpu`` times the torch reference, a GPU run without ``dct_kernels._cuda`` the
Triton kernels. ``missing_core_note`` says so before the numbers are taken, so that they are
not read as the compiled core's.
"""

import sys
from typing import Optional

import torch

import dct_kernels
from dct_kernels.backends import resolve

# The compiled core meant for each device type (a backend name of available_backends()).
COMPILED_CORE = {"cpu": "cpu", "cuda": "cuda"}


def kernel_backend(device, backend: Optional[str] = None) -> str:
    """The name of the backend the ops use for tensors on ``device`` ("cuda", "triton", "cpu"
    or "torch"): ``backend`` when one is named, else the default for the device
    (DCT_KERNELS_BACKEND honoured), as every op resolves it."""
    return resolve(backend, torch.device(device)).NAME


def missing_core_note(device, backend: Optional[str] = None) -> Optional[str]:
    """One line saying that the ops on ``device`` run on another backend because the device's
    compiled core (``dct_kernels._cpu`` or ``dct_kernels._cuda``) cannot be used here, and why;
    None when it can (or the device has none)."""
    device = torch.device(device)
    core = COMPILED_CORE.get(device.type)
    if core is None:
        return None
    why = dct_kernels.available_backends()[core]
    if why == "available":
        return None
    return (f"note: the ops on {device.type} tensors run on the "
            f"{kernel_backend(device, backend)} backend, not dct_kernels._{core}: {why}")


def warn_if_core_missing(device, backend: Optional[str] = None) -> None:
    """Print ``missing_core_note`` (to stderr) when there is one."""
    note = missing_core_note(device, backend)
    if note:
        print(note, file=sys.stderr, flush=True)
