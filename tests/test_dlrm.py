"""The end-to-end DLRM trainer of bench/ (docs/design.md): a smoke run on 2 gloo ranks
whose bytes are checked against counts taken by wrapping the torch.distributed collectives,
and the Criteo reader on generated files."""

import datetime
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import pytest
import torch

from dct_kernels.backends import resolve

# ``dlrm`` is bench/dlrm, on sys.path through pyproject.toml's pytest ``pythonpath``.
from dlrm import criteo, data as dlrm_data
from dlrm.config import tiny
from dlrm.model import shard_tables
from dlrm.optim import RowWiseAdagrad
import ranks  # bench/ranks.py

TRAIN_DLRM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                          "train_dlrm.py")

SMOKE_DEADLINE_S = 120
# The backend the ops resolve to for the ranks' CPU tensors (the spawned ranks inherit the
# environment, DCT_KERNELS_BACKEND included).
CPU_KERNELS = resolve(None, torch.device("cpu")).NAME
RUN_FIELDS = ("steps", "auc", "logloss", "dp_bytes_per_step", "dp_bytes_ring_per_step",
              "dp_compression", "mp_bytes_per_step", "mp_bytes_dense_per_step",
              "mp_compression", "step_ms", "dp_overflow_frequency", "train_s", "eval_s")


# ------------------------------------------------------------------ collective byte counting

class _Counter:
    """Wraps the torch.distributed collectives and counts, per class, the bytes this rank
    sends and receives inside training steps, as docs/design.md counts them (all-gather
    of N: N out, (W-1) N in; ring all-reduce of M: 2 (W-1)/W M each way; all-to-all: the
    chunks to and from the other ranks). DP = all-gathers and all-reduces (the smoke run uses
    the all-gather exchange), MP = all-to-alls."""

    def __init__(self, world):
        import torch.distributed as dist

        self.dist, self.world = dist, world
        self.active = False
        self.run = None
        self.totals = {}      # run -> {"dp": float, "mp_sent": float, "mp_received": float}
        self.per_step = {}    # run -> list of snapshots after each step
        self.unexpected = []  # collectives of any other kind inside a step
        self.originals = {}
        for name in ("all_gather_into_tensor", "all_gather_single", "all_gather",
                     "all_reduce", "all_to_all_single", "all_to_all", "broadcast",
                     "reduce_scatter_tensor", "reduce_scatter", "send", "recv", "isend",
                     "irecv"):
            if hasattr(dist, name):
                self.originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self.originals[name]))

    @staticmethod
    def _bytes(t):
        return t.numel() * t.element_size()

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            if self.active:
                self._count(name, args, kwargs)
            return original(*args, **kwargs)
        return wrapped

    def _count(self, name, args, kwargs):
        w = self.world
        t = self.totals.setdefault(self.run, {"dp": 0.0, "mp_sent": 0.0, "mp_received": 0.0})
        if name in ("all_gather_into_tensor", "all_gather_single"):
            inp = args[1] if len(args) > 1 else kwargs["input_tensor"]
            t["dp"] += self._bytes(inp) * w  # N sent + (W - 1) N received
        elif name == "all_reduce":
            t["dp"] += 4 * (w - 1) / w * self._bytes(args[0])
        elif name == "all_to_all_single":
            out, inp = args[0], args[1]
            t["mp_sent"] += self._bytes(inp) * (w - 1) / w
            t["mp_received"] += self._bytes(out) * (w - 1) / w
        else:
            self.unexpected.append(name)

    def step_end(self, run, step):
        t = self.totals.setdefault(run, {"dp": 0.0, "mp_sent": 0.0, "mp_received": 0.0})
        self.per_step.setdefault(run, []).append(dict(t))


# The runs of the first smoke run (the baselines have a run of their own below).
SMOKE_RUNS = ("dense", "dct_dp", "dct_dp_mp")


