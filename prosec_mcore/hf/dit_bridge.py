"""Bridge between the megatron ProSeCo model (style=dit, time_conditioning=adaln) and the
Hugging Face layout of the ProSeCo / MDLM reference checkpoints (dit/modeling_proseco.py).

One readable table maps names; four rules handle what differs beyond names:
  * QKV rows: megatron interleaves them per head ([q_h, k_h, v_h] for each head h); the
    reference stacks [q (all heads), k, v].
  * Vocabulary: megatron pads its embedding/output rows to a multiple of 128; HF has exactly
    vocab_size rows. Padding rows are dropped on export and zero on import.
  * Time input: the reference zeroes sigma when `time_conditioning` is false, which is our
    `model.zero_timestep`.
  * Class labels (classifier-free guidance): the reference's `cfg` / `cfg_num_classes` are our
    `model.num_classes`; its `cond_map.embedding_table` (num_classes + 1 rows, the last is the
    null label) is our `time_embedder.label_embedding`. The reference joins it as
    c = SiLU(time) + SiLU(label); `label_combination` (our key, absent in the reference: silu_sum)
    also allows the project's older SiLU(time + label).
The reference's `dropout` (hidden dropout after attention and MLP) is our `model.hidden_dropout`.
Megatron names are the global names of a TP=1, PP=1 model (`decoder.layers.<i>...`); export and
import go one tensor at a time (`export_tensors`, `import_tensor`), as in llada_bridge.py.
"""
from __future__ import annotations

import torch

MODEL_TYPE = "proseco"
MODELING_SUBDIR = "dit"
MODELING_FILES = ("configuration_proseco.py", "modeling_proseco.py")
AUTO_MAP = {"AutoConfig": "configuration_proseco.ProsecoConfig",
            "AutoModelForMaskedLM": "modeling_proseco.Proseco"}
REFERENCE_KEYS = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads", "dropout",
                  "time_conditioning", "cfg", "cfg_num_classes")
LABEL_COMBINATIONS = ("silu_sum", "sum_silu")

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
LABEL_MAP = ("time_embedder.label_embedding.weight", "backbone.cond_map.embedding_table.weight")
VOCAB_ROWS = {"embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"}
INV_FREQ = "backbone.rotary_emb.inv_freq"  # a buffer of the reference (base 10000), not a weight


def name_pairs(model_cfg):
    pairs = list(GLOBAL_MAP)
    if getattr(model_cfg, "num_classes", 0):
        pairs.append(LABEL_MAP)
    for i in range(model_cfg.num_layers):
        pairs += [(m.format(i=i), h.format(i=i)) for m, h in LAYER_MAP]
    return pairs


