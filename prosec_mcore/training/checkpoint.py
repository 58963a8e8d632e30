"""Distributed checkpoints: megatron-core `dist_checkpointing` (torch_dist), crash-safe and reshardable.

On disk, under `checkpoint.save_dir` (default `<run_dir>/checkpoints`):

    iter_0000100/           one checkpoint: the torch_dist shards of every rank, megatron's
                            metadata.json and common.pt, and COMPLETE (our marker, last)
    latest                  the name of the newest COMPLETE checkpoint (replaced atomically)

A checkpoint counts only once COMPLETE exists, and COMPLETE is written by rank 0 after every rank
has finished writing its shards (a barrier), then `latest` is switched with an atomic rename. A
crash or `kill -9` at any moment of a save therefore leaves the previous checkpoint as latest;
a leftover partial directory is ignored when loading and replaced by the next save. A COMPLETE
checkpoint is never deleted or overwritten by a save (only pruning removes old ones, and pruning
keeps the newest checkpoint recorded as healthy).

COMPLETE is a small JSON record: the iteration, the layout, the save time, whether training was
healthy when it was written (training/health.py), and a manifest of every file of the checkpoint
with its size. Loading checks the manifest first, so a shard that went missing or a file cut
short (a copy interrupted, a disk that filled up) is named in one line together with the previous
complete checkpoint, instead of failing deep inside torch.distributed.checkpoint. A write that
fails (no space left, an I/O error) removes its partial directory and says which checkpoint is
still intact.

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
states (restored only when the layout is unchanged: dropout streams are per rank), the EMA of the
weights when the run keeps one (training/ema.py: fp32, under the weights' keys prefixed `ema.`,
so it reshards like them), and the resolved run configuration.
"""
from __future__ import annotations

import contextlib
import errno
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
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from ..config import ConfigError
from .ema import copy_loaded, ema_sharded, has_ema
from .faults import fault_injected
from .save_processes import saving

COMPLETE = "COMPLETE"
LATEST = "latest"
# Model settings that decide what a checkpoint's weights mean: a run that differs in any of them
# cannot continue from it (the tensors might even load, but would compute another function).
ARCHITECTURE_KEYS = ("style", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "time_conditioning", "time_embedding_dim", "zero_timestep",
                     "num_classes", "label_combination", "rotary_base", "layernorm_epsilon")
# The value an architecture key had before it existed: a checkpoint without the key was trained
# with this (other missing keys are not checked).
LEGACY_MODEL_VALUES = {"label_combination": "sum_silu"}


def upgrade_saved_config(saved_cfg: dict) -> dict:
    """A checkpoint's config with the architecture keys it predates filled in with the values it
    was trained with (LEGACY_MODEL_VALUES), so that it rebuilds the same function."""
    model = dict(saved_cfg.get("model", {}))
    for key, value in LEGACY_MODEL_VALUES.items():
        model.setdefault(key, value)
    return {**saved_cfg, "model": model}


class CheckpointCorruptError(ConfigError):
    """A checkpoint marked COMPLETE whose files do not match its manifest, or cannot be read."""


class CheckpointWriteError(RuntimeError):
    """A save failed; the message names the partial checkpoint (removed) and the intact latest one."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoint_iteration(path: str) -> int:
    return int(os.path.basename(os.path.normpath(path)).split("_")[1])


def layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def read_record(path: str) -> dict:
    """The COMPLETE record of a checkpoint ({} for a checkpoint of an older version, whose marker
    was written without one)."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def complete_checkpoints(save_dir: str) -> list[str]:
    """Paths of the COMPLETE checkpoints of `save_dir`, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    names = sorted(d for d in os.listdir(save_dir)
                   if d.startswith("iter_") and d[5:].isdigit() and is_complete(os.path.join(save_dir, d)))
    return [os.path.join(save_dir, d) for d in names]


def find_latest(save_dir: str) -> str | None:
    """The newest complete checkpoint in `save_dir`. Found by scanning, not by following `latest`
    (which is kept for people and scripts): a crash between writing COMPLETE and switching `latest`
    leaves the pointer one checkpoint behind, and resuming from there would redo finished work."""
    complete = complete_checkpoints(save_dir)
    return complete[-1] if complete else None


def previous_complete(path: str) -> str | None:
    """The newest complete checkpoint of the same directory that is older than `path`."""
    older = [p for p in complete_checkpoints(os.path.dirname(os.path.normpath(path)))
             if checkpoint_iteration(p) < checkpoint_iteration(path)]
    return older[-1] if older else None


# ------------------------------------------------------------------------------- manifest
def _manifest(path: str) -> dict:
    """{relative file path: size in bytes} of every file under a checkpoint directory."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    files.pop(COMPLETE, None)
    return files


