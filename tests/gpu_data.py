"""What the GPU-only tests (tests/test_gpu_*.py, and the NCCL tests) share: the device backends
to check, the random inputs with the hard cases planted in them, and a block in which any host
synchronization is an error. Those tests compare every device backend bitwise with the torch
reference on the same device."""

import contextlib

import torch

import dct_kernels as dk

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def device_backends():
    """The backends with GPU kernels that are usable here (none without a GPU: the tests that
    take them as a parameter then collect nothing and skip)."""
    return [b for b in ("triton", "cuda") if dk.available_backends().get(b) == "available"]


def gpu_data(n, dtype, seed, specials=True):
    """n random normals on the GPU in ``dtype``; with ``specials``, NaN, ±inf, -0 and denormals
    at random places; always a run of 5000 equal values across block boundaries (ties)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, device=DEVICE, generator=g)
    if specials:
        pick = torch.randint(0, n, (64,), device=DEVICE, generator=g)
        x[pick[:8]] = float("nan")
        x[pick[8:16]] = float("inf")
        x[pick[16:24]] = -float("inf")
        x[pick[24:32]] = -0.0
        tiny = torch.finfo(dtype).tiny
        x[pick[32:48]] = tiny * torch.rand(16, device=DEVICE, generator=g)  # denormals
    x[n // 3:n // 3 + 5000] = 0.75  # a run of ties across block boundaries
    return x.to(dtype)


@contextlib.contextmanager
def no_host_sync():
    """Run the block under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any host
    synchronization made through torch (blocking copies, ``.item()``, stream syncs). The device
    is synchronized before and after, outside that mode, so that neither the work queued before
    nor the block's own work is cut short."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