def _smoke_worker(rank, world, store, out_dir, result_dir, runs=None):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    from dlrm import cli
    from dlrm.runner import Callbacks

    counter = _Counter(world)
    digests = {}

    class Watch(Callbacks):
        def step_begin(self, run, step):
            counter.run, counter.active = run, True

        def step_end(self, run, step):
            counter.active = False
            counter.step_end(run, step)

        def run_end(self, run, dense_arch, shard):
            h = hashlib.sha256()
            for name, p in dense_arch.named_parameters():
                h.update(name.encode())
                h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
            digests[run] = h.hexdigest()

    cfg = tiny()
    cfg.exchange = "allgather"
    if runs is not None:
        cfg.runs = list(runs)
    report = cli.train(cfg, out_dir, callbacks=Watch(), progress=False)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"per_step": counter.per_step, "unexpected": counter.unexpected,
                   "digests": digests, "series": {n: r["series"]
                                                  for n, r in report["runs"].items()}}, f)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(world, fn, args, deadline_s):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"the smoke run outlived its {deadline_s} s deadline")
    finally:
        ranks.remove_error_files(ctx)  # torch leaves them in the temporary folder


def _two_rank_run(tmp_path_factory, name, runs):
    """Spawn a two-rank run of ``runs``; (report, each rank's record, output folder)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp(name)
    out_dir = str(tmp / "out")
    _spawn(2, _smoke_worker, (str(tmp / "store"), out_dir, str(tmp), runs), SMOKE_DEADLINE_S)
    with open(os.path.join(out_dir, "dlrm.json")) as f:
        report = json.load(f)
    ranks = []
    for r in range(2):
        with open(tmp / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    return report, ranks, out_dir


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return _two_rank_run(tmp_path_factory, "dlrm_smoke", SMOKE_RUNS)


def test_smoke_report_fields(smoke):
    report, _, out_dir = smoke
    assert report["world_size"] == 2
    assert isinstance(report["device"], str) and report["device"]
    assert report["kernel_backend"] == CPU_KERNELS
    assert 0.5 < report["teacher_auc"] < 1.0
    assert set(report["runs"]) == {"dense", "dct_dp", "dct_dp_mp"}
    for name, run in report["runs"].items():
        for field in RUN_FIELDS:
            assert field in run, (name, field)
            assert isinstance(run[field], (int, float)) and math.isfinite(run[field]), \
                (name, field, run[field])
        assert run["steps"] == tiny().steps
        assert 0.0 <= run["auc"] <= 1.0 and run["logloss"] > 0
        assert run["dp_bytes_per_step"] > 0 and run["mp_bytes_per_step"] > 0
        assert run["dp_compression"] == pytest.approx(
            run["dp_bytes_ring_per_step"] / run["dp_bytes_per_step"])
        assert run["mp_compression"] == pytest.approx(
            run["mp_bytes_dense_per_step"] / run["mp_bytes_per_step"])
    dense = report["runs"]["dense"]
    assert dense["dp_compression"] == 1 and dense["mp_compression"] == 1
    assert report["runs"]["dct_dp"]["dp_compression"] > 5
    assert report["runs"]["dct_dp"]["mp_compression"] == 1
    assert report["runs"]["dct_dp_mp"]["mp_compression"] > 5
    for name in ("dlrm.md", "dlrm_quality.png", "dlrm_bytes.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0
    with open(os.path.join(out_dir, "dlrm.md")) as f:
        table = f.read()
    assert all(f"| {name} |" in table for name in report["runs"])
    assert f"dct_kernels backend {CPU_KERNELS})" in table


def test_smoke_bytes_match_wrapped_collectives(smoke):
    """Per step, from step 2 on (steps 0 and 1 carry the one-time cross-rank checks of the DP
    hook and of the MP exchange), the bytes the trainer reports from the package's counters
    equal those counted by wrapping the collectives, on every rank."""
    _, ranks, _ = smoke
    steps = tiny().steps
    for rank, got in enumerate(ranks):
        assert got["unexpected"] == [], got["unexpected"]
        for run, series in got["series"].items():
            counted = got["per_step"][run]
            assert len(counted) == steps and series["step"] == list(range(1, steps + 1))
            for step in range(2, steps):
                dp_counted = counted[step]["dp"] - counted[1]["dp"]
                dp_reported = series["dp_bytes"][step] - series["dp_bytes"][1]
                assert dp_reported == pytest.approx(dp_counted, rel=1e-9), (rank, run, step)
                mp_counted = counted[step]["mp_sent"] - counted[1]["mp_sent"]
                mp_reported = series["mp_bytes"][step] - series["mp_bytes"][1]
                assert mp_reported == pytest.approx(mp_counted, rel=1e-9), (rank, run, step)
                # equal blocks: a rank receives what it sends
                assert counted[step]["mp_received"] - counted[1]["mp_received"] == \
                    pytest.approx(mp_counted)
            # the dense exchanges' own baselines equal what was really moved
            if run == "dense":
                assert series["dp_ring"][-1] == pytest.approx(series["dp_bytes"][-1])
            if run != "dct_dp_mp":
                assert series["mp_dense"][-1] == pytest.approx(series["mp_bytes"][-1])
            else:
                assert series["mp_bytes"][-1] < series["mp_dense"][-1] / 5


def test_smoke_ranks_end_identical(smoke):
    report, ranks, _ = smoke
    for run in report["runs"]:
        assert ranks[0]["digests"][run] == ranks[1]["digests"][run], run
        assert report["runs"][run]["ranks_identical"] is True


# ------------------------------------------------------- baselines: bytes, identical ranks

BASELINE_RUNS = ("dense", "bf16", "powersgd")


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """A tiny loopback run of dense, bf16 and powersgd, with the collectives wrapped."""
    return _two_rank_run(tmp_path_factory, "dlrm_baselines", BASELINE_RUNS)[:2]


def _ring(nbytes, world=2):
    """Sent plus received by one rank in a ring all-reduce of ``nbytes``."""
    return 4 * (world - 1) / world * nbytes


def _powersgd_step_bytes(cfg, world=2):
    """What torch's powerSGD_hook all-reduces per compressed step on the DLRM's data-parallel
    part (one bucket), from the parameters' shapes alone: per matrix n x m of rank
    r = min(n, m, rank), P (n r) and Q (m r) when (n + m) r 2 < n m, else the whole matrix;
    vectors whole. Three all-reduces: the uncompressed tensors, the Ps, the Qs."""
    from dlrm.model import DenseArch

    arch = DenseArch(world, cfg.tower_width, width=cfg.width, vectors=cfg.vectors)
    plain = ps = qs = 0
    for p in arch.parameters():
        n = p.shape[0]
        m = p.numel() // n
        r = min(n, m, cfg.powersgd_rank)
        if p.dim() > 1 and (n + m) * r * 2 < n * m:
            ps, qs = ps + n * r, qs + m * r
        else:
            plain += p.numel()
    return sum(_ring(4 * k, world) for k in (plain, ps, qs)), _ring(
        4 * sum(p.numel() for p in arch.parameters()), world)


def test_baseline_bytes_match_wrapped_collectives(baselines):
    """Every step of dense, bf16 and powersgd: the bytes the trainer reports equal those
    counted by wrapping the torch.distributed collectives; bf16 moves half of dense's DP and
    MP bytes; PowerSGD moves the whole fp32 bucket during its warm-up and afterwards what its
    P/Q all-reduces move, as computed from the shapes."""
    report, ranks = baselines
    cfg = tiny()
    start = cfg.powersgd_start()
    assert 2 <= start < cfg.steps
    compressed, full = _powersgd_step_bytes(cfg)
    assert compressed < full / 4
    for rank, got in enumerate(ranks):
        assert got["unexpected"] == [], got["unexpected"]
        assert set(got["series"]) == set(BASELINE_RUNS)
        per_run = {}
        for run, series in got["series"].items():
            counted = got["per_step"][run]
            assert len(counted) == cfg.steps and series["step"] == list(range(1, cfg.steps + 1))
            dp = [c["dp"] for c in counted]
            mp = [c["mp_sent"] for c in counted]
            assert series["dp_bytes"] == pytest.approx(dp, rel=1e-12), (rank, run)
            assert series["mp_bytes"] == pytest.approx(mp, rel=1e-12), (rank, run)
            assert [c["mp_received"] for c in counted] == pytest.approx(mp)
            per_run[run] = (np.diff([0] + dp), np.diff([0] + mp), series)
        dense_dp, dense_mp, dense = per_run["dense"]
        assert np.allclose(dense_dp, full)
        bf16_dp, bf16_mp, bf16 = per_run["bf16"]
        assert np.allclose(bf16_dp, dense_dp / 2) and np.allclose(bf16_mp, dense_mp / 2)
        assert bf16["dp_ring"][-1] == pytest.approx(dense["dp_ring"][-1])
        assert bf16["mp_dense"][-1] == pytest.approx(dense["mp_dense"][-1])
        psgd_dp, psgd_mp, psgd = per_run["powersgd"]
        assert np.allclose(psgd_dp[:start], full)
        assert np.allclose(psgd_dp[start:], compressed)
        assert np.allclose(psgd_mp, dense_mp / 2)
        assert psgd["dp_ring"][-1] == pytest.approx(dense["dp_ring"][-1])
    runs = report["runs"]
    assert runs["bf16"]["dp_compression"] == pytest.approx(2.0)
    assert runs["bf16"]["mp_compression"] == pytest.approx(2.0)
    assert runs["powersgd"]["mp_compression"] == pytest.approx(2.0)
    assert runs["powersgd"]["dp_compression_steady"] == pytest.approx(full / compressed)
    assert runs["powersgd"]["powersgd"]["buckets_plain"] == start
    assert runs["powersgd"]["powersgd"]["buckets_compressed"] == cfg.steps - start


def test_baseline_ranks_end_identical(baselines):
    report, ranks = baselines
    for run in BASELINE_RUNS:
        assert ranks[0]["digests"][run] == ranks[1]["digests"][run], run
        assert report["runs"][run]["ranks_identical"] is True


def test_time_to_target_fields(baselines):
    """target_auc is the dense run's final AUC - 0.002; every run's time_to_target_s is the
    training time at its first evaluation reaching it (None if none), within its train_s."""
    report, _ = baselines
    runs = report["runs"]
    assert report["link"] is None
    assert report["target_auc"] == pytest.approx(runs["dense"]["auc"] - 0.002)
    for name, run in runs.items():
        evals = run["evals"]
        assert len(evals["train_s"]) == len(evals["step"])
        assert evals["train_s"] == sorted(evals["train_s"])
        assert evals["train_s"][-1] == pytest.approx(run["train_s"])
        assert run["eval_s"] > 0
        reached = [i for i, auc in enumerate(evals["auc"]) if auc >= report["target_auc"]]
        if reached:
            assert run["time_to_target_s"] == evals["train_s"][reached[0]]
            assert run["steps_to_target"] == evals["step"][reached[0]]
        else:
            assert run["time_to_target_s"] is None and run["steps_to_target"] is None
    assert runs["dense"]["time_to_target_s"] is not None  # its final AUC is above its target


def test_time_to_target_without_dense():
    from dlrm.cli import add_time_to_target, time_to_target

    evals = {"step": [10, 20, 30], "auc": [0.6, 0.71, 0.70], "train_s": [1.0, 2.0, 3.0]}
    assert time_to_target(evals, 0.7) == (2.0, 20)
    assert time_to_target(evals, 0.8) == (None, None)
    assert time_to_target(evals, None) == (None, None)
    runs = {"bf16": {"auc": 0.7, "evals": evals}}
    assert add_time_to_target(runs) is None
    assert runs["bf16"]["time_to_target_s"] is None


# --------------------------------------------------------------- the emulated cluster (--link)

def _cli_exit(argv, capsys):
    """Run the trainer's main in this process; (exit status or message, stderr)."""
    from dlrm import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--link", "1gbit", "--ranks", "1"], "--link needs at least 2 ranks"),
    (["--tiny", "--link", "fast"], "--link: 'fast' is not a rate as tc writes it"),
    (["--tiny", "--link", "1 gbit"], "is not a rate"),
    (["--tiny", "--link", "0mbit"], "zero"),
    (["--tiny", "--link", "1gbit", "--ranks", "16"], "2 to 8 ranks"),
    (["--tiny", "--link-delay", "5"], "need --link"),
    (["--tiny", "--link-delay", "5ms"], "need --link"),  # tc's form, as the number of ms
    (["--tiny", "--runs", "dense,sgd"], "unknown run 'sgd'"),
    (["--tiny", "--runs", "dense,dense"], "names a run twice"),
    (["--tiny", "--capacity-factor", "0"], "--capacity-factor (capacity_factor): expected"),
    (["--tiny", "--warmup-steps", "-5"], "--warmup-steps (warmup_steps): expected >= 0"),
    (["--tiny", "--seed", "-1"], "--seed (seed): expected >= 0"),
    (["--tiny", "--data-file", "/nonexistent/day_0.tsv"], "--data-file (data_file):"),
    (["--tiny", "--batch-size", "3"], "--batch-size (batch_size): 3 does not split"),
    (["--tiny", "--sweep", "--runs", "dense"], "--sweep always runs dense and its"),
])
def test_argument_errors_before_anything_starts(argv, message, capsys):
    """Clear errors naming the option, before any cluster or rank exists."""
    code, _ = _cli_exit(argv, capsys)
    assert isinstance(code, str) and message in code, code


