"""Test configuration: which backends run on which devices here.

Without a GPU the Triton kernels run under the interpreter on CPU tensors; TRITON_INTERPRET must
be set before the kernels are decorated, i.e. before dct_kernels' Triton backend is imported.
With a GPU they run compiled on CUDA tensors, and the torch reference runs on both devices.
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dct_kernels  # noqa: E402

TRITON_DEVICE = "cuda" if HAS_GPU else "cpu"

# (backend, device) pairs compared against the reference.
BACKEND_DEVICES = [("torch", "cpu"), ("triton", TRITON_DEVICE)]
if HAS_GPU:
    BACKEND_DEVICES.append(("torch", "cuda"))
    if dct_kernels.available_backends()["cuda"] == "available":
        BACKEND_DEVICES.append(("cuda", "cuda"))


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    """A (backend name, device) pair; tests move their inputs to the device."""
    return request.param
