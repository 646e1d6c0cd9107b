#!/usr/bin/env bash
# Install everything the tests need (into .venv) and run the test suite.
# Without a GPU, the Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py).
source "$(dirname "$0")/setup_env.sh"
python -m pytest -q tests "$@"
