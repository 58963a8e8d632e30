"""Bridge between the megatron ProSeCo model (style=llama, time_conditioning=none) and the
Hugging Face layout of GSAI-ML/LLaDA-8B-Base (llada/modeling_llada.py), so ProSeCo training can
start from LLaDA weights (the paper's 8B experiment) and export back.

Three parts:
  * The config (`resolve_config`, `check_supported`, `model_overrides`, `hf_config`). LLaDA's own
    configuration class starts from defaults (REAL_DEFAULTS, the values of its `ModelConfig`) and
    derives three fields: kv heads from `n_kv_heads` / `multi_query_attention`, the MLP width
    from `mlp_hidden_size` or `mlp_ratio * d_model`, the embedding rows from `embedding_size` or
    `vocab_size`. Import does the same, then refuses by name every setting that changes the
    network and that the megatron model does not implement (q/k norms, qkv biases, logit
    scaling, Gemma norms, ...): importing them silently would give other logits.
  * Names (LAYER_MAP / GLOBAL_MAP) and three layout rules:
      - QKV: megatron fuses q, k, v into one matrix, grouped per key/value head: for each of the
        n_kv groups, the group's (n_heads / n_kv) query heads, then its key head, then its value
        head. LLaDA keeps q_proj, k_proj, v_proj separate.
      - SwiGLU: megatron's linear_fc1 stacks [gate; up] (it applies SiLU to the first half);
        LLaDA has ff_proj (gate) and up_proj.
      - Vocabulary rows are padded to a multiple of 128 in megatron (LLaDA's 126464 already is).
  * Streaming (`export_tensors`, `import_tensor`): one Hugging Face tensor at a time, read from or
    written into (a slice of) the megatron parameter it belongs to, so a conversion never holds a
    second copy of the model (convert.py reads and writes one safetensors shard at a time).

LLaDA's mask token is id 126336, not the last id, and its 126464 rows exceed its tokenizer's ids:
config.json's mask_token_id is kept on import (the checkpoint records it, and training names the
token with data.tokenizer.mask_token) and written back on export, with eos/pad (126081) and bos.
"""
from __future__ import annotations

import dataclasses

import torch

from .llada.configuration_llada import DEFAULTS

MODEL_TYPE = "llada"
MODELING_SUBDIR = "llada"
MODELING_FILES = ("configuration_llada.py", "modeling_llada.py")
AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForMaskedLM": "modeling_llada.LLaDAModelLM"}  # the hub's three, plus MaskedLM

# The defaults of LLaDA's own ModelConfig (configuration_llada.py on the hub): a key that a
# config.json leaves out takes this value in LLaDA's code, so it does here too.
REAL_DEFAULTS = DEFAULTS
# GSAI-ML/LLaDA-8B-Base's config.json, every key as the hub ships it (tests scale the sizes down;
# docs/hf.md does the 8B memory arithmetic with it).
LLADA_8B_BASE_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}
LLADA_8B_BASE_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 126080, "eos_token_id": 126081,
                                   "pad_token_id": 126081, "transformers_version": "4.46.3"}
# The settings the megatron llama block implements, each with the one value it implements and
# what the value means; any other value is refused with this text.
REQUIRED = {
    "block_type": ("llama", "the Llama-style block (separate q/k/v and gate/up projections)"),
    "activation_type": ("silu", "SwiGLU as LLaDA's llama block computes it"),
    "layer_norm_type": ("rms", "RMSNorm"),
    "layer_norm_with_affine": (True, "norms with a weight"),
    "bias_for_layer_norm": (False, "norms without bias"),
    "include_bias": (False, "linear layers without bias"),
    "include_qkv_bias": (False, "q/k/v projections without bias"),
    "attention_layer_norm": (False, "no q/k norms"),
    "weight_tying": (False, "separate input and output embeddings"),
    "rope": (True, "rotary position embeddings"),
    "alibi": (False, "no ALiBi"),
    "scale_logits": (False, "unscaled logits"),
    "input_emb_norm": (False, "embeddings not scaled by sqrt(d_model)"),
    "rope_full_precision": (True, "rotary embeddings applied in float32"),
}

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


# ------------------------------------------------------------------------------- config
def effective_kv_heads(config: dict) -> int:
    """LLaDA's rule (ModelConfig.effective_n_kv_heads): n_kv_heads, else 1 with
    multi_query_attention, else n_heads; both given must agree."""
    kv, mqa, heads = config.get("n_kv_heads"), config.get("multi_query_attention"), config["n_heads"]
    if kv is None:
        return 1 if mqa is True else heads
    if mqa is not None and kv != (1 if mqa else heads):
        raise ValueError(f"config.json sets multi_query_attention={mqa} and n_kv_heads={kv}, which disagree; "
                         f"drop one of them")
    return kv


