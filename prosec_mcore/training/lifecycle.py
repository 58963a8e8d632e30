"""What keeps a run's work safe: one job per run directory, where the run starts, saves and their
failures, and the signals and settings that end it.

A pre-training job runs for weeks, is requeued many times and is watched by nobody at night; the
checkpoints in its run directory are the only copy of that work. `RunLifecycle` gathers every rule
that protects them, so that the training loop (trainer.py) only asks three questions: where do I
start, save now, should I stop.

Where a run starts (`choose_start`), in this order:
    checkpoint.load        resume exactly this checkpoint (weights, optimizer, schedule, iteration)
    own latest             the newest complete checkpoint of the run's save_dir (a requeue)
    checkpoint.pretrained  initial weights only (iteration 0, fresh optimizer), e.g. imported LLaDA
    fresh                  a new initialisation
So a job started from pretrained weights and requeued with the same command continues from its
own checkpoints. Every candidate is verified against its manifest (checkpoint.py); a corrupt
newest checkpoint stops the run with a line naming the previous complete one and the override to
resume from it, or, with checkpoint.fallback_to_previous, is renamed aside and the previous one
used. A start that would later overwrite complete checkpoints of higher iterations (e.g.
checkpoint.load of an older checkpoint in the same save_dir) is refused: saving never deletes a
complete checkpoint.

Every decision is taken identically by every rank (they read the same files, and where only rank 0
acts, a barrier or a broadcast follows), so all ranks start, save and stop together.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from ..config import Config, ConfigError
from .checkpoint import (CheckpointCorruptError, checkpoint_iteration, complete_checkpoints, exception_chain,
                         find_latest, load_common, save_checkpoint, set_aside, verify_checkpoint, write_failure)
from .exit_signals import ExitSignals
from .health import state_is_finite
from .run_lock import RunDirLock, RunDirLockedError

# Exit statuses of tools/pretrain_prosec.py (0: done, or stopped by a signal/exit setting after saving).
EXIT_BAD_INPUT = 2  # configuration, data or checkpoint problems found before training
EXIT_UNHEALTHY = 3  # non-finite loss/gradients (health.nonfinite=stop), or too many skipped updates
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (no space left, I/O error)


class RunError(RuntimeError):
    """A run that must stop; the message is the one line the user sees."""

    exit_code = 1


class UnhealthyTrainingError(RunError):
    exit_code = EXIT_UNHEALTHY


class SaveFailedError(RunError):
    """`collective`: every rank raised it (megatron propagates a failed write to all ranks), so one
    rank's report is enough; otherwise only the ranks that failed know, and each must say so."""

    exit_code = EXIT_SAVE_FAILED
    collective = False


def _save_failed(err: BaseException) -> SaveFailedError:
    failure = SaveFailedError(str(err))
    failure.collective = any(isinstance(link, CheckpointException) for link in exception_chain(err))
    return failure


@dataclass
class StartPoint:
    kind: str  # load | resume | pretrained | fresh
    path: str | None = None
    common: dict | None = None  # the checkpoint's non-tensor state

    @property
    def iteration(self) -> int:
        if self.common is None or self.kind == "pretrained" or self.common.get("model_only"):
            return 0
        return int(self.common["iteration"])


