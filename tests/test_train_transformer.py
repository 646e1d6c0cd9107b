"""The transformer benchmark (bench/train_transformer.py) end to end at a tiny size: every run
trains without error on 2 gloo ranks, the ranks end identical, DCT moves fewer bytes than the
ring all-reduce it replaces, and the report has its fields; the byte-level text is the standard
library's own source."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import train_transformer as tt  # noqa: E402  (bench/train_transformer.py)

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                      "train_transformer.py")


def test_stdlib_text_is_real_python_source():
    text = tt.stdlib_text(1 << 16)
    assert len(text) == 1 << 16
    assert b"def " in text and b"import " in text


def test_tasks_are_seeded_and_learnable_in_shape():
    for name in tt.TASKS:
        a, b = tt.Task(name, 3), tt.Task(name, 3)
        xa, ya = a.batch(rank=1, step=5, size=8)
        xb, yb = b.batch(rank=1, step=5, size=8)
        assert xa.equal(xb) and ya.equal(yb), name
        other, _ = a.batch(rank=0, step=5, size=8)
        assert not other.equal(xa), name  # each rank draws its own batch
        assert xa.shape == (8, tt.SEQ[name]) and int(xa.max()) < 256
        if name == "classify":
            # Labels follow the fixed token weights; both classes occur.
            x, y = a.heldout
            assert y.equal((a.weights[x].sum(1) > 0).long()) and 0 < int(y.sum()) < len(y)


def test_tiny_runs_end_identical_and_report(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, SCRIPT, "--ranks", "2", "--steps", "12",
                           "--tasks", "classify,lm_synthetic", "--runs",
                           "dense,fp16,powersgd,dct,dct_rs", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "transformers.json") as f:
        report = json.load(f)
    assert report["world_size"] == 2 and report["transformers"]
    # The backend the ops ran on: the compiled core where it is built, else the reference.
    import dct_kernels
    built = dct_kernels.available_backends()["cpu"] == "available"
    assert report["kernel_backend"] == ("cpu" if built else "torch"), report["kernel_backend"]
    for task, runs in report["tasks"].items():
        assert set(runs) == {"dense", "fp16", "powersgd", "dct", "dct_rs"}
        for name, r in runs.items():
            assert r["ranks_identical"], (task, name)
            assert len(r["curve"]["quality"]) == len(r["curve"]["step"]) >= 1
            assert r["curve"]["step"][-1] == 12
        assert runs["dense"]["compression"] == pytest.approx(1.0)
        assert runs["fp16"]["compression"] == pytest.approx(2.0)
        # 10 dense warm-up steps of 12: DCT's two sparse steps already save bytes.
        assert runs["dct"]["compression"] > 1.0 and runs["dct"]["dp_stats"]["buckets_sparse"] > 0
        assert runs["dct_rs"]["dp_stats"]["buckets_reduce_scatter"] > 0
    assert (out / "transformers.md").exists()


def test_lr_schedules():
    def lrs(name, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=2.0)
        schedule = tt.lr_schedule(opt, name, steps)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        return out

    assert lrs("constant", 7) == [2.0] * 7
    got = lrs("cosine", 100)   # warm-up over 5 steps, then cosine to 0 at step 100
    assert got[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])
    assert got[5] == pytest.approx(2.0)
    assert got[6] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 95)))
    assert got[52] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert all(a >= b for a, b in zip(got[4:], got[5:])) and 0 < got[-1] < 0.01


def test_hidden_size():
    """--hidden widens both models (the BERT's MLP twice the hidden size); the same seed gives
    the same weights; a size the 4 heads cannot split is refused before anything starts."""
    for task in ("classify", "lm_text"):
        small, wide = tt.build_model(task, 0), tt.build_model(task, 0, hidden=64)
        assert small.config.hidden_size == 128 and wide.config.hidden_size == 64
        assert sum(p.numel() for p in wide.parameters()) < \
            sum(p.numel() for p in small.parameters())
        again = tt.build_model(task, 0, hidden=64)
        assert all(a.equal(b) for a, b in zip(wide.parameters(), again.parameters()))
    assert tt.build_model("classify", 0, hidden=64).config.intermediate_size == 128
    with pytest.raises(SystemExit):
        tt.main(["--hidden", "6", "--tasks", "classify", "--runs", "dense"])


def test_sgd_ema_is_adams_first_moment():
    # After steps with gradients g_1..g_t, sgd_ema has moved the weight by lr x the sum of the
    # running means m_1 = g_1, m_s = 0.9 m_(s-1) + 0.1 g_s (torch starts the buffer at g_1).
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, generator=gen) for _ in range(4)]
    w = torch.nn.Parameter(torch.randn(5, generator=gen))
    start = w.detach().clone()
    opt = tt.make_optimizer([w], "sgd_ema", 0.5)
    m, moved = torch.zeros(5), torch.zeros(5)
    for s, g in enumerate(grads):
        w.grad = g.clone()
        opt.step()
        m = g if s == 0 else 0.9 * m + 0.1 * g
        moved += 0.5 * m
    torch.testing.assert_close(start - w.detach(), moved, rtol=1e-6, atol=1e-6)
    assert isinstance(tt.make_optimizer([w], "adamw", 1e-3), torch.optim.AdamW)
    sgd = tt.make_optimizer([w], "sgd", 1e-3)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["dampening"] == 0


def test_dct_set_names_a_value_dtype(tmp_path):
    # A run's settings are recorded as given; value_dtype may be a torch dtype's name, and a
    # name that is not one is refused before anything starts.
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, SCRIPT, "--ranks", "1", "--steps", "12",
                           "--tasks", "lm_synthetic", "--runs", "dct",
                           "--dct-set", "value_dtype='bfloat16'", "--dct-set", "warmup_steps=2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "transformers.json") as f:
        run = json.load(f)["tasks"]["lm_synthetic"]["dct"]
    assert run["settings"]["value_dtype"] == "torch.bfloat16"
    with pytest.raises(SystemExit):
        tt.main(["--dct-set", "value_dtype='bfloat17'", "--out", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-3"], "--steps"), (["--batch", "0"], "--batch"), (["--lr", "0"], "--lr"),
    (["--dct-set", "foo=1"], "--dct-set"), (["--dct-set", "ratio=5"], "--dct-set: ratio"),
    (["--tasks", "poetry"], "--tasks"),
])
def test_bad_options_stop_before_any_rank(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        tt.main(argv + ["--out", str(tmp_path / "no")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
