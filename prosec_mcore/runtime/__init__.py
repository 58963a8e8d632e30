"""Runtime: process groups, CPU support for megatron-core, layout-independent init.

* ``distributed``: ``initialize_distributed`` / ``destroy_distributed`` /
  ``device`` start and stop torch.distributed and megatron's parallel groups.
* ``cpu_compat``: ``apply_cpu_compat`` makes megatron-core's CUDA-only spots
  work on CPU (gloo) so the real schedules, DDP and optimizer run in tests.
* ``init``: ``init_weights_layout_independent`` gives every layout (TP/PP/VPP)
  the same initial weights.
"""

from prosec_mcore.runtime.cpu_compat import apply_cpu_compat, describe_cpu_compat
from prosec_mcore.runtime.distributed import destroy_distributed, device, initialize_distributed
from prosec_mcore.runtime.init import init_weights_layout_independent

__all__ = [
    "apply_cpu_compat",
    "describe_cpu_compat",
    "destroy_distributed",
    "device",
    "init_weights_layout_independent",
    "initialize_distributed",
]
