"""Exponential moving average (EMA) of the weights, as the ProSeCo/MDLM reference trains with it.

After every applied optimizer step (a skipped update does not count):

    n   <- n + 1
    d_n  = min(decay, (1 + n) / (10 + n))     with `train.ema_warmup` (the reference's default),
           decay                              without
    ema <- ema - (1 - d_n) * (ema - w)

The warm-up makes the average usable early: d_1 = 0.18, d_100 = 0.92, d_1000 = 0.991, and only
after ~90,000 steps does the reference's decay of 0.9999 take over. Validation, sampling,
evaluation and Hugging Face export use the EMA weights by default (the reference validates and
samples with them); the raw weights stay what the optimizer updates.

Layout: each rank keeps an fp32 copy of exactly the parameter shards it holds (its TP slice of
its pipeline stage; data-parallel ranks hold identical copies, as they hold identical weights).
The copies are saved in the distributed checkpoint under the parameters' own global keys with an
`ema.` prefix, so they reshard like the weights: a checkpoint saved at TP2 PP2 gives its EMA
weights to a TP1 model. Megatron-core has no weight EMA (Megatron-LM neither), so this file
writes one.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

EMA_PREFIX = "ema."


def ema_decay_at(decay: float, num_updates: int, warmup: bool) -> float:
    """The decay applied by update number `num_updates` (counted from 1)."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


def _map_sharded(sharded: dict, fn) -> dict:
    """Apply fn to every ShardedTensor / ShardedTensorFactory of a (nested) sharded state dict,
    keeping the structure; entries for which fn returns None are dropped (TE's _extra_state
    objects, non-parameter tensors)."""
    out = {}
    for name, item in sharded.items():
        if isinstance(item, dict):
            mapped = _map_sharded(item, fn)
            if mapped:
                out[name] = mapped
        elif isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            mapped = fn(item)
            if mapped is not None:
                out[name] = mapped
    return out


def ema_sharded(model_sharded: dict, data_for) -> dict:
    """The EMA entries for the parameters of `model_sharded` (a model's sharded state dict):
    the same global shapes and offsets, keys prefixed with `ema.`, data `data_for(param)` (an
    fp32 tensor of the parameter's shape) or entries dropped where data_for returns None."""

    def swap(item):
        data = data_for(item.data)
        if data is None:
            return None
        if isinstance(item, ShardedTensor):
            return dataclasses.replace(item, key=EMA_PREFIX + item.key, data=data, dtype=data.dtype)
        return dataclasses.replace(item, key=EMA_PREFIX + item.key, data=data)

    return _map_sharded(model_sharded, swap)


def has_ema(common: dict) -> bool:
    """Whether a checkpoint (its common state) holds EMA weights."""
    return bool((common.get("ema_state") or {}).get("num_updates"))


class WeightEMA:
    """The fp32 EMA of the trainable parameters of this rank's model chunks."""

    def __init__(self, model_chunks, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), not {decay}")
        self.decay, self.warmup = decay, warmup
        self.params = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights (after loading pretrained weights)."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p.detach().float())
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> float:
        """Fold the current weights in (call after each applied optimizer step); returns d_n."""
        self.num_updates += 1
        one_minus_decay = 1.0 - ema_decay_at(self.decay, self.num_updates, self.warmup)
        for s, p in zip(self.shadow, self.params):
            s.sub_(one_minus_decay * (s - p.detach().float()))
        return 1.0 - one_minus_decay

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Inside the block the model computes with the EMA weights; afterwards the raw weights
        are back, bit for bit."""
        raw = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)
        try:
            yield
        finally:
            for r, p in zip(raw, self.params):
                p.copy_(r)

    # -------------------------------------------------------------- checkpoint
    def sharded_state_dict(self, model_sharded: dict) -> dict:
        """The EMA weights as sharded tensors beside the model's (same layout, `ema.` keys)."""
        by_id = {id(p): s for p, s in zip(self.params, self.shadow)}
        return ema_sharded(model_sharded, lambda param: by_id.get(id(param)))

    def state(self) -> dict:
        """The non-tensor state for the checkpoint's common part."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    @torch.no_grad()
    def load(self, loaded: dict, template: dict, common_state: dict) -> None:
        """Copy what dist_checkpointing loaded for `template` (this object's sharded_state_dict)
        into the shadow weights."""
        copy_loaded(template, loaded)
        self.num_updates = int(common_state.get("num_updates", 0))


def copy_loaded(template: dict, loaded: dict) -> None:
    """Copy the tensors dist_checkpointing returned for `template` into the template's own data
    tensors (the load may hand back new tensors, e.g. for merged factories). The two dicts are
    walked key by key (the loaded one also holds the checkpoint's common state)."""
    with torch.no_grad():
        for name, item in template.items():
            if isinstance(item, dict):
                copy_loaded(item, loaded[name])
            elif isinstance(item, (ShardedTensor, ShardedTensorFactory)):
                value = loaded[name]
                if value.data_ptr() != item.data.data_ptr():  # torch_dist loads in place when it can
                    item.data.copy_(value)
