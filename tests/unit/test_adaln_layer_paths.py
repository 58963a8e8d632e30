"""The adaLN layer on megatron-core's own forward paths (model/adaln_layer.py).

AdaLNTransformerLayer runs megatron's TransformerLayer.forward with the modulation injected at
three seams (attention input, MLP input, gated bias-dropout-add). These tests hold it to:
  * the layer's previous hand-written forward, copied below as `reference_forward`: bitwise equal
    outputs and gradients in fp32 without dropout, and with hidden dropout p = 0.5 (dropout
    multiplies by a mask times 1/(1-p) = 2, an exact scaling, so Dropout(gate * y) and
    gate * Dropout(y) agree bitwise when both draw the mask from the same generator state), with a
    block-diagonal document-attention mask and rotary embeddings passed through;
  * megatron's selective recomputation inside the layer (recompute_modules layernorm, mlp,
    core_attn): the recomputed functions really run again, and outputs equal those without
    recomputation bitwise, gradients up to the order of a sum (`assert_equal_up_to_sum_order`);
  * full recomputation through megatron's TransformerBlock (train.recompute_granularity=full,
    recompute_method=uniform, via the builder's TransformerConfig): the same, with dropout on;
  * the spec construction for both backends (the te spec with stand-in TE classes: it runs on a
    GPU only) and the refusals of the paths that would drop the modulation.
Each test takes well under a second after the session's megatron start-up.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from omegaconf import OmegaConf

from prosec_mcore.config import Config
from prosec_mcore.model import layer_specs
from prosec_mcore.model.adaln_layer import AdaLNTransformerLayer
from prosec_mcore.model.builder import transformer_config
from prosec_mcore.model.norms import norm_class
from prosec_mcore.model.time_embedding import modulate
from tests.compare import set_generic_point

SEQ, BATCH = 6, 3
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
        "model.time_embedding_dim=16", "train.precision=fp32"]
LAYER_RECOMPUTE = ["layernorm", "mlp", "core_attn"]


def reference_forward(layer, hidden_states, attention_mask=None, context=None, rotary_pos_emb=None,
                      packed_seq_params=None):
    """The layer's forward before it ran on megatron's paths, kept verbatim as the reference (but for
    `self_attention.forward`: calling the module would fire the layer's modulating pre-hook)."""

    def gated_residual(residual, output_with_bias, gate):
        output, bias = output_with_bias
        if bias is not None:
            output = output + bias
        output = F.dropout(output, p=layer.hidden_dropout, training=layer.training)
        return residual + gate * output

    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = layer.adaln_modulation(context)
    attn_in = modulate(layer.input_layernorm(hidden_states), shift_a, scale_a)
    attn_out = layer.self_attention.forward(attn_in, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                            packed_seq_params=packed_seq_params)
    hidden_states = gated_residual(hidden_states, attn_out, gate_a)
    mlp_in = modulate(layer.pre_mlp_layernorm(hidden_states), shift_m, scale_m)
    return gated_residual(hidden_states, layer.mlp(mlp_in), gate_m), context


def tiny_config(*overrides, **megatron_fields):
    """The builder's TransformerConfig for a tiny fp32 run (train.* options go through the builder's
    wiring), with TransformerConfig fields the run configuration does not reach set directly."""
    dotlist = OmegaConf.from_dotlist(TINY + list(overrides))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), dotlist))
    config = transformer_config(cfg)
    return dataclasses.replace(config, **megatron_fields) if megatron_fields else config


def build_layer(config, style="dit", seed=0):
    torch.manual_seed(0)
    layer = build_module(layer_specs.layer_spec(style, "adaln"), config=config, layer_number=1)
    set_generic_point(layer, seed)  # non-zero gates: every branch reaches the output
    return layer


def inputs(config, seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, config.hidden_size, generator=gen, requires_grad=True)
    context = torch.randn(BATCH, config.time_embedding_dim, generator=gen, requires_grad=True)
    return hidden, context


def document_mask():
    """Two documents per sample, [b, 1, s, s], True = masked out (megatron's convention)."""
    doc = torch.tensor([0, 0, 0, 1, 1, 1])
    return (doc[:, None] != doc[None, :]).expand(BATCH, 1, SEQ, SEQ).contiguous()


def rotary(config):
    return RotaryEmbedding(config.kv_channels, rotary_percent=1.0)(SEQ)


def run(module_call, module, hidden, context, dropout_seed=5):
    """Output and the gradients of (output * fixed weights).sum() w.r.t. inputs and parameters."""
    hidden, context = hidden.detach().requires_grad_(), context.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(dropout_seed)
    out = module_call(hidden, context)
    # A Parameter returned from a reentrant checkpoint becomes a non-leaf and the backward recurses
    # without end (layer_specs._adds_own_bias): fail here instead of hanging.
    assert all(p.is_leaf for p in module.parameters()), "a parameter got a grad_fn in the forward"
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return out.detach(), dict(grads, hidden=hidden.grad, context=context.grad)


