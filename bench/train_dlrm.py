"""Hybrid-parallel DLRM: dense vs DCT-DP vs DCT-DP+MP on the same data and seeds.

    python bench/train_dlrm.py --quick                 # 2 spawned ranks (gloo on CPUs)
    python bench/train_dlrm.py --quick --ranks 4
    torchrun --nproc-per-node 2 bench/train_dlrm.py --quick
    python bench/train_dlrm.py --data-file day_0.tsv   # Criteo-format TSV
    python bench/train_dlrm.py --sweep                 # DP ratio x MP k

Writes dlrm.json, dlrm.md and PNG plots into --out (default bench/results/<device>/dlrm/).
See bench/dlrm/ and README.md ("End to end").
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                   # bench/dlrm
sys.path.insert(0, os.path.dirname(HERE))  # dct_kernels from a checkout

from dlrm.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
