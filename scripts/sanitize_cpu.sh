#!/usr/bin/env bash
# Builds the cpu backend (dct_kernels._cpu) with AddressSanitizer and UndefinedBehaviorSanitizer
# into a temporary directory and runs the corrupted-payload tests (format versions 1 and 2), the
# cpu backend's own tests and the row ops' tests on it there: every out-of-bounds access, use
# after free or undefined operation aborts the run with a report. The installed package is left
# alone.
#
#   bash scripts/sanitize_cpu.sh [extra pytest arguments]
#
# Needs gcc's libasan/libubsan (the sanitized module is loaded into an uninstrumented python,
# so the runtimes are preloaded). Exit status: pytest's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dct_sanitize.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# The package's Python files, and the sanitized module built next to them.
mkdir -p "$WORK/pkg"
cp -r "$ROOT/dct_kernels" "$WORK/pkg/"
find "$WORK/pkg" \( -name "*.so" -o -name "__pycache__" \) -prune -exec rm -rf {} +
PYBIND11_DIR="$("$PYTHON" -c "import pybind11; print(pybind11.get_cmake_dir())")"
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)
cmake -S "$ROOT" -B "$WORK/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DDCT_BUILD_CUDA=OFF -DDCT_SANITIZE=ON -DDCT_OUTPUT_DIR="$WORK/pkg/dct_kernels" \
  -DPython_EXECUTABLE="$PYTHON" -Dpybind11_DIR="$PYBIND11_DIR" >/dev/null
cmake --build "$WORK/build" -j "${MAX_JOBS:-$(nproc)}" >/dev/null
echo "sanitized module: $(ls "$WORK"/pkg/dct_kernels/_cpu*.so)"

CXX_BIN="${CXX:-g++}"
PRELOAD="$("$CXX_BIN" -print-file-name=libasan.so) $("$CXX_BIN" -print-file-name=libubsan.so)"
# Run from the temporary directory: from the checkout, python would import the package there
# (the current directory comes first on sys.path) instead of the sanitized copy.
cd "$WORK"
# detect_leaks=0: CPython and torch keep allocations until exit by design, which LeakSanitizer
# would report; the kernels allocate only through std::vector.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export DCT_KERNELS_SANITIZED=1
LD_PRELOAD="$PRELOAD" PYTHONPATH="$WORK/pkg" "$PYTHON" -c \
  "import sys, dct_kernels; from dct_kernels import _cpu; print('testing', _cpu.__file__); sys.exit(not _cpu.__file__.startswith('$WORK'))"
LD_PRELOAD="$PRELOAD" PYTHONPATH="$WORK/pkg" "$PYTHON" -m pytest -q -p no:cacheprovider \
  --rootdir "$ROOT" "$ROOT/tests/test_errors.py" "$ROOT/tests/test_decompress.py" \
  "$ROOT/tests/test_decompress_many.py" "$ROOT/tests/test_payload.py" \
  "$ROOT/tests/test_cpu_backend.py" "$ROOT/tests/test_rows.py" "$ROOT/tests/test_codec.py" \
  "$ROOT/tests/test_threshold_rule.py" "$ROOT/tests/test_compress_shards.py" \
  -k "not triton and not torch-cpu" "$@"
