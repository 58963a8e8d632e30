"""Megatron-core DDP, optimizer and learning-rate schedule for the model chunks.

GPU: overlapped gradient reduction and the distributed optimizer. CPU (gloo): the plain
optimizer, since megatron-core's distributed optimizer only handles CUDA tensors.
"""
from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..config import TrainConfig


def wrap_ddp(model_chunks, transformer_config):
    on_gpu = torch.cuda.is_available()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=on_gpu,
        use_distributed_optimizer=on_gpu,
        bucket_size=None if on_gpu else 10**9,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(DistributedDataParallel(
            config=transformer_config, ddp_config=ddp_config, module=chunk,
            disable_bucketing=i > 0,  # megatron's rule: only the first chunk overlaps with backward
        ))
    return wrapped


def build_optimizer(model_chunks, train: TrainConfig, bf16: bool):
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
            use_distributed_optimizer=torch.cuda.is_available(),
        ),
        model_chunks,
    )
    decay_iters = max(train.iters - train.lr_warmup_iters, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train.lr_warmup_iters > 0 else train.lr,
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
