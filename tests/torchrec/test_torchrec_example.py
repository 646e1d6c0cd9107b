"""bench/train_torchrec.py reaches its goal (example_checks.py) on 2 gloo ranks. About two
minutes on 2 CPU cores; needs the TorchRec environment (scripts/check_torchrec.sh)."""

from dist_harness import spawned_checks

group_of_2, test_example_goal = spawned_checks("example_checks", 2, ["check_example_goal"],
                                               deadline_s=600)
