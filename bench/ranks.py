"""Spawned ranks that leave nothing behind in the temporary folder.

torch.multiprocessing gives each spawned process a file for its traceback (named
``pytorch-errorfile-*.pickle`` in the temporary folder); a process that raises writes it, the
parent reads it to raise, and nobody removes it. Every benchmark here starts its ranks through
``spawn`` below, which removes them however the ranks end.
"""

import os

import torch.multiprocessing as mp


def spawn(fn, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.start_processes(fn, args, nprocs, start_method="spawn")``,
    joined, with the processes' error files removed afterwards.

    Raises what torch's join raises when a rank fails (``ProcessRaisedException`` with the
    rank's traceback, ``ProcessExitedException`` with its exit code), after terminating the
    other ranks as torch does.
    """
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                 start_method="spawn")
    try:
        while not context.join():
            pass
    finally:
        remove_error_files(context)


def remove_error_files(context) -> None:
    """Remove the traceback files of a ``ProcessContext``'s processes (those that exist)."""
    for path in context.error_files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
