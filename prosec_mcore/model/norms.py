"""Normalisation layers that megatron-core's layer specs can build on any device.

megatron-core's torch fallback norm refuses sequence parallelism, and apex/TE are GPU-only, so
the local spec uses these two small modules. They follow megatron's constructor contract
`(config, hidden_size, eps)` and mark their weights `sequence_parallel` so that
`finalize_model_grads` all-reduces their gradients across the tensor-parallel group when the
sequence is split (each rank then only sees part of the tokens).

    LayerNormNoBias  y = (x - mean) / sqrt(var + eps) * weight      (the reference DiT's norm)
    RMSNorm          y = x / sqrt(mean(x^2) + eps) * weight           (Llama / LLaDA)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mark_sequence_parallel(module: torch.nn.Module, enabled: bool) -> None:
    """Tag every parameter of `module` for the tensor-parallel all-reduce of SP gradients."""
    for param in module.parameters():
        setattr(param, "sequence_parallel", enabled)


class _ScaledNorm(torch.nn.Module):
    """y = normalize(x) * weight, computed in float32 and returned in the input's dtype."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        mark_sequence_parallel(self, config.sequence_parallel)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        return self._normalize(x.float()).to(x.dtype) * self.weight


class LayerNormNoBias(_ScaledNorm):
    def _normalize(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)


class RMSNorm(_ScaledNorm):
    def _normalize(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def norm_class(style: str):
    return LayerNormNoBias if style == "dit" else RMSNorm
