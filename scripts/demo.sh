#!/usr/bin/env bash
# The main job. Installs into .venv (scripts/setup_env.sh), then prints two tables:
#   1. the kernel microbenchmark's quick table (bench/run.py --quick; arguments go to it);
#   2. the end-to-end comparison: a hybrid-parallel DLRM trained dense, with the baselines a
#      user would pick (bf16, PowerSGD), with DCT-DP and with DCT-DP+MP on 2 spawned ranks
#      (bench/train_dlrm.py --quick; extra trainer options in $DLRM_ARGS, e.g.
#      DLRM_ARGS="--ranks 4", or as root DLRM_ARGS="--link 1gbit" for shaped links).
#      Results and plots in bench/results/<device>/.
source "$(dirname "$0")/setup_env.sh"
# torch's DDP makes an (empty) inductor cache folder under /tmp when first used: give it one
# of the job's own, removed when the job ends, however it ends.
if [ -z "${TORCHINDUCTOR_CACHE_DIR:-}" ]; then
  TORCHINDUCTOR_CACHE_DIR="$(mktemp -d -t dct_kernels_inductor_XXXXXX)"
  export TORCHINDUCTOR_CACHE_DIR
  trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
fi
start=$(date +%s)
echo "== 1/2 kernel microbenchmark: python bench/run.py --quick =="
python bench/run.py --quick "$@"
echo
echo "== 2/2 hybrid-parallel DLRM, dense vs bf16 vs PowerSGD vs DCT-DP vs DCT-DP+MP: python bench/train_dlrm.py --quick =="
# shellcheck disable=SC2086
python bench/train_dlrm.py --quick ${DLRM_ARGS:-}
echo "demo: $(( $(date +%s) - start )) s after installation"
