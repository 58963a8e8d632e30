"""A ready-to-sample model from a distributed checkpoint (any saved layout) or a Hugging Face
folder exported by ``tools/convert_checkpoint.py``.

Distributed checkpoints reshard on load, so a model trained at TP2 PP2 samples at any TP (the
samplers need PP = 1: the whole depth on one rank). The run's resolved config travels inside
the checkpoint; it gives the architecture, the noise schedule and the tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..diffusion.schedules import build_schedule
from .denoiser import Denoiser, hf_denoiser, megatron_denoiser


@dataclass
class LoadedModel:
    denoiser: Denoiser
    schedule: object
    tokenizer: object
    seq_length: int
    source: str
    config: object = None      # the training run's Config (megatron checkpoints)
    iteration: int | None = None
    weights: str | None = None  # "ema" or "raw": which weights a megatron checkpoint gave


def load_from_checkpoint(checkpoint: str, tp: int = 1, weights: str = "ema") -> LoadedModel:
    """Build the model at tensor-parallel size ``tp`` (PP 1) and load ``checkpoint`` (a
    checkpoint directory, or a run/save directory whose latest complete checkpoint is used).
    ``weights``: ``ema`` (default, as the reference samples) the checkpoint's EMA weights when it
    has them, else the trained ones; ``raw`` the trained weights. Initialises torch.distributed
    and megatron's parallel state if needed."""
    from ..data import build_tokenizer
    from ..training.checkpoint import load_model_for_inference
    from ..training.trainer import resolve_tokenizer_path

    model, cfg, common, path = load_model_for_inference(checkpoint, tp, weights=weights)
    vocab = common["vocab_size"]
    tok_path = resolve_tokenizer_path(cfg)
    tokenizer = build_tokenizer(cfg.data.tokenizer.kind, tok_path)
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"the tokenizer at {tok_path} has {tokenizer.vocab_size} ids but the "
                         f"checkpoint's model only {vocab}")
    o = cfg.objective
    return LoadedModel(megatron_denoiser(model, tokenizer.vocab_size, tokenizer.mask_id),
                       build_schedule(o.schedule, o.schedule_eps), tokenizer, cfg.data.seq_length,
                       path, cfg, common.get("iteration"), common.get("weights", weights))


def load_from_hf(folder: str, schedule: str = "loglinear", schedule_eps: float = 1e-3,
                 seq_length: int | None = None) -> LoadedModel:
    """An exported Hugging Face folder (``AutoModelForMaskedLM`` with ``trust_remote_code``)
    and the tokenizer saved beside it; runs in plain PyTorch, no megatron."""
    from transformers import AutoModelForMaskedLM

    from ..data import build_tokenizer

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = build_tokenizer("auto", folder)
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    length = seq_length or hf_config.get("model_length") or hf_config.get("max_sequence_length")
    return LoadedModel(hf_denoiser(model, tokenizer.vocab_size, tokenizer.mask_id),
                       build_schedule(schedule, schedule_eps), tokenizer, int(length), folder)
