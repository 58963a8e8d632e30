"""Bridge between the megatron ProSeCo model (style=dit, time_conditioning=adaln) and the
Hugging Face layout of the ProSeCo / MDLM reference checkpoints (dit/modeling_proseco.py).

One readable table maps names; three rules handle what differs beyond names:
  * QKV rows: megatron interleaves them per head ([q_h, k_h, v_h] for each head h); the
    reference stacks [q (all heads), k, v].
  * Vocabulary: megatron pads its embedding/output rows to a multiple of 128; HF has exactly
    vocab_size rows. Padding rows are dropped on export and zero on import.
  * Time input: the reference zeroes sigma when `time_conditioning` is false, which is our
    `model.zero_timestep`.
Megatron names are the global names of a TP=1, PP=1 model (`decoder.layers.<i>...`).
"""
from __future__ import annotations

import torch

# (megatron name, HF name); {i} is the layer index.
LAYER_MAP = [
    ("decoder.layers.{i}.input_layernorm.weight", "backbone.blocks.{i}.norm1.weight"),
    ("decoder.layers.{i}.self_attention.linear_qkv.weight", "backbone.blocks.{i}.attn_qkv.weight"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", "backbone.blocks.{i}.attn_out.weight"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", "backbone.blocks.{i}.norm2.weight"),
    ("decoder.layers.{i}.mlp.linear_fc1.weight", "backbone.blocks.{i}.mlp.0.weight"),
    ("decoder.layers.{i}.mlp.linear_fc1.bias", "backbone.blocks.{i}.mlp.0.bias"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", "backbone.blocks.{i}.mlp.2.weight"),
    ("decoder.layers.{i}.mlp.linear_fc2.bias", "backbone.blocks.{i}.mlp.2.bias"),
    ("decoder.layers.{i}.adaln_modulation.linear.weight", "backbone.blocks.{i}.adaLN_modulation.weight"),
    ("decoder.layers.{i}.adaln_modulation.linear.bias", "backbone.blocks.{i}.adaLN_modulation.bias"),
]
GLOBAL_MAP = [
    ("embedding.word_embeddings.weight", "backbone.vocab_embed.embedding"),
    ("time_embedder.fc1.weight", "backbone.sigma_map.mlp.0.weight"),
    ("time_embedder.fc1.bias", "backbone.sigma_map.mlp.0.bias"),
    ("time_embedder.fc2.weight", "backbone.sigma_map.mlp.2.weight"),
    ("time_embedder.fc2.bias", "backbone.sigma_map.mlp.2.bias"),
    ("decoder.final_layernorm.weight", "backbone.output_layer.norm_final.weight"),
    ("final_modulation.linear.weight", "backbone.output_layer.adaLN_modulation.weight"),
    ("final_modulation.linear.bias", "backbone.output_layer.adaLN_modulation.bias"),
    ("output_layer.weight", "backbone.output_layer.linear.weight"),
    ("output_layer.bias", "backbone.output_layer.linear.bias"),
]
VOCAB_ROWS = {"embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"}


def name_pairs(num_layers: int):
    pairs = list(GLOBAL_MAP)
    for i in range(num_layers):
        pairs += [(m.format(i=i), h.format(i=i)) for m, h in LAYER_MAP]
    return pairs


def _qkv_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    three_h, hidden = w.shape
    return w.view(heads, 3, three_h // (3 * heads), hidden).transpose(0, 1).reshape(three_h, hidden)


def _qkv_to_megatron(w: torch.Tensor, heads: int) -> torch.Tensor:
    three_h, hidden = w.shape
    return w.view(3, heads, three_h // (3 * heads), hidden).transpose(0, 1).reshape(three_h, hidden)


def hf_config(model_cfg, vocab_size: int, max_length: int, mask_token_id: int | None = None) -> dict:
    """config.json of the exported folder (the reference's keys, plus auto_map for AutoModel).
    The reference config names no mask id (its mask is the last id), so `mask_token_id` is unused."""
    if model_cfg.style != "dit" or model_cfg.time_conditioning != "adaln":
        raise ValueError("the DiT bridge converts model.style=dit with model.time_conditioning=adaln")
    if model_cfg.ffn_hidden_size != 4 * model_cfg.hidden_size:
        raise ValueError(f"the reference DiT has ffn = 4 x hidden; this model has {model_cfg.ffn_hidden_size}")
    if getattr(model_cfg, "num_classes", 0):
        raise ValueError("exporting a label-conditioned model (model.num_classes > 0) is not supported: the "
                         "exported modeling code has no label embedding; sample it with tools/generate_prosec.py")
    return {
        "model_type": "proseco", "architectures": ["Proseco"],
        "auto_map": {"AutoConfig": "configuration_proseco.ProsecoConfig",
                     "AutoModelForMaskedLM": "modeling_proseco.Proseco"},
        "vocab_size": vocab_size, "model_length": max_length, "hidden_dim": model_cfg.hidden_size,
        "cond_dim": model_cfg.time_embedding_dim, "n_blocks": model_cfg.num_layers,
        "n_heads": model_cfg.num_attention_heads, "dropout": model_cfg.hidden_dropout,
        "time_conditioning": not model_cfg.zero_timestep, "cfg": False, "cfg_num_classes": -1,
    }


def vocab_size(config: dict) -> int:
    return config["vocab_size"]


def model_overrides(config: dict) -> list[str]:
    """Hydra overrides of `model.*` that rebuild the HF checkpoint's network in megatron."""
    if config.get("cfg"):
        raise ValueError("checkpoints with classifier-free-guidance conditioning (cfg=true) are not supported")
    return [
        "model.style=dit", "model.time_conditioning=adaln", f"model.num_layers={config['n_blocks']}",
        f"model.hidden_size={config['hidden_dim']}", f"model.num_attention_heads={config['n_heads']}",
        f"model.ffn_hidden_size={4 * config['hidden_dim']}", f"model.max_sequence_length={config['model_length']}",
        f"model.time_embedding_dim={config['cond_dim']}", f"model.zero_timestep={not config['time_conditioning']}",
        f"model.vocab_size={config['vocab_size']}",
    ]


MODEL_TYPE = "proseco"
MODELING_SUBDIR = "dit"
MODELING_FILES = ("configuration_proseco.py", "modeling_proseco.py")


def megatron_to_hf(state: dict, model_cfg, vocab_size: int) -> dict:
    heads = model_cfg.num_attention_heads
    out = {}
    for m_name, h_name in name_pairs(model_cfg.num_layers):
        tensor = state[m_name].detach().float().cpu()
        if m_name in VOCAB_ROWS:
            tensor = tensor[:vocab_size]
        if m_name.endswith("linear_qkv.weight"):
            tensor = _qkv_to_hf(tensor, heads)
        out[h_name] = tensor.contiguous()
    head_dim = state["decoder.layers.0.self_attention.linear_qkv.weight"].shape[1] // heads
    out["backbone.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return out


def hf_to_megatron(hf_state: dict, model_cfg, padded_vocab: int) -> dict:
    heads = model_cfg.num_attention_heads
    out = {}
    for m_name, h_name in name_pairs(model_cfg.num_layers):
        if h_name not in hf_state:
            raise KeyError(f"the Hugging Face checkpoint has no {h_name}: not a ProSeCo/MDLM DiT checkpoint?")
        tensor = hf_state[h_name].detach().float()
        if m_name in VOCAB_ROWS:
            padded = torch.zeros((padded_vocab,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        if m_name.endswith("linear_qkv.weight"):
            tensor = _qkv_to_megatron(tensor, heads)
        out[m_name] = tensor
    return out
