"""Bridge between the megatron ProSeCo model (style=llama, time_conditioning=none) and the
Hugging Face layout of GSAI-ML/LLaDA-8B-Base (llada/modeling_llada.py), so ProSeCo training can
start from LLaDA weights (the paper's 8B experiment) and export back.

Beyond names (the table below):
  * QKV: megatron fuses q, k, v into one matrix, grouped per key/value head: for each of the
    n_kv groups, the group's (n_heads / n_kv) query heads, then its key head, then its value
    head. LLaDA keeps q_proj, k_proj, v_proj separate.
  * SwiGLU: megatron's linear_fc1 stacks [gate; up] (it applies SiLU to the first half);
    LLaDA has ff_proj (gate) and up_proj.
  * Vocabulary rows are padded to a multiple of 128 in megatron (LLaDA's 126464 already is).
  * LLaDA's mask token is id 126336, not the last id, and its 126464 rows exceed its tokenizer's
    ids: config.json's mask_token_id is kept on import (the checkpoint records it, and training
    names the token with data.tokenizer.mask_token) and written back on export.
"""
from __future__ import annotations

import torch

MODEL_TYPE = "llada"
MODELING_SUBDIR = "llada"
MODELING_FILES = ("configuration_llada.py", "modeling_llada.py")

LAYER_MAP = [
    ("decoder.layers.{i}.input_layernorm.weight", "model.transformer.blocks.{i}.attn_norm.weight"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", "model.transformer.blocks.{i}.attn_out.weight"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", "model.transformer.blocks.{i}.ff_norm.weight"),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", "model.transformer.blocks.{i}.ff_out.weight"),
]
GLOBAL_MAP = [
    ("embedding.word_embeddings.weight", "model.transformer.wte.weight"),
    ("decoder.final_layernorm.weight", "model.transformer.ln_f.weight"),
    ("output_layer.weight", "model.transformer.ff_out.weight"),
]
VOCAB_ROWS = {"embedding.word_embeddings.weight", "output_layer.weight"}
QKV = "decoder.layers.{i}.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.{i}.mlp.linear_fc1.weight"
BLOCK = "model.transformer.blocks.{i}."


def _groups(model_cfg):
    heads = model_cfg.num_attention_heads
    kv = model_cfg.num_query_groups or heads
    return heads, kv, model_cfg.hidden_size // heads


def _split_qkv(w, model_cfg):
    heads, kv, d = _groups(model_cfg)
    grouped = w.view(kv, heads // kv + 2, d, -1)
    q = grouped[:, : heads // kv].reshape(heads * d, -1)
    return q, grouped[:, -2].reshape(kv * d, -1), grouped[:, -1].reshape(kv * d, -1)


def _fuse_qkv(q, k, v, model_cfg):
    heads, kv, d = _groups(model_cfg)
    hidden = q.shape[1]
    return torch.cat([q.view(kv, heads // kv, d, hidden), k.view(kv, 1, d, hidden), v.view(kv, 1, d, hidden)],
                     dim=1).reshape(-1, hidden)


def hf_config(model_cfg, vocab_size: int, max_length: int, mask_token_id: int | None = None) -> dict:
    if model_cfg.style != "llama" or model_cfg.time_conditioning != "none":
        raise ValueError("the LLaDA bridge converts model.style=llama with model.time_conditioning=none")
    heads, kv, _ = _groups(model_cfg)
    return {
        "model_type": MODEL_TYPE, "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForMaskedLM": "modeling_llada.LLaDAModelLM"},
        "d_model": model_cfg.hidden_size, "n_heads": heads, "n_kv_heads": kv, "n_layers": model_cfg.num_layers,
        "mlp_hidden_size": model_cfg.ffn_hidden_size, "vocab_size": vocab_size, "embedding_size": vocab_size,
        "rope_theta": float(model_cfg.rotary_base), "rms_norm_eps": model_cfg.layernorm_epsilon,
        "max_sequence_length": max_length, "block_type": "llama",
        "mask_token_id": vocab_size - 1 if mask_token_id is None else mask_token_id,
        "activation_type": "silu", "layer_norm_type": "rms", "weight_tying": False, "include_bias": False,
        "include_qkv_bias": False, "rope": True, "alibi": False, "scale_logits": False, "input_emb_norm": False,
        "attention_layer_norm": False, "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
        "flash_attention": False, "rope_full_precision": True, "mlp_ratio": model_cfg.ffn_hidden_size // model_cfg.hidden_size,
    }


def vocab_size(config: dict) -> int:
    return config.get("embedding_size") or config["vocab_size"]


def model_overrides(config: dict) -> list[str]:
    if config.get("block_type", "llama") != "llama" or config.get("weight_tying") or config.get("include_bias"):
        raise ValueError("only Llama-style LLaDA checkpoints (block_type=llama, no weight tying, no biases) are supported")
    return [
        "model.style=llama", "model.time_conditioning=none", f"model.num_layers={config['n_layers']}",
        f"model.hidden_size={config['d_model']}", f"model.num_attention_heads={config['n_heads']}",
        f"model.num_query_groups={config.get('n_kv_heads') or config['n_heads']}",
        f"model.ffn_hidden_size={config['mlp_hidden_size']}", f"model.max_sequence_length={config['max_sequence_length']}",
        f"model.rotary_base={int(config['rope_theta'])}", f"model.layernorm_epsilon={config['rms_norm_eps']}",
        f"model.vocab_size={vocab_size(config)}",
    ]


def megatron_to_hf(state: dict, model_cfg, vocab_size: int) -> dict:
    out = {}
    for m_name, h_name in GLOBAL_MAP:
        tensor = state[m_name].detach().float().cpu()
        out[h_name] = (tensor[:vocab_size] if m_name in VOCAB_ROWS else tensor).contiguous()
    for i in range(model_cfg.num_layers):
        for m_name, h_name in LAYER_MAP:
            out[h_name.format(i=i)] = state[m_name.format(i=i)].detach().float().cpu().contiguous()
        q, k, v = _split_qkv(state[QKV.format(i=i)].detach().float().cpu(), model_cfg)
        gate, up = state[FC1.format(i=i)].detach().float().cpu().chunk(2, dim=0)
        block = BLOCK.format(i=i)
        out.update({block + "q_proj.weight": q.contiguous(), block + "k_proj.weight": k.contiguous(),
                    block + "v_proj.weight": v.contiguous(), block + "ff_proj.weight": gate.contiguous(),
                    block + "up_proj.weight": up.contiguous()})
    return out


def hf_to_megatron(hf_state: dict, model_cfg, padded_vocab: int) -> dict:
    def get(name):
        if name not in hf_state:
            raise KeyError(f"the Hugging Face checkpoint has no {name}: not a LLaDA checkpoint?")
        return hf_state[name].detach().float()

    out = {}
    for m_name, h_name in GLOBAL_MAP:
        tensor = get(h_name)
        if m_name in VOCAB_ROWS:
            padded = torch.zeros((padded_vocab,) + tuple(tensor.shape[1:]))
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        out[m_name] = tensor
    for i in range(model_cfg.num_layers):
        block = BLOCK.format(i=i)
        for m_name, h_name in LAYER_MAP:
            out[m_name.format(i=i)] = get(h_name.format(i=i))
        out[QKV.format(i=i)] = _fuse_qkv(get(block + "q_proj.weight"), get(block + "k_proj.weight"),
                                         get(block + "v_proj.weight"), model_cfg)
        out[FC1.format(i=i)] = torch.cat([get(block + "ff_proj.weight"), get(block + "up_proj.weight")], dim=0)
    return out
