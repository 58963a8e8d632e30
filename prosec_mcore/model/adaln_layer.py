"""A megatron-core TransformerLayer with DiT adaLN modulation.

megatron-core's TransformerLayer builds the sub-modules (norms, tensor-parallel attention and
MLP) from a layer spec; this subclass keeps all of them and only rewrites the forward so that
each sub-block is modulated by the time embedding c, which the TransformerBlock hands to every
layer through its `context` argument (and every layer hands on unchanged):

    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = Linear(c)          # zero-initialised
    h = h + gate_a * Dropout(Attention( LN(h) * (1 + scale_a) + shift_a ))
    h = h + gate_m * Dropout(MLP(       LN(h) * (1 + scale_m) + shift_m ))

Hidden states are [s, b, h] (megatron's layout; s is the local chunk under sequence
parallelism); the modulation vectors are [1, b, h] and broadcast over the sequence.
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.transformer_layer import TransformerLayer

from .time_embedding import AdaLNModulation, modulate


class AdaLNTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.adaln_modulation = AdaLNModulation(config, config.time_embedding_dim, chunks=6)

    def _gated_residual(self, residual, output_with_bias, gate):
        output, bias = output_with_bias
        if bias is not None:
            output = output + bias
        output = F.dropout(output, p=self.hidden_dropout, training=self.training)
        return residual + gate * output

    def forward(self, hidden_states, attention_mask=None, context=None, rotary_pos_emb=None,
                packed_seq_params=None, **kwargs):
        """attention_mask / packed_seq_params (document attention, diffusion/packing.py) go to the
        self-attention unchanged, as megatron's TransformerLayer hands them on."""
        if context is None:
            raise ValueError("AdaLNTransformerLayer needs the time embedding (passed as `context`)")
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln_modulation(context)

        attn_in = modulate(self.input_layernorm(hidden_states), shift_a, scale_a)
        attn_out = self.self_attention(attn_in, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                       packed_seq_params=packed_seq_params)
        hidden_states = self._gated_residual(hidden_states, attn_out, gate_a)

        mlp_in = modulate(self.pre_mlp_layernorm(hidden_states), shift_m, scale_m)
        hidden_states = self._gated_residual(hidden_states, self.mlp(mlp_in), gate_m)
        return hidden_states, context
