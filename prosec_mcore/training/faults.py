"""Fault injection for the tests of run safety (tests/distributed/test_run_safety.py).

    PROSEC_FAULT_INJECTION=<point>:<iteration or *>[:<rank>]

names one place where a run is made to fail the way real runs fail, so that the test can check
what the user sees and that the checkpoints survive:

    nonfinite     the loss weights of that iteration's batch become NaN (training/step.py), so its
                  loss and gradients do, as in a diverging run
    write         megatron's shard writer processes fail with ENOSPC, as on a full disk
    slow_write    each shard write takes 30 s, so that a test can kill a rank in the middle
    after_shards  the process dies after writing its shards, before COMPLETE (as with kill -9)
(the last three in training/checkpoint.py). Unset, nothing happens.
"""
from __future__ import annotations

import os


def fault_injected(point: str, iteration: int) -> bool:
    """Whether PROSEC_FAULT_INJECTION asks for `point` at `iteration` on this rank."""
    parts = os.environ.get("PROSEC_FAULT_INJECTION", "").split(":")
    if len(parts) < 2 or parts[0] != point or parts[1] not in (str(iteration), "*"):
        return False
    if len(parts) == 2:
        return True
    import torch

    return parts[2] == str(torch.distributed.get_rank())