class RunLifecycle:
    def __init__(self, cfg: Config, device, is_logger: bool):
        self.cfg = cfg
        self.device = device
        self.is_logger = is_logger
        self.save_dir = cfg.checkpoint.save_dir or os.path.join(cfg.run_dir, "checkpoints")
        inside_run_dir = os.path.abspath(self.save_dir).startswith(os.path.abspath(cfg.run_dir) + os.sep)
        self.locks = [RunDirLock(d) for d in ([cfg.run_dir] if inside_run_dir else [cfg.run_dir, self.save_dir])]
        self.signals = ExitSignals(verbose=is_logger)
        # Background checkpoint writes (megatron-core's queue of forked writers); None: synchronous saves.
        self.async_queue = AsyncCallsQueue() if cfg.checkpoint.async_save else None
        self._pending: list[str] = []  # paths of async saves not finalised yet, oldest first
        self.last_saved: int | None = None

    def _say(self, message: str) -> None:
        if self.is_logger:
            print(f"[prosec] {message}", flush=True)

    # ------------------------------------------------------------------ the run directory
    def acquire(self) -> None:
        """Take the run directory (rank 0 holds the lock); every rank refuses alike if it is taken."""
        refusal = None
        if torch.distributed.get_rank() == 0:
            try:
                for lock in self.locks:
                    lock.acquire()
            except RunDirLockedError as err:
                refusal = str(err)
        refusal = _broadcast(refusal)
        if refusal:
            self.release()
            raise ConfigError(refusal)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()

    # ------------------------------------------------------------------ where the run starts
    def choose_start(self) -> StartPoint:
        ck = self.cfg.checkpoint
        if ck.load is not None:
            if not os.path.isdir(ck.load):
                raise ConfigError(f"checkpoint.load={ck.load} does not exist (or is not a directory)")
            start = StartPoint("load", ck.load, load_common(ck.load))
        else:
            start = self._own_latest() if ck.resume else None
            if start is None and ck.pretrained is not None:
                if not os.path.isdir(ck.pretrained):
                    raise ConfigError(f"checkpoint.pretrained={ck.pretrained} does not exist (or is not a directory)")
                start = StartPoint("pretrained", ck.pretrained, load_common(ck.pretrained))
            start = start or StartPoint("fresh")
        self._protect_later_checkpoints(start.iteration)
        return start

    def _own_latest(self) -> StartPoint | None:
        """The newest complete checkpoint of save_dir that passes its manifest check."""
        latest = find_latest(self.save_dir)
        while latest is not None:
            try:
                return StartPoint("resume", latest, load_common(latest))
            except CheckpointCorruptError as err:
                if not self.cfg.checkpoint.fallback_to_previous:
                    raise
                self._set_aside(latest, str(err))
            latest = find_latest(self.save_dir)
        return None

    def _set_aside(self, path: str, why: str) -> None:
        target = _broadcast(set_aside(path) if torch.distributed.get_rank() == 0 else None)
        self._say(f"{why.split(';')[0]}; renamed it to {os.path.basename(target)} and going on without it")

    def _protect_later_checkpoints(self, start_iteration: int) -> None:
        """Refuse a start whose saves would overwrite complete checkpoints of later iterations;
        set aside later ones that are corrupt (they would be overwritten, and hold nothing usable)."""
        later = [p for p in complete_checkpoints(self.save_dir) if checkpoint_iteration(p) > start_iteration]
        healthy = []
        for path in later:
            try:
                verify_checkpoint(path)
                healthy.append(path)
            except CheckpointCorruptError as err:
                self._set_aside(path, str(err))
        if healthy:
            names = ", ".join(os.path.basename(p) for p in healthy)
            raise ConfigError(f"this run starts at iteration {start_iteration} but {self.save_dir} already holds "
                              f"complete checkpoints of later iterations ({names}) that its saves would overwrite; "
                              f"give it another run_dir (or checkpoint.save_dir), or move those checkpoints away")

    def describe_start(self, start: StartPoint, rng_restored: bool) -> str:
        ck = self.cfg.checkpoint
        if start.kind == "fresh":
            return f"starting from a fresh initialisation (no checkpoint in {self.save_dir})"
        if start.kind == "pretrained":
            return (f"starting from the pretrained weights of {start.path} (checkpoint.pretrained): iteration 0, "
                    f"fresh optimizer; requeues of this job resume from its own checkpoints in {self.save_dir}")
        note = "" if rng_restored or start.iteration == 0 else " (new parallel layout: per-rank RNG states not restored)"
        how = "checkpoint.load" if start.kind == "load" else "the run's own latest checkpoint"
        ignored = (f"; checkpoint.pretrained={ck.pretrained} is not used: the run has its own checkpoints"
                   if ck.pretrained and start.kind == "resume" else "")
        return f"resumed from {start.path} at iteration {start.iteration} ({how}){note}{ignored}"

    # ------------------------------------------------------------------ saves
    def save(self, trainer, iteration: int, healthy: bool = True) -> str | None:
        """Save checkpoint `iteration` (a collective). Refuses to write NaN/Inf state; a write failure
        becomes SaveFailedError naming the intact latest checkpoint. Returns the path, or None when
        this iteration is saved already."""
        if self.last_saved == iteration:
            return None
        self.finalize_pending(blocking=True)  # one save in flight at a time, finalised in order
        if not state_is_finite(trainer.model, trainer.optimizer, self.device):
            latest = find_latest(self.save_dir)
            raise UnhealthyTrainingError(
                f"iteration {iteration}: the weights or the optimizer state hold NaN/Inf, so no checkpoint was "
                f"written; the newest checkpoint {latest or '(none)'} is healthy: lower train.lr and resume from it")
        for chunk in trainer.model:  # overlap_param_gather: the last step's all-gather must finish first
            if getattr(chunk, "use_forward_hook", False):
                chunk.start_param_sync(force_sync=True)
        start = time.time()
        try:
            path = save_checkpoint(trainer, iteration, self.save_dir, self.cfg.checkpoint.keep_last,
                                   async_queue=self.async_queue, on_complete=self._announce_saved,
                                   healthy=healthy, extra_state=trainer.extra_checkpoint_state(iteration))
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - checkpoint.py words every failure
            raise _save_failed(err) from err
        self.last_saved = iteration
        if self.async_queue is None:
            self._say(f"saved checkpoint {path} in {time.time() - start:.1f} s")
        else:
            self._pending.append(path)
            self._say(f"writing checkpoint {path} in the background")
        return path

    def _announce_saved(self, path: str) -> None:
        if self.async_queue is not None:
            self._say(f"saved checkpoint {path}")

    def finalize_pending(self, blocking: bool) -> None:
        """Finalise background saves whose writers have finished on every rank (all of them,
        waiting, when `blocking`). A collective: every rank calls it at the same point of the run."""
        if self.async_queue is None or not self.async_queue.get_num_unfinalized_calls():
            return
        try:
            done = self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - a background write failed
            path = self._pending[0] if self._pending else self.save_dir
            raise _save_failed(write_failure(err, path, self.save_dir)) from err
        for _ in done or []:
            if self._pending:
                self._pending.pop(0)

    # ------------------------------------------------------------------ stopping
    def exit_reason(self, iteration: int) -> str | None:
        """Why to stop after this iteration: a signal on any rank (all ranks must stop at the same
        iteration, hence the all-reduce), train.exit_file present, or train.exit_interval."""
        exit_file = self.cfg.train.exit_file
        flags = torch.tensor([1.0 if self.signals.requested else 0.0,
                              1.0 if exit_file and os.path.exists(exit_file) else 0.0], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, file_seen = flags.tolist()
        if signalled:
            return self.signals.requested or "exit signal on another rank"
        if file_seen:  # ranks may see a shared file system at different times: the all-reduce agrees
            return f"train.exit_file {exit_file} exists"
        interval = self.cfg.train.exit_interval
        if interval and iteration % interval == 0 and iteration < self.cfg.train.iters:
            return f"train.exit_interval={interval}"
        return None

    def install_signal_handlers(self) -> None:
        if self.cfg.checkpoint.save_on_exit_signal:
            self.signals.install()

    def close(self) -> None:
        """At the end of the run, however it ends: the signal handlers (unless an exit was asked
        for) and the run-directory lock are released. Pending saves are finalised by the loop."""
        self.signals.uninstall()
        self.release()


def _broadcast(value):
    """Rank 0's `value` on every rank (a picklable object)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
