"""Hugging Face DiT bridge: megatron <-> the reference checkpoints' layout, logits in float32.

A tiny random model on each side (litgpt's recipe): convert, then compare logits on real text
tokens and a few noise levels. The HF side is dit/modeling_proseco.py, which follows the
reference implementation (names, QKV layout, rotary, adaLN, final layer).
"""
import dataclasses

import pytest
import torch

from prosec_mcore.config import Config
from prosec_mcore.hf import dit_bridge
from prosec_mcore.hf.dit.configuration_proseco import ProsecoConfig
from prosec_mcore.hf.dit.modeling_proseco import Proseco
from prosec_mcore.model.builder import build_model, padded_vocab_size
from tests.compare import set_generic_point

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York"
CHARS = sorted(set(TEXT))
VOCAB = len(CHARS) + 1


def tokens():
    ids = torch.tensor([CHARS.index(c) for c in TEXT[:64]])
    return torch.stack([ids[:32], ids[32:64]])


def megatron_model(zero_timestep=False):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_layers=2, hidden_size=32, num_attention_heads=4,
                                    ffn_hidden_size=128, time_embedding_dim=16, zero_timestep=zero_timestep)
    model = build_model(cfg, VOCAB)
    set_generic_point(model)
    return cfg, model.eval()


def megatron_state(model):
    return {name: p for name, p in model.state_dict().items() if not name.endswith("_extra_state")}


@pytest.mark.parametrize("zero_timestep", [False, True])
def test_export_logits_match(single_process_world, zero_timestep):
    cfg, model = megatron_model(zero_timestep)
    hf = Proseco(ProsecoConfig(**{k: v for k, v in dit_bridge.hf_config(cfg.model, VOCAB, 128).items()
                                  if k not in ("model_type", "architectures", "auto_map")})).eval()
    missing, unexpected = hf.load_state_dict(dit_bridge.megatron_to_hf(megatron_state(model), cfg.model, VOCAB), strict=True)
    assert not missing and not unexpected
    sigma = torch.tensor([0.3, 2.0])
    with torch.no_grad():
        want = model(tokens(), sigma)[..., :VOCAB]
        got = hf(input_ids=tokens(), timesteps=sigma).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.1  # a non-trivial network (adaLN gates are non-zero here)


def test_import_logits_match_and_round_trip_is_exact(single_process_world):
    cfg, model = megatron_model()
    hf_cfg = ProsecoConfig(vocab_size=VOCAB, model_length=128, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4,
                           time_conditioning=True)
    torch.manual_seed(3)
    hf = Proseco(hf_cfg).eval()
    set_generic_point(hf, seed=1)
    hf_state = hf.state_dict()
    state = dit_bridge.hf_to_megatron(hf_state, cfg.model, padded_vocab_size(VOCAB))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    sigma = torch.tensor([0.7, 0.05])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens(), sigma)[..., :VOCAB], hf(input_ids=tokens(), timesteps=sigma).logits,
                                   rtol=1e-5, atol=1e-5)
    back = dit_bridge.megatron_to_hf(megatron_state(model), cfg.model, VOCAB)
    assert set(back) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name  # every tensor, bit for bit


def test_unsupported_models_are_refused():
    cfg = Config()
    with pytest.raises(ValueError, match="model.style=dit"):
        dit_bridge.hf_config(dataclasses.replace(cfg.model, style="llama", time_conditioning="none"), 100, 128)
    with pytest.raises(ValueError, match="cfg=true"):
        dit_bridge.model_overrides({"cfg": True})
