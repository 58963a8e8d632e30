"""Distributed checkpoints: megatron-core `dist_checkpointing` (torch_dist), crash-safe and reshardable.

On disk, under `checkpoint.save_dir` (default `<run_dir>/checkpoints`):

    iter_0000100/           one checkpoint: the torch_dist shards of every rank, megatron's
                            metadata.json and common.pt, and COMPLETE (our marker, last)
    latest                  the name of the newest COMPLETE checkpoint (replaced atomically)

A checkpoint counts only once COMPLETE exists, and COMPLETE is written by rank 0 after every rank
has finished writing its shards (a barrier), then `latest` is switched with an atomic rename. A
crash or `kill -9` at any moment of a save therefore leaves the previous checkpoint as latest;
a leftover partial directory is ignored when loading and replaced by the next save.

Asynchronous saves (`checkpoint.async_save=true`) split a save in two. Now: the state is planned
and handed to a forked writer process (megatron-core's `AsyncCallsQueue`; a fork gives the writer
a copy-on-write snapshot of the weights, so training may change them meanwhile), and training goes
on. Later: once every rank's writer has finished (megatron checks it collectively), the request's
finalize functions run on all ranks: torch_dist's metadata, megatron's metadata.json, and last our
`_finalize` (COMPLETE, `latest`, pruning). So COMPLETE still means "every rank wrote everything",
and the crash guarantee is unchanged. The trainer finalises pending saves without waiting after
every iteration, and waits for them before the next save, before loading and before exiting.

What a checkpoint holds: the model (sharded tensors keyed by global names, so any TP/PP/DP layout
can load them), the optimizer state mapped onto the model's shards (megatron's reshardable
format; the distributed optimizer saves `fully_sharded_model_space`), the LR scheduler, the
iteration (the data position and the diffusion noise are pure functions of it), every rank's RNG
states (restored only when the layout is unchanged: dropout streams are per rank), and the
resolved run configuration.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ..config import ConfigError

COMPLETE = "COMPLETE"
LATEST = "latest"
# Model settings that must match between a checkpoint and the run that loads it.
SHAPE_KEYS = ("style", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "time_conditioning", "time_embedding_dim")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def find_latest(save_dir: str) -> str | None:
    """The newest complete checkpoint in `save_dir` (following `latest`, else scanning)."""
    pointer = os.path.join(save_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(save_dir, f.read().strip())
        if is_complete(path):
            return path
    if not os.path.isdir(save_dir):
        return None
    complete = sorted(d for d in os.listdir(save_dir) if d.startswith("iter_") and is_complete(os.path.join(save_dir, d)))
    return os.path.join(save_dir, complete[-1]) if complete else None


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_keys(trainer) -> list:
    """Megatron-LM's names: `model`, or `model0`, `model1`... for interleaved-pipeline chunks.
    (Sharded tensors are matched by their own global keys, so the names need not match on load.)"""
    return ["model"] if len(trainer.model) == 1 else [f"model{i}" for i in range(len(trainer.model))]


def _model_sharded_state(trainer) -> dict:
    # unwrap DDP: the keys are the model's own (global) parameter names
    return {key: chunk.module.sharded_state_dict() for key, chunk in zip(_model_keys(trainer), trainer.model)}


def _load_model_state(trainer, loaded: dict) -> None:
    for key, chunk in zip(_model_keys(trainer), trainer.model):
        chunk.module.load_state_dict(loaded[key])


def _sharded_state_dict(trainer, is_loading: bool, with_rng: bool) -> dict:
    model_sd = _model_sharded_state(trainer)
    state = dict(model_sd)
    state["optimizer"] = trainer.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"})
    if with_rng:
        pp, tp, dp = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_data_parallel_rank())
        lay = layout()
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), (lay["pp"], lay["tp"], lay["dp"]), (pp, tp, dp),
                                           replica_id=0)
    return state


def save_checkpoint(trainer, iteration: int, save_dir: str, keep_last: int, async_queue=None,
                    on_complete=None) -> str:
    """Write checkpoint `iteration` on every rank and return its path.

    Without `async_queue` the function returns once the checkpoint is COMPLETE. With one (a
    megatron `AsyncCallsQueue`) it returns as soon as the background write is scheduled; COMPLETE,
    `latest` and pruning happen when the queue finalises the request, after every rank's writer
    finished. `on_complete(path)` runs on every rank once the checkpoint is COMPLETE."""
    from ..config_loader import config_to_dict

    path = os.path.join(save_dir, checkpoint_name(iteration))
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        if os.path.exists(path):  # a partial save of this iteration from a crashed run
            shutil.rmtree(path)
        os.makedirs(path)
    torch.distributed.barrier()
    start = time.time()
    state = _sharded_state_dict(trainer, is_loading=False, with_rng=True)
    state["iteration"] = iteration
    state["scheduler"] = trainer.scheduler.state_dict()
    state["layout"] = layout()
    state["config"] = config_to_dict(trainer.cfg)
    state["vocab_size"] = trainer.vocab_size
    state.update(_tokenizer_record(trainer))

    def finalize():
        _finalize(save_dir, iteration, keep_last, {"layout": layout(), "seconds": time.time() - start,
                                                   "async": async_queue is not None})
        if on_complete is not None:
            on_complete(path)

    if async_queue is None:
        dist_checkpointing.save(state, path)
        finalize()
    else:
        request = dist_checkpointing.save(state, path, async_sharded_save=True)
        request.add_finalize_fn(finalize)  # after megatron's own finalisation (metadata files)
        sys.stdout.flush()  # the forked writer flushes inherited stdio buffers when it exits
        sys.stderr.flush()
        async_queue.schedule_async_request(request)
    return path


def _tokenizer_record(trainer) -> dict:
    """Which ids the model may predict: recorded so that a run with another tokenizer is refused."""
    out = {}
    for key in ("mask_id", "tokenizer_vocab_size"):
        if getattr(trainer, key, None) is not None:
            out[key] = int(getattr(trainer, key))
    return out


def _finalize(save_dir: str, iteration: int, keep_last: int, info: dict) -> None:
    """Runs on every rank once every rank has written its shards (sync: right after writing;
    async: when the queue finalises the request)."""
    _fault_injection("after_shards", iteration)
    torch.distributed.barrier()  # every rank has written its shards
    if torch.distributed.get_rank() == 0:
        mark_complete(save_dir, iteration, info)
        _prune(save_dir, keep_last)
    torch.distributed.barrier()


def mark_complete(save_dir: str, iteration: int, info: dict) -> None:
    """Rank 0, after every rank has written: COMPLETE in the checkpoint, then `latest` -> it."""
    with open(os.path.join(save_dir, checkpoint_name(iteration), COMPLETE), "w") as f:
        json.dump({"iteration": iteration, **info}, f)
    tmp = os.path.join(save_dir, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(checkpoint_name(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, LATEST))


def _prune(save_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(d for d in os.listdir(save_dir) if d.startswith("iter_") and is_complete(os.path.join(save_dir, d)))
    for name in complete[:-keep_last]:
        shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def _fault_injection(point: str, iteration: int) -> None:
    """Test hook: PROSEC_FAULT_INJECTION=<point>:<iteration> kills the process there, as
    `kill -9` would (tests/distributed/test_checkpoints.py)."""
    if os.environ.get("PROSEC_FAULT_INJECTION") == f"{point}:{iteration}":
        os._exit(137)


def check_compatible(saved_cfg: dict, cfg, vocab_size: int, path: str, mask_id: int | None = None) -> None:
    """Refuse a checkpoint of another model shape, vocabulary or mask id, naming the mismatch."""
    saved_model = saved_cfg["model"]
    for key in SHAPE_KEYS:
        if saved_model.get(key) != getattr(cfg.model, key):
            raise ConfigError(f"checkpoint {path} has model.{key}={saved_model.get(key)!r} but this run has "
                              f"{getattr(cfg.model, key)!r}; load it with the same model settings")
    saved_vocab = saved_cfg.get("vocab_size")
    if saved_vocab is not None and saved_vocab != vocab_size:
        raise ConfigError(f"checkpoint {path} has a vocabulary of {saved_vocab} rows but this run's model has "
                          f"{vocab_size}; use the checkpoint's tokenizer (and model.vocab_size={saved_vocab})")
    saved_mask = saved_cfg.get("mask_id")
    if saved_mask is not None and mask_id is not None and saved_mask != mask_id:
        raise ConfigError(f"checkpoint {path} was trained with mask id {saved_mask} but this run's tokenizer has "
                          f"mask id {mask_id}; name the checkpoint's mask token with data.tokenizer.mask_token")


def load_checkpoint(trainer, path: str) -> tuple[int, bool]:
    """Load model, optimizer, scheduler (and RNG if the layout is unchanged).

    Returns (iteration, whether the RNG states were restored)."""
    if not is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint (no {COMPLETE} marker: the save was interrupted); "
                          f"point checkpoint.load at a complete one")
    common = dist_checkpointing.load_common_state_dict(path)
    check_compatible(common["config"] | {"vocab_size": common.get("vocab_size"), "mask_id": common.get("mask_id")},
                     trainer.cfg, trainer.vocab_size, path, getattr(trainer, "mask_id", None))
    if common.get("model_only"):  # e.g. imported from Hugging Face: weights only, training starts at 0
        _load_model_state(trainer, dist_checkpointing.load(_model_sharded_state(trainer), path))
        trainer.optimizer.reload_model_params()  # the optimizer's fp32 main copies, when there are any
        return 0, False
    same_layout = common["layout"] == layout()
    template = _sharded_state_dict(trainer, is_loading=True, with_rng=same_layout)
    loaded = dist_checkpointing.load(template, path)
    _load_model_state(trainer, loaded)
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    trainer.scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return int(common["iteration"]), same_layout


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory itself, or a save_dir / run_dir holding checkpoints (its latest)."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if is_complete(candidate):
            return candidate
        latest = find_latest(candidate) if os.path.isdir(candidate) else None
        if latest:
            return latest
    raise FileNotFoundError(f"no complete checkpoint at {path} (expected a directory with a COMPLETE marker, "
                            f"or a run directory whose checkpoints/ holds one)")


def load_model_for_inference(checkpoint: str, tp: int = 1):
    """The trained model of ``checkpoint`` (see :func:`resolve_checkpoint`) on one pipeline stage
    at tensor-parallel size ``tp``, for export, sampling and evaluation: the weights reshard from
    whatever layout saved them. Initialises torch.distributed and megatron's parallel state when
    needed. Returns ``(model, cfg, common, path)``: ``cfg`` is the run's config with this
    layout, ``common`` the checkpoint's non-tensor state (iteration, vocab_size, mask_id, ...)."""
    from ..config_loader import config_from_dict
    from ..model.builder import build_model
    from ..runtime import initialize_distributed

    path = resolve_checkpoint(checkpoint)
    common = dist_checkpointing.load_common_state_dict(path)
    cfg = config_from_dict(common["config"])
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.sequence_parallel = tp, 1, None, False
    if not torch.distributed.is_initialized():
        initialize_distributed(tp=tp, pp=1, seed=cfg.train.seed)
    elif parallel_state.get_tensor_model_parallel_world_size() != tp:
        raise ValueError("torch.distributed is already initialised with another TP size")
    model = build_model(cfg, common["vocab_size"])
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"])
    return model, cfg, common, path
