"""Process-group start-up: torch.distributed + megatron's model-parallel groups.

A megatron job is a grid of ranks. With ``world_size`` processes, tensor
parallel size ``tp`` and pipeline parallel size ``pp``, each model replica
spans ``tp * pp`` ranks and the remaining factor is data parallelism:
``dp = world_size / (tp * pp)``. ``initialize_distributed`` does the three
things every entry point needs, in order:

1. check the layout (cheap, before any process group exists, so a bad
   command line fails with one clear line instead of a hang);
2. start torch.distributed: from torchrun's environment (``RANK``,
   ``WORLD_SIZE``, ``MASTER_ADDR``...) when present, otherwise as a world of
   one process on a free local TCP port, so scripts and notebooks run without
   a launcher. The backend is NCCL on GPUs and gloo on CPU; on CPU the
   megatron CPU patches (``cpu_compat``) are applied first;
3. build megatron's parallel groups and seed the RNGs the way Megatron-LM
   does: the base seed is offset by ``100 * pipeline_rank`` (so different
   stages, which own different layers, draw different dropout masks), and
   ``model_parallel_cuda_manual_seed`` then derives the tensor-parallel RNG
   stream from it. Weight initialisation does *not* depend on these seeds
   when ``prosec_mcore.runtime.init.init_weights_layout_independent`` is
   used.
"""

from __future__ import annotations

import logging
import os
import random
import socket

import numpy
import torch
import torch.distributed as dist

from prosec_mcore.runtime.cpu_compat import apply_cpu_compat, describe_cpu_compat

logger = logging.getLogger(__name__)


def device() -> torch.device:
    """The torch.device this process computes on (its GPU, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _world_size_from_env() -> int:
    return int(os.environ["WORLD_SIZE"]) if _launched_by_torchrun() else 1


def validate_layout(world_size: int, tp: int, pp: int, vpp: int | None) -> None:
    """Raise ValueError (one line) unless the parallel layout fits `world_size` ranks."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp} pp={pp}")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}"
        )
    if vpp is not None:
        if vpp < 1:
            raise ValueError(f"virtual pipeline size must be >= 1, got vpp={vpp}")
        if vpp > 1 and pp < 2:
            raise ValueError(f"virtual pipeline size {vpp} needs pipeline parallel size > 1")


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_process_group(backend: str) -> None:
    if dist.is_initialized():
        return
    if _launched_by_torchrun():
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        port = _free_local_port()
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )


def _seed_everything(seed: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    numpy.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def initialize_distributed(tp: int, pp: int, vpp: int | None = None, seed: int = 1234) -> None:
    """Start torch.distributed and megatron's TP/PP/DP groups, then seed the RNGs."""
    validate_layout(_world_size_from_env(), tp, pp, vpp)

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        apply_cpu_compat()
        backend = "gloo"

    _init_process_group(backend)
    # The group may have existed already (e.g. created by a test harness).
    validate_layout(dist.get_world_size(), tp, pp, vpp)

    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    _seed_everything(seed)

    if dist.get_rank() == 0:
        dp = dist.get_world_size() // (tp * pp)
        logger.info(
            "distributed: backend=%s world=%d tp=%d pp=%d vpp=%s dp=%d",
            backend, dist.get_world_size(), tp, pp, vpp, dp,
        )
        for patch in describe_cpu_compat():
            logger.info("cpu patch: %s", patch)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (for tests)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
