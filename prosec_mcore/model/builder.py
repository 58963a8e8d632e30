"""Build this rank's piece of the ProSeCo model from the typed run configuration."""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from ..config import Config, ConfigError
from .layer_specs import block_spec, describe_backend, select_backend
from .prosec_model import ProSeCoModel, ProSeCoTransformerConfig

# The vocabulary is padded to a multiple of this (divisible by every power-of-two TP size up to
# 128), independent of the parallel layout, so that every layout builds the same weights.
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int = 1) -> int:
    padded = math.ceil(vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    if padded % tp:
        raise ConfigError(f"tensor parallel size {tp} must divide the padded vocabulary size {padded}")
    return padded


def params_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def transformer_config(cfg: Config) -> ProSeCoTransformerConfig:
    """megatron-core's TransformerConfig for this run: shape, parallel layout, precision (bf16 or
    fp32 parameters; FP8 GEMMs through Transformer Engine with `train.fp8`), activation
    recomputation and CUDA graphs. validate_config has already refused what cannot run here."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = params_dtype(cfg.train.precision)
    on_gpu = torch.cuda.is_available()
    dit = m.style == "dit"
    return ProSeCoTransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=dit,  # MLP biases (DiT); attention projections never have one (layer_specs.py)
        add_qkv_bias=False,
        gated_linear_unit=not dit,
        activation_func=partial(F.gelu, approximate="tanh") if dit else F.silu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        # With two pipeline ranks, previous and next stage are the same rank: megatron's batched
        # p2p then mixes up activations and gradients of the interleaved schedule (Megatron-LM's
        # own setting for interleaving avoids it).
        overlap_p2p_comm=p.vpp is not None,
        batch_p2p_comm=p.vpp is None,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        autocast_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        time_conditioning=m.time_conditioning,
        time_embedding_dim=m.time_embedding_dim,
        zero_timestep=m.zero_timestep,
        num_classes=m.num_classes,
        label_combination=m.label_combination,
        time_embedder_seed=cfg.train.seed,
        has_cond_embedder=m.time_conditioning == "adaln",
        output_layer_bias=dit,
        # FP8 (TE layers only). megatron wraps each layer's forward in TE's fp8 autocast with the
        # recipe built from these fields (megatron/core/fp8_utils.py: get_fp8_recipe).
        fp8=t.fp8,
        fp8_recipe=t.fp8_recipe,
        fp8_margin=t.fp8_margin,
        fp8_amax_history_len=t.fp8_amax_history_len,
        fp8_amax_compute_algo=t.fp8_amax_compute_algo,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        cuda_graph_impl=t.cuda_graph_impl,
        # Read by GPTModel's own loss only; the ProSeCo losses get the same choice via LossOptions.
        cross_entropy_loss_fusion=t.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=t.cross_entropy_fusion_impl,
    )


def build_model(cfg: Config, vocab_size: int, backend: str = "auto", vp_stage: int | None = None) -> ProSeCoModel:
    """One model chunk of this rank: the layers of its (virtual) pipeline stage, its vocab shard."""
    config = transformer_config(cfg)
    backend = select_backend(backend)
    if cfg.train.fp8 and backend != "te":  # validate_config only saw that TE is installed
        raise ConfigError(f"train.fp8={cfg.train.fp8} needs the Transformer Engine layers, but they cannot "
                          f"be used here ({describe_backend()[1]}); drop train.fp8")
    model = ProSeCoModel(
        config=config,
        transformer_layer_spec=block_spec(config, cfg.model.style, cfg.model.time_conditioning, backend, vp_stage,
                                          cfg.model.local_attention),
        vocab_size=padded_vocab_size(vocab_size, cfg.parallel.tp),
        max_sequence_length=cfg.model.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        rotary_base=cfg.model.rotary_base,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.backend = backend
    return model


def build_model_chunks(cfg: Config, vocab_size: int, backend: str = "auto") -> list:
    """All model chunks of this rank: one, or `parallel.vpp` with the interleaved pipeline."""
    if cfg.parallel.vpp is None:
        return [build_model(cfg, vocab_size, backend)]
    return [build_model(cfg, vocab_size, backend, vp_stage=i) for i in range(cfg.parallel.vpp)]