def resolve_config(config: dict) -> dict:
    """config.json as LLaDA's code reads it: missing keys take LLaDA's defaults, and the derived
    fields (kv heads, MLP width, embedding rows) are filled in."""
    out = {**REAL_DEFAULTS, **config}
    for key in ("d_model", "n_heads", "n_layers"):
        if not isinstance(out[key], int) or isinstance(out[key], bool):
            raise ValueError(f"config.json: {key} must be an integer, not {out[key]!r}")
    out["n_kv_heads"] = effective_kv_heads(out)
    if out["mlp_hidden_size"] is None:  # LLaDA: mlp_ratio * d_model when mlp_hidden_size is null
        out["mlp_hidden_size"] = int(out["mlp_ratio"] * out["d_model"])
    if out["embedding_size"] is None:
        out["embedding_size"] = out["vocab_size"]
    if out["bias_for_layer_norm"] is None:  # LLaDA: inherits include_bias
        out["bias_for_layer_norm"] = out["include_bias"]
    return out


def check_supported(config: dict) -> None:
    """Refuse, naming the key, every setting of a resolved config that the import would drop."""
    for key, (value, meaning) in REQUIRED.items():
        if config[key] != value:
            raise ValueError(f"config.json has {key}={config[key]!r}: not supported (the megatron model implements "
                             f"{key}={value!r}, {meaning}); convert a checkpoint with {key}={value!r}")
    if config["embedding_dropout"] != config["residual_dropout"]:
        raise ValueError(f"config.json has embedding_dropout={config['embedding_dropout']} and residual_dropout="
                         f"{config['residual_dropout']}: megatron applies one hidden dropout to both; set them equal")


def _rotary_base(theta) -> str:
    """rope_theta as the model.rotary_base override: kept exactly (500000.0 -> 500000); a
    non-integer theta needs a float-typed model.rotary_base."""
    from ..config import ModelConfig

    theta = float(theta)
    if theta.is_integer():
        return str(int(theta))
    kind = {f.name: f.type for f in dataclasses.fields(ModelConfig)}["rotary_base"]
    if "float" not in str(kind):
        raise ValueError(f"config.json has rope_theta={theta}: not supported (model.rotary_base holds integers "
                         f"here); a checkpoint with an integer rope_theta converts")
    return repr(theta)


def model_overrides(config: dict) -> list[str]:
    """Hydra overrides of `model.*` that rebuild the checkpoint's network in megatron (after
    `resolve_config` and `check_supported`)."""
    return [
        "model.style=llama", "model.time_conditioning=none", f"model.num_layers={config['n_layers']}",
        f"model.hidden_size={config['d_model']}", f"model.num_attention_heads={config['n_heads']}",
        f"model.num_query_groups={config['n_kv_heads']}", f"model.ffn_hidden_size={config['mlp_hidden_size']}",
        f"model.max_sequence_length={config['max_sequence_length']}",
        f"model.rotary_base={_rotary_base(config['rope_theta'])}", f"model.layernorm_epsilon={config['rms_norm_eps']}",
        f"model.hidden_dropout={config['residual_dropout']}", f"model.attention_dropout={config['attention_dropout']}",
        f"model.vocab_size={vocab_size(config)}",
    ]


def vocab_size(config: dict) -> int:
    """Embedding rows: embedding_size, or vocab_size when it is null (after resolve_config)."""
    return config.get("embedding_size") or config["vocab_size"]


