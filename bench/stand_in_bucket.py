"""A stand-in for DDP's GradBucket, for the benchmarks that drive dct_hook without DDP."""


class StandInBucket:
    """What dct_hook reads of a bucket: its flat buffer, its parameters and whether it is the
    step's last."""

    def __init__(self, params, buffer, last):
        self._params, self._buffer, self._last = params, buffer, last

    def buffer(self):
        return self._buffer

    def parameters(self):
        return self._params

    def is_last(self):
        return self._last
