"""Futures for the asynchronous hook: results that complete in ``then`` callbacks, and the
rule that keeps every rank issuing its collectives in the same order.

On gloo a callback runs on the thread that completed the collective; on NCCL the collective's
future completes as soon as the collective is enqueued, and a callback that ``wait()``s on it
makes the current stream wait for the collective's CUDA event (no host wait). So every callback
here first ``wait()``s on the futures it depends on (already complete on gloo: no blocking) and
the futures made here carry the device, so DDP's wait orders its stream after our kernels.

Issue order. gloo and NCCL match collectives by the order they are issued in. A second-stage
collective issued from a callback (stage 3 of ``"reduce_scatter"``) would be issued at a time
that depends on thread timing, interleaved differently on different ranks with the collectives
the autograd thread issues for later buckets (and with DDP's own). ``StepOrder`` fixes one order
on every rank: every bucket's first collective on the calling thread, bucket by bucket; then, at
the step's last bucket and still on the calling thread, each bucket's second-stage collective in
bucket order.
"""

from typing import Callable, List, Optional, Tuple

import torch


def new_future(device: torch.device) -> torch.futures.Future:
    """A pending future for a result on ``device`` (device-aware on CUDA)."""
    if device.type == "cuda":
        return torch.futures.Future(devices=[device])
    return torch.futures.Future()


def after(futures: List[torch.futures.Future], fn: Callable[[], object],
          device: torch.device,
          into: Optional[torch.futures.Future] = None) -> torch.futures.Future:
    """A future that completes with ``fn()`` once every future in ``futures`` has completed:
    ``into`` (a pending future made by ``new_future``, e.g. one handed out before the
    collectives were issued), else a new one.

    ``fn`` runs in a ``then`` callback after waiting on each of ``futures`` (stream ordering on
    CUDA; already complete on gloo). An error in any of them, or in ``fn``, completes the
    returned future with that error.
    """
    result = into if into is not None else new_future(device)
    held = [list(futures), fn]

    def run(_):
        # The callback runs on the collective's thread, which releases it after it returns;
        # whatever it still held then could be the last reference to the hook's state and,
        # through it, to a process group the program destroyed as soon as the result was set:
        # the group's destructor would then join its own thread and abort the process. So
        # everything is let go here, before the result is set.
        inputs, function = held
        held.clear()
        value, error = None, None
        try:
            for future in inputs:
                future.wait()
            value = function()
        except Exception as caught:  # delivered to whoever waits on the result
            error = caught
        del inputs, function
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(value)

    if len(futures) == 1:
        futures[0].then(run)
    else:
        torch.futures.collect_all(futures).then(run)
    return result


class StepOrder:
    """The issue order of one step (see the module docstring).

    ``chain(issue)`` queues a function that issues collectives; ``close()`` — called on the
    hook's calling thread once the step's last bucket has issued its first collectives — runs
    the queued functions there, in bucket order. No collective is ever issued from a
    collective's callback, so DDP's own collectives at the end of the backward pass (e.g. the
    unused-parameter map of ``find_unused_parameters``) come after ours on every rank too.
    """

    def __init__(self):
        self._queued: List[Tuple[Callable[[], None], torch.futures.Future]] = []
        self._closed = False

    def chain(self, issue: Callable[[], None], result: torch.futures.Future) -> None:
        """Queue ``issue`` (it waits on its own inputs and delivers its own errors to
        ``result``, which ``abandon`` fails instead)."""
        self._queued.append((issue, result))

    def close(self) -> None:
        """Run the queued functions, in order (each waits on its inputs: on gloo a host wait
        for the first collective, which the backward pass of the later buckets has overlapped;
        on NCCL a stream wait)."""
        if self._closed:
            return
        self._closed = True
        for issue, _ in self._queued:
            issue()
        self._queued.clear()

    def abandon(self, error: Exception) -> None:
        """After an error on the calling thread: nothing more is issued, and every queued
        result fails with ``error``."""
        self._closed = True
        for _, result in self._queued:
            if not result.done():
                result.set_exception(error)
        self._queued.clear()