def test_a_delay_that_is_not_one_names_the_flag(capsys):
    code, err = _cli_exit(["--tiny", "--link", "1gbit", "--link-delay", "5 parsecs"], capsys)
    assert code == 2 and "--link-delay: '5 parsecs' is not a delay" in err, err


def test_quick_and_tiny_are_one_or_the_other(capsys):
    code, err = _cli_exit(["--quick", "--tiny"], capsys)
    assert code == 2 and "--quick and --tiny" in err, err


def test_link_without_privileges_gives_the_clusters_message(monkeypatch, capsys):
    """Without CAP_SYS_ADMIN/CAP_NET_ADMIN the launcher stops with the cluster's message
    (exit status 1) before creating anything."""
    import cluster

    monkeypatch.setattr(cluster, "_capabilities", lambda: 0)
    before = cluster.list_namespaces()
    code, err = _cli_exit(["--tiny", "--link", "1gbit"], capsys)
    assert code == 1
    assert "the emulated cluster needs root" in err and "CAP_NET_ADMIN" in err, err
    assert cluster.list_namespaces() == before


def test_link_delay_without_netem_gives_the_clusters_message(capsys):
    """On a kernel without netem (this machine's) --link-delay stops with the cluster's
    message, before anything is created (--link-loss alone works: a random dropper)."""
    import cluster

    reason = cluster.unavailable_reason()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")
    if cluster._kernel_has_netem() is not False:
        pytest.skip("this kernel has netem (or its configuration cannot be read)")
    before = cluster.list_namespaces()
    for flags in (["--link-delay", "1"], ["--link-delay", "1", "--link-loss", "1"]):
        code, err = _cli_exit(["--tiny", "--link", "1gbit", *flags], capsys)
        assert code == 1 and "netem" in err, err
    assert cluster.list_namespaces() == before


