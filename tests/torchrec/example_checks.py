"""The goal of bench/train_torchrec.py, checked on every rank of a spawned gloo group: at its
default size, the DCT-DP run's held-out AUC is within 0.002 of the dense run's at >= 100x
fewer DP bytes, the bytes counted on the wire inside each run's comm hook (``HookTap``)."""

import train_torchrec as example
from dct_kernels.distributed import dct_hook
from dlrm import dp_traffic
from hook_tap import HookTap


def check_example_goal(rank, world):
    """Both runs of the example on the same data; each run's DP bytes counted by wrapping the
    collectives its hook issues, and equal to what the example reports; both runs' dense
    parts identical across ranks."""
    settings = example.Settings()
    data = example.load_data(settings)
    runs, wire = {}, {}
    for run, hook in (("dense", dp_traffic.dense_hook), ("dct_dp", dct_hook)):
        with HookTap(world, [hook]) as tap:
            runs[run] = example.train(settings, data, run, rank, world)
        wire[run] = (tap.sent + tap.received) / settings.steps
    for run, result in runs.items():
        assert result["ranks_identical"], run
        assert abs(wire[run] - result["dp_bytes_per_step"]) <= 1e-9 * wire[run], \
            (run, wire[run], result["dp_bytes_per_step"])
    delta = runs["dct_dp"]["auc"] - runs["dense"]["auc"]
    ratio = wire["dense"] / wire["dct_dp"]
    summary = (f"AUC dense {runs['dense']['auc']:.4f}, dct_dp {runs['dct_dp']['auc']:.4f} "
               f"({delta:+.4f}); DP bytes per step and rank on the wire: dense "
               f"{wire['dense']:.0f}, dct_dp {wire['dct_dp']:.0f} ({ratio:.1f}x fewer)")
    if rank == 0:
        print(summary, flush=True)
    assert abs(delta) <= 0.002, summary
    assert ratio >= 100, summary
