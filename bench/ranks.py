"""Spawned ranks that leave nothing behind in the temporary folder.

torch.multiprocessing gives each spawned process a file for its traceback (named
``pytorch-errorfile-*.pickle`` in the temporary folder); a process that raises writes it, the
parent reads it to raise, and nobody removes it. And torch's DDP makes an (empty) inductor
cache folder there, ``torchinductor_<user>``, when first used. Every benchmark here starts its
ranks through ``spawn`` below, which removes both however the ranks end.
"""

import os
import shutil
import signal
import tempfile
import threading

import torch.multiprocessing as mp

STOP_GRACE_S = 5.0  # how long a rank has to exit after SIGTERM before it is killed


def spawn(fn, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.start_processes(fn, args, nprocs, start_method="spawn")``,
    joined, with the processes' error files removed afterwards, and (unless the caller set
    ``TORCHINDUCTOR_CACHE_DIR``) the ranks' inductor cache in a folder of their own, removed
    afterwards.

    Raises what torch's join raises when a rank fails (``ProcessRaisedException`` with the
    rank's traceback, ``ProcessExitedException`` with its exit code), after terminating the
    other ranks as torch does. Interrupted (KeyboardInterrupt, or SIGTERM, which raises
    SystemExit here while the ranks run unless the caller installed its own handler), it
    stops the ranks (SIGTERM, then SIGKILL after ``STOP_GRACE_S``) before removing their
    files, and re-raises.
    """
    own_cache = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if own_cache:  # the ranks inherit it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dct_kernels_inductor_")
    previous = _exit_on_sigterm()
    try:
        context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                     start_method="spawn")
        try:
            while not context.join():
                pass
        except BaseException:
            stop(context.processes)
            raise
        finally:
            remove_error_files(context)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if own_cache:
            shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)


def stop(processes) -> None:
    """Terminate the processes still alive, kill those that outlive ``STOP_GRACE_S``, and
    join them all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(STOP_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()


def _exit_on_sigterm():
    """While the ranks run, SIGTERM raises SystemExit in the launcher, so that its cleanup
    runs (the default action ends the process on the spot and leaves the ranks' folder).
    Returns the handler to restore, or None when the caller's own is left in place (one it
    installed, or not the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, terminated)


def remove_error_files(context) -> None:
    """Remove the traceback files of a ``ProcessContext``'s processes (those that exist)."""
    for path in context.error_files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
