# Sourced by the scripts here: a virtual environment in .venv with torch, the test tools and
# dct_kernels installed from this checkout. Safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# A venv whose creation failed half-way (ensurepip missing) has bin/python but no activate:
# made anew rather than left to fail on every later run.
if [ ! -x .venv/bin/python ] || [ ! -f .venv/bin/activate ]; then
  rm -rf .venv
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch>=2.4"
  else
    pip install -q torch==2.13.0 || pip install -q "torch>=2.4"
  fi
fi
# Where nvcc is, build the CUDA extension and fail loudly if it does not build.
if command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
  export DCT_KERNELS_CUDA="${DCT_KERNELS_CUDA:-1}"
fi
pip install -q -e ".[test]"
# pip -q hides the build's own notes: say in one line when the cpu core was not built.
python - <<'PY'
import dct_kernels
why = dct_kernels.available_backends()["cpu"]
if why != "available":
    print(f"dct_kernels: the cpu backend is not built ({why}); cmake and a C++17 compiler "
          "build it (pip install -v -e . says why not)")
PY
