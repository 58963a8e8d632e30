"""Gradient finalisation: megatron-core's, plus the pipeline-shared time embedder.

`finalize_model_grads` (megatron-core) reduces gradients across data-parallel replicas, the
sequence-parallel norm weights across tensor-parallel ranks, and tied embeddings across the
first and last stages. The adaLN time embedder has one copy per pipeline stage (each stage needs
the time embedding), so after megatron's reduction the copies' gradients are summed over the
pipeline group: every copy then takes the same optimizer step, and the model equals the
single-stage model whose one embedder receives the gradient of every layer.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads


def _grad_of(param):
    return param.main_grad if getattr(param, "main_grad", None) is not None else param.grad


def allreduce_pipeline_shared_grads(model_chunks) -> None:
    """Give every copy of a pipeline-shared parameter the sum of all copies' gradients.

    Copies are matched by parameter name: first summed over this rank's model chunks (the
    interleaved pipeline holds several), then over the pipeline group.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    copies: dict = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            grad = _grad_of(param)
            if getattr(param, "pipeline_shared", False) and grad is not None:
                copies.setdefault(name.removeprefix("module."), []).append(grad)
    if not copies:
        return
    names = sorted(copies)  # the same order on every rank
    flat = torch.cat([torch.stack(copies[n]).sum(0).reshape(-1) for n in names])
    torch.distributed.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
    offset = 0
    for name in names:
        numel = copies[name][0].numel()
        for grad in copies[name]:
            grad.copy_(flat[offset:offset + numel].view_as(grad))
        offset += numel


def finalize_prosec_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """Drop-in for `config.finalize_model_grads_func`."""
    finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    allreduce_pipeline_shared_grads(model)