def test_the_ranks_command_line_on_the_cluster(tmp_path, monkeypatch):
    """Without the --link options, with --out and --threads explicit, and the paths it names
    absolute: the ranks start in the repository's root, not in the caller's folder."""
    from dlrm import cli

    monkeypatch.chdir(tmp_path)
    argv = ["--tiny", "--link", "1gbit", "--link-loss=1", "--data-file", "day_0.tsv",
            "--checkpoint-dir=ckpt", "--out", "old", "--threads", "3", "--runs", "dense"]
    got = cli._rank_argv(argv, "results", 1)
    assert got[2:] == ["--tiny", "--data-file", str(tmp_path / "day_0.tsv"),
                       f"--checkpoint-dir={tmp_path / 'ckpt'}", "--runs", "dense",
                       "--out", str(tmp_path / "results"), "--threads", "1"]


def test_the_tables_exchange_is_a_dct_runs():
    from dlrm import report

    assert report._dp_exchange({"dct_dp_mp": {"dp_exchange": "allgather"}}) == "allgather"
    assert report._dp_exchange({"dct_dp": {"dp_exchange": "reduce_scatter"},
                                "dct_dp_mp": {"dp_exchange": "allgather"}}) == "reduce_scatter"
    assert report._dp_exchange({"dense": {}}) == "-"