def assert_bitwise_equal(got, want):
    (out_got, grads_got), (out_want, grads_want) = got, want
    assert torch.equal(out_got, out_want), f"outputs differ by {(out_got - out_want).abs().max():.3g}"
    assert grads_got.keys() == grads_want.keys()
    for name, grad in grads_want.items():
        gap = (grads_got[name] - grad).abs().max()
        assert torch.equal(grads_got[name], grad), f"{name}: gradients differ by {gap:.3g}"


@pytest.mark.parametrize("hidden_dropout", [0.0, 0.5])
@pytest.mark.parametrize("mask", [False, True])
def test_megatron_forward_equals_the_previous_forward_bitwise(single_process_world, hidden_dropout, mask):
    config = tiny_config(f"model.hidden_dropout={hidden_dropout}")
    layer = build_layer(config)
    layer.train()
    hidden, context = inputs(config)
    kwargs = dict(attention_mask=document_mask() if mask else None, rotary_pos_emb=rotary(config))
    new = run(lambda h, c: layer(h, context=c, **kwargs)[0], layer, hidden, context)
    old = run(lambda h, c: reference_forward(layer, h, context=c, **kwargs)[0], layer, hidden, context)
    assert_bitwise_equal(new, old)
    if hidden_dropout:  # the mask really dropped something, and a different draw differs
        other = run(lambda h, c: layer(h, context=c, **kwargs)[0], layer, hidden, context, dropout_seed=6)
        assert not torch.equal(other[0], new[0])
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(hidden, context=context, **kwargs)[0],
                           reference_forward(layer, hidden, context=context, **kwargs)[0])


def test_the_document_mask_reaches_the_attention(single_process_world):
    """Guards the hand-on of attention_mask: with a block-diagonal mask, the first document's
    outputs do not depend on the second document's tokens."""
    config = tiny_config()
    layer = build_layer(config)
    hidden, context = inputs(config)
    changed = hidden.detach().clone()
    changed[3:] += 1.0
    out = layer(hidden, context=context, attention_mask=document_mask(), rotary_pos_emb=rotary(config))[0]
    out_changed = layer(changed, context=context, attention_mask=document_mask(), rotary_pos_emb=rotary(config))[0]
    assert torch.equal(out[:3], out_changed[:3]) and not torch.equal(out[3:], out_changed[3:])


def assert_equal_up_to_sum_order(got, want):
    """Outputs bitwise; gradients within 1e-6 of each gradient's largest entry. A recomputed
    function back-propagates inside megatron's checkpoint and hands its input gradient back as one
    term, so a tensor used three times (RMSNorm's input: x * rsqrt(mean(x^2)), plus the residual)
    sums its gradient terms in another order: measured up to 2.7e-7 (llama, four seeds), 0 with
    the single-op LayerNorm of the dit style."""
    (out_got, grads_got), (out_want, grads_want) = got, want
    assert torch.equal(out_got, out_want), f"outputs differ by {(out_got - out_want).abs().max():.3g}"
    assert grads_got.keys() == grads_want.keys()
    for name, grad in grads_want.items():
        torch.testing.assert_close(grads_got[name], grad, rtol=0, atol=1e-6 * grad.abs().max().item(), msg=name)


