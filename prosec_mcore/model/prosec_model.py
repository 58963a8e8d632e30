"""The ProSeCo network: megatron-core's GPTModel made bidirectional and time-conditioned.

GPTModel supplies everything distributed (vocab-parallel embedding and output layer, rotary
embeddings, the pipeline-aware TransformerBlock, sharded state dicts for dist_checkpointing);
this subclass changes what a *diffusion* model needs:
  * no causal mask: the layer specs use `no_mask`; attention is bidirectional over the sample,
    or, with document attention / variable-length samples (diffusion/packing.py), restricted to
    segments by an `attention_mask` (local layers) or thd `packed_seq_params` (Transformer Engine),
    which forward hands to every layer;
  * the input may contain the mask token (the last id of the tokenizer's vocabulary);
  * time conditioning `adaln`: c = TimestepEmbedder(sigma) is handed to every layer, and the
    final norm is modulated by (shift, scale) = Linear(c) as in the DiT's final layer;
    time conditioning `none`: the network never sees t (LLaDA);
  * style `dit`: the output layer has a bias, as the reference DiT's final linear;
  * forward returns the vocab-parallel logits as [b, L, V/tp]; the objective
    (diffusion/losses.py) suppresses the mask token and computes the losses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .time_embedding import AdaLNModulation, TimestepEmbedder, modulate


@dataclass
class ProSeCoTransformerConfig(TransformerConfig):
    """TransformerConfig plus the ProSeCo time-conditioning settings."""

    time_conditioning: str = "adaln"  # adaln | none
    time_embedding_dim: int = 128
    zero_timestep: bool = False
    time_embedder_seed: int = 1234
    num_classes: int = 0  # > 0: a class-label embedding joins the time embedding (classifier-free guidance)
    label_combination: str = "silu_sum"  # silu_sum (reference) | sum_silu: time_embedding.py
    output_layer_bias: bool = False  # the reference DiT's final linear has a bias
    # Read by megatron-core's finalize_model_grads: all-reduce the gradients of `pipeline_parallel`
    # parameters (the time embedder, replicated on every pipeline stage) over the pipeline group.
    has_cond_embedder: bool = False


class ProSeCoModel(GPTModel):
    def __init__(self, config: ProSeCoTransformerConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, pre_process: bool = True, post_process: bool = True,
                 rotary_base: int = 10000, vp_stage=None):
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=rotary_base,
            vp_stage=vp_stage,
        )
        self.time_conditioning = config.time_conditioning
        if post_process and config.output_layer_bias:
            # megatron's GPTModel builds its output layer without a bias; rebuild it with one.
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.vocab_size, config=config, init_method=config.init_method,
                bias=True, skip_bias_add=False, gather_output=False, tp_group=self.pg_collection.tp,
            )
        if self.time_conditioning == "adaln":
            self.time_embedder = TimestepEmbedder(config, config.time_embedding_dim, config.time_embedder_seed,
                                                  config.num_classes, config.label_combination)
            # Every (virtual) stage holds a copy of the embedder. megatron-core sums the copies'
            # gradients over the pipeline group in finalize_model_grads (`pipeline_parallel` params,
            # with config.has_cond_embedder), so all copies take the same step and stay equal.
            # `shared` leaves the later copies out of the gradient norm (counted once), and
            # `shared_embedding` gives each of these parameters its own DDP bucket (megatron's rule
            # for tied embeddings), so under the distributed optimizer every stage shards them
            # identically and the pipeline all-reduce adds matching slices.
            for param in self.time_embedder.parameters():
                param.pipeline_parallel = True
                param.shared = not pre_process
                param.shared_embedding = True
            if post_process:
                self.final_modulation = AdaLNModulation(config, config.time_embedding_dim, chunks=2)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron's sharded state dict; the time-embedder copies of later pipeline stages are
        marked as secondary replicas, so a checkpoint stores the embedder once."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.time_conditioning == "adaln" and not self.pre_process:
            for key, value in state.items():
                if key.startswith(f"{prefix}time_embedder."):
                    value.replica_id = (1,) + tuple(value.replica_id[1:])
        return state

    def forward(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                packed_seq_params=None) -> torch.Tensor:
        """input_ids [b, L] (z_t or y), sigma [b] -> vocab-parallel logits [b, L, V/tp].
        labels [b]: class labels of a label-conditioned model (None: the null label).
        attention_mask [b, 1, L, L] bool, True = masked out (megatron's convention), or
        packed_seq_params (megatron's thd PackedSeqParams, b = 1, Transformer Engine layers only):
        which positions may attend to which (None: all to all). diffusion/packing.py builds both.

        On a pipeline stage other than the first, the hidden states come from the previous
        stage through `set_input_tensor` and `input_ids` only supplies the shape.
        On a stage other than the last, the output is the hidden states [s, b, h].
        """
        seq_length = input_ids.shape[1]
        if packed_seq_params is not None and input_ids.shape[0] != 1:
            raise ValueError(f"packed_seq_params (thd) takes one sample per micro-batch (got {input_ids.shape[0]}); "
                             f"set train.micro_batch_size=1")
        hidden = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        rotary = self.rotary_pos_emb(seq_length)

        context = None
        if labels is not None and self.time_conditioning != "adaln":
            raise ValueError("labels condition the model through adaLN; this model has time_conditioning=none")
        if self.time_conditioning == "adaln":
            if sigma is None:
                raise ValueError("time_conditioning=adaln needs sigma (the noise level) for each sample")
            if self.config.zero_timestep:
                sigma = torch.zeros_like(sigma)
            context = self.time_embedder(sigma, labels)

        hidden = self.decoder(hidden_states=hidden, attention_mask=attention_mask, context=context,
                              rotary_pos_emb=rotary, packed_seq_params=packed_seq_params)
        if not self.post_process:
            return hidden
        if context is not None:
            shift, scale = self.final_modulation(context)
            hidden = modulate(hidden, shift, scale)
        logits, _ = self.output_layer(hidden)
        return logits.transpose(0, 1).contiguous()