def test_link_smoke_run(tmp_path):
    """--tiny --link 1gbit --ranks 2 with all five runs: dlrm.json carries the link (set and
    measured rate), target_auc, and per run train_s and time_to_target_s; the AUCs and bytes
    are those of the same runs on loopback; nothing is left in ip netns list."""
    import subprocess

    import cluster

    pytest.importorskip("sklearn")
    reason = cluster.unavailable_reason()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")
    out_dir = tmp_path / "out"
    runs = "dense,bf16,powersgd,dct_dp,dct_dp_mp"
    proc = subprocess.Popen([sys.executable, TRAIN_DLRM, "--tiny", "--link", "1gbit", "--ranks",
                             "2", "--runs", runs, "--out", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=4 * SMOKE_DEADLINE_S)
    assert proc.returncode == 0, err[-3000:]
    assert [n for n in cluster.list_namespaces()
            if n.startswith(f"{cluster.PREFIX}{proc.pid}-")] == []
    with open(out_dir / "dlrm.json") as f:
        report = json.load(f)
    link = report["link"]
    assert link["rate_bit_s"] == 10**9 and link["rate"] == "1gbit"
    assert link["measured_bit_s"] > 0
    assert link["delay_ms"] is None and link["loss_pct"] is None
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert list(report["runs"]) == runs.split(",")
    assert report["target_auc"] == pytest.approx(report["runs"]["dense"]["auc"] - 0.002)
    for name, run in report["runs"].items():
        assert run["train_s"] > 0 and run["step_ms"] > 0, name
        assert "time_to_target_s" in run, name
        assert run["ranks_identical"] is True, name
    assert report["config"]["ranks"] == 2
    assert "| powersgd |" in out and "emulated links of 1gbit" in out


def test_one_rank_run_reports_every_field(tmp_path):
    """World size 1 (the layout of a one-GPU run): no byte crosses the network, and the
    report still carries every field, finite: the MP compressions at 1, the dense-wire runs'
    DP compressions at 1, and the DCT runs' at 0 (DCTState.stats() counts the all-gather's own
    buffer as sent while a ring at W = 1 moves nothing: docs/distributed.md#statistics)."""
    import subprocess

    pytest.importorskip("sklearn")
    out_dir = tmp_path / "out"
    done = subprocess.run([sys.executable, TRAIN_DLRM, "--tiny", "--ranks", "1", "--out",
                           str(out_dir)], capture_output=True, text=True,
                          timeout=SMOKE_DEADLINE_S)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out_dir / "dlrm.json") as f:
        report = json.load(f)
    assert report["world_size"] == 1
    assert report["kernel_backend"] == CPU_KERNELS
    for name, run in report["runs"].items():
        for field in RUN_FIELDS:
            assert isinstance(run[field], (int, float)) and math.isfinite(run[field]), \
                (name, field, run[field])
        assert run["mp_bytes_per_step"] == 0 and run["mp_bytes_dense_per_step"] == 0
        assert run["mp_compression"] == 1.0
        assert run["dp_bytes_ring_per_step"] == 0
        assert run["dp_compression"] == (0.0 if name.startswith("dct") else 1.0), name


