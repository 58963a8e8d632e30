"""Hugging Face LLaDA bridge: megatron (style=llama, GQA, SwiGLU, no time input) <-> the
GSAI-ML/LLaDA-8B-Base layout, logits in float32, both directions, an exact round trip; and the
config: LLaDA's real config.json (every key, sizes scaled down) is read as LLaDA's code reads it,
and every setting the megatron model does not implement is refused by name."""
import dataclasses

import pytest
import torch

from prosec_mcore.config import Config
from prosec_mcore.hf import llada_bridge
from prosec_mcore.hf.llada.configuration_llada import LLaDAConfig
from prosec_mcore.hf.llada.modeling_llada import LLaDAModelLM
from prosec_mcore.model.builder import build_model
from tests.compare import set_generic_point

TEXT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"
CHARS = sorted(set(TEXT))
VOCAB = len(CHARS) + 1
# the hub's config.json, every key, with tiny sizes
TINY = {**llada_bridge.LLADA_8B_BASE_CONFIG, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
        "mlp_hidden_size": 48, "vocab_size": VOCAB, "embedding_size": VOCAB, "max_sequence_length": 128,
        "mask_token_id": VOCAB - 1, "eos_token_id": 0, "pad_token_id": 0}


def tokens():
    ids = torch.tensor([CHARS.index(c) for c in TEXT[:64]])
    return torch.stack([ids[:32], ids[32:64]])


def megatron_model():
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, style="llama", time_conditioning="none", num_layers=2, hidden_size=32,
                                    num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                                    rotary_base=500000)
    model = build_model(cfg, VOCAB)
    set_generic_point(model)
    return cfg, model.eval()


def params(model):
    return {name: p for name, p in model.state_dict(keep_vars=True).items() if not name.endswith("_extra_state")}


def test_export_logits_match(single_process_world):
    cfg, model = megatron_model()
    config = llada_bridge.hf_config(cfg.model, VOCAB, 128, {"mask_token_id": VOCAB - 1, "eos_token_id": 0,
                                                            "pad_token_id": 0})
    assert set(llada_bridge.LLADA_8B_BASE_CONFIG) - {"torch_dtype", "transformers_version"} <= set(config)
    assert (config["eos_token_id"], config["pad_token_id"], config["mask_token_id"]) == (0, 0, VOCAB - 1)
    assert config["mlp_ratio"] == 4 and config["rope_theta"] == 500000.0
    assert "AutoModelForCausalLM" in config["auto_map"]
    hf = LLaDAModelLM(LLaDAConfig(**config)).eval()
    missing, unexpected = hf.load_state_dict(llada_bridge.megatron_to_hf(params(model), cfg.model, VOCAB))
    assert not missing and not unexpected
    with torch.no_grad():
        want = model(tokens())[..., :VOCAB]
        torch.testing.assert_close(hf(input_ids=tokens()).logits, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.1


def test_import_of_the_real_config_format_and_exact_round_trip(single_process_world):
    resolved = llada_bridge.resolve_config(TINY)
    llada_bridge.check_supported(resolved)
    assert "model.num_query_groups=2" in llada_bridge.model_overrides(resolved)
    cfg, model = megatron_model()
    torch.manual_seed(4)
    hf = LLaDAModelLM(LLaDAConfig(**TINY)).eval()
    set_generic_point(hf, seed=1)
    hf_state = hf.state_dict()
    llada_bridge.hf_to_megatron(hf_state, params(model), cfg.model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens())[..., :VOCAB], hf(input_ids=tokens()).logits, rtol=1e-5, atol=1e-5)
        out = hf(input_ids=tokens(), output_hidden_states=True, return_dict=False)
        assert len(out) == 2 and len(out[1]) == 3  # (logits, hidden states: embeddings + 2 layers)
        embeds = hf.get_input_embeddings()(tokens())
        torch.testing.assert_close(hf(inputs_embeds=embeds).logits, out[0])
    back = llada_bridge.megatron_to_hf(params(model), cfg.model, VOCAB)
    assert set(back) == set(hf_state)
    assert all(torch.equal(back[name], tensor) for name, tensor in hf_state.items())
    # the config comes back as the source wrote it (ids, mlp_ratio, vocab_size, every key)
    config = llada_bridge.hf_config(cfg.model, VOCAB, 128, {}, source=TINY)
    assert {k: config[k] for k in TINY if k != "auto_map"} == {k: v for k, v in TINY.items() if k != "auto_map"}


@pytest.mark.parametrize("key,value", [
    ("scale_logits", True), ("input_emb_norm", True), ("attention_layer_norm", True), ("include_qkv_bias", True),
    ("layer_norm_type", "gemma_rms"), ("layer_norm_type", "default"), ("include_bias", True),
    ("weight_tying", True), ("block_type", "sequential"), ("activation_type", "swiglu"), ("alibi", True),
    ("rope", False), ("bias_for_layer_norm", True), ("layer_norm_with_affine", False),
    ("rope_full_precision", False), ("rope_theta", 500000.5),
])
def test_unimplemented_settings_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        resolved = llada_bridge.resolve_config({**TINY, key: value})
        llada_bridge.check_supported(resolved)
        llada_bridge.model_overrides(resolved)


def test_null_and_derived_fields_follow_llada():
    # multi_query_attention with n_kv_heads null: one kv head (LLaDA's effective_n_kv_heads)
    mqa = llada_bridge.resolve_config({**TINY, "n_kv_heads": None, "multi_query_attention": True})
    assert mqa["n_kv_heads"] == 1
    assert llada_bridge.resolve_config({**TINY, "n_kv_heads": None})["n_kv_heads"] == 4
    with pytest.raises(ValueError, match="multi_query_attention"):
        llada_bridge.resolve_config({**TINY, "n_kv_heads": 2, "multi_query_attention": True})
    # mlp_hidden_size null: mlp_ratio * d_model; embedding_size null: vocab_size
    derived = llada_bridge.resolve_config({**TINY, "mlp_hidden_size": None, "embedding_size": None})
    assert derived["mlp_hidden_size"] == 4 * 32 and derived["embedding_size"] == VOCAB
    # a key the file leaves out takes LLaDA's default (block_type: sequential), which is refused
    with pytest.raises(ValueError, match="block_type='sequential'"):
        llada_bridge.check_supported(llada_bridge.resolve_config({k: v for k, v in TINY.items() if k != "block_type"}))
    assert "model.rotary_base=500000" in llada_bridge.model_overrides(llada_bridge.resolve_config(TINY))
