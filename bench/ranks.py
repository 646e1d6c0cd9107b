"""Spawned ranks that leave nothing behind in the temporary folder.

torch.multiprocessing gives each spawned process a file for its traceback (named
``pytorch-errorfile-*.pickle`` in the temporary folder); a process that raises writes it, the
parent reads it to raise, and nobody removes it. And torch's DDP makes an (empty) inductor
cache folder there, ``torchinductor_<user>``, when first used. Every benchmark here starts its
ranks through ``spawn`` below, which removes both however the ranks end.
"""

import os
import shutil
import tempfile

import torch.multiprocessing as mp


def spawn(fn, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.start_processes(fn, args, nprocs, start_method="spawn")``,
    joined, with the processes' error files removed afterwards, and (unless the caller set
    ``TORCHINDUCTOR_CACHE_DIR``) the ranks' inductor cache in a folder of their own, removed
    afterwards.

    Raises what torch's join raises when a rank fails (``ProcessRaisedException`` with the
    rank's traceback, ``ProcessExitedException`` with its exit code), after terminating the
    other ranks as torch does.
    """
    own_cache = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if own_cache:  # the ranks inherit it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dct_kernels_inductor_")
    try:
        context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                     start_method="spawn")
        try:
            while not context.join():
                pass
        finally:
            remove_error_files(context)
    finally:
        if own_cache:
            shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)


def remove_error_files(context) -> None:
    """Remove the traceback files of a ``ProcessContext``'s processes (those that exist)."""
    for path in context.error_files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
