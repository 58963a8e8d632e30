"""Build this rank's piece of the ProSeCo model from the typed run configuration.

`random_init=False` builds without megatron's random initialisation (megatron-core's
``perform_initialization=False``), for a model whose weights come next from a checkpoint, a
Hugging Face import or ``runtime.init.init_weights_layout_independent``: megatron then draws
nothing (on CPU it would draw every weight's full master tensor on every rank), but it also
skips two things it does only on that path, which `_complete_uninitialised` does instead:

* the tensor-parallel attributes (``tensor_model_parallel``, ``partition_dim``,
  ``partition_stride``) of the weights of its own parallel linears and embedding, which DDP,
  gradient-norm clipping and the layout-independent init read (Transformer Engine's layers set
  them themselves);
* zeroing those layers' biases (Transformer Engine zeroes its own).

The matrices that must then be written (those `init_weights_layout_independent` draws) are
filled with NaN, so one that no checkpoint or import writes shows up at once instead of training
from leftover memory. Norm weights (ones), the time embedder and the zero-initialised adaLN
modulations are set by their own modules either way.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.transformer.mlp import MLP

from ..config import Config, ConfigError
from ..runtime.init import is_drawn
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


def transformer_config(cfg: Config, random_init: bool = True) -> ProSeCoTransformerConfig:
    """megatron-core's TransformerConfig for this run: shape, parallel layout, precision (bf16 or
    fp32 parameters; FP8 GEMMs through Transformer Engine with `train.fp8`), activation
    recomputation and CUDA graphs. validate_config has already refused what cannot run here.
    random_init: megatron's `perform_initialization` (module docstring)."""
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
        perform_initialization=random_init,
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


def build_model(cfg: Config, vocab_size: int, backend: str = "auto", vp_stage: int | None = None,
                random_init: bool = True) -> ProSeCoModel:
    """One model chunk of this rank: the layers of its (virtual) pipeline stage, its vocab shard.
    random_init=False: no random draws; the matrices hold NaN until the caller loads weights or
    calls init_weights_layout_independent (module docstring)."""
    config = transformer_config(cfg, random_init)
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
    if not random_init:
        _complete_uninitialised(model)
    model.backend = backend
    return model


def build_model_chunks(cfg: Config, vocab_size: int, backend: str = "auto", random_init: bool = True) -> list:
    """All model chunks of this rank: one, or `parallel.vpp` with the interleaved pipeline."""
    if cfg.parallel.vpp is None:
        return [build_model(cfg, vocab_size, backend, random_init=random_init)]
    return [build_model(cfg, vocab_size, backend, vp_stage=i, random_init=random_init)
            for i in range(cfg.parallel.vpp)]


def _fc1_stride(config) -> int:
    """The partition stride megatron-core 0.16.1 gives an MLP's linear_fc1 (transformer/mlp.py):
    2 for a gated linear unit ([gate; up] interleaved per rank), except with Kitchen layers."""
    return 2 if config.gated_linear_unit and not config.use_kitchen else 1


@torch.no_grad()
def _complete_uninitialised(model: ProSeCoModel) -> None:
    """What megatron's parallel layers skip with perform_initialization=False (module docstring),
    and NaN in the matrices that must be written next."""
    strides = {id(m.linear_fc1): _fc1_stride(m.config) for m in model.modules() if isinstance(m, MLP)}
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            dim = 1 if isinstance(module, RowParallelLinear) else 0
            set_tensor_model_parallel_attributes(weight, True, dim, strides.get(id(module), 1))
        if isinstance(bias, torch.Tensor):
            bias.zero_()
    for name, param in model.named_parameters():
        if is_drawn(name, param):
            param.fill_(float("nan"))
