#!/usr/bin/env bash
# Build (or reuse) .venv-torchrec, the environment of the TorchRec integration, and run its
# tests (tests/torchrec, about three minutes on 2 cores). Kept apart from .venv, the main test
# run and CI because of its size: torch 2.14.1 from PyPI is the CUDA build, about 5.5 GB
# installed with its NVIDIA libraries (it runs on CPU too).
#
# The versions that load together (fbgemm is built for one torch release; its compatibility
# table maps 1.9 to torch 2.14, and torch 2.13 or 2.15 fail with "undefined symbol"):
#   torch 2.14.1, fbgemm-gpu-cpu 1.9.0, torchrec 1.9.2
# torchrec goes in with --no-deps: it requires the CUDA fbgemm-gpu, which would overwrite the
# cpu one. Its other dependencies are installed by name (pip then notes that torchrec pins
# torchmetrics 1.0.3; the integration does not use torchmetrics, and the current release works).
#
# dct_kernels is installed into the environment from a copy of this checkout's sources (with
# its compiled CPU core, built here), so that nothing is built into the checkout itself; it is
# reinstalled whenever those sources change. The tests then import that installed copy.
#
# Safe to run again. Extra arguments go to pytest. The last line is pytest's summary.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-torchrec"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# What this run creates in the temporary folder goes when it ends: the package's staged
# sources, and the (empty) inductor cache folder torch's DDP makes when first used.
scratch="$(mktemp -d -t dct_kernels_torchrec_XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$scratch/inductor}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c "import torchrec.distributed" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.14.1"
  "$PY" -m pip install -q "fbgemm-gpu-cpu==1.9.0"
  "$PY" -m pip install -q --no-deps "torchrec==1.9.2"
  "$PY" -m pip install -q tensordict torchmetrics tqdm pyre-extensions
fi
if ! "$PY" -c "import pytest, sklearn, pybind11, setuptools, wheel" >/dev/null 2>&1; then
  "$PY" -m pip install -q pytest scikit-learn numpy "setuptools>=77" wheel "pybind11>=2.10"
fi

# The package's build inputs (pyproject.toml, setup.py, MANIFEST.in and what they name).
SOURCES=(pyproject.toml setup.py MANIFEST.in CMakeLists.txt README.md csrc dct_kernels)
digest="$(find "${SOURCES[@]}" -type f ! -name '*.so' ! -name '*.pyc' -print0 | sort -z |
          xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.dct_kernels_sources"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  stage="$scratch/stage"
  mkdir -p "$stage"
  tar -cf - --exclude='__pycache__' --exclude='*.so' --exclude='*.egg-info' "${SOURCES[@]}" |
    tar -xf - -C "$stage"
  # The integration runs on gloo ranks: the CUDA core is not needed (DCT_KERNELS_CUDA=1
  # builds it anyway); the CPU core builds as in setup_env.sh, or the torch backend is used.
  DCT_KERNELS_CUDA="${DCT_KERNELS_CUDA:-0}" "$PY" -m pip install -q --no-deps \
    --no-build-isolation "$stage"
  echo "$digest" > "$stamp"
fi

"$PY" -P - <<'EOF'
from importlib import metadata
import dct_kernels
print("torch", metadata.version("torch"), "| fbgemm-gpu-cpu", metadata.version("fbgemm-gpu-cpu"),
      "| torchrec", metadata.version("torchrec"), "| dct_kernels", dct_kernels.__version__,
      "(backends:", dct_kernels.available_backends(), ")")
EOF
# -P: the checkout's root stays off sys.path, so the tests import the installed package.
"$PY" -P -m pytest -q -p no:cacheprovider tests/torchrec "$@"
