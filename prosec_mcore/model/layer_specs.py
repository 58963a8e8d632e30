"""Layer specs of the bidirectional ProSeCo transformer.

A masked diffusion model sees the whole (partly masked) sequence at once, so attention has no
causal mask anywhere: every spec here builds megatron-core's attention with
`AttnMaskType.no_mask`. The model passes `attention_mask=None` (all positions see each other) or,
with document attention / variable-length samples (diffusion/packing.py), a block-diagonal bool
mask to the local core attentions (megatron's unfused one applies any mask it is given, whatever
its mask type) or thd `packed_seq_params` to Transformer Engine's (megatron turns `no_mask` into
TE's `padding` type, which thd requires).

Two backends, chosen automatically (`select_backend`):
  local  megatron-core's own tensor-parallel linears; core attention through PyTorch's fused
         scaled_dot_product_attention (`sdpa_attention.py`, the default) or megatron-core's
         unfused DotProductAttention (`model.local_attention=unfused`); runs on CPU too.
  te     Transformer Engine linears and fused attention (GPU).
The attention projections (QKV, output) never have a bias; the MLP has one in the DiT style, which
its second linear adds itself (`_adds_own_bias`: megatron's MLP recomputation needs that).

Neither backend fuses the norm into the next linear. megatron's own TE spec does (QKV and FC1 as
`TELayerNormColumnParallelLinear`: y = W (norm(x) * gamma + beta), gamma and beta per feature):
  * adaLN layers cannot: the modulation norm(x) * (1 + scale) + shift sits between the norm and
    the linear, and scale and shift are per sample ([b, h]) while the fused norm applies one
    per-feature gamma / beta to every token. The shift alone could move behind the GEMM (a
    per-sample bias W shift), but the scale multiplies the features before W.
  * unmodulated layers (llama, time_conditioning=none) could, and do not: the fused module needs
    TransformerConfig.normalization="RMSNorm" (the builder leaves megatron's default LayerNorm,
    for which TE would add a bias) and renames the norm weights (input_layernorm.weight becomes
    self_attention.linear_qkv.layer_norm_weight, pre_mlp_layernorm.weight becomes
    mlp.linear_fc1.layer_norm_weight), names the Hugging Face bridges, the name-seeded
    initialisation and the TE-vs-local comparisons (tests/gpu) rely on.
"""
from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .adaln_layer import AdaLNTransformerLayer
from .norms import norm_class
from .sdpa_attention import SDPAttention

LOCAL_ATTENTION = {"sdpa": SDPAttention, "unfused": DotProductAttention}


def _transformer_engine_status() -> tuple[bool, str]:
    """(usable, why): TE is used only when it imports *and* a CUDA device is present."""
    import torch

    try:
        import transformer_engine
    except ImportError:
        return False, "transformer_engine is not installed"
    except Exception as err:  # a TE build that cannot load its CUDA libraries
        return False, f"transformer_engine failed to import ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    if not torch.cuda.is_available():
        return False, "no CUDA device (Transformer Engine runs on GPUs only)"
    return True, f"Transformer Engine {getattr(transformer_engine, '__version__', '?')} with CUDA"


def transformer_engine_available() -> bool:
    return _transformer_engine_status()[0]


def describe_backend(requested: str = "auto") -> tuple[str, str]:
    """The backend `select_backend` picks and the reason, for the start-up log."""
    usable, why = _transformer_engine_status()
    if requested == "auto":
        return ("te", why) if usable else ("local", why)
    return requested, "requested explicitly" + ("" if requested == "local" or usable else f", but {why}")


def select_backend(requested: str = "auto") -> str:
    if requested == "auto":
        return "te" if transformer_engine_available() else "local"
    if requested == "te" and not transformer_engine_available():
        raise RuntimeError("model backend 'te' needs Transformer Engine and a GPU; use backend=local")
    return requested


def attention_kernels(backend: str, local_attention: str = "sdpa") -> str:
    """Which attention implementation runs. TE picks flash / cuDNN fused / unfused per call from
    the shapes, dtype and GPU; the NVTE_* switches below force it (NVTE_DEBUG=1
    NVTE_DEBUG_LEVEL=2 makes TE log each choice). PyTorch picks SDPA's kernel per call too."""
    if backend != "te" and local_attention == "unfused":
        return "megatron-core DotProductAttention (unfused: baddbmm, softmax, bmm; no causal mask)"
    if backend != "te":
        return ("torch scaled_dot_product_attention (no causal mask; flash / cuDNN / memory-efficient / math "
                "chosen per call by PyTorch)")
    import os

    switches = " ".join(f"{k}={os.environ[k]}" for k in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
                        if k in os.environ)
    return ("TEDotProductAttention (no causal mask; flash / cuDNN fused / unfused chosen per call by TE"
            + (f"; {switches}" if switches else "") + ")")


@functools.cache
def _no_bias(linear_class):
    """The same linear layer, never with a bias: the reference DiT has biases in its MLP but
    none on the attention projections, while megatron's `add_bias_linear` covers both."""

    class NoBias(linear_class):
        def __init__(self, *args, bias: bool = False, **kwargs):
            super().__init__(*args, bias=False, **kwargs)

    NoBias.__name__ = f"{linear_class.__name__}NoBias"
    return NoBias


@functools.cache
def _adds_own_bias(linear_class):
    """The same row-parallel linear, adding its bias itself (`skip_bias_add=False`) where megatron's
    MLP asks it to hand the bias back for the bias-dropout-add to add (the same sum, out + bias).

    A bias handed back is the Parameter itself, and megatron's MLP recomputation
    (`recompute_modules=["mlp"]`) returns the MLP's outputs from a reentrant autograd Function:
    autograd then gives the bias Parameter that Function as its grad_fn, and the backward recurses
    without end (megatron-core 0.16.1, torch 2.x). An MLP that adds its own bias returns a fresh
    tensor and no bias. The adaLN layer adds the bias before its gate anyway (adaln_layer.py), so
    the bias-dropout-add never receives one; for the plain layer, residual + Dropout(out + bias) is
    unchanged."""

    class AddsOwnBias(linear_class):
        def __init__(self, *args, skip_bias_add: bool = False, **kwargs):
            super().__init__(*args, skip_bias_add=False, **kwargs)

    AddsOwnBias.__name__ = f"{linear_class.__name__}AddsOwnBias"
    return AddsOwnBias


def _linears(backend: str, local_attention: str = "sdpa"):
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TERowParallelLinear,
        )

        return TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    return ColumnParallelLinear, RowParallelLinear, LOCAL_ATTENTION[local_attention]



def layer_spec(style: str, time_conditioning: str, backend: str = "local", local_attention: str = "sdpa") -> ModuleSpec:
    """One bidirectional transformer layer."""
    column, row, core_attention = _linears(backend, local_attention)
    norm = norm_class(style)
    return ModuleSpec(
        module=AdaLNTransformerLayer if time_conditioning == "adaln" else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=_no_bias(column),
                    core_attention=core_attention,
                    linear_proj=_no_bias(row),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=_adds_own_bias(row))),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config, style: str, time_conditioning: str, backend: str = "local", vp_stage=None,
               local_attention: str = "sdpa"):
    """The layers of this pipeline stage plus the final norm (built on the last stage only)."""
    spec = layer_spec(style, time_conditioning, backend, local_attention)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=norm_class(style))