@pytest.fixture
def output_discarding_checkpoint_without_te(monkeypatch):
    """megatron-core 0.16.1's CheckpointWithoutOutput sets `self.fp8 = fp8 is not None`, True even
    for fp8=False, and then calls Transformer Engine's FP8 state manager, which a machine without
    TE lacks (NameError). With TE and FP8 off, that branch only enters TE's recompute contexts,
    which touch TE modules alone; on the local layers the fp8=False branch is the same computation."""
    from megatron.core.tensor_parallel import random as megatron_random

    if megatron_random.HAVE_TE:
        return
    original_init = megatron_random.CheckpointWithoutOutput.__init__

    def init_without_te(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = False

    monkeypatch.setattr(megatron_random.CheckpointWithoutOutput, "__init__", init_without_te)


def _count_calls(module, counts, key):
    module.register_forward_hook(lambda *args: counts.__setitem__(key, counts.get(key, 0) + 1))


@pytest.mark.parametrize("style", ["dit", "llama"])
def test_selective_recompute_inside_the_layer_keeps_outputs_and_gradients(single_process_world, style,
                                                                         output_discarding_checkpoint_without_te):
    plain_config = tiny_config(f"model.style={style}")
    recompute_config = tiny_config(f"model.style={style}", recompute_granularity="selective",
                                   recompute_modules=LAYER_RECOMPUTE)
    plain, recomputed = build_layer(plain_config, style), build_layer(recompute_config, style)
    recomputed.load_state_dict(plain.state_dict())
    assert (recomputed.recompute_input_layernorm, recomputed.recompute_pre_mlp_layernorm,
            recomputed.recompute_mlp) == (True, True, True)
    counts = {}
    for name in ("input_layernorm", "pre_mlp_layernorm", "mlp"):
        _count_calls(getattr(recomputed, name), counts, name)
    _count_calls(recomputed.self_attention.core_attention, counts, "core_attention")
    hidden, context = inputs(plain_config)
    kwargs = dict(attention_mask=document_mask(), rotary_pos_emb=rotary(plain_config))
    want = run(lambda h, c: plain(h, context=c, **kwargs)[0], plain, hidden, context)
    got = run(lambda h, c: recomputed(h, context=c, **kwargs)[0], recomputed, hidden, context)
    # Each recomputed function ran in the forward and again in the backward.
    assert counts == {"input_layernorm": 2, "pre_mlp_layernorm": 2, "mlp": 2, "core_attention": 2}
    assert_equal_up_to_sum_order(got, want)


def build_block(config, seed=0):
    torch.manual_seed(0)
    block = TransformerBlock(config, layer_specs.block_spec(config, "dit", "adaln"))
    set_generic_point(block, seed)
    return block


@pytest.mark.parametrize("num_layers", [1, 2])
def test_full_recompute_through_the_transformer_block_keeps_outputs_and_gradients(single_process_world, num_layers):
    dropout = ["model.hidden_dropout=0.5"]  # the re-run must replay the same dropout masks
    plain = build_block(tiny_config(*dropout))
    recomputed = build_block(tiny_config(*dropout, "train.recompute_granularity=full", "train.recompute_method=uniform",
                                         f"train.recompute_num_layers={num_layers}"))
    assert recomputed.config.recompute_granularity == "full" and recomputed.config.recompute_method == "uniform"
    recomputed.load_state_dict(plain.state_dict())
    counts = {}
    for index, layer in enumerate(recomputed.layers):
        _count_calls(layer, counts, index)
    plain.train(), recomputed.train()
    hidden, context = inputs(plain.config)
    kwargs = dict(attention_mask=document_mask(), rotary_pos_emb=rotary(plain.config))
    want = run(lambda h, c: plain(h, context=c, **kwargs), plain, hidden, context)
    got = run(lambda h, c: recomputed(h, context=c, **kwargs), recomputed, hidden, context)
    assert counts == {0: 2, 1: 2}  # every layer ran again in the backward pass
    assert_bitwise_equal(got, want)


def test_sub_blocks_refuse_to_run_outside_the_forward(single_process_world):
    """A path that calls megatron's _forward_attention / _forward_mlp directly (TE's CUDA-graph
    capture does) must fail loudly rather than run the layer without its modulation."""
    config = tiny_config()
    layer = build_layer(config)
    hidden, _ = inputs(config)
    with pytest.raises(RuntimeError, match="outside its forward"):
        layer._forward_attention(hidden)
    with pytest.raises(ValueError, match="needs the time embedding"):
        layer(hidden)
    config.inference_fuse_tp_communication = True  # megatron allows it with its inference-optimised layers only
    with pytest.raises(ValueError, match="inference_fuse_tp_communication"):
        build_layer(config)


@pytest.mark.parametrize("style,conditioning", [("dit", "adaln"), ("llama", "none")])
def test_te_spec_keeps_the_norm_as_its_own_module(monkeypatch, style, conditioning):
    """The te spec (GPU only) is built here with stand-in TE classes: the norm is a separate module
    and QKV / FC1 are plain TE column-parallel linears, never TE's fused LayerNorm+Linear
    (layer_specs.py says why)."""
    from megatron.core.extensions import transformer_engine as te_ext

    stand_ins = {name: type(name, (torch.nn.Module,), {}) for name in (
        "TEColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention", "TELayerNormColumnParallelLinear")}
    for name, cls in stand_ins.items():
        monkeypatch.setattr(te_ext, name, cls)
    spec = layer_specs.layer_spec(style, conditioning, backend="te")
    sub = spec.submodules
    attention, mlp = sub.self_attention.submodules, sub.mlp.submodules
    assert spec.module is (AdaLNTransformerLayer if conditioning == "adaln" else layer_specs.TransformerLayer)
    assert sub.input_layernorm is norm_class(style) and sub.pre_mlp_layernorm is norm_class(style)
    assert issubclass(attention.linear_qkv, stand_ins["TEColumnParallelLinear"])
    assert mlp.linear_fc1 is stand_ins["TEColumnParallelLinear"]
    assert issubclass(mlp.linear_fc2, stand_ins["TERowParallelLinear"])
    assert attention.core_attention is stand_ins["TEDotProductAttention"]
    fused = stand_ins["TELayerNormColumnParallelLinear"]
    assert not issubclass(attention.linear_qkv, fused) and mlp.linear_fc1 is not fused