def test_missing_core_note(monkeypatch):
    """bench/kernel_backend.py: no line while the device's compiled core is usable; one naming
    the core, the backend used instead and the reason when it is not."""
    import types

    import kernel_backend

    available = dict(kernel_backend.dct_kernels.available_backends(), cpu="available")
    monkeypatch.setattr(kernel_backend.dct_kernels, "available_backends", lambda: available)
    assert kernel_backend.missing_core_note("cpu") is None
    assert kernel_backend.missing_core_note("meta") is None  # no compiled core for the device
    available["cpu"] = "extension not built (dct_kernels._cpu is missing)"
    monkeypatch.setattr(kernel_backend, "resolve", lambda backend, device: types.SimpleNamespace(
        NAME=backend or "torch"))
    assert kernel_backend.missing_core_note("cpu") == (
        "note: the ops on cpu tensors run on the torch backend, not dct_kernels._cpu: "
        "extension not built (dct_kernels._cpu is missing)")


# ------------------------------------------------------------------------------- criteo

def _criteo_line(rng, label=None):
    ints = []
    for _ in range(13):
        roll = rng.random()
        ints.append("" if roll < 0.1 else str(int(rng.integers(-2, 5000))))
    cats = []
    for _ in range(26):
        cats.append("" if rng.random() < 0.1 else f"{int(rng.integers(0, 2**32)):08x}")
    label = str(int(rng.integers(0, 2))) if label is None else label
    return "\t".join([label] + ints + cats)