def hf_config(model_cfg, rows: int, max_length: int, ids: dict, source: dict | None = None) -> dict:
    """config.json of the exported folder: every key LLaDA-8B-Base's config.json has, as LLaDA
    writes them. `rows`: embedding rows; `ids`: bos/eos/pad/mask token ids (None: left out);
    `source`: the config.json the checkpoint was imported from, whose other values are kept."""
    if model_cfg.style != "llama" or model_cfg.time_conditioning != "none":
        raise ValueError("the LLaDA bridge converts model.style=llama with model.time_conditioning=none")
    heads, kv, _ = _groups(model_cfg)
    ffn, hidden = model_cfg.ffn_hidden_size, model_cfg.hidden_size
    source = dict(source or {})
    # vocab_size may name fewer ids than there are rows (an OLMo-style config): kept from the source
    nominal = source.get("vocab_size") if source.get("vocab_size") and source["vocab_size"] <= rows else rows
    out = {**REAL_DEFAULTS, **source}
    out.update({
        "model_type": MODEL_TYPE, "architectures": ["LLaDAModelLM"], "auto_map": dict(AUTO_MAP),
        "d_model": hidden, "n_heads": heads, "n_kv_heads": kv, "n_layers": model_cfg.num_layers,
        "mlp_hidden_size": ffn, "vocab_size": nominal, "embedding_size": rows,
        "rope_theta": float(model_cfg.rotary_base), "rms_norm_eps": model_cfg.layernorm_epsilon,
        "max_sequence_length": max_length, "residual_dropout": model_cfg.hidden_dropout,
        "embedding_dropout": model_cfg.hidden_dropout, "attention_dropout": model_cfg.attention_dropout,
        "multi_query_attention": None, "use_cache": False,
    })
    out.update({key: value for key, (value, _) in REQUIRED.items()})
    # mlp_ratio is unused when mlp_hidden_size is set; LLaDA-8B writes its default 4 (not 12288 / 4096)
    out["mlp_ratio"] = source.get("mlp_ratio", REAL_DEFAULTS["mlp_ratio"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        # the source's keys, with the run's values (LLaDA-8B: bos only in generation_config.json);
        # without a source, every id known; never LLaDA's default 50256, an ordinary token
        if ids.get(key) is not None and (not source or key in source):
            out[key] = ids[key]
        elif key not in source:
            out.pop(key, None)
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------- weights
def _groups(model_cfg):
    heads = model_cfg.num_attention_heads
    kv = model_cfg.num_query_groups or heads
    return heads, kv, model_cfg.hidden_size // heads


def _qkv_parts(qkv: torch.Tensor, model_cfg) -> dict:
    """Views of megatron's fused QKV (rows grouped per kv head) as q, k, v: [groups, n, d, hidden]."""
    heads, kv, d = _groups(model_cfg)
    grouped = qkv.view(kv, heads // kv + 2, d, -1)
    return {"q_proj": grouped[:, : heads // kv], "k_proj": grouped[:, -2:-1], "v_proj": grouped[:, -1:]}


def _fc1_parts(fc1: torch.Tensor) -> dict:
    gate, up = fc1.chunk(2, dim=0)
    return {"ff_proj": gate, "up_proj": up}


def hf_names(model_cfg) -> list[str]:
    """Every tensor name of the Hugging Face checkpoint, in the order export writes them."""
    names = [h for _, h in GLOBAL_MAP[:1]]
    for i in range(model_cfg.num_layers):
        block = BLOCK.format(i=i)
        names += [h.format(i=i) for _, h in LAYER_MAP]
        names += [block + p + ".weight" for p in ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj")]
    return names + [h for _, h in GLOBAL_MAP[1:]]


def _target(hf_name: str, params: dict, model_cfg):
    """The megatron tensor (or view into one) that holds HF tensor `hf_name`, and whether its rows
    are the padded vocabulary."""
    for m_name, h_name in GLOBAL_MAP:
        if hf_name == h_name:
            return params[m_name], m_name in VOCAB_ROWS
    if not hf_name.startswith("model.transformer.blocks."):
        return None, False
    i = int(hf_name.split(".")[3])
    for m_name, h_name in LAYER_MAP:
        if hf_name == h_name.format(i=i):
            return params[m_name.format(i=i)], False
    part = hf_name.split(".")[4]
    if part in ("q_proj", "k_proj", "v_proj"):
        return _qkv_parts(params[QKV.format(i=i)], model_cfg)[part], False
    if part in ("ff_proj", "up_proj"):
        return _fc1_parts(params[FC1.format(i=i)])[part], False
    return None, False


def export_tensors(params: dict, model_cfg, vocab: int):
    """Yield (HF name, tensor) one at a time from the megatron parameters (TP=1 names); each tensor
    is a view or a fresh copy of one parameter's part, never the whole model."""
    hidden = model_cfg.hidden_size
    for name in hf_names(model_cfg):
        tensor, vocab_rows = _target(name, params, model_cfg)
        tensor = tensor.detach()
        if vocab_rows:
            tensor = tensor[:vocab]
        yield name, tensor.reshape(-1, hidden) if tensor.dim() == 4 else tensor


def import_tensor(hf_name: str, tensor: torch.Tensor, params: dict, model_cfg) -> None:
    """Copy one HF tensor into its megatron parameter (or the slice of it that holds it); padded
    vocabulary rows are zeroed. Raises KeyError for a name that is not LLaDA's."""
    target, vocab_rows = _target(hf_name, params, model_cfg)
    if target is None:
        raise KeyError(f"unexpected tensor {hf_name} in the Hugging Face checkpoint: not a LLaDA (llama block) "
                       f"checkpoint?")
    with torch.no_grad():
        if vocab_rows:
            target[: tensor.shape[0]].copy_(tensor)
            target[tensor.shape[0]:].zero_()
        else:
            target.copy_(tensor.reshape(target.shape))


def megatron_to_hf(state: dict, model_cfg, vocab: int) -> dict:
    """The whole HF state at once (tests and small models): {name: contiguous tensor}."""
    return {name: t.clone().contiguous() for name, t in export_tensors(state, model_cfg, vocab)}


def hf_to_megatron(hf_state: dict, params: dict, model_cfg) -> None:
    """Copy a whole HF state into megatron parameters `params` (e.g. model.state_dict(keep_vars=True))."""
    missing = [n for n in hf_names(model_cfg) if n not in hf_state]
    if missing:
        raise KeyError(f"the Hugging Face checkpoint has no {missing[0]}: not a LLaDA checkpoint?")
    for name, tensor in hf_state.items():
        import_tensor(name, tensor, params, model_cfg)
