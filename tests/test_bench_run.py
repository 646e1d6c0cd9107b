"""bench/run.py refuses bad options before it measures anything, naming the option."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "run.py")


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "0"], "--ratios"), (["--ratios", "nan"], "--ratios"),
    (["--sizes", "40"], "--sizes"), (["--backends", "nope"], "--backends: unknown ['nope']"),
])
def test_bad_options_are_refused_up_front(argv, message, tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--quick", "--csv",
                           str(tmp_path / "results.csv"), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "results.csv").exists()
