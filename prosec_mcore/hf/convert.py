"""Convert between distributed checkpoints and Hugging Face folders (DiT and LLaDA families).

export: a dist checkpoint saved at any TP/PP/DP layout is loaded into one TP=1 PP=1 model
        (dist_checkpointing reshards; its EMA weights by default), mapped by the family's bridge
        one tensor at a time, and written as a folder that
        `AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)` loads (LLaDA also
        with AutoModel / AutoModelForCausalLM, as on the hub): config.json, generation_config.json,
        safetensors (sharded with an index past `max_shard_size`), the modeling files, the
        tokenizer files. dtype: the one asked for; by default the source's for a checkpoint
        imported from Hugging Face, else the one the checkpoint stores its weights in (bf16 for
        bf16 runs).
import: a Hugging Face folder becomes a model-only dist checkpoint (iteration 0) that a
        training run starts from with `checkpoint.pretrained=<dir>` (fresh optimizer, iteration 0;
        a requeued run then resumes from its own checkpoints). The folder's config.json is read
        as its family's code reads it (defaults, derived fields), and every setting the megatron
        model does not implement is refused by name. The weights stream in one tensor at a time
        into the model, so the host holds the model plus one tensor, never a second copy.
        The checkpoint records the source (`hf_source`: config.json, generation_config.json,
        dtype) and its config the folder's tokenizer, so that exporting it again reproduces
        the folder: ids, dtype, tokenizer files.

tokens.py handles the tokenizer and the special ids, shards.py the safetensors files.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from megatron.core import dist_checkpointing

from ..config_loader import config_to_dict, load_config
from ..model.builder import build_model
from ..training.checkpoint import checkpoint_name, is_complete, layout, load_model_for_inference, mark_complete
from ..training.save_processes import saving
from . import dit_bridge, llada_bridge, shards, tokens

HF_DIR = os.path.dirname(os.path.abspath(__file__))
BRIDGES = {"dit": dit_bridge, "llama": llada_bridge}  # model.style -> bridge
OPTIONAL = {dit_bridge.INV_FREQ}  # tensors a folder may lack (recomputed)


def bridge_for_hf(hf_config: dict):
    for bridge in BRIDGES.values():
        if hf_config.get("model_type") == bridge.MODEL_TYPE:
            return bridge
    raise ValueError(f"config.json has model_type={hf_config.get('model_type')!r}: not supported (expected one "
                     f"of {', '.join(b.MODEL_TYPE for b in BRIDGES.values())})")


def _single_process_world():
    from ..runtime import initialize_distributed

    if not torch.distributed.is_initialized():
        initialize_distributed(tp=1, pp=1)


def _params(model) -> dict:
    """The model's parameters and buffers by TP=1 name, as the tensors themselves (written in place)."""
    return {n: p for n, p in model.state_dict(keep_vars=True).items() if not n.endswith("_extra_state")}


def _stored_dtype(path: str) -> torch.dtype:
    """The dtype a dist checkpoint stores its model weights in (that of the word embeddings)."""
    metadata = dist_checkpointing.load_tensors_metadata(path)
    names = sorted(metadata, key=lambda k: not k.endswith("word_embeddings.weight"))
    for name in names:
        dtype = getattr(metadata[name], "dtype", None)
        if dtype in shards.TORCH_NAMES:
            return dtype
    return torch.float32


