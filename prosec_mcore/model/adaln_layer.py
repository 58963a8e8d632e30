"""A megatron-core TransformerLayer with DiT adaLN modulation, run on megatron's own forward.

Each sub-block of a layer is modulated by the time embedding c, which the TransformerBlock hands
to every layer through its `context` argument (and every layer hands on unchanged):

    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = Linear(c)          # zero-initialised
    h = h + gate_a * Dropout(Attention( LN(h) * (1 + scale_a) + shift_a ))
    h = h + gate_m * Dropout(MLP(       LN(h) * (1 + scale_m) + shift_m ))

Hidden states are [s, b, h] (megatron's layout; s is the local chunk under sequence
parallelism); the modulation vectors are [1, b, h] and broadcast over the sequence.

How the modulation enters megatron's forward
--------------------------------------------
`forward` computes the six vectors from c, keeps them for the duration of the call, and runs
megatron's `TransformerLayer.forward` (`_forward_attention`, `_forward_mlp`) unchanged. Three
seams inject adaLN, each *outside* every function megatron may checkpoint:

  * attention input: a forward pre-hook on `self_attention` modulates the norm's output, so the
    input norm stays megatron's plain module call (or its output-discarding checkpoint);
  * MLP input: `_forward_pre_mlp_layernorm` (megatron's own seam) modulates what the pre-MLP norm
    returns, before megatron calls (or checkpoints) the MLP;
  * gated residual: megatron's bias-dropout-add computes residual + Dropout(x + bias) and has no
    gate, so the gate is folded into its input: (x, bias) -> (gate * (x + bias), None). Dropout
    is an elementwise mask times 1/(1-p), so Dropout(gate * y) and gate * Dropout(y) draw the
    same mask from the same generator and agree up to the rounding of one product (exactly when
    1/(1-p) is a power of two, and always with p = 0). The bias is added before the gate, as the
    reference DiT does, so megatron's bda receives no separate bias.

Why the modulation must not live inside the norm module (a "ModulatedNorm"): megatron's
`recompute_modules=["layernorm"]` checkpoints `self.input_layernorm(hidden_states)` with
hidden_states as the only input. A norm that also multiplied by (1 + scale) would capture scale,
a tensor of the time embedder's graph, inside that checkpoint: in the backward the recomputed
graph would be back-propagated on its own, through the shared time embedder, which frees that
graph before the other layers reach it. The seams above keep shift, scale and gate in the
ordinary autograd graph.

What megatron now does for these layers (config switches of TransformerConfig):
  * bias-dropout-add through `self_attn_bda` / `mlp_bda` from the spec, fused or not
    (`bias_dropout_fusion`), inside megatron's `bias_dropout_add_exec_handler`;
  * selective recomputation inside the layer: `recompute_modules` "layernorm" (the norms'
    outputs are discarded after use and recomputed in the backward; modulate keeps the norm
    output for its backward, so that is the copy freed), "mlp" (the MLP on its modulated input)
    and "core_attn" (inside the attention); with FP8, megatron asks linear_qkv / linear_fc1 to
    keep their original input for the "layernorm" case, here the modulated tensor;
  * full recomputation by the TransformerBlock (whole layers re-run, this forward included);
  * fine-grained activation offloading of "attn_norm" / "mlp_norm" (GPU): the hooks wrap the
    norms exactly as megatron's forward places them;
  * attention_mask / packed_seq_params / rotary embeddings go to the attention as megatron's
    forward hands them on (document attention, diffusion/packing.py).
What cannot apply:
  * CUDA graphs (refused by validate_config): TE's capture calls `_forward_attention` /
    `_forward_mlp` without this forward, and the modulation is per call; the seams then raise
    rather than run the layer unmodulated;
  * the inference-optimised fused TP communication (`inference_fuse_tp_communication`): it
    adds the residual inside linear_proj / linear_fc2 and skips the bda, so the gate would be
    lost; refused at construction;
  * Transformer Engine's fused LayerNorm+Linear: see layer_specs.py.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from .time_embedding import AdaLNModulation, modulate


class LayerModulation(NamedTuple):
    """The six [1, b, h] vectors Linear(c) gives one layer for one forward call."""

    shift_attention: torch.Tensor
    scale_attention: torch.Tensor
    gate_attention: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


def gate_sublayer_output(output_with_bias, gate: torch.Tensor):
    """(output, bias) -> (gate * (output + bias), None): the input megatron's bias-dropout-add
    needs to compute residual + Dropout(gate * (output + bias))."""
    output, bias = output_with_bias
    if bias is not None:
        output = output + bias
    return gate * output, None


class AdaLNTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        if getattr(config, "inference_fuse_tp_communication", False):
            raise ValueError("inference_fuse_tp_communication adds the residual inside the output projections and "
                             "skips the gated residual of adaLN; leave it off for time_conditioning=adaln")
        self.adaln_modulation = AdaLNModulation(config, config.time_embedding_dim, chunks=6)
        self._modulation: LayerModulation | None = None  # set for the duration of one forward call
        self.self_attention.register_forward_pre_hook(self._modulate_attention_input, with_kwargs=True)
        # megatron calls `self.self_attn_bda(training, fused)(output_with_bias, residual, p)`.
        self.self_attn_bda = functools.partial(self._gated_bias_dropout_add, self.self_attn_bda, "gate_attention")
        self.mlp_bda = functools.partial(self._gated_bias_dropout_add, self.mlp_bda, "gate_mlp")

    def forward(self, hidden_states, attention_mask=None, context=None, **kwargs):
        """megatron's TransformerLayer.forward with the modulation of `context` (c, [b, D]) in place;
        attention_mask / packed_seq_params and the rest go to megatron's forward unchanged."""
        if context is None:
            raise ValueError("AdaLNTransformerLayer needs the time embedding (passed as `context`)")
        self._modulation = LayerModulation(*self.adaln_modulation(context))
        try:
            return super().forward(hidden_states, attention_mask=attention_mask, context=context, **kwargs)
        finally:
            self._modulation = None

    def _current_modulation(self) -> LayerModulation:
        if self._modulation is None:
            raise RuntimeError("AdaLNTransformerLayer's sub-blocks ran outside its forward (a CUDA-graph path?): "
                               "the adaLN modulation is only known inside forward")
        return self._modulation

    def _modulate_attention_input(self, attention, args, kwargs):
        """Forward pre-hook of self_attention: LN(h) -> LN(h) * (1 + scale_a) + shift_a."""
        mod = self._current_modulation()
        if args:
            return (modulate(args[0], mod.shift_attention, mod.scale_attention), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=modulate(kwargs["hidden_states"], mod.shift_attention,
                                                     mod.scale_attention))
        return args, kwargs

    def _forward_pre_mlp_layernorm(self, hidden_states):
        """megatron's pre-MLP norm (plain, recomputed or offloaded), then the MLP's modulation."""
        mod = self._current_modulation()
        return modulate(super()._forward_pre_mlp_layernorm(hidden_states), mod.shift_mlp, mod.scale_mlp)

    def _gated_bias_dropout_add(self, megatron_bda, gate_name: str, training: bool, fused: bool):
        """Stands in for the spec's bda: megatron's bda function on the gated sublayer output."""
        bias_dropout_add = megatron_bda(training, fused)
        gate = getattr(self._current_modulation(), gate_name)

        def gated_bias_dropout_add(output_with_bias, residual, prob):
            return bias_dropout_add(gate_sublayer_output(output_with_bias, gate), residual, prob)

        return gated_bias_dropout_add