def _qkv_view(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Megatron's per-head-interleaved QKV viewed in the reference's order: [3, heads, d, hidden]."""
    three_h, hidden = w.shape
    return w.view(heads, 3, three_h // (3 * heads), hidden).transpose(0, 1)


# ------------------------------------------------------------------------------- config
def hf_config(model_cfg, rows: int, max_length: int, ids: dict, source: dict | None = None) -> dict:
    """config.json of the exported folder: the reference's keys (so its code loads it), our
    `label_combination`, the token ids a Hugging Face consumer reads, and auto_map."""
    if model_cfg.style != "dit" or model_cfg.time_conditioning != "adaln":
        raise ValueError("the DiT bridge converts model.style=dit with model.time_conditioning=adaln")
    fixed = {"ffn_hidden_size": 4 * model_cfg.hidden_size, "rotary_base": 10000, "layernorm_epsilon": 1e-5,
             "num_query_groups": (None, model_cfg.num_attention_heads)}
    for key, want in fixed.items():
        have = getattr(model_cfg, key)
        if have not in (want if isinstance(want, tuple) else (want,)):
            raise ValueError(f"the reference DiT has model.{key}={want if not isinstance(want, tuple) else want[0]}; "
                             f"this model has {have}, which its Hugging Face class cannot express")
    classes = getattr(model_cfg, "num_classes", 0)
    out = {k: v for k, v in (source or {}).items() if k not in ("torch_dtype", "transformers_version")}
    out.update({
        "model_type": MODEL_TYPE, "architectures": ["Proseco"], "auto_map": dict(AUTO_MAP),
        "vocab_size": rows, "model_length": max_length, "hidden_dim": model_cfg.hidden_size,
        "cond_dim": model_cfg.time_embedding_dim, "n_blocks": model_cfg.num_layers,
        "n_heads": model_cfg.num_attention_heads, "dropout": model_cfg.hidden_dropout,
        "time_conditioning": not model_cfg.zero_timestep, "cfg": bool(classes),
        "cfg_num_classes": classes if classes else -1,
        "label_combination": getattr(model_cfg, "label_combination", "silu_sum"),
    })
    # token ids: the source's keys (round trip), or every id known
    out.update({k: v for k, v in ids.items() if v is not None and (not source or k in source)})
    return out


def vocab_size(config: dict) -> int:
    return config["vocab_size"]


def resolve_config(config: dict) -> dict:
    """The reference's defaults (its ProsecoConfig) for keys a config.json leaves out."""
    defaults = {"vocab_size": 50258, "model_length": 1024, "hidden_dim": 768, "cond_dim": 128, "n_blocks": 12,
                "n_heads": 12, "dropout": 0.1, "time_conditioning": False, "cfg": False, "cfg_num_classes": -1,
                "label_combination": "silu_sum"}
    return {**defaults, **config}


def check_supported(config: dict) -> None:
    if config["cfg"] and (not isinstance(config["cfg_num_classes"], int) or config["cfg_num_classes"] < 1):
        raise ValueError(f"config.json has cfg=true but cfg_num_classes={config['cfg_num_classes']!r}; "
                         f"a label-conditioned checkpoint names its number of classes")
    if config["label_combination"] not in LABEL_COMBINATIONS:
        raise ValueError(f"config.json has label_combination={config['label_combination']!r}: not supported "
                         f"(one of {', '.join(LABEL_COMBINATIONS)})")
    if config["hidden_dim"] % config["n_heads"]:
        raise ValueError(f"config.json: hidden_dim={config['hidden_dim']} is not a multiple of n_heads")


def model_overrides(config: dict) -> list[str]:
    """Hydra overrides of `model.*` that rebuild the HF checkpoint's network in megatron."""
    classes = config["cfg_num_classes"] if config["cfg"] else 0
    return [
        "model.style=dit", "model.time_conditioning=adaln", f"model.num_layers={config['n_blocks']}",
        f"model.hidden_size={config['hidden_dim']}", f"model.num_attention_heads={config['n_heads']}",
        f"model.ffn_hidden_size={4 * config['hidden_dim']}", f"model.max_sequence_length={config['model_length']}",
        f"model.time_embedding_dim={config['cond_dim']}", f"model.zero_timestep={not config['time_conditioning']}",
        f"model.hidden_dropout={config['dropout']}", f"model.num_classes={classes}",
        f"model.label_combination={config['label_combination']}", f"model.vocab_size={config['vocab_size']}",
    ]


# ------------------------------------------------------------------------------- weights
def hf_names(model_cfg) -> list[str]:
    return [h for _, h in name_pairs(model_cfg)] + [INV_FREQ]


def export_tensors(params: dict, model_cfg, vocab: int):
    """Yield (HF name, tensor) one at a time from the megatron parameters (TP=1 names)."""
    heads = model_cfg.num_attention_heads
    for m_name, h_name in name_pairs(model_cfg):
        tensor = params[m_name].detach()
        if m_name in VOCAB_ROWS:
            tensor = tensor[:vocab]
        if m_name.endswith("linear_qkv.weight"):
            tensor = _qkv_view(tensor, heads).reshape(tensor.shape)
        yield h_name, tensor
    head_dim = model_cfg.hidden_size // heads
    yield INV_FREQ, 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))


def import_tensor(hf_name: str, tensor: torch.Tensor, params: dict, model_cfg) -> None:
    """Copy one HF tensor into its megatron parameter (padded vocabulary rows zeroed)."""
    if hf_name == INV_FREQ:
        return  # recomputed from the head size
    m_name = _megatron_name(hf_name)
    if m_name is None or m_name not in params:
        what = ("a label embedding, but config.json has cfg=false" if hf_name == LABEL_MAP[1]
                else "not a ProSeCo/MDLM DiT tensor")
        raise KeyError(f"unexpected tensor {hf_name} in the Hugging Face checkpoint: {what}")
    target = params[m_name]
    with torch.no_grad():
        if m_name in VOCAB_ROWS:
            target[: tensor.shape[0]].copy_(tensor)
            target[tensor.shape[0]:].zero_()
        elif m_name.endswith("linear_qkv.weight"):
            _qkv_view(target, model_cfg.num_attention_heads).copy_(tensor.reshape(3, model_cfg.num_attention_heads,
                                                                                  -1, tensor.shape[-1]))
        else:
            target.copy_(tensor.reshape(target.shape))


def _megatron_name(hf_name: str) -> str | None:
    if hf_name == LABEL_MAP[1]:
        return LABEL_MAP[0]
    for m, h in GLOBAL_MAP:
        if h == hf_name:
            return m
    if hf_name.startswith("backbone.blocks."):
        i = hf_name.split(".")[2]
        for m, h in LAYER_MAP:
            if h.format(i=i) == hf_name:
                return m.format(i=i)
    return None


def megatron_to_hf(state: dict, model_cfg, vocab: int) -> dict:
    """The whole HF state at once (tests and small models)."""
    return {name: t.clone().contiguous() for name, t in export_tensors(state, model_cfg, vocab)}


def hf_to_megatron(hf_state: dict, params: dict, model_cfg) -> None:
    """Copy a whole HF state into megatron parameters `params` (e.g. model.state_dict(keep_vars=True))."""
    missing = [h for _, h in name_pairs(model_cfg) if h not in hf_state]
    if missing:
        raise KeyError(f"the Hugging Face checkpoint has no {missing[0]}: not a ProSeCo/MDLM DiT checkpoint?")
    for name, tensor in hf_state.items():
        import_tensor(name, tensor, params, model_cfg)