def verify_checkpoint(path: str) -> None:
    """Raise CheckpointCorruptError (one line: what is wrong, and what to resume from instead)
    unless every file of the manifest in COMPLETE exists with its recorded size."""
    record = read_record(path)
    if not is_complete(path):
        raise CheckpointCorruptError(f"{path} is not a complete checkpoint (no {COMPLETE} marker: the save was "
                                     f"interrupted){_instead(path)}")
    expected = record.get("files")
    if expected is None:  # written before manifests existed: nothing to compare against
        return
    problems = []
    for name, size in sorted(expected.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            problems.append(f"{name} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{name} has {os.path.getsize(full):,} bytes instead of {size:,}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointCorruptError(f"checkpoint {path} is corrupt: {problems[0]}{more}{_instead(path)}")


def _instead(path: str) -> str:
    previous = previous_complete(path)
    if previous is None:
        return "; there is no earlier complete checkpoint in its directory"
    return (f"; the previous complete checkpoint is {previous}: resume from it with checkpoint.load={previous}"
            f" (or checkpoint.fallback_to_previous=true)")


def set_aside(path: str) -> str:
    """Rename a corrupt checkpoint out of the way (kept for inspection, never loaded again)."""
    target = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, target)
    return target


# ------------------------------------------------------------------------------- state
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


def _sharded_state_dict(trainer, is_loading: bool, with_rng: bool, with_ema: bool = True) -> dict:
    model_sd = _model_sharded_state(trainer)
    state = dict(model_sd)
    ema = getattr(trainer, "ema", None)
    if ema is not None and with_ema:
        state["ema"] = ema.sharded_state_dict(model_sd)
    state["optimizer"] = trainer.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"})
    if with_rng:
        pp, tp, dp = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_data_parallel_rank())
        lay = layout()
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), (lay["pp"], lay["tp"], lay["dp"]), (pp, tp, dp),
                                           replica_id=0)
    return state


# ------------------------------------------------------------------------------- save
def save_checkpoint(trainer, iteration: int, save_dir: str, keep_last: int, async_queue=None,
                    on_complete=None, healthy: bool = True, extra_state: dict | None = None) -> str:
    """Write checkpoint `iteration` on every rank and return its path.

    Without `async_queue` the function returns once the checkpoint is COMPLETE. With one (a
    megatron `AsyncCallsQueue`) it returns as soon as the background write is scheduled; COMPLETE,
    `latest` and pruning happen when the queue finalises the request, after every rank's writer
    finished. `on_complete(path)` runs on every rank once the checkpoint is COMPLETE. `healthy`
    is recorded in COMPLETE (pruning keeps the newest healthy checkpoint); `extra_state` joins the
    checkpoint's common state (e.g. the health guard's counters).

    A failed write raises CheckpointWriteError after removing the partial directory (sync saves;
    async failures surface in `finalize_async_save`)."""
    from ..config_loader import config_to_dict

    path = os.path.join(save_dir, checkpoint_name(iteration))
    if is_complete(path):  # never overwrite (and so never delete) a checkpoint that counts
        raise CheckpointWriteError(f"{path} already exists as a complete checkpoint; it is kept, and this run "
                                   f"does not overwrite it (use another checkpoint.save_dir)")
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
    if getattr(trainer, "ema", None) is not None:
        state["ema_state"] = trainer.ema.state()
    state.update(_tokenizer_record(trainer))
    state.update(extra_state or {})

    def finalize():
        _finalize(save_dir, iteration, keep_last, {"layout": layout(), "seconds": round(time.time() - start, 3),
                                                   "async": async_queue is not None, "healthy": healthy})
        if on_complete is not None:
            on_complete(path)

    try:
        with saving(), _injected_write_fault(iteration):  # save_processes.py: the writers die with the rank
            if async_queue is None:
                dist_checkpointing.save(state, path)
                finalize()
                return path
            request = dist_checkpointing.save(state, path, async_sharded_save=True)
            request.add_finalize_fn(finalize)  # after megatron's own finalisation (metadata files)
            sys.stdout.flush()  # the forked writer flushes inherited stdio buffers when it exits
            sys.stderr.flush()
            async_queue.schedule_async_request(request)  # forks the writer
            return path
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - every failure of the write, in one line
        raise write_failure(err, path, save_dir) from err