def test_criteo_reader_parses_and_hashes(tmp_path):
    rng = np.random.default_rng(7)
    lines = [_criteo_line(rng) for _ in range(50)]
    path = tmp_path / "day.tsv"
    path.write_text("\n".join(lines) + "\n")
    hash_size = 1009
    logs = criteo.read_criteo(str(path), hash_size=hash_size, heldout_fraction=0.2)
    assert logs.dense.shape == (50, 13) and logs.ids.shape == (50, 26)
    assert logs.num_train == 40 and logs.num_heldout == 10
    assert logs.table_sizes == [hash_size] * 26 and logs.teacher_prob is None
    for i, line in enumerate(lines):
        fields = line.split("\t")
        assert logs.labels[i] == float(fields[0])
        for j in range(13):
            text = fields[1 + j]
            expect = 0.0 if text == "" else math.log1p(max(int(text), 0))
            assert logs.dense[i, j] == pytest.approx(expect, rel=1e-6)
        for j in range(26):
            text = fields[14 + j]
            expect = 0 if text == "" else 1 + int(text, 16) % (hash_size - 1)
            assert logs.ids[i, j] == expect
    assert logs.ids.min() >= 0 and logs.ids.max() < hash_size
    assert (logs.ids == 0).any() and (logs.dense == 0).any()  # missing values were drawn


@pytest.mark.parametrize("mangle, message", [
    (lambda f: f[:-1], "40 tab-separated columns"),
    (lambda f: ["2"] + f[1:], "label"),
    (lambda f: f[:3] + ["12x"] + f[4:], "I3"),
    (lambda f: f[:20] + ["zz12"] + f[21:], "C7"),
    # What int() would take but a log never holds:
    (lambda f: f[:3] + ["1_000"] + f[4:], "I3"),
    (lambda f: f[:3] + [" 12"] + f[4:], "I3"),
    (lambda f: f[:3] + ["+12"] + f[4:], "I3"),
    (lambda f: f[:20] + ["0x1f"] + f[21:], "C7"),
    (lambda f: f[:20] + ["-1f"] + f[21:], "C7"),
    (lambda f: f[:20] + ["1_f"] + f[21:], "C7"),
    (lambda f: f[:20] + [" 1f"] + f[21:], "C7"),
])
def test_criteo_reader_bad_line_names_the_line(tmp_path, mangle, message):
    rng = np.random.default_rng(11)
    lines = [_criteo_line(rng) for _ in range(6)]
    lines[3] = "\t".join(mangle(lines[3].split("\t")))
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"bad.tsv:4: .*{message}"):
        criteo.read_criteo(str(path), hash_size=100)


def test_criteo_reader_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_file"):
        criteo.read_criteo(str(tmp_path / "missing.tsv"))
    path = tmp_path / "one.tsv"
    path.write_text(_criteo_line(np.random.default_rng(0)) + "\n")
    with pytest.raises(ValueError, match="hash_size"):
        criteo.read_criteo(str(path), hash_size=1)
    with pytest.raises(ValueError, match="too few"):
        criteo.read_criteo(str(path))


