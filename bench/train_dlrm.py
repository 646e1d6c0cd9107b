"""Hybrid-parallel DLRM: dense vs DCT-DP vs DCT-DP+MP on the same data and seeds.

    python bench/train_dlrm.py --quick                 # 2 spawned ranks (gloo on CPUs)
    python bench/train_dlrm.py --quick --ranks 4
    torchrun --nproc-per-node 2 bench/train_dlrm.py --quick
    python bench/train_dlrm.py --data-file day_0.tsv   # Criteo-format TSV
    python bench/train_dlrm.py --sweep                 # DP ratio x MP k

Writes dlrm.json, dlrm.md and PNG plots into --out (default bench/results/<device>/dlrm/).
See bench/dlrm/ and README.md ("End to end").
"""

# Run as a script, this file's folder (bench/) is sys.path[0], so dlrm is the package next to
# it; dct_kernels is the installed package (``pip install -e .`` for the checkout's source).
from dlrm.cli import main

if __name__ == "__main__":
    main()
