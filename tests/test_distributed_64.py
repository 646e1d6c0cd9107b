"""The scale checks of tests/dist_checks_scale.py in one spawned gloo group of 64 ranks (the
size our users train at), opt-in: 64 processes on one machine need about 20 GB of memory and
several minutes, so the README's test command leaves this module out unless
``DCT_TEST_64_RANKS=1`` is set (``bash scripts/check_64_ranks.sh`` sets it)."""

import os

import pytest

from dist_harness import spawned_checks

if os.environ.get("DCT_TEST_64_RANKS") != "1":
    pytest.skip("64 ranks: opt-in with DCT_TEST_64_RANKS=1 (scripts/check_64_ranks.sh)",
                allow_module_level=True)

CHECKS_64 = ["check_zeros_never_sent", "check_reduce_scatter_audited", "check_issue_order",
             "check_bytes_counted", "check_wire_v2"]

group_of_64, test_sixty_four_ranks = spawned_checks("dist_checks_scale", 64, CHECKS_64,
                                                    deadline_s=1800)
