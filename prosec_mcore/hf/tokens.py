"""The tokenizer and the special token ids of a Hugging Face folder, both ways.

Import: when the folder holds tokenizer.json, training uses it (data.tokenizer.kind=hf_json,
path=<folder>) and names its special tokens by the ids config.json gives (mask_token_id,
eos_token_id, pad_token_id). These overrides go into the imported checkpoint's config as well,
so that exporting it again ships the folder's tokenizer, not the bundled one.

Export: a run whose tokenizer is a folder (an imported model's, e.g. LLaDA's) gets that folder's
tokenizer files copied verbatim (tokenizer.json, tokenizer_config.json, ...); any other run gets
its tokenizer saved. Either way the folder also gets prosec_tokenizer.json, which names the
special tokens for this project's `build_tokenizer("auto", folder)`.

The ids a Hugging Face consumer reads (generate, evaluation harnesses) are written to
config.json and generation_config.json: eos and pad from the run's tokenizer (what it trained
with), mask from the checkpoint, bos from the source (LLaDA-8B keeps bos 126080 in
generation_config.json only).
"""
from __future__ import annotations

import json
import os
import re
import shutil

# what a tokenizer folder may hold; copied as they are
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hydra_value(value: str) -> str:
    """A Hydra override value: quoted unless it is a plain word or path (e.g. '<|mdm_mask|>')."""
    if re.fullmatch(r"[A-Za-z0-9_./-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def read_json_if_present(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def import_overrides(hf_dir: str, hf_config: dict) -> tuple[list, dict]:
    """Overrides that train with the folder's tokenizer.json, naming its special tokens by the ids
    of config.json; and what the checkpoint records (mask id, tokenizer vocabulary)."""
    record = {"mask_id": hf_config["mask_token_id"]} if hf_config.get("mask_token_id") is not None else {}
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return [], record
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(path)
    overrides = ["data.tokenizer.kind=hf_json", f"data.tokenizer.path={hydra_value(os.path.abspath(hf_dir))}"]
    for key, option in (("mask_token_id", "mask_token"), ("eos_token_id", "eod_token"), ("pad_token_id", "pad_token")):
        token = backend.id_to_token(hf_config[key]) if hf_config.get(key) is not None else None
        if token is not None:
            overrides.append(f"data.tokenizer.{option}={hydra_value(token)}")
    ids = backend.get_vocab(with_added_tokens=True).values()
    record["tokenizer_vocab_size"] = max(ids) + 1
    return overrides, record


def export_tokenizer(cfg, out_dir: str, imported: bool):
    """Write the run's tokenizer into `out_dir`. Returns (where it came from, the tokenizer), or
    (None, None) when it cannot be found, or when `imported` names a checkpoint imported from a
    folder without tokenizer (the bundled tokenizer would be the wrong one)."""
    from ..training.trainer import build_run_tokenizer, resolve_tokenizer_path

    if imported and cfg.data.tokenizer.path is None:
        return None, None
    tok_path = resolve_tokenizer_path(cfg)
    try:
        tokenizer = build_run_tokenizer(cfg, tok_path)
    except (FileNotFoundError, ValueError):
        return None, None  # the caller reports that the tokenizer was not found
    tokenizer.save(out_dir)
    if tok_path and os.path.isdir(tok_path):  # a model folder's tokenizer: its own files, byte for byte
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok_path, name)):
                shutil.copyfile(os.path.join(tok_path, name), os.path.join(out_dir, name))
    return tok_path, tokenizer


def token_ids(tokenizer, tok_path: str | None, mask_id: int | None, source: dict) -> dict:
    """bos/eos/pad/mask ids for config.json: the run's tokenizer (eos, pad) and the checkpoint's
    mask id first; then the source's config.json / generation_config.json (imported checkpoints),
    then those of the tokenizer's folder (runs started from an imported model)."""
    ids = {key: None for key in ID_KEYS}
    if tokenizer is not None:
        ids.update(eos_token_id=tokenizer.eod, pad_token_id=tokenizer.pad, mask_token_id=tokenizer.mask_id)
    if mask_id is not None:
        ids["mask_token_id"] = mask_id
    folder = tok_path if tok_path and os.path.isdir(tok_path) else None
    sources = [source.get("config") or {}, source.get("generation_config") or {}]
    if folder:
        sources += [read_json_if_present(os.path.join(folder, n)) or {} for n in ("config.json",
                                                                                  "generation_config.json")]
    limit = tokenizer.vocab_size if tokenizer is not None else None
    for key in ID_KEYS:
        for where in sources:
            if ids[key] is None and isinstance(where.get(key), int) and (limit is None or where[key] < limit):
                ids[key] = where[key]
    return ids


def generation_config(ids: dict, source: dict | None, transformers_version: str) -> dict:
    """generation_config.json: the source's (round trip), with the bos/eos/pad ids set."""
    out = dict(source or {"_from_model_config": True})
    out.update({k: ids[k] for k in GENERATION_KEYS if ids.get(k) is not None})
    out.setdefault("transformers_version", transformers_version)
    return out
