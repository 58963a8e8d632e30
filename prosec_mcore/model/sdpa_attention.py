"""Bidirectional core attention through PyTorch's scaled_dot_product_attention (the local spec).

Core attention is softmax(Q K^T * scale) V per head, with no causal mask: a masked diffusion model
lets every position see every other. megatron-core's own `DotProductAttention` writes that out
as baddbmm -> softmax -> bmm, which materialises the [b, heads, s, s] score matrix (at s = 2048
and 16 heads that is 256 MiB per sequence in bf16, stored for the backward). PyTorch's
`scaled_dot_product_attention` computes the same result with a fused kernel that never stores
the scores: FlashAttention-2, cuDNN or memory-efficient attention on a GPU, a fused flash kernel
on CPU, picked per call by PyTorch. It is what the local spec uses unless
`model.local_attention=unfused` asks for megatron's; Transformer Engine's attention (the te spec)
is unaffected.

With document attention (diffusion/packing.py) a position sees only its own document: megatron's
bool mask [b, 1, s, s] (True = masked out) arrives as `attention_mask` and goes to SDPA inverted
(SDPA's bool `attn_mask` is True = attend; masked scores become -inf, so their weights are exactly
0). With a mask PyTorch does not use its flash kernel on a GPU (it picks cuDNN, memory-efficient or
math attention).

Grouped-query attention (K/V heads shared by groups of `group` consecutive query heads: query
head h reads K/V head h // group, megatron's layout) goes to SDPA as is, with `enable_gqa=True`,
rather than as K/V repeated to one head per query head: the fused kernels index the shared head
themselves, so the repeated K/V ([b, heads, s, d] each, and their gradients) never exist. On CPU
the flash kernel does so with or without a mask (the tests read the profiler trace); with dropout
PyTorch takes its math kernel on CPU, which repeats K/V internally (the cost of the explicit
repeat, no more). On an NVIDIA GPU, PyTorch's kernel choice (sdp_utils.cpp) admits GQA for flash,
cuDNN and memory-efficient attention alike; on ROCm the memory-efficient kernel refuses it, so a
masked GQA call there falls back to math attention (not measured here: no GPU).

Everything else is inherited from megatron's DotProductAttention: the heads of this tensor-
parallel rank, the number of K/V groups, the softmax scale (1/sqrt(head dim), `softmax_scale`,
query-key layer scaling) and attention dropout, drawn under megatron's model-parallel RNG tracker
as megatron does. The tests compare the two classes on the same inputs
(tests/unit/test_sdpa_attention.py, tests/unit/test_logits_memory.py for the GQA kernel path).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    """DotProductAttention's interface and shapes ([s, b, heads, head dim] in, [s, b, heads * head
    dim] out), computed by torch.nn.functional.scaled_dot_product_attention."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.softmax_type != "vanilla":
            raise ValueError(f"model.local_attention=sdpa supports the vanilla softmax only (got softmax_type="
                             f"{config.softmax_type}); use model.local_attention=unfused")
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError("model.local_attention=sdpa has no sliding-window attention; use unfused")
        # megatron divides softmax_scale by the layer number under query-key layer scaling and
        # multiplies it back inside its softmax; SDPA applies one scale, the product.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes an attention mask but no attention bias or packed (thd) sequences; "
                             "document attention on the local layers passes a mask")
        seq, batch = query.shape[0], query.shape[1]
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # grouped-query attention: every K/V head serves a group of consecutive query heads
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        dropout = self.attention_dropout.p if self.training else 0.0
        attend = None if attention_mask is None else ~attention_mask  # [b, 1, s, s], broadcast over heads
        context = self._attend(q, k, v, dropout, attend, gqa)
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)

    def _attend(self, q, k, v, dropout: float, attend: torch.Tensor | None, gqa: bool) -> torch.Tensor:
        if dropout == 0.0:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=self.sdpa_scale, enable_gqa=gqa)
        # The RNG choice of megatron's DotProductAttention: the model-parallel tracker's stream,
        # except under sequence parallelism.
        with tensor_parallel.get_cuda_rng_tracker().fork() if not self.config.sequence_parallel else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout, scale=self.sdpa_scale,
                                                  enable_gqa=gqa)

