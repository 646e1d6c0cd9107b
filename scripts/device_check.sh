#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests, compute-sanitizer over
# one small run of every CUDA kernel, and the benchmark. Everything lands in $OUT (at most 8
# files) or ./device_check_out: build.log (with the environment), pytest.log, sanitize.log,
# profile.log, bench.log, results.md (this run's table), results.csv (the card's results file,
# bench/results/<card>/results.csv, with this run's rows replacing those of the same key: copy it
# back over the tracked one) and time_vs_n.png (bench/plot.py). Record the run in bench/NOTES.md.
#
# Knobs (environment): ARCH (CUDA architectures, default 90), TESTS / TEST_FILTER (what pytest
# runs), TEST_TIMEOUT, SANITIZERS ("memcheck racecheck synccheck"), SIZES (log2 sizes), RATIOS,
# BACKENDS (backends to time, default cuda), OPS, BENCH_TIMEOUT.
#
#   bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
# The extension is built in place below (no pip install on a bare GPU machine), so the checkout
# itself is the package the tests, the tools and the benchmark import.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
SECONDS=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nvcc --version | tail -2
} > "$OUT/build.log" 2>&1
cat "$OUT/build.log"

DCT_KERNELS_CUDA=1 DCT_KERNELS_CUDA_ARCH="${ARCH:-90}" timeout 300 \
  "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 \
  && echo "[$SECONDS s] extension build: ok" \
  || { echo "[$SECONDS s] extension build: FAILED"; tail -40 "$OUT/build.log"; }
"$PY" -c "import dct_kernels as d; print(d.available_backends())" 2>&1 | tee -a "$OUT/build.log"

TESTS="${TESTS:-tests}"
# The ops' CUDA cases, the CUDA extension's own tests and the NCCL ones (the hook's steady
# state and sparse_all_to_all under set_sync_debug_mode("error")); the Triton GPU variants
# (compiled at first use, minutes) only when asked for with TEST_FILTER.
TEST_FILTER="${TEST_FILTER:-cuda-cuda or (test_gpu and not triton) or test_cuda_ext or test_distributed_gpu or test_mp_exchange_gpu}"
timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest -q -p no:cacheprovider --maxfail=40 \
  -k "$TEST_FILTER" $TESTS > "$OUT/pytest.log" 2>&1
echo "[$SECONDS s] pytest rc=$?"; grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30

: > "$OUT/sanitize.log"
for tool in ${SANITIZERS:-memcheck racecheck synccheck}; do
  echo "=== $tool" >> "$OUT/sanitize.log"
  timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    "$PY" scripts/sanitize_cuda.py >> "$OUT/sanitize.log" 2>&1
  echo "[$SECONDS s] compute-sanitizer $tool rc=$?"
done
grep -E "ERROR SUMMARY|mismatch|Error|error" "$OUT/sanitize.log" | sort | uniq -c | head -20

if [ -z "${SKIP_PROFILE:-}" ]; then
  timeout 90 "$PY" scripts/profile_cuda.py > "$OUT/profile.log" 2>&1
  echo "[$SECONDS s] profile rc=$?"; cat "$OUT/profile.log"
fi

timeout "${BENCH_TIMEOUT:-200}" "$PY" bench/run.py --sizes ${SIZES:-20 24 28} \
  --ratios ${RATIOS:-0.01} --backends ${BACKENDS:-cuda} ${OPS:+--ops $OPS} --out "$OUT" \
  > "$OUT/bench.log" 2>&1
echo "[$SECONDS s] bench rc=$?"
grep -E "n=2\^28" "$OUT/bench.log"
