#!/usr/bin/env bash
# Install (into .venv) and run the main job: a small benchmark of every op on this machine's
# device (the GPU if there is one, else the CPU), printing a table.
source "$(dirname "$0")/setup_env.sh"
python bench/run.py --quick "$@"
