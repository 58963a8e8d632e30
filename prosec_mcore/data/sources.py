"""A run's training and validation samples, from whichever source the config names.

``data.loader`` chooses how samples are stored and read:

* ``indexed``: megatron indexed datasets (``.bin``/``.idx``), one (``data.data_prefix``) or a
  weighted blend (``data.data_path``, per split ``data.train_data_path`` ...), built by
  megatron-core's ``BlendedMegatronDatasetBuilder`` (data/datasets.py, data/blends.py);
* ``webdataset``: tokenized tar shards named by a manifest (``data.shards``, or a weighted blend
  of manifests), streamed with the webdataset library (data/shard_dataset.py);
* ``dali``: the same shards decoded by NVIDIA DALI's webdataset reader (data/dali_decode.py).

``data.format=sft`` reads supervised fine-tuning examples instead (data/sft.py: one example per
sample, with its prompt and padding masks), from the files of ``tools/preprocess_data.py --sft``.

Every source answers ``source[i] -> {"tokens": [L], ...}`` for the global sample index ``i``, so
the batches (data/batches.py), the noise and the resume logic are the same for all of them.

:func:`data_state` is what a checkpoint records of the data: the sources' identity and the
position reached. A resume compares it with the run's (:func:`data_state_changes`) and says what
changed, because a changed blend, shard set, seed or batch size silently changes which samples
the rest of the run sees.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class RunData:
    """What the trainer needs of the data: the two sources and a line describing them."""

    train: Any
    valid: Any  # None when validation is off
    description: str
    identity: dict  # what must not change for an exact resume (see data_state)


def default_prefix(cfg) -> str:
    """The bundled corpus's indexed dataset, used when no data key names another."""
    return os.path.join(cfg.data.prepare_dir, f"{cfg.data.name}_text_document")


def build_run_data(cfg, tokenizer, num_samples: tuple[int, int, int], cache_dir: str) -> RunData:
    """Train and valid sources of ``cfg.data`` (``num_samples``: the minimum number of train,
    valid and test samples, as megatron's builder takes them; 0 valid samples: validation off).
    Bad input raises a one-line ``ValueError`` naming the key or file."""
    d, t = cfg.data, cfg.train
    if getattr(d, "format", "text") == "sft":
        return _sft(cfg, tokenizer, num_samples)
    if d.loader == "indexed":
        return _indexed(cfg, tokenizer, num_samples, cache_dir)
    if d.data_prefix or d.data_path or d.train_data_path or d.valid_data_path or d.test_data_path:
        raise ValueError(f"data.loader={d.loader} reads data.shards; data.data_prefix / data.*data_path name "
                         f"indexed datasets: drop them, or set data.loader=indexed")
    if not d.shards:
        raise ValueError(f"data.loader={d.loader} needs data.shards=[<manifest.json>] (or [w1, manifest1, w2, "
                         f"manifest2]); write shards with tools/preprocess_data.py --output-format webdataset")
    if d.labels:
        raise ValueError("data.labels (per-document labels) needs data.loader=indexed with one data.data_prefix")
    from .shard_dataset import build_shard_source

    dp = _dp_size()
    streams = d.streams or dp
    if streams % dp:
        raise ValueError(f"data.streams={streams} must be divisible by the data-parallel size {dp}: each rank "
                         f"reads streams/dp shard streams; choose a multiple of {dp}")
    common = dict(seq_length=d.seq_length, seed=t.seed, global_batch_size=t.global_batch_size, streams=streams,
                  tokenizer_vocab_size=tokenizer.vocab_size, shard_url=d.shard_url, decoder=d.loader)
    train = build_shard_source(list(d.shards), "train", **common)
    valid = build_shard_source(list(d.shards), "valid", **common) if num_samples[1] else None
    shards = ", ".join(str(s) for s in d.shards)
    description = (f"{d.loader} shards [{shards}] in {streams} stream(s) "
                   f"({streams // dp} per data-parallel rank)")
    return RunData(train, valid, description, {"loader": d.loader, **train.fingerprint()})


def _indexed(cfg, tokenizer, num_samples, cache_dir) -> RunData:
    from .blends import data_sources_from_config, require_single_prefix
    from .datasets import build_datasets

    d, t = cfg.data, cfg.train
    if d.shards:
        raise ValueError("data.shards names webdataset shards: set data.loader=webdataset (or dali), or drop "
                         "data.shards to read indexed datasets")
    sources = data_sources_from_config(d, default_prefix(cfg))
    if d.labels:
        require_single_prefix(sources)
    train, valid, _ = build_datasets(sources, tokenizer, d.seq_length, d.split, t.seed, num_samples, cache_dir)
    description = sources.describe()
    # the whole blend (describe() abbreviates long ones), as JSON-ready lists
    identity = {"loader": "indexed", "sources": json.loads(json.dumps(dataclasses.asdict(sources))),
                "split": d.split, "seq_length": d.seq_length,
                "seed": t.seed, "global_batch_size": t.global_batch_size}
    return RunData(train, valid, description, identity)


