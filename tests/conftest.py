"""Test configuration: which backends run on which devices here, and the one-rank NCCL group
that the GPU tests of the distributed exchanges share (``nccl_group``).

Without a GPU the Triton kernels run under the interpreter on CPU tensors; TRITON_INTERPRET must
be set before the kernels are decorated, i.e. before dct_kernels' Triton backend is imported.
With a GPU they run compiled on CUDA tensors, and the torch reference runs on both devices.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

import torch

# torch.compile's caches go to a folder of this run, removed when the run's process exits
# (by default inductor keeps them in /tmp/torchinductor_<user> for good). At exit, not at the
# session's end: a run that stops early (a usage error) never reaches that. Subprocesses
# inherit the setting and leave the folder to this process.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dct_kernels_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)


HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dct_kernels  # noqa: E402

TRITON_DEVICE = "cuda" if HAS_GPU else "cpu"

# (backend, device) pairs compared against the reference.
BACKEND_DEVICES = [("torch", "cpu"), ("triton", TRITON_DEVICE)]
HAS_CPU_EXT = dct_kernels.available_backends()["cpu"] == "available"
if HAS_CPU_EXT:
    BACKEND_DEVICES.append(("cpu", "cpu"))
# The cpu backend runs every generic test at these thread counts (its results must not depend
# on them); the other backends at torch's default.
CPU_THREADS = (1, 2)
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


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    """A one-rank NCCL process group on GPU 0 for a GPU test module's tests (NCCL refuses two
    ranks on one GPU), destroyed after them."""
    import datetime

    import torch.distributed as dist

    torch.cuda.set_device(0)
    store = tmp_path_factory.mktemp("nccl") / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield dist.group.WORLD
    dist.destroy_process_group()


def _backend_params():
    params = []
    for backend, device in BACKEND_DEVICES:
        if backend == "cpu":
            params += [pytest.param((backend, device, t), id=f"cpu-cpu-t{t}")
                       for t in CPU_THREADS]
        else:
            params.append(pytest.param((backend, device, None), id=f"{backend}-{device}"))
    return params


@pytest.fixture(params=_backend_params())
def backend_device(request):
    """A (backend name, device) pair; tests move their inputs to the device. For the cpu
    backend, torch's thread count (which that backend uses) is set for the test's duration."""
    backend, device, threads = request.param
    if threads is None:
        yield backend, device
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield backend, device
    finally:
        torch.set_num_threads(before)


# tests/torchrec/ needs TorchRec, whose kernels load only against their own torch release: it
# runs in its own environment (scripts/check_torchrec.sh), and is not collected without it.
# (With tests/ on sys.path that folder is itself a namespace package "torchrec", which has no
# origin; the library is a regular package and wins over it where it is installed.)
_TORCHREC = importlib.util.find_spec("torchrec")
if _TORCHREC is None or _TORCHREC.origin is None:
    collect_ignore = ["torchrec"]
