#!/usr/bin/env bash
# One call on a GPU machine: environment, GPU tests, benchmark. Everything lands in $OUT (or
# ./device_check_out). Usage: bash bench/device_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
QUICK="${1:-}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  "$PY" -c "import dct_kernels as d; print(d.available_backends())"
} 2>&1 | tee "$OUT/env.txt"

# The extension (when csrc/ has kernels) is built in place; a failure is reported, not fatal.
if [ -f setup.py ] && grep -q "cmake" setup.py 2>/dev/null; then
  timeout 240 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    && echo "extension build: ok" || echo "extension build: FAILED (see build.log)"
fi

# FULL_SUITE=1 runs every test on the GPU (several minutes: each Triton variant compiles);
# by default the GPU-only tests, the look-back and custom-op tests.
TESTS="${TESTS:-tests/test_gpu.py tests/test_lookback.py tests/test_library.py}"
[ -n "${FULL_SUITE:-}" ] && TESTS="tests"
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider $TESTS 2>&1 \
  | tee "$OUT/pytest.log" | tail -25

if [ -z "${SKIP_SWEEP:-}" ]; then
  timeout 60 "$PY" bench/sweep_blocks.py --out "$OUT" 2>&1 | tee "$OUT/sweep.log" | tail -12
  timeout 30 "$PY" bench/profile_host.py > "$OUT/profile.log" 2>&1; head -60 "$OUT/profile.log"
fi

if [ "$QUICK" = "--quick" ]; then
  timeout 100 "$PY" bench/run.py --sizes 16 20 24 28 --ratios 0.01 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
else
  timeout "${BENCH_TIMEOUT:-300}" "$PY" bench/run.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi
cat "$OUT/results.md" 2>/dev/null | tail -40
