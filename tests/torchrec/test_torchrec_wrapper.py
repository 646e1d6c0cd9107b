"""DCT-DP on TorchRec's DistributedModelParallel (``DCTDataParallelWrapper``), on 2 gloo
ranks against the real library; the checks are in torchrec_checks.py. Needs the TorchRec
environment: ``bash scripts/check_torchrec.sh`` (docs/torchrec.md)."""

from dist_harness import spawned_checks

CHECKS = ["check_wrapper_arguments", "check_hook_registered_and_counted",
          "check_dense_part_identical_every_step", "check_ratio_one_is_torchrec_allreduce",
          "check_round_trip_allgather", "check_round_trip_reduce_scatter"]

group_of_2, test_two_ranks = spawned_checks("torchrec_checks", 2, CHECKS, deadline_s=300)
