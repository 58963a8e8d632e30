"""Hugging Face DiT bridge: megatron <-> the reference checkpoints' layout, logits in float32.

A tiny random model on each side (litgpt's recipe): convert, then compare logits on real text
tokens and a few noise levels. The HF side is dit/modeling_proseco.py, which follows the
reference implementation (names, QKV layout, rotary, adaLN, final layer, class labels, dropout).
"""
import dataclasses

import pytest
import torch

from prosec_mcore.config import Config
from prosec_mcore.hf import dit_bridge
from prosec_mcore.hf.dit.configuration_proseco import ProsecoConfig
from prosec_mcore.hf.dit.modeling_proseco import Proseco
from prosec_mcore.model.builder import build_model
from tests.compare import set_generic_point

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York"
CHARS = sorted(set(TEXT))
VOCAB = len(CHARS) + 1


def tokens():
    ids = torch.tensor([CHARS.index(c) for c in TEXT[:64]])
    return torch.stack([ids[:32], ids[32:64]])


def megatron_model(zero_timestep=False, **model):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_layers=2, hidden_size=32, num_attention_heads=4,
                                    ffn_hidden_size=128, time_embedding_dim=16, zero_timestep=zero_timestep, **model)
    model = build_model(cfg, VOCAB)
    set_generic_point(model)
    return cfg, model.eval()


def megatron_state(model):
    return {name: p for name, p in model.state_dict(keep_vars=True).items() if not name.endswith("_extra_state")}


def exported(cfg, model):
    config = dit_bridge.hf_config(cfg.model, VOCAB, 128, {"mask_token_id": VOCAB - 1})
    hf = Proseco(ProsecoConfig(**config)).eval()
    missing, unexpected = hf.load_state_dict(dit_bridge.megatron_to_hf(megatron_state(model), cfg.model, VOCAB),
                                             strict=True)
    assert not missing and not unexpected
    return config, hf


@pytest.mark.parametrize("zero_timestep", [False, True])
def test_export_logits_match(single_process_world, zero_timestep):
    cfg, model = megatron_model(zero_timestep)
    _, hf = exported(cfg, model)
    sigma = torch.tensor([0.3, 2.0])
    with torch.no_grad():
        want = model(tokens(), sigma)[..., :VOCAB]
        got = hf(input_ids=tokens(), timesteps=sigma).logits
        as_tuple = hf(input_ids=tokens(), timesteps=sigma, return_dict=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.1  # a non-trivial network (adaLN gates are non-zero here)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], got)


@pytest.mark.parametrize("combination", ["silu_sum", "sum_silu"])
def test_labels_and_dropout_survive_export_and_import(single_process_world, combination):
    """cond (class labels, the last row the null label) gives megatron's logits under both label
    combinations; dropout and the label settings come back on import; dropout acts in training."""
    cfg, model = megatron_model(num_classes=3, label_combination=combination, hidden_dropout=0.1)
    config, hf = exported(cfg, model)
    assert (config["cfg"], config["cfg_num_classes"], config["dropout"]) == (True, 3, 0.1)
    sigma, labels = torch.tensor([0.3, 2.0]), torch.tensor([2, 0])
    with torch.no_grad():
        for cond in (labels, None):  # None: the null label, as megatron's labels=None
            want = model(tokens(), sigma, labels=cond)[..., :VOCAB]
            torch.testing.assert_close(hf(input_ids=tokens(), timesteps=sigma, cond=cond).logits, want,
                                       rtol=1e-5, atol=1e-5)
        assert not torch.allclose(hf(input_ids=tokens(), timesteps=sigma, cond=labels).logits,
                                  hf(input_ids=tokens(), timesteps=sigma).logits)
        hf.train()
        torch.manual_seed(0)
        dropped = hf(input_ids=tokens(), timesteps=sigma, cond=labels).logits
        hf.eval()
        assert not torch.allclose(dropped, hf(input_ids=tokens(), timesteps=sigma, cond=labels).logits)
    overrides = dit_bridge.model_overrides(dit_bridge.resolve_config(config))
    assert {"model.num_classes=3", f"model.label_combination={combination}",
            "model.hidden_dropout=0.1"} <= set(overrides)


def test_import_logits_match_and_round_trip_is_exact(single_process_world):
    cfg, model = megatron_model()
    hf_cfg = ProsecoConfig(vocab_size=VOCAB, model_length=128, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4,
                           time_conditioning=True)
    torch.manual_seed(3)
    hf = Proseco(hf_cfg).eval()
    set_generic_point(hf, seed=1)
    hf_state = hf.state_dict()
    dit_bridge.hf_to_megatron(hf_state, megatron_state(model), cfg.model)
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
        dit_bridge.hf_config(dataclasses.replace(cfg.model, style="llama", time_conditioning="none"), 100, 128, {})
    with pytest.raises(ValueError, match="model.rotary_base=10000"):
        dit_bridge.hf_config(dataclasses.replace(cfg.model, rotary_base=500000), 100, 128, {})
    with pytest.raises(ValueError, match="cfg_num_classes"):
        dit_bridge.check_supported(dit_bridge.resolve_config({"cfg": True}))
    with pytest.raises(ValueError, match="label_combination='other'"):
        dit_bridge.check_supported(dit_bridge.resolve_config({"label_combination": "other"}))
