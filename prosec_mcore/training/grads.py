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
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    grads = [_grad_of(p) for chunk in model_chunks for p in chunk.parameters() if getattr(p, "pipeline_shared", False)]
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def finalize_prosec_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """Drop-in for `config.finalize_model_grads_func`."""
    finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    allreduce_pipeline_shared_grads(model)
