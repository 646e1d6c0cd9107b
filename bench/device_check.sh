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

timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py \
  ${FULL_SUITE:+tests} 2>&1 | tee "$OUT/pytest.log" | tail -25

if [ "$QUICK" = "--quick" ]; then
  timeout 200 "$PY" bench/run.py --sizes 16 20 24 28 --ratios 0.01 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
else
  timeout "${BENCH_TIMEOUT:-300}" "$PY" bench/run.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi
cat "$OUT/results.md" 2>/dev/null | tail -40