def export_to_hf(checkpoint: str, out_dir: str, dtype: str | None = None, weights: str = "ema",
                 max_shard_size: str | int = shards.DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Write `checkpoint` as a Hugging Face folder `out_dir` (module docstring). `dtype`: bf16,
    fp16, fp32 or None (the default rule); `weights`: ema or raw; `max_shard_size`: e.g. 5GB."""
    target = shards.parse_dtype(dtype) if dtype is not None else None
    max_bytes = shards.parse_size(max_shard_size)
    model, cfg, common, path = load_model_for_inference(checkpoint, tp=1, weights=weights)
    source = common.get("hf_source") or {}
    if target is None:
        target = shards.parse_dtype(source["dtype"]) if source.get("dtype") else _stored_dtype(path)
    rows = common["vocab_size"]
    bridge = BRIDGES[cfg.model.style]
    os.makedirs(out_dir, exist_ok=True)

    tok_path, tokenizer = tokens.export_tokenizer(cfg, out_dir, imported=bool(source))
    ids = tokens.token_ids(tokenizer, tok_path, common.get("mask_id"), source)
    import transformers

    hf_config = bridge.hf_config(cfg.model, rows, cfg.model.max_sequence_length, ids, source.get("config"))
    hf_config["torch_dtype"] = shards.TORCH_NAMES[target]
    hf_config.setdefault("transformers_version", transformers.__version__)

    writer = shards.ShardWriter(out_dir, max_bytes)
    count = 0
    with torch.no_grad():
        for name, tensor in bridge.export_tensors(_params(model), cfg.model, rows):
            writer.add(name, tensor.to(target))  # a copy only where the dtype or layout changes
            count += 1
    files = writer.close()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(tokens.generation_config(ids, source.get("generation_config"), transformers.__version__), f,
                  indent=2)
    for name in bridge.MODELING_FILES:
        shutil.copy(os.path.join(HF_DIR, bridge.MODELING_SUBDIR, name), os.path.join(out_dir, name))
    return {"checkpoint": path, "iteration": common["iteration"], "out_dir": out_dir, "tensors": count,
            "files": files, "dtype": shards.TORCH_NAMES[target], "tokenizer": tok_path if tokenizer else None,
            "ids": ids}


def import_from_hf(hf_dir: str, save_dir: str) -> dict:
    """Write the Hugging Face folder `hf_dir` as a model-only checkpoint in `save_dir` (module
    docstring). Returns the checkpoint path and the overrides that train from it."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        raw = json.load(f)
    bridge = bridge_for_hf(raw)
    resolved = bridge.resolve_config(raw)
    bridge.check_supported(resolved)
    overrides = bridge.model_overrides(resolved)
    tokenizer_overrides, tokenizer_record = tokens.import_overrides(hf_dir, raw)
    cfg = load_config(overrides + tokenizer_overrides)  # the checkpoint records the folder's tokenizer
    stored = shards.stored_dtype(hf_dir)
    source = {"config": raw, "generation_config": tokens.read_json_if_present(os.path.join(hf_dir,
                                                                                         "generation_config.json")),
              "dtype": shards.TORCH_NAMES.get(stored) or raw.get("torch_dtype") or "float32"}

    path = os.path.join(save_dir, checkpoint_name(0))
    if is_complete(path):  # never overwrite a checkpoint that counts
        raise ValueError(f"{path} already holds a complete checkpoint; import into another --out directory")
    _single_process_world()
    model = build_model(cfg, bridge.vocab_size(resolved), random_init=False)  # every weight comes from the folder
    params = _params(model)
    seen = set()
    for name, tensor in shards.iter_tensors(hf_dir):  # one tensor in memory at a time
        bridge.import_tensor(name, tensor, params, cfg.model)
        seen.add(name)
    missing = [n for n in bridge.hf_names(cfg.model) if n not in seen and n not in OPTIONAL]
    if missing:
        raise ValueError(f"the weights lack {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                              else "") + f" that config.json's model needs")

    unset = [name for name, p in params.items() if not bool(torch.isfinite(p).all())]
    if unset:  # built uninitialised: a parameter no HF tensor filled would be saved as NaN
        raise ValueError(f"the import filled no value for {unset[0]}" + (f" (and {len(unset) - 1} more)" if len(unset) > 1
                         else "") + "; the bridge maps no tensor of config.json's model to it")
    if os.path.exists(path):  # an interrupted earlier import
        shutil.rmtree(path)
    os.makedirs(path)
    with saving():  # the writer processes die with this process
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0,
                                 "config": config_to_dict(cfg), "vocab_size": bridge.vocab_size(resolved),
                                 "layout": layout(), "model_only": True, "hf_source": source,
                                 **tokenizer_record}, path)
    mark_complete(save_dir, 0, {"layout": layout(), "imported_from": os.path.abspath(hf_dir)})
    return {"checkpoint": path, "overrides": overrides + tokenizer_overrides, "dtype": source["dtype"],
            "tokenizer": bool(tokenizer_overrides)}
