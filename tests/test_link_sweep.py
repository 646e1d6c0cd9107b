"""bench/link_sweep.py's analysis on made-up sweep points whose step times follow the model
exactly (step = a + b / rate): the fit recovers a and b, the break-even rates are where the
lines cross, and the tables and plots are written. No trainer runs here; the trainer on the
emulated cluster is tested in tests/test_dlrm.py."""

import json
import os

import pytest

import link_sweep  # bench/link_sweep.py (pyproject's pythonpath)

# run: (a in ms, exposed bytes per step, bytes sent per step (DP sent+received, MP sent))
MODEL = {
    "dense": (20.0, 2.0e6, (1.2e6, 2.0e6)),
    "bf16": (21.0, 1.0e6, (0.6e6, 1.0e6)),
    "powersgd": (30.0, 0.9e6, (0.1e6, 1.0e6)),
    "dct_dp": (24.0, 1.6e6, (0.01e6, 2.0e6)),
    "dct_dp_mp": (26.0, 0.1e6, (0.01e6, 0.1e6)),
}
RATES = {"loopback": None, "10gbit": 10e9, "1gbit": 1e9, "500mbit": 0.5e9}


def _points():
    points = []
    for label, rate in RATES.items():
        measured = None if rate is None else 0.95 * rate
        runs = {}
        for name, (a, exposed, (dp, mp)) in MODEL.items():
            step = a + (0 if rate is None else exposed * 8 / measured * 1e3)
            evals = {"step": [10, 20], "auc": [0.70, 0.78], "train_s": [step / 100, step / 50]}
            runs[name] = {"step_ms": step, "train_s": step / 50, "auc": 0.78,
                          "time_to_target_s": step / 50, "dp_bytes_per_step": dp,
                          "mp_bytes_per_step": mp, "evals": evals}
        report = {"device": "test", "world_size": 2, "config": {"steps": 20, "batch_size": 8},
                  "wall_s": 1.0, "target_auc": 0.778, "runs": runs,
                  "link": None if rate is None else {"rate": label, "rate_bit_s": rate,
                                                     "measured_bit_s": measured}}
        points.append({"label": label, "rate_bit_s": rate, "measured_bit_s": measured,
                       "report": report})
    return points


def test_fit_recovers_the_model():
    fits = link_sweep.fit_runs(_points())
    for name, (a, exposed, (dp, mp)) in MODEL.items():
        assert fits[name]["compute_ms"] == pytest.approx(a)
        assert fits[name]["exposed_bytes"] == pytest.approx(exposed)
        assert fits[name]["rms_ms"] == pytest.approx(0, abs=1e-9)
        assert fits[name]["wire_bytes_per_step"] == pytest.approx(dp / 2 + mp)
        assert fits[name]["exposed_fraction"] == pytest.approx(exposed / (dp / 2 + mp))


def _cross(run, ref, speedup=1):
    (a1, b1, _), (a2, b2, _) = MODEL[run], MODEL[ref]
    # a1 / s + 8 b1 / r = a2 / s + 8 b2 / r  ->  r = 8 (b2 - b1) s / (a1 - a2) (a in s)
    return 8 * (b2 - b1) * speedup / ((a1 - a2) / 1e3)


def test_break_even_measured_and_modelled():
    points = _points()
    summary = link_sweep.analyse(points)
    be = summary["break_even"]
    # dct_dp_mp against dense: the lines cross at one rate; below it DCT is faster.
    item = be["dct_dp_mp"]["dense"]
    expect = _cross("dct_dp_mp", "dense")
    assert item["modelled"]["1"]["faster_at"] == "below"
    assert item["modelled"]["1"]["rate_bit_s"] == pytest.approx(expect, rel=0.02)
    assert item["modelled"]["100"]["rate_bit_s"] == pytest.approx(100 * expect, rel=0.02)
    # measured: interpolated linearly in 1 / rate, exact for points on a line
    assert item["measured"]["faster_at"] == "below"
    assert item["measured"]["rate_bit_s"] == pytest.approx(expect, rel=1e-9)
    # the best baseline is bf16 at every rate here (below 1e10 bit/s, powersgd never wins)
    best = be["dct_dp_mp"]["best_baseline"]
    assert best["modelled"]["1"]["rate_bit_s"] == pytest.approx(
        _cross("dct_dp_mp", "bf16"), rel=0.02)
    # dct_dp is slower than bf16 everywhere: more exposed bytes and more compute
    assert be["dct_dp"]["best_baseline"]["measured"] == {"rate_bit_s": None,
                                                         "faster_at": "none"}


def test_break_even_cases():
    xs = [0.0, 1e-10, 1e-9, 2e-9]
    assert link_sweep.break_even(xs, [1, 1, 1, 1], [2, 2, 2, 2])["faster_at"] == "all"
    assert link_sweep.break_even(xs, [3, 3, 3, 3], [2, 2, 2, 2])["faster_at"] == "none"
    above = link_sweep.break_even(xs, [1, 1, 3, 5], [2, 2, 2, 2])
    assert above["faster_at"] == "above"
    assert above["rate_bit_s"] == pytest.approx(1 / 5.5e-10)  # halfway from 1e-10 to 1e-9
    assert link_sweep.break_even(xs, [1, 3, 1, 3], [2, 2, 2, 2])["faster_at"] == "mixed"


def test_write_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    points = _points()
    summary = link_sweep.analyse(points)
    link_sweep.write(summary, points, str(tmp_path))
    for name in ("link_sweep.json", "link_sweep.md", "link_sweep_step.png",
                 "link_sweep_time_to_auc.png", "link_sweep_model.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    text = (tmp_path / "link_sweep.md").read_text()
    assert "modelled" in text and "| 1gbit | 950 Mbit/s |" in text
    with open(tmp_path / "link_sweep.json") as f:
        assert json.load(f)["points"] == list(RATES)


def test_load_points_reads_each_rates_folder(tmp_path):
    for p in _points()[:2]:
        os.makedirs(tmp_path / p["label"])
        with open(tmp_path / p["label"] / "dlrm.json", "w") as f:
            json.dump(p["report"], f)
    points = link_sweep.load_points(str(tmp_path), list(RATES))
    assert [p["label"] for p in points] == ["loopback", "10gbit"]
    assert points[0]["measured_bit_s"] is None and points[1]["rate_bit_s"] == 10e9


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        link_sweep.main(["--rates", "loopback,fast", "--analyse-only"])
    assert "not a rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        link_sweep.main(["--runs", "dense,sgd", "--analyse-only"])
    assert "unknown sgd" in capsys.readouterr().err


def test_fit_ignores_one_disturbed_point():
    """Theil-Sen: one point far off the line (a step slowed by another job) leaves the fit
    close to the line through the others."""
    xs = [0.0, 1e-10, 4e-10, 1e-9, 2e-9]
    ys = [0.020 + 2e6 * 8 * x for x in xs]
    ys[0] = 0.045  # loopback slowed
    line = link_sweep.fit_line(xs, ys)
    assert line["a"] == pytest.approx(0.020, rel=0.05)
    assert line["b"] == pytest.approx(16e6, rel=0.05)
    assert link_sweep.fit_line([1.0, 1.0], [2.0, 4.0])["b"] is None
