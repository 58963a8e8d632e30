"""Convert between distributed checkpoints and Hugging Face folders (DiT and LLaDA families).

export: a dist checkpoint saved at any TP/PP/DP layout is loaded into one TP=1 PP=1 model
        (dist_checkpointing reshards), mapped by dit_bridge.py, and written as a folder that
        `AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)` loads:
        config.json, model.safetensors, configuration_/modeling_proseco.py, tokenizer files.
import: a Hugging Face folder becomes a model-only dist checkpoint (iteration 0) that a
        training run starts from with `checkpoint.pretrained=<dir>` (fresh optimizer, iteration 0;
        a requeued run then resumes from its own checkpoints).
        When the folder holds tokenizer.json, the printed overrides point training at it and name
        its special tokens by the ids of config.json (mask_token_id, eos_token_id, pad_token_id):
        LLaDA-8B's mask is "<|mdm_mask|>" (126336), in the middle of its vocabulary, and its 126464
        rows exceed the tokenizer's ids; the checkpoint records the mask id so that a run with
        another tokenizer is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
from megatron.core import dist_checkpointing

from ..config import Config
from ..config_loader import config_to_dict, load_config
from ..model.builder import build_model, padded_vocab_size
from ..training.checkpoint import checkpoint_name, is_complete, layout, load_model_for_inference, mark_complete
from ..training.save_processes import saving
from . import dit_bridge, llada_bridge

HF_DIR = os.path.dirname(os.path.abspath(__file__))
BRIDGES = {"dit": dit_bridge, "llama": llada_bridge}  # model.style -> bridge


def bridge_for_hf(hf_config: dict):
    for bridge in BRIDGES.values():
        if hf_config.get("model_type") == bridge.MODEL_TYPE:
            return bridge
    raise ValueError(f"unsupported Hugging Face model_type {hf_config.get('model_type')!r}: "
                     f"expected one of {', '.join(b.MODEL_TYPE for b in BRIDGES.values())}")


def _single_process_world():
    from ..runtime import initialize_distributed

    if not torch.distributed.is_initialized():
        initialize_distributed(tp=1, pp=1)


def _state(model) -> dict:
    return {name: p for name, p in model.state_dict().items() if not name.endswith("_extra_state")}


def export_to_hf(checkpoint: str, out_dir: str) -> dict:
    model, cfg, common, path = load_model_for_inference(checkpoint, tp=1)
    vocab = common["vocab_size"]
    bridge = BRIDGES[cfg.model.style]
    hf_config = bridge.hf_config(cfg.model, vocab, cfg.model.max_sequence_length, mask_token_id=common.get("mask_id"))
    tensors = bridge.megatron_to_hf(_state(model), cfg.model, vocab)

    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    for name in bridge.MODELING_FILES:
        shutil.copy(os.path.join(HF_DIR, bridge.MODELING_SUBDIR, name), os.path.join(out_dir, name))
    tokenizer = _save_tokenizer(cfg, out_dir)
    return {"checkpoint": path, "iteration": common["iteration"], "out_dir": out_dir,
            "tensors": len(tensors), "tokenizer": tokenizer}


def _save_tokenizer(cfg: Config, out_dir: str) -> str | None:
    from ..training.trainer import build_run_tokenizer, resolve_data_paths

    _, tok_path = resolve_data_paths(cfg)
    try:
        build_run_tokenizer(cfg, tok_path).save(out_dir)
        return tok_path
    except (FileNotFoundError, ValueError):
        return None  # the caller reports that the tokenizer was not found


def import_from_hf(hf_dir: str, save_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    bridge = bridge_for_hf(hf_config)
    overrides = bridge.model_overrides(hf_config)
    cfg = load_config(overrides)
    tokenizer_overrides, tokenizer_record = _tokenizer_overrides(hf_dir, hf_config)
    vocab = bridge.vocab_size(hf_config)
    hf_state = _read_hf_weights(hf_dir)
    _single_process_world()
    model = build_model(cfg, vocab)
    state = bridge.hf_to_megatron(hf_state, cfg.model, padded_vocab_size(vocab))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")

    path = os.path.join(save_dir, checkpoint_name(0))
    if is_complete(path):  # never overwrite a checkpoint that counts
        raise ValueError(f"{path} already holds a complete checkpoint; import into another --out directory")
    if os.path.exists(path):  # an interrupted earlier import
        shutil.rmtree(path)
    os.makedirs(path)
    with saving():  # the writer processes die with this process
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0,
                                 "config": config_to_dict(cfg), "vocab_size": vocab, "layout": layout(),
                                 "model_only": True, **tokenizer_record}, path)
    mark_complete(save_dir, 0, {"layout": layout(), "imported_from": os.path.abspath(hf_dir)})
    return {"checkpoint": path, "overrides": overrides + tokenizer_overrides}


def _hydra_value(value: str) -> str:
    """A Hydra override value: quoted unless it is a plain word or path (e.g. '<|mdm_mask|>')."""
    if re.fullmatch(r"[A-Za-z0-9_./-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tokenizer_overrides(hf_dir: str, hf_config: dict) -> tuple[list, dict]:
    """Overrides that train with the folder's tokenizer.json, naming its special tokens by the ids
    config.json gives; and what the checkpoint records (mask id, tokenizer vocabulary)."""
    record = {"mask_id": hf_config["mask_token_id"]} if hf_config.get("mask_token_id") is not None else {}
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return [], record
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(path)
    overrides = ["data.tokenizer.kind=hf_json", f"data.tokenizer.path={_hydra_value(os.path.abspath(hf_dir))}"]
    for key, option in (("mask_token_id", "mask_token"), ("eos_token_id", "eod_token"), ("pad_token_id", "pad_token")):
        token = backend.id_to_token(hf_config[key]) if hf_config.get(key) is not None else None
        if token is not None:
            overrides.append(f"data.tokenizer.{option}={_hydra_value(token)}")
    ids = backend.get_vocab(with_added_tokens=True).values()
    record["tokenizer_vocab_size"] = max(ids) + 1
    return overrides, record


def _read_hf_weights(hf_dir: str) -> dict:
    """model.safetensors, the shards listed by model.safetensors.index.json (LLaDA-8B ships six),
    or pytorch_model.bin."""
    from safetensors.torch import load_file

    safetensors_path = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(safetensors_path):
        return load_file(safetensors_path)
    index_path = safetensors_path + ".index.json"
    if os.path.exists(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(hf_dir, shard)))
        return state
    bin_path = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.exists(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin")
