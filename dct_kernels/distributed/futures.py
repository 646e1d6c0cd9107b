"""Futures for the asynchronous hook: results that complete in ``then`` callbacks, and the
rule that keeps every rank issuing its collectives in the same order.

On gloo a callback runs on the thread that completed the collective; on NCCL the collective's
future completes as soon as the collective is enqueued, and a callback that ``wait()``s on it
makes the current stream wait for the collective's CUDA event (no host wait). So every callback
here first ``wait()``s on the futures it depends on (already complete on gloo: no blocking) and
the futures made here carry the device, so DDP's wait orders its stream after our kernels.

Issue order. gloo and NCCL match collectives by the order they are issued in. Collectives
issued from callbacks (stage 3 of ``"reduce_scatter"``) would otherwise be issued at times that
depend on thread timing, interleaved differently with the collectives the autograd thread issues
for later buckets. ``StepOrder`` fixes one order on every rank: first every collective the hook
issues on the calling thread, bucket by bucket, up to the last bucket of the step; then the
collectives issued from callbacks, in bucket order.
"""

import threading
from typing import Callable, List

import torch


def new_future(device: torch.device) -> torch.futures.Future:
    """A pending future for a result on ``device`` (device-aware on CUDA)."""
    if device.type == "cuda":
        return torch.futures.Future(devices=[device])
    return torch.futures.Future()


def completed(value, device: torch.device) -> torch.futures.Future:
    """A completed future holding ``value`` (on CUDA it records the current stream)."""
    future = new_future(device)
    future.set_result(value)
    return future


def after(futures: List[torch.futures.Future], fn: Callable[[], object],
          device: torch.device) -> torch.futures.Future:
    """A future that completes with ``fn()`` once every future in ``futures`` has completed.

    ``fn`` runs in a ``then`` callback after waiting on each of ``futures`` (stream ordering on
    CUDA; already complete on gloo). An error in any of them, or in ``fn``, completes the
    returned future with that error.
    """
    result = new_future(device)

    def run(_):
        try:
            for future in futures:
                future.wait()
            result.set_result(fn())
        except Exception as error:  # delivered to whoever waits on the result
            result.set_exception(error)

    if len(futures) == 1:
        futures[0].then(run)
    else:
        torch.futures.collect_all(futures).then(run)
    return result


class StepOrder:
    """The issue order of one step (see the module docstring).

    ``gate`` completes when the hook has issued the collectives of the step's last bucket on
    the calling thread (``close``). ``chain(...)`` runs a callback that issues collectives only
    after the gate, its own inputs and the previous chained callback's issue are complete.
    """

    def __init__(self):
        self.gate = torch.futures.Future()
        self._tail: torch.futures.Future = torch.futures.Future()
        self._tail.set_result(None)
        self._lock = threading.Lock()

    def chain(self, inputs: List[torch.futures.Future],
              issue: Callable[[], None]) -> None:
        """Run ``issue()`` (which issues collectives) after the gate, ``inputs`` and the
        previous ``issue``; the next chained call waits for this one to return. ``issue``
        must ``wait()`` on ``inputs`` itself and deliver its own errors (to its result)."""
        with self._lock:
            previous, done = self._tail, torch.futures.Future()
            self._tail = done

        def run(_):
            try:
                issue()
            finally:
                # Even after an error the next bucket may go on (its collectives then fail or
                # time out on every rank rather than wait here forever).
                done.set_result(None)

        torch.futures.collect_all([self.gate, previous] + list(inputs)).then(run)

    def close(self) -> None:
        """The step's last bucket has issued its calling-thread collectives."""
        if not self.gate.done():
            self.gate.set_result(None)