def _sft(cfg, tokenizer, num_samples) -> RunData:
    """``data.format=sft``: the train and valid :class:`~prosec_mcore.data.sft.SFTDataset` of one
    SFT dataset (``data.data_prefix``, or ``data.data_path`` of one prefix) cut into examples by
    ``data.split`` (data/sft.py: split_examples), or of one prefix per split
    (``data.train_data_path`` / ``data.valid_data_path``, each used whole). Blends, shards and the
    packing options are refused in one line: an SFT sample is one example, not packed text."""
    from .blends import data_sources_from_config
    from .sft import SFTDataset, split_examples

    d, t = cfg.data, cfg.train
    hint = "data.format=sft reads the files of tools/preprocess_data.py --sft"
    if d.loader != "indexed" or d.shards:
        raise ValueError(f"{hint} (indexed, with per-token roles): set data.loader=indexed and drop data.shards")
    for key, value in (("data.labels", d.labels), ("data.document_attention", d.document_attention),
                       ("data.variable_length_fraction", d.variable_length_fraction)):
        if value:
            raise ValueError(f"{key} is for packed pre-training text, not data.format=sft (one example per "
                             f"sample); drop it")
    if not (d.data_prefix or d.data_path or d.train_data_path):
        raise ValueError(f"{hint}: give data.data_prefix=<prefix> (or data.train_data_path=[<prefix>] and "
                         f"data.valid_data_path=[<prefix>])")
    if d.test_data_path:
        raise ValueError("data.test_data_path is not read by training; drop it (evaluate a test set with "
                         "tools/evaluate_prosec.py)")
    sources = data_sources_from_config(d, "")
    for blend in sources.blends:
        if len(blend[0]) != 1:
            raise ValueError(f"data.format=sft reads one SFT dataset per split, not a blend of {len(blend[0])}; "
                             f"write the examples into one dataset with tools/preprocess_data.py --sft "
                             f"(it takes several --input files)")
    wants_valid = num_samples[1] > 0
    if sources.blend is not None:
        prefix = sources.blend[0][0]
        whole = SFTDataset(prefix, d.seq_length, seed=t.seed, tokenizer=tokenizer)
        train_idx, valid_idx, _ = split_examples(len(whole), d.split)
        for name, idx, needed in (("train", train_idx, True), ("validation", valid_idx, wants_valid)):
            if needed and not len(idx):
                fix = ("a larger first share" if name == "train" else
                       "a larger second share, e.g. \"data.split='90,10,0'\", or train.eval_interval=0")
                raise ValueError(f"data.split={d.split} gives the {name} split none of the {len(whole)} examples "
                                 f"of {prefix}; give it {fix}")
        train, valid = whole.subset(train_idx), whole.subset(valid_idx) if wants_valid else None
        description = f"SFT {prefix} split {d.split} ({len(train)} train, {len(valid_idx)} valid examples)"
        split = d.split
    else:
        train_prefix = sources.blend_per_split[0][0][0]
        valid_blend = sources.blend_per_split[1]
        if wants_valid and valid_blend is None:
            raise ValueError("data.train_data_path is set but data.valid_data_path is not, and validation is on; "
                             "give data.valid_data_path=[<prefix>] or set train.eval_interval=0")
        train = SFTDataset(train_prefix, d.seq_length, None, t.seed, tokenizer)
        valid = SFTDataset(valid_blend[0][0], d.seq_length, None, t.seed, tokenizer) if wants_valid else None
        description = (f"SFT train {train_prefix} ({len(train)} examples)"
                       + (f" | valid {valid.prefix} ({len(valid)} examples)" if valid is not None else ""))
        split = None
    identity = {"loader": "indexed", "format": "sft", "train": train.fingerprint(),
                "valid": valid.fingerprint() if valid is not None else None, "split": split,
                "seq_length": d.seq_length, "seed": t.seed, "global_batch_size": t.global_batch_size}
    return RunData(train, valid, description, identity)


def _dp_size() -> int:
    import torch

    from megatron.core import parallel_state

    if not torch.distributed.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return 1  # a tool reading data outside a training run
    return parallel_state.get_data_parallel_world_size()


def data_state(identity: dict, iteration: int, global_batch_size: int, train_source=None) -> dict:
    """What a checkpoint at ``iteration`` records of the data: the identity and the position (the
    next global sample index; for shard streams also where each stream stands)."""
    first = iteration * global_batch_size
    state = {"identity": identity, "next_sample": first}
    position, streams = getattr(train_source, "position", None), getattr(train_source, "streams", None)
    if position is not None and streams:
        per_stream = global_batch_size // streams
        state["next_positions"] = [position(first + v * per_stream) for v in range(streams)]
    return state


def data_state_changes(saved: Optional[dict], identity: dict) -> list[str]:
    """The keys of the data identity that differ between a checkpoint and this run (``[]``: the same
    data, or a checkpoint from before data states were recorded)."""
    if not saved or "identity" not in saved:
        return []
    before = saved["identity"]

    def short(value) -> str:  # a blend of thousands of prefixes stays one readable line
        text = repr(value)
        return text if len(text) <= 160 else text[:150] + f"... ({len(text):,} chars)"

    return [f"{key}: {short(before.get(key))} -> {short(identity.get(key))}"
            for key in sorted(set(before) | set(identity)) if before.get(key) != identity.get(key)]
