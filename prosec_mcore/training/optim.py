"""Megatron-core DDP, optimizer and learning-rate schedule for the model chunks.

Data-parallel speed features (`parallel.*`, each None = automatic: on with CUDA, off on CPU):
  use_distributed_optimizer  the Adam state and fp32 main weights are sharded over the DP ranks
                             (ZeRO-1); gradients are reduce-scattered, updated parameters all-gathered.
  overlap_grad_reduce        gradient buckets are reduced while the backward pass still runs.
  overlap_param_gather       (off unless asked) the all-gather of updated parameters runs during
                             the next forward, bucket by bucket, from forward pre-hooks.
Gradients are reduced in fp32 (bf16 runs keep fp32 main weights in the optimizer). On CPU (gloo)
the plain optimizer runs, since megatron-core's distributed optimizer only handles CUDA tensors.
"""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..config import ParallelConfig, TrainConfig


def data_parallel_features(parallel: ParallelConfig | None = None) -> dict:
    """The resolved DDP settings: `parallel.*` where set, otherwise on with CUDA and off on CPU."""
    parallel = parallel or ParallelConfig()
    on_gpu = torch.cuda.is_available()

    def auto(value):
        return on_gpu if value is None else bool(value)

    dist_opt = auto(parallel.use_distributed_optimizer)
    return {
        "use_distributed_optimizer": dist_opt,
        "overlap_grad_reduce": auto(parallel.overlap_grad_reduce),
        "overlap_param_gather": bool(parallel.overlap_param_gather) and dist_opt,
    }


def wrap_ddp(model_chunks, transformer_config, parallel: ParallelConfig | None = None):
    on_gpu = torch.cuda.is_available()
    features = data_parallel_features(parallel)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        bucket_size=None if on_gpu else 10**9,
        **features,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(DistributedDataParallel(
            config=transformer_config, ddp_config=ddp_config, module=chunk,
            disable_bucketing=i > 0,  # megatron's rule: only the first chunk overlaps with backward
        ))
    return wrapped


def build_optimizer(model_chunks, train: TrainConfig, bf16: bool, parallel: ParallelConfig | None = None):
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=train.lr,
            min_lr=train.min_lr,
            weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1,
            adam_beta2=train.adam_beta2,
            adam_eps=train.adam_eps,
            clip_grad=train.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=data_parallel_features(parallel)["use_distributed_optimizer"],
        ),
        model_chunks,
    )
    decay_iters = max(train.iters - train.lr_warmup_iters, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=train.lr_warmup_init if train.lr_warmup_iters > 0 else train.lr,
        max_lr=train.lr,
        min_lr=train.min_lr if train.lr_decay_style != "constant" else train.lr,
        lr_warmup_steps=train.lr_warmup_iters * train.global_batch_size,
        lr_decay_steps=(train.lr_warmup_iters + decay_iters) * train.global_batch_size,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.iters * train.global_batch_size,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


# Settings that shape the LR / weight-decay schedule, and settings that fix what iteration k means
# (the samples and the noise of a global batch are functions of the iteration, the batch size and
# the seed: data/datasets.py, diffusion/noise.py).
SCHEDULE_KEYS = ("lr", "min_lr", "lr_warmup_iters", "lr_warmup_init", "lr_decay_style", "weight_decay", "iters")
POSITION_KEYS = ("global_batch_size", "seed")


def schedule_on_resume(saved_train: dict, train: TrainConfig, path: str) -> tuple[str, str | None]:
    """Which LR schedule a resumed run follows: ("checkpoint" | "config", a note to print or None).

    Megatron-LM's convention: a changed schedule setting needs an explicit choice,
    train.override_opt_param_scheduler (this run's settings, from the resumed step on) or
    train.use_checkpoint_opt_param_scheduler (the checkpoint's). Without either it is refused,
    except a longer train.iters, which simply continues the checkpoint's schedule (for a decaying
    schedule: min_lr after the old end). Raises ConfigError for a refused change."""
    from ..config import ConfigError

    for key in POSITION_KEYS:
        if key in saved_train and saved_train[key] != getattr(train, key):
            raise ConfigError(f"checkpoint {path} was trained with train.{key}={saved_train[key]} but this run has "
                              f"{getattr(train, key)}: the data position and the diffusion noise of an iteration "
                              f"depend on it; resume with train.{key}={saved_train[key]}, or start a new run from "
                              f"these weights with checkpoint.pretrained={path}")
    changed = {k: (saved_train[k], getattr(train, k)) for k in SCHEDULE_KEYS
               if k in saved_train and saved_train[k] != getattr(train, k)}
    if not changed:
        return "checkpoint", None
    listed = ", ".join(f"train.{k} {old} -> {new}" for k, (old, new) in changed.items())
    if train.override_opt_param_scheduler:
        return "config", f"LR schedule from this run's settings ({listed}), from the resumed iteration on"
    if train.use_checkpoint_opt_param_scheduler:
        return "checkpoint", f"LR schedule of the checkpoint; this run's changed settings are ignored ({listed})"
    if set(changed) == {"iters"} and train.iters > saved_train["iters"]:
        old = saved_train["iters"]
        follows = ("constant LR" if saved_train.get("lr_decay_style") == "constant" else
                   f"{saved_train.get('lr_decay_style')} decay to min_lr={saved_train.get('min_lr')} by iteration "
                   f"{old}, then min_lr")
        return "checkpoint", (f"train.iters extended from {old} to {train.iters}: following the checkpoint's LR "
                              f"schedule ({follows}); train.override_opt_param_scheduler=true spreads the schedule "
                              f"over the new train.iters instead")
    raise ConfigError(f"checkpoint {path} was trained with another LR schedule ({listed}); choose "
                      f"train.override_opt_param_scheduler=true (apply this run's settings from the resumed step) or "
                      f"train.use_checkpoint_opt_param_scheduler=true (keep the checkpoint's)")
