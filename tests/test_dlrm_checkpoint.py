"""Checkpoints and restarts of the DLRM trainer (bench/dlrm/checkpoint.py): a run stopped
mid-way and started again equals the uninterrupted run bit for bit; a torn checkpoint (a
part truncated, the marker missing) is never loaded; a checkpoint of another configuration is
refused with the differing field named."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from dlrm import checkpoint
from dlrm.optim import RowWiseAdagrad

TRAIN_DLRM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                          "train_dlrm.py")
DEADLINE_S = 180
# Two runs, one DDP baseline and DCT on both sides, with the reduce_scatter exchange (the one
# whose shards depend on DDP's bucket order): checkpoints every 5 of the tiny 24 steps.
ARGS = ["--tiny", "--runs", "dense,dct_dp_mp", "--exchange", "reduce_scatter",
        "--checkpoint-every", "5"]
# Fields that are times (this invocation's, or summed over invocations): all others must be
# equal between a resumed and an uninterrupted run.
TIMES = {"step_ms", "step_ms_mean", "train_s", "eval_s", "checkpoint_s", "time_to_target_s",
         "resumed_from_step"}


def _train(out, *extra, check=True):
    done = subprocess.run([sys.executable, TRAIN_DLRM, *ARGS, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _report(out):
    with open(os.path.join(out, "dlrm.json")) as f:
        return json.load(f)


def _assert_same_runs(a, b):
    assert a["runs"].keys() == b["runs"].keys()
    for name, x in a["runs"].items():
        y = b["runs"][name]
        for field, value in x.items():
            if field in TIMES:
                continue
            if field == "evals":
                for key in ("step", "auc", "logloss"):
                    assert value[key] == y["evals"][key], (name, key)
            else:
                assert value == y[field], (name, field)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """An uninterrupted run, and a checkpoint folder of the same configuration stopped in the
    second run at step 13 (checkpoints at dense 5..20, after dense, dct_dp_mp 5 and 10)."""
    pytest.importorskip("sklearn")
    tmp = tmp_path_factory.mktemp("dlrm_ckpt")
    _train(tmp / "whole", "--checkpoint-dir", str(tmp / "whole_ckpt"))
    done = _train(tmp / "never", "--checkpoint-dir", str(tmp / "ckpt"), "--stop-after",
                  "dct_dp_mp:13", check=False)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "stopped after run dct_dp_mp step 13" in done.stderr
    assert not (tmp / "never" / "dlrm.json").exists()
    return tmp


def test_stopped_and_resumed_equals_uninterrupted(stopped, tmp_path):
    """The restart resumes at dct_dp_mp step 10, keeps the dense run's results, and ends with
    the same parameters (final_params_sha256), AUC, bytes and series as the whole run."""
    folder = tmp_path / "ckpt"
    shutil.copytree(stopped / "ckpt", folder)
    # Only the newest two complete checkpoints are kept.
    assert len(checkpoint.folders(str(folder))) == 2
    done = _train(tmp_path / "out", "--checkpoint-dir", str(folder))
    assert "(run dct_dp_mp step 10)" in done.stderr
    whole, resumed = _report(stopped / "whole"), _report(tmp_path / "out")
    _assert_same_runs(whole, resumed)
    assert resumed["runs"]["dct_dp_mp"]["resumed_from_step"] == 10
    assert resumed["runs"]["dense"]["resumed_from_step"] is None
    assert whole["runs"]["dct_dp_mp"]["resumed_from_step"] is None
    for run in resumed["runs"].values():
        assert len(run["final_params_sha256"]) == 64 and run["ranks_identical"]
    assert (whole["runs"]["dense"]["final_params_sha256"]
            != whole["runs"]["dct_dp_mp"]["final_params_sha256"])


def test_powersgd_resumes_mid_run(tmp_path):
    """The PowerSGD baseline is checkpointed within its run (torch's PowerSGDState through its
    own __getstate__/__setstate__, and the bucket's parameter order its memories are laid out
    in): stopped at step 13 after compression started (step 4), resumed from step 10, it ends
    with the uninterrupted run's parameters and AUC."""
    pytest.importorskip("sklearn")
    args = ["--runs", "powersgd", "--powersgd-start-iter", "4"]
    whole = subprocess.run([sys.executable, TRAIN_DLRM, "--tiny", *args, "--out",
                            str(tmp_path / "whole")], capture_output=True, text=True,
                           timeout=DEADLINE_S)
    assert whole.returncode == 0, whole.stderr[-3000:]
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "5"]
    stopped = subprocess.run([sys.executable, TRAIN_DLRM, "--tiny", *args, *ckpt,
                              "--stop-after", "powersgd:13", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=DEADLINE_S)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    resumed = subprocess.run([sys.executable, TRAIN_DLRM, "--tiny", *args, *ckpt, "--out",
                              str(tmp_path / "resumed")], capture_output=True, text=True,
                             timeout=DEADLINE_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(run powersgd step 10)" in resumed.stderr
    a = _report(tmp_path / "whole")["runs"]["powersgd"]
    b = _report(tmp_path / "resumed")["runs"]["powersgd"]
    assert b["resumed_from_step"] == 10
    assert a["final_params_sha256"] == b["final_params_sha256"]
    assert a["auc"] == b["auc"] and a["dp_bytes_per_step"] == b["dp_bytes_per_step"]


def test_torn_checkpoints_are_never_loaded(stopped, tmp_path):
    """The newest checkpoint with a truncated part, and then also without its marker: each
    time the previous complete one is used, with a warning naming the problem."""
    folder = tmp_path / "ckpt"
    shutil.copytree(stopped / "ckpt", folder)
    newest, previous = [p for _, p in checkpoint.folders(str(folder))]
    part = os.path.join(newest, "rank1.pt")
    size = os.path.getsize(part)
    with open(part, "r+b") as f:
        f.truncate(size // 2)
    marker = checkpoint.newest_complete(str(folder), _config_of(previous))
    assert marker["path"] == previous
    assert "rank1.pt has" in checkpoint.check_folder(newest)
    os.remove(os.path.join(newest, checkpoint.MARKER))
    assert checkpoint.check_folder(newest).startswith("no marker")
    # A missing part, not only a short one.
    os.remove(os.path.join(previous, "rank0.pt"))
    assert checkpoint.check_folder(previous) == "rank0.pt is missing"
    assert checkpoint.newest_complete(str(folder), _config_of(previous)) is None


def test_resume_skips_a_torn_checkpoint(stopped, tmp_path):
    """End to end: the newest part truncated, the trainer warns, resumes from the one before
    (dct_dp_mp step 5) and still ends equal to the uninterrupted run."""
    folder = tmp_path / "ckpt"
    shutil.copytree(stopped / "ckpt", folder)
    newest = checkpoint.folders(str(folder))[0][1]
    with open(os.path.join(newest, "rank0.pt"), "r+b") as f:
        f.truncate(100)
    done = _train(tmp_path / "out", "--checkpoint-dir", str(folder))
    assert f"ignored {newest}: rank0.pt has 100 bytes" in done.stderr
    assert "(run dct_dp_mp step 5)" in done.stderr
    _assert_same_runs(_report(stopped / "whole"), _report(tmp_path / "out"))


def test_another_configuration_is_refused(stopped, tmp_path):
    """Another --mp-k on the same folder: exit status 2 and a message naming mp_k; nothing is
    trained, nothing written."""
    folder = tmp_path / "ckpt"
    shutil.copytree(stopped / "ckpt", folder)
    before = sorted(os.listdir(folder))
    done = _train(tmp_path / "out", "--checkpoint-dir", str(folder), "--mp-k", "8",
                  check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "another configuration" in done.stderr
    assert "mp_k: checkpoint 4, this run 8" in done.stderr
    assert sorted(os.listdir(folder)) == before
    assert not (tmp_path / "out" / "dlrm.json").exists()


def test_finished_comparison_resumes_to_the_same_report(stopped, tmp_path):
    """The same command on a folder whose comparison finished trains nothing and writes the
    same results (a job restarted after its last checkpoint)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(stopped / "whole_ckpt", folder)
    done = _train(tmp_path / "out", "--checkpoint-dir", str(folder))
    assert "every run finished" in done.stderr
    _assert_same_runs(_report(stopped / "whole"), _report(tmp_path / "out"))


def _config_of(path):
    with open(os.path.join(path, checkpoint.MARKER)) as f:
        return json.load(f)["config"]


def test_differing_fields_and_digest():
    a = {"ranks": 2, "mp_k": 4, "steps": 24}
    b = dict(a, ranks=4)
    assert checkpoint.config_digest(a) == checkpoint.config_digest(dict(a))
    assert checkpoint.config_digest(a) != checkpoint.config_digest(b)
    assert checkpoint.differing_fields(a, b) == ["ranks: checkpoint 2, this run 4"]


def test_write_atomic_leaves_no_temporary(tmp_path):
    path = tmp_path / "part"
    checkpoint.write_atomic(str(path), b"x" * 10)
    checkpoint.write_atomic(str(path), b"y" * 3)
    assert path.read_bytes() == b"yyy"
    assert os.listdir(tmp_path) == ["part"]


def test_prune_keeps_the_newest_two_complete(tmp_path):
    for seq, complete in ((1, True), (2, True), (3, False), (4, True), (5, True), (6, False)):
        folder = tmp_path / f"ckpt-{seq:010d}"
        folder.mkdir()
        if complete:
            (folder / checkpoint.MARKER).write_text("{}")
    checkpoint.prune(str(tmp_path))
    assert [s for s, _ in checkpoint.folders(str(tmp_path))] == [6, 5, 4]


def test_row_wise_adagrad_state_round_trip():
    table = torch.nn.Parameter(torch.randn(5, 3))
    opt = RowWiseAdagrad([table], lr=0.1)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 3), (5, 3))
    opt.step()
    saved = opt.state_dict()
    other = RowWiseAdagrad([torch.nn.Parameter(torch.zeros(5, 3))], lr=0.2)
    other.load_state_dict(saved)
    assert other.lr == 0.1 and torch.equal(other.state[0], opt.state[0])
    opt.state[0].add_(1)  # the saved state is a copy
    assert not torch.equal(saved["state"][0], opt.state[0])
    with pytest.raises(ValueError, match="accumulators of shapes"):
        RowWiseAdagrad([torch.nn.Parameter(torch.zeros(4, 3))]).load_state_dict(saved)


def test_torchrun_restarts_a_killed_rank(tmp_path):
    """A rank SIGKILLed right after the first checkpoint under torchrun --max-restarts 1: the
    agent restarts both ranks, they resume from the checkpoint (their group's keys under the
    new attempt's prefix) and the report equals an uninterrupted run's."""
    pytest.importorskip("sklearn")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("no torchrun next to this Python")
    folder, out = tmp_path / "ckpt", tmp_path / "out"
    # One run of 400 tiny steps: the kill lands soon after the checkpoint at step 5, long
    # before the end.
    common = ["--tiny", "--runs", "dct_dp_mp", "--exchange", "reduce_scatter", "--steps", "400",
              "--checkpoint-every", "5", "--pg-timeout", "60"]
    whole = subprocess.run([sys.executable, TRAIN_DLRM, *common, "--out", str(tmp_path / "w"),
                            "--checkpoint-dir", str(tmp_path / "w_ckpt")],
                           capture_output=True, text=True, timeout=DEADLINE_S)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # --log-dir: the agent's own folder inside tmp_path (by default it makes one in /tmp and
    # leaves it there).
    job = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "2",
                            "--max-restarts", "1", "--log-dir", str(tmp_path / "torchrun"),
                            TRAIN_DLRM, *common,
                            "--checkpoint-dir", str(folder), "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not any(os.path.exists(os.path.join(p, checkpoint.MARKER))
                      for _, p in checkpoint.folders(str(folder))):
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        # A worker is any process but the agent whose command line names this checkpoint
        # folder (looked for until one shows: the agent may still be starting its workers).
        victims = []
        while not victims:
            assert job.poll() is None and time.monotonic() < deadline, \
                "the job ended before a rank could be killed"
            found = subprocess.run(["pgrep", "-f", f"train_dlrm.py.*{folder}"],
                                   capture_output=True, text=True).stdout.split()
            victims = [int(p) for p in found if int(p) != job.pid]
            if not victims:
                time.sleep(0.05)
        os.kill(victims[-1], signal.SIGKILL)
        output, _ = job.communicate(timeout=DEADLINE_S)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-3000:]
    assert "checkpoint: resuming from" in output
    resumed = _report(out)
    _assert_same_runs(_report(tmp_path / "w"), resumed)
    assert resumed["runs"]["dct_dp_mp"]["resumed_from_step"] is not None
