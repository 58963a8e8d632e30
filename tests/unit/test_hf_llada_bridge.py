"""Hugging Face LLaDA bridge: megatron (style=llama, GQA, SwiGLU, no time input) <-> the
GSAI-ML/LLaDA-8B-Base layout, logits in float32, both directions, and an exact round trip."""
import dataclasses

import torch

from prosec_mcore.config import Config
from prosec_mcore.hf import llada_bridge
from prosec_mcore.hf.llada.configuration_llada import LLaDAConfig
from prosec_mcore.hf.llada.modeling_llada import LLaDAModelLM
from prosec_mcore.model.builder import build_model, padded_vocab_size
from tests.compare import set_generic_point

TEXT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"
CHARS = sorted(set(TEXT))
VOCAB = len(CHARS) + 1


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


def hf_model(cfg):
    keys = llada_bridge.hf_config(cfg.model, VOCAB, 128)
    return LLaDAModelLM(LLaDAConfig(**{k: v for k, v in keys.items() if k not in ("model_type", "architectures",
                                                                                   "auto_map")})).eval()


def megatron_state(model):
    return {name: p for name, p in model.state_dict().items() if not name.endswith("_extra_state")}


def test_export_logits_match(single_process_world):
    cfg, model = megatron_model()
    hf = hf_model(cfg)
    missing, unexpected = hf.load_state_dict(llada_bridge.megatron_to_hf(megatron_state(model), cfg.model, VOCAB))
    assert not missing and not unexpected
    with torch.no_grad():
        want = model(tokens())[..., :VOCAB]
        torch.testing.assert_close(hf(input_ids=tokens()).logits, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.1


def test_import_logits_match_and_round_trip_is_exact(single_process_world):
    cfg, model = megatron_model()
    torch.manual_seed(4)
    hf = hf_model(cfg)
    set_generic_point(hf, seed=1)
    hf_state = hf.state_dict()
    result = model.load_state_dict(llada_bridge.hf_to_megatron(hf_state, cfg.model, padded_vocab_size(VOCAB)),
                                   strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens())[..., :VOCAB], hf(input_ids=tokens()).logits, rtol=1e-5, atol=1e-5)
    back = llada_bridge.megatron_to_hf(megatron_state(model), cfg.model, VOCAB)
    assert set(back) == set(hf_state)
    assert all(torch.equal(back[name], tensor) for name, tensor in hf_state.items())
