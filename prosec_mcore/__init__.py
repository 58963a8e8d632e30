"""prosec-mcore: self-correcting masked diffusion language models (ProSeCo) on megatron-core.

Where things are:
  diffusion/   the method: noise schedules, the forward (masking) process, the ProSeCo losses
  model/       the bidirectional, time-conditioned megatron-core GPTModel and its layer specs
  training/    the two-pass ProSeCo step on megatron-core schedules, optimizer, trainer, logging
  data/        tokenizers, indexed-dataset preprocessing, the bundled corpus, batch iteration
  runtime/     process groups, megatron-core on CPU, layout-independent initialisation
"""
import logging
import warnings

__version__ = "0.1.0"

_NOISY_MEGATRON_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*tp_group is None, using default tp group.*",
    r".*MLP requires ffn_hidden_size.*",
    r".*full scope is deprecated.*",
    # torch.distributed.checkpoint deprecations that megatron-core 0.16.1's checkpoint loading triggers
    r".*`load_state_dict` is deprecated and will be removed.*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
)


def quiet_known_warnings() -> None:
    """Silence megatron-core's repeated fallback/deprecation warnings (the start-up log says
    which backend runs instead)."""
    for pattern in _NOISY_MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # A failed checkpoint write is reported by the trainer in one line naming the file and the
    # intact checkpoint (training/checkpoint.py: write_failure); megatron's writer logs the same
    # failure once more per worker process, without that context.
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(logging.CRITICAL)