def write_failure(err: BaseException, path: str, save_dir: str) -> CheckpointWriteError:
    """Remove the partial checkpoint `path` (rank 0) and word the failure in one line."""
    if torch.distributed.get_rank() == 0 and os.path.isdir(path) and not is_complete(path):
        shutil.rmtree(path, ignore_errors=True)
    latest = find_latest(save_dir)
    intact = f"the latest checkpoint {latest} is intact" if latest else "there is no earlier complete checkpoint"
    if _is_disk_full(err, save_dir):
        free = shutil.disk_usage(save_dir).free if os.path.isdir(save_dir) else 0
        return CheckpointWriteError(f"no space left on device writing {path} ({free / 2**20:.1f} MiB free); "
                                    f"{intact}; free some space (or lower checkpoint.keep_last) and run again")
    detail = _first_line(err)
    return CheckpointWriteError(f"could not write checkpoint {path} ({detail}); the partial checkpoint was removed "
                                f"and {intact}")


def exception_chain(err: BaseException):
    """`err`, then what caused it (or was being handled when it was raised), and so on."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _is_disk_full(err: BaseException, save_dir: str) -> bool:
    """ENOSPC anywhere in the exception chain, in its text (torch's zip writer reports a full disk
    as 'unexpected pos'), or a file system with (almost) nothing left."""
    for link in exception_chain(err):
        if isinstance(link, OSError) and link.errno == errno.ENOSPC:
            return True
        text = str(link)
        if "No space left" in text or "ENOSPC" in text or "unexpected pos" in text:
            return True
    try:
        return os.path.isdir(save_dir) and shutil.disk_usage(save_dir).free < 2**20
    except OSError:
        return False


def _first_line(err: BaseException) -> str:
    """The most specific line of an exception chain (the root cause's), for a one-line message."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0][:300]}" if text else type(root).__name__


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
    """Rank 0, after every rank has written: COMPLETE (with the manifest) in the checkpoint, then
    `latest` -> it. Both are written to a temporary name first and renamed, so neither is ever seen
    half-written."""
    path = os.path.join(save_dir, checkpoint_name(iteration))
    record = {"iteration": iteration, **info, "files": _manifest(path)}
    _write_atomically(os.path.join(path, COMPLETE), json.dumps(record))
    _write_atomically(os.path.join(save_dir, LATEST), checkpoint_name(iteration))


def _write_atomically(target: str, text: str) -> None:
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _prune(save_dir: str, keep_last: int) -> None:
    """Remove complete checkpoints beyond the newest `keep_last`, but never the newest one recorded
    as healthy (a run that went bad keeps its last good state however many saves followed)."""
    if keep_last <= 0:
        return
    complete = complete_checkpoints(save_dir)
    healthy = [p for p in complete if read_record(p).get("healthy", True)]
    keep = set(complete[-keep_last:]) | set(healthy[-1:])
    for path in complete:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _fault_injection(point: str, iteration: int) -> None:
    """`after_shards` (training/faults.py): the process dies there, as with `kill -9`."""
    if fault_injected(point, iteration):
        os._exit(137)


@contextlib.contextmanager
def _injected_write_fault(iteration: int):
    """In megatron's shard writer processes: `write` fails with ENOSPC, as on a full disk (the
    failure then travels megatron's real error path: worker -> results -> every rank);
    `slow_write` makes each write take 30 s, so that a test can kill a rank in the middle."""
    failing, slow = fault_injected("write", iteration), fault_injected("slow_write", iteration)
    if not (failing or slow):
        yield
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real = filesystem_async._write_item

    def faulty(*args, **kwargs):
        if failing:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        time.sleep(30)
        return real(*args, **kwargs)

    filesystem_async._write_item = faulty
    try:
        yield
    finally:
        filesystem_async._write_item = real


# ------------------------------------------------------------------------------- load
def check_compatible(saved_cfg: dict, cfg, vocab_size: int, path: str, mask_id: int | None = None) -> None:
    """Refuse a checkpoint of another architecture, vocabulary or mask id, naming the mismatch."""
    saved_model = upgrade_saved_config(saved_cfg)["model"]
    for key in ARCHITECTURE_KEYS:
        if key not in saved_model:  # a checkpoint of an older version, from before the key existed
            continue
        if key == "label_combination" and not saved_model.get("num_classes"):
            continue  # no label embedding: the combination changes nothing
        if saved_model[key] != getattr(cfg.model, key):
            raise ConfigError(f"checkpoint {path} has model.{key}={saved_model[key]!r} but this run has "
                              f"{getattr(cfg.model, key)!r}; load it with the same model settings "
                              f"(model.{key}={saved_model[key]})")
    saved_vocab = saved_cfg.get("vocab_size")
    if saved_vocab is not None and saved_vocab != vocab_size:
        raise ConfigError(f"checkpoint {path} has a vocabulary of {saved_vocab} rows but this run's model has "
                          f"{vocab_size}; use the checkpoint's tokenizer (and model.vocab_size={saved_vocab})")
    saved_mask = saved_cfg.get("mask_id")
    if saved_mask is not None and mask_id is not None and saved_mask != mask_id:
        raise ConfigError(f"checkpoint {path} was trained with mask id {saved_mask} but this run's tokenizer has "
                          f"mask id {mask_id}; name the checkpoint's mask token with data.tokenizer.mask_token")


def load_common(path: str) -> dict:
    """The non-tensor state of a checkpoint (iteration, config, scheduler...), after checking its
    manifest; an unreadable file becomes a one-line CheckpointCorruptError."""
    verify_checkpoint(path)
    try:
        return dist_checkpointing.load_common_state_dict(path)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - torch/megatron raise many types for an unreadable file
        raise CheckpointCorruptError(f"checkpoint {path} could not be read ({_first_line(err)}){_instead(path)}") \
            from err


def _load_sharded(template: dict, path: str) -> dict:
    try:
        return dist_checkpointing.load(template, path)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - as load_common
        raise CheckpointCorruptError(f"checkpoint {path} could not be read ({_first_line(err)}){_instead(path)}") \
            from err


def load_weights(trainer, path: str, common: dict | None = None, weights: str = "ema") -> dict:
    """Load only the model weights of any checkpoint (a training checkpoint or a model-only one,
    e.g. imported from Hugging Face) into the trainer's model; the optimizer's main copies follow.
    weights: `ema` loads the checkpoint's EMA weights when it has them (what it was validated
    with), `raw` the weights the optimizer trained. `common` is the checkpoint's common state
    when the caller has read it already. Returns it."""
    common = common if common is not None else load_common(path)
    check_compatible(common["config"] | {"vocab_size": common.get("vocab_size"), "mask_id": common.get("mask_id")},
                     trainer.cfg, trainer.vocab_size, path, getattr(trainer, "mask_id", None))
    modules = {key: chunk.module for key, chunk in zip(_model_keys(trainer), trainer.model)}
    load_module_weights(modules, path, _use_ema(weights, common))
    trainer.optimizer.reload_model_params()  # the optimizer's fp32 main copies, when there are any
    return common


def _check_weights(weights: str) -> None:
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, not {weights!r}")


def _use_ema(weights: str, common: dict) -> bool:
    """Whether `weights` (ema | raw) means loading the EMA weights of a checkpoint (with `common`)."""
    _check_weights(weights)
    return weights == "ema" and has_ema(common)


def load_module_weights(modules: dict, path: str, use_ema: bool) -> None:
    """Load the weights of checkpoint `path` into `modules` ({state key: megatron module}):
    the trained weights, or (use_ema) the EMA weights saved under their `ema.` keys."""
    if not use_ema:
        loaded = _load_sharded({key: m.sharded_state_dict() for key, m in modules.items()}, path)
        for key, module in modules.items():
            module.load_state_dict(loaded[key])
        return
    pairs = []

    def buffer_for(param):
        if not isinstance(param, torch.nn.Parameter):
            return None
        buffer = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        pairs.append((buffer, param))
        return buffer

    template = {"ema": {key: ema_sharded(m.sharded_state_dict(), buffer_for) for key, m in modules.items()}}
    copy_loaded(template, _load_sharded(template, path))
    with torch.no_grad():
        for buffer, param in pairs:
            param.copy_(buffer)


def load_checkpoint(trainer, path: str, common: dict | None = None) -> tuple[int, bool]:
    """Load model, optimizer, scheduler (and RNG if the layout is unchanged) to resume training.
    A model-only checkpoint loads its weights and starts at iteration 0.

    Returns (iteration, whether the RNG states were restored)."""
    common = common if common is not None else load_common(path)
    if common.get("model_only"):  # e.g. imported from Hugging Face: weights only, training starts at 0
        load_weights(trainer, path, common)
        if getattr(trainer, "ema", None) is not None:
            trainer.ema.reset()  # the average starts at the loaded weights (the model was built uninitialised)
        return 0, False
    check_compatible(common["config"] | {"vocab_size": common.get("vocab_size"), "mask_id": common.get("mask_id")},
                     trainer.cfg, trainer.vocab_size, path, getattr(trainer, "mask_id", None))
    same_layout = common["layout"] == layout()
    ema = getattr(trainer, "ema", None)
    template = _sharded_state_dict(trainer, is_loading=True, with_rng=same_layout, with_ema=has_ema(common))
    loaded = _load_sharded(template, path)
    _load_model_state(trainer, loaded)
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    if ema is not None:
        if "ema" in template:
            ema.load(loaded["ema"], template["ema"], common["ema_state"])
        else:  # EMA switched on for a run whose checkpoint has none: the average starts here
            ema.reset()
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


def load_model_for_inference(checkpoint: str, tp: int = 1, weights: str = "ema"):
    """The trained model of ``checkpoint`` (see :func:`resolve_checkpoint`) on one pipeline stage
    at tensor-parallel size ``tp``, for export, sampling and evaluation: the weights reshard from
    whatever layout saved them. weights: ``ema`` (default) the EMA weights when the checkpoint
    has them (else the trained ones), ``raw`` the weights the optimizer trained. Initialises
    torch.distributed and megatron's parallel state when needed. Returns
    ``(model, cfg, common, path)``: ``cfg`` is the run's config with this layout, ``common`` the
    checkpoint's non-tensor state (iteration, vocab_size, mask_id, ..., and `weights`: which
    weights were loaded)."""
    from ..config_loader import config_from_dict
    from ..model.builder import build_model
    from ..runtime import initialize_distributed

    _check_weights(weights)  # before any file is read
    path = resolve_checkpoint(checkpoint)
    common = load_common(path)
    use_ema = _use_ema(weights, common)
    cfg = config_from_dict(upgrade_saved_config(common["config"]))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.sequence_parallel = tp, 1, None, False
    if not torch.distributed.is_initialized():
        initialize_distributed(tp=tp, pp=1, seed=cfg.train.seed)
    elif parallel_state.get_tensor_model_parallel_world_size() != tp:
        raise ValueError("torch.distributed is already initialised with another TP size")
    model = build_model(cfg, common["vocab_size"], random_init=False)  # every weight comes from the checkpoint
    load_module_weights({"model": model}, path, use_ema)
    common["weights"] = "ema" if use_ema else "raw"
    return model, cfg, common, path
