#!/usr/bin/env bash
# The distributed scale checks at 64 gloo ranks on this machine (tests/test_distributed_64.py):
# about 20 GB of memory and 10-20 minutes on 2 cores. Not part of the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
DCT_TEST_64_RANKS=1 exec python -m pytest -q tests/test_distributed_64.py "$@"
