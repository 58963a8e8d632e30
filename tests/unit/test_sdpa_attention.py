"""SDPAttention (PyTorch's fused scaled_dot_product_attention) against megatron-core's unfused
DotProductAttention: the same bidirectional attention (no mask; a document mask is tested in
test_document_attention.py), outputs and gradients, in one layer and in the whole model.

Both compute softmax(Q K^T / sqrt(d)) V in fp32 from the same inputs, in a different order of
operations (SDPA's fused kernel scales Q before the product and accumulates the softmax online),
so they agree to fp32 round-off: observed below 1e-6; 1e-5 leaves a margin while a wrong scale,
a wrong head grouping or a dropped head differs by O(0.1).
"""
import dataclasses

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from prosec_mcore.config import Config
from prosec_mcore.model import layer_specs
from prosec_mcore.model.builder import build_model, transformer_config
from prosec_mcore.model.sdpa_attention import SDPAttention
from tests.compare import forward_and_grads, relative_error

SEQ, BATCH, HEADS, HEAD_DIM = 12, 3, 4, 16


def attention_pair(num_query_groups=None, attention_dropout=0.0, layer_scaling=False):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_attention_heads=HEADS, hidden_size=HEADS * HEAD_DIM,
                                    num_query_groups=num_query_groups, attention_dropout=attention_dropout)
    config = transformer_config(cfg)
    config.apply_query_key_layer_scaling = layer_scaling
    make = lambda cls: cls(config, layer_number=3, attn_mask_type=AttnMaskType.no_mask, attention_type="self")
    return make(DotProductAttention), make(SDPAttention), config.num_query_groups


def qkv(groups):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=gen) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("num_query_groups,layer_scaling", [
    (None, False), (2, False), (1, False),  # multi-head, grouped-query, multi-query
    (None, True),  # query-key layer scaling: megatron splits the scale between the product and the softmax
])
def test_sdpa_matches_megatron_unfused_attention(single_process_world, num_query_groups, layer_scaling):
    unfused, sdpa, groups = attention_pair(num_query_groups, layer_scaling=layer_scaling)
    inputs = qkv(groups)
    out_ref = unfused(*inputs, attention_mask=None)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), inputs)
    out = sdpa(*inputs, attention_mask=None)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    assert out.shape == out_ref.shape == (SEQ, BATCH, HEADS * HEAD_DIM)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"d/d{name}")


def test_sdpa_dropout_only_in_training(single_process_world):
    _, sdpa, groups = attention_pair(attention_dropout=0.5)
    _, sdpa_no_dropout, _ = attention_pair()
    inputs = [t.detach() for t in qkv(groups)]
    sdpa.eval()
    torch.testing.assert_close(sdpa(*inputs, attention_mask=None), sdpa_no_dropout(*inputs, attention_mask=None))
    sdpa.train()
    assert not torch.allclose(sdpa(*inputs, attention_mask=None), sdpa_no_dropout(*inputs, attention_mask=None))


@pytest.mark.parametrize("style", ["dit", "llama"])
def test_whole_model_is_the_same_with_either_local_attention(single_process_world, style):
    """Same weights, same input: logits and every parameter's gradient agree (tests/compare.py)."""
    shape = dict(style=style, num_layers=2)
    state, logits_ref, grads_ref = forward_and_grads({**shape, "local_attention": "unfused"}, 50, "local")
    _, logits, grads = forward_and_grads({**shape, "local_attention": "sdpa"}, 50, "local", state)
    assert relative_error(logits, logits_ref) < 1e-5
    errors = {name: relative_error(grads[name], grads_ref[name]) for name in grads_ref}
    assert max(errors.values()) < 1e-5, errors  # observed: below 1e-6 for every parameter


def test_core_attention_class_follows_the_setting(single_process_world):
    for attention, cls in layer_specs.LOCAL_ATTENTION.items():
        cfg = Config()
        cfg.model = dataclasses.replace(cfg.model, num_layers=1, local_attention=attention)
        model = build_model(cfg, 50, backend="local")
        assert type(model.decoder.layers[0].self_attention.core_attention) is cls


def test_attention_report_names_the_kernel():
    assert "scaled_dot_product_attention" in layer_specs.attention_kernels("local", "sdpa")
    assert "megatron-core DotProductAttention (unfused" in layer_specs.attention_kernels("local", "unfused")