# ------------------------------------------------------------------------ data and pieces

def test_synthetic_data_is_seeded_and_power_law():
    a = dlrm_data.generate(4000, 1000, seed=3, num_tables=6, min_rows=50, max_rows=5000)
    b = dlrm_data.generate(4000, 1000, seed=3, num_tables=6, min_rows=50, max_rows=5000)
    c = dlrm_data.generate(4000, 1000, seed=4, num_tables=6, min_rows=50, max_rows=5000)
    for name in ("dense", "ids", "labels", "teacher_prob"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.ids, c.ids)
    assert a.table_sizes == [50, 126, 315, 792, 1991, 5000]
    assert a.ids.shape == (5000, 6) and a.num_train == 4000
    for t, rows in enumerate(a.table_sizes):
        assert 0 <= a.ids[:, t].min() and a.ids[:, t].max() < rows
    counts = np.sort(np.bincount(a.ids[:, 5], minlength=5000))[::-1]
    assert counts[0] > 50 * max(1, counts[len(counts) // 2])  # a heavy head, a thin tail
    assert 0.15 < a.labels.mean() < 0.35
    # the labels follow the teacher: clicks are likelier where it says so
    assert a.labels[a.teacher_prob > 0.5].mean() > a.labels[a.teacher_prob < 0.2].mean() + 0.3


def test_shard_tables_covers_every_table_once():
    sizes = dlrm_data.table_sizes(26, 100, 100_000)
    for world in (1, 2, 3, 8, 26):
        shards = shard_tables(sizes, world)
        assert sorted(t for s in shards for t in s) == list(range(26))
        assert all(s for s in shards)
    with pytest.raises(ValueError, match="more ranks than tables"):
        shard_tables(sizes[:3], 4)


def test_row_wise_adagrad_against_dense_formula():
    g = torch.Generator().manual_seed(5)
    table = torch.nn.EmbeddingBag(20, 3, mode="sum", sparse=True)
    with torch.no_grad():
        table.weight.normal_(generator=g)
    reference = table.weight.detach().clone().double()
    state = torch.zeros(20, dtype=torch.float64)
    opt = RowWiseAdagrad([table.weight], lr=0.1)
    for _ in range(3):
        ids = torch.randint(0, 20, (12,), generator=g)  # repeats: duplicates are summed
        target = torch.randn(12, 3, generator=g)
        out = table(ids, torch.arange(12))
        loss = ((out - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        dense_grad = torch.zeros(20, 3, dtype=torch.float64)
        dense_grad.index_add_(0, ids, 2 * (out.detach() - target).double())
        opt.step()
        touched = torch.unique(ids)
        state[touched] += dense_grad[touched].pow(2).mean(dim=1)
        reference[touched] -= 0.1 * dense_grad[touched] / (state[touched].sqrt() + 1e-8
                                                          ).unsqueeze(1)
        assert torch.allclose(table.weight.double(), reference, rtol=1e-5, atol=1e-6)


def test_sweep_report_without_a_teacher():
    """A sweep over a Criteo file (no teacher) writes its table with the teacher's AUC as n/a."""
    from dlrm import sweep

    row = {"axis": "dense", "run": "dense", "dp_ratio": 0.003, "mp_k": 4,
           "capacity_factor": 1.5, "auc": 0.71, "logloss": 0.5, "dp_compression": 1.0,
           "dp_compression_steady": 1.0, "mp_compression": 1.0, "dp_overflow_frequency": 0.0,
           "step_ms": 1.0, "wall_s": 1.0}
    report = {"device": "cpu", "world_size": 2, "kernel_backend": {}, "teacher_auc": None,
              "config": {"steps": 10, "batch_size": 8, "seed": 0, "dp_ratio": 0.003,
                         "mp_k": 4, "tower_width": 64, "capacity_factor": 1.5},
              "rows": [row], "wall_s": 1.0}
    assert "teacher AUC n/a" in sweep.markdown(report)
