"""The ProSeCo pre-training loop on megatron-core (the same code on GPU and on CPU).

    Trainer(cfg).train()

builds, in order: the process groups (runtime/distributed.py), the tokenizer and datasets
(data/), the model chunk of this rank (model/builder.py) wrapped in megatron-core DDP, the
optimizer and LR schedule (optim.py), and the ProSeCo step (step.py). Each iteration draws the
global batch (split over data-parallel ranks and micro-batches), runs the step, takes one
optimizer step and logs iteration, the two loss terms, learning rate, gradient norm,
tokens/s and ETA.
"""
from __future__ import annotations

import math
import os
import signal
import time

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from ..config import Config, ConfigError, validate_config
from ..config_loader import config_to_dict
from ..data import build_datasets, build_tokenizer, load_document_labels, make_batch_iterator
from ..diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME, STREAM_VALID_MASK, STREAM_VALID_TIME
from ..diffusion.schedules import build_schedule
from ..model.builder import build_model_chunks, padded_vocab_size, params_dtype
from ..model.layer_specs import attention_kernels, describe_backend
from ..perf.report import StepAccounting, startup_lines
from ..runtime import describe_cpu_compat, initialize_distributed
from ..runtime.init import init_weights_layout_independent
from .checkpoint import find_latest, load_checkpoint, save_checkpoint
from .grads import finalize_prosec_grads
from .metrics_logger import MetricsLogger
from .optim import build_optimizer, data_parallel_features, wrap_ddp
from .step import NoiseSettings, ProSeCoStep, loss_options


def resolve_data_paths(cfg: Config) -> tuple[str, str | None]:
    prefix = cfg.data.data_prefix or os.path.join(cfg.data.prepare_dir, f"{cfg.data.name}_text_document")
    tok_path = cfg.data.tokenizer.path
    if tok_path is None and cfg.data.tokenizer.kind == "hf_json":
        tok_path = os.path.join(cfg.data.prepare_dir, "tokenizer.json")
    return prefix, tok_path


def build_run_tokenizer(cfg: Config, tok_path):
    """The run's tokenizer, with the special-token names of `data.tokenizer` (None: defaults)."""
    t = cfg.data.tokenizer
    return build_tokenizer(t.kind, tok_path, mask_token=t.mask_token, eod_token=t.eod_token, pad_token=t.pad_token)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        validate_config(cfg, world_size)
        initialize_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, seed=cfg.train.seed)
        self.rank = torch.distributed.get_rank()
        self.is_logger = self.rank == 0
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()

        prefix, tok_path = resolve_data_paths(cfg)
        try:  # the data layer reports bad input (vocabulary/data mismatch, empty data) as ValueError
            self._build_data(cfg, prefix, tok_path)
        except ValueError as err:
            raise ConfigError(str(err)) from err

        t = cfg.train
        self.model = build_model_chunks(cfg, self.vocab_size)
        init_weights_layout_independent(self.model, seed=t.seed)
        self.tconfig = self.model[0].config
        self.model = wrap_ddp(self.model, self.tconfig, cfg.parallel)
        self.tconfig.finalize_model_grads_func = finalize_prosec_grads
        self.tconfig.no_sync_func = self.model[0].no_sync if len(self.model) == 1 else [m.no_sync for m in self.model]
        self.bf16 = params_dtype(t.precision) == torch.bfloat16
        self.optimizer, self.scheduler = build_optimizer(self.model, t, self.bf16, cfg.parallel)
        self.accounting = StepAccounting.for_run(cfg, padded_vocab_size(self.vocab_size), world_size)

        o = cfg.objective
        self.loss_opts = loss_options(cfg)
        self.step = ProSeCoStep(self.model, self.tconfig, o.name, self.loss_opts,
                                build_schedule(o.schedule, o.schedule_eps), self.mask_id, self.tokenizer_vocab_size,
                                cfg.data.seq_length, t.micro_batch_size)
        self.logger = MetricsLogger(cfg.run_dir, t.iters, enabled=self.is_logger,
                                    tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                    wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
                                    config_dict=config_to_dict(cfg))
        self._print_startup(prefix, tok_path)
        self.save_dir = cfg.checkpoint.save_dir or os.path.join(cfg.run_dir, "checkpoints")
        # Background checkpoint writes (megatron-core's queue of forked writers); None: synchronous saves.
        self.async_queue = AsyncCallsQueue() if cfg.checkpoint.async_save else None
        self.start_iteration = self._maybe_resume()
        self._exit_signal = None
        if cfg.checkpoint.save_on_exit_signal:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._on_exit_signal)

    # ------------------------------------------------------------------ checkpoints
    def _maybe_resume(self) -> int:
        ck = self.cfg.checkpoint
        path = ck.load
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint.load={path} does not exist")
        if path is None and ck.resume:
            path = find_latest(self.save_dir)
        if path is None:
            return 0
        self.finalize_pending_saves(blocking=True)  # a checkpoint being written must not be read
        iteration, rng_restored = load_checkpoint(self, path)
        if self.is_logger:
            note = "" if rng_restored else " (new parallel layout: per-rank RNG states not restored)"
            print(f"[prosec] resumed from {path} at iteration {iteration}{note}", flush=True)
        return iteration

    def _on_exit_signal(self, signum, frame):
        self._exit_signal = signal.Signals(signum).name

    def _exit_reason(self, iteration: int) -> str | None:
        """Why to stop after this iteration: a signal on any rank (all ranks must stop at the same
        iteration, hence the all-reduce), train.exit_file present, or train.exit_interval."""
        exit_file = self.cfg.train.exit_file
        flags = torch.tensor([1.0 if self._exit_signal else 0.0,
                              1.0 if exit_file and os.path.exists(exit_file) else 0.0], device=self.step.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, file_seen = flags.tolist()
        if signalled:
            return self._exit_signal or "exit signal on another rank"
        if file_seen:  # ranks may see a shared file system at different times: the all-reduce agrees
            return f"train.exit_file {exit_file} exists"
        interval = self.cfg.train.exit_interval
        if interval and iteration % interval == 0 and iteration < self.cfg.train.iters:
            return f"train.exit_interval={interval}"
        return None

    def save(self, iteration: int) -> str:
        """Save checkpoint `iteration`; with checkpoint.async_save it is written in the background and
        becomes COMPLETE (and `latest`) when a later `finalize_pending_saves` finds every rank done."""
        self.finalize_pending_saves(blocking=True)  # one save in flight at a time, finalised in order
        self._sync_parameters()
        path = save_checkpoint(self, iteration, self.save_dir, self.cfg.checkpoint.keep_last,
                               async_queue=self.async_queue, on_complete=self._announce_saved)
        if self.is_logger and self.async_queue is not None:
            print(f"[prosec] writing checkpoint {path} in the background", flush=True)
        return path

    def _sync_parameters(self) -> None:
        """With parallel.overlap_param_gather the all-gather of the parameters updated by the last
        optimizer step waits for the next forward pass; a checkpoint must not wait: gather now."""
        for chunk in self.model:
            if getattr(chunk, "use_forward_hook", False):
                chunk.start_param_sync(force_sync=True)

    def _announce_saved(self, path: str) -> None:
        if self.is_logger:
            print(f"[prosec] saved checkpoint {path}", flush=True)

    def finalize_pending_saves(self, blocking: bool) -> None:
        """Finalise background saves whose writers have finished on every rank (all of them, waiting,
        when `blocking`). A collective: every rank calls it at the same point of the run."""
        if self.async_queue is not None and self.async_queue.get_num_unfinalized_calls():
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    # ------------------------------------------------------------------ helpers
    def _build_data(self, cfg: Config, prefix: str, tok_path):
        self.tokenizer = build_run_tokenizer(cfg, tok_path)
        vocab = self.tokenizer.vocab_size
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary of {vocab} "
                f"(mask token included); drop model.vocab_size or use the matching tokenizer"
            )
        # The model's rows (what checkpoints and HF exports hold) may exceed the tokenizer's ids (a
        # pretrained model's padded vocabulary); the loss predicts only ids < tokenizer_vocab_size.
        self.vocab_size = cfg.model.vocab_size or vocab
        self.tokenizer_vocab_size = vocab
        self.mask_id = self.tokenizer.mask_id
        t = cfg.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        eval_samples = (t.iters // max(t.eval_interval, 1) + 2) * t.eval_iters * t.global_batch_size
        self.train_ds, self.valid_ds, _ = build_datasets(
            prefix, self.tokenizer, cfg.data.seq_length, cfg.data.split, t.seed,
            (t.iters * t.global_batch_size, eval_samples, 0), os.path.join(cfg.run_dir, "dataset_cache"),
        )
        self.labels = load_document_labels(cfg.data.labels, self.train_ds, cfg.model.num_classes) \
            if cfg.data.labels else None

    def _print_startup(self, prefix, tok_path):
        if not self.is_logger:
            return
        n_params = sum(p.numel() for m in self.model for p in m.parameters())
        cfg = self.cfg
        print(f"[prosec] device={'cuda' if torch.cuda.is_available() else 'cpu'} world={torch.distributed.get_world_size()} "
              f"tp={cfg.parallel.tp} pp={cfg.parallel.pp}{f' vpp={cfg.parallel.vpp}' if cfg.parallel.vpp else ''} "
              f"dp={self.dp_size} sp={cfg.parallel.sequence_parallel} "
              f"backend={self.model[0].module.backend} dtype={'bf16' if self.bf16 else 'fp32'}", flush=True)
        backend = self.model[0].module.backend
        for line in startup_lines(cfg, backend, describe_backend()[1], attention_kernels(backend, cfg.model.local_attention),
                                  data_parallel_features(cfg.parallel), self.bf16):
            print(line, flush=True)
        patches = describe_cpu_compat()
        if patches:
            names = sorted({line.split(" ")[0].split(":")[0] for line in patches})
            print(f"[prosec] cpu runtime: {len(patches)} megatron-core adjustments ({', '.join(names)}); "
                  f"see prosec_mcore/runtime/cpu_compat.py", flush=True)
        print(f"[prosec] model={cfg.model.name} ({cfg.model.style}, time={cfg.model.time_conditioning}) "
              f"params on rank 0: {n_params/1e6:.2f}M | vocab {self.vocab_size} (padded {padded_vocab_size(self.vocab_size, cfg.parallel.tp)})"
              + (f" of which the tokenizer's {self.tokenizer_vocab_size}" if self.tokenizer_vocab_size != self.vocab_size else "")
              + f" mask_id {self.mask_id}", flush=True)
        print(f"[prosec] objective={cfg.objective.name} schedule={cfg.objective.schedule} | data {prefix} "
              f"(train {len(self.train_ds)} samples of {cfg.data.seq_length} tokens) | tokenizer {tok_path}", flush=True)
        print(f"[prosec] global batch {cfg.train.global_batch_size} = micro {cfg.train.micro_batch_size} x "
              f"{self.num_microbatches} accumulation x dp {self.dp_size} | run dir {cfg.run_dir}", flush=True)

    def _noise(self, valid: bool) -> NoiseSettings:
        o, t = self.cfg.objective, self.cfg.train
        return NoiseSettings(
            seed=t.seed, eps=o.eps_valid if valid else o.eps_train, antithetic=o.antithetic,
            global_batch_size=t.global_batch_size,
            time_stream=STREAM_VALID_TIME if valid else STREAM_TRAIN_TIME,
            mask_stream=STREAM_VALID_MASK if valid else STREAM_TRAIN_MASK,
            cond_dropout=0.0 if valid else o.cond_dropout, null_label=self.cfg.model.num_classes,
        )

    def _next_microbatches(self, iterator):
        return [next(iterator) for _ in range(self.num_microbatches)]

    def _batches(self, dataset, start_iteration: int = 0):
        t = self.cfg.train
        return make_batch_iterator(dataset, t.global_batch_size, t.micro_batch_size, self.dp_rank, self.dp_size,
                                   start_iteration, labels=self.labels)

    # ------------------------------------------------------------------ train / validate
    def train_step(self, microbatches) -> dict:
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self.step.run(microbatches, self._noise(valid=False))
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step applies
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.cfg.train.global_batch_size)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_skipped"] = not ok
        return metrics

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation NELBO per token (the MDM loss at eps_valid; exp(NELBO) bounds the perplexity),
        the corrector's loss on its own argmax input (as trained, w(t)-weighted) and its plain
        NLL, the mean -log p_theta(x | y) per token."""
        for chunk in self.model:
            chunk.eval()
        iterator = self._batches(self.valid_ds)
        totals: dict = {}
        for _ in range(self.cfg.train.eval_iters):
            m = self.step.run(self._next_microbatches(iterator), self._noise(valid=True), forward_only=True,
                              with_corrector=True)
            for key in ("mdm_loss", "sc_loss", "corrector_nll", "corrector_accuracy_on_errors"):
                totals[key] = totals.get(key, 0.0) + m[key] / self.cfg.train.eval_iters
        return {
            "valid_nelbo": totals["mdm_loss"],
            "valid_ppl_bound": math.exp(min(totals["mdm_loss"], 50.0)),
            "valid_sc_loss": totals["sc_loss"],
            "valid_corrector_nll": totals["corrector_nll"],
            "valid_corrector_accuracy_on_errors": totals["corrector_accuracy_on_errors"],
        }

    def train(self, start_iteration: int | None = None) -> None:
        t = self.cfg.train
        ck = self.cfg.checkpoint
        start_iteration = self.start_iteration if start_iteration is None else start_iteration
        iterator = self._batches(self.train_ds, start_iteration)
        tokens_per_iter = t.global_batch_size * self.cfg.data.seq_length
        window_start, window_iters = time.time(), 0
        iteration = start_iteration
        for iteration in range(start_iteration + 1, t.iters + 1):
            begin = time.time()
            metrics = self.train_step(self._next_microbatches(iterator))
            elapsed = time.time() - begin
            window_iters += 1
            record = {"iteration": iteration, "loss": metrics["loss"], "mdm_loss": metrics["mdm_loss"],
                      "sc_loss": metrics["sc_loss"], "lr": metrics["lr"],
                      "tokens_per_s": tokens_per_iter / elapsed, "step_time_s": elapsed,
                      **self.accounting.metrics(elapsed),
                      **{k: v for k, v in metrics.items() if k not in ("loss", "mdm_loss", "sc_loss", "tokens", "lr")}}
            if t.eval_interval and (iteration % t.eval_interval == 0 or iteration == t.iters):
                record.update(self.validate())
            console = iteration % t.log_interval == 0 or iteration == t.iters or iteration == start_iteration + 1
            sec_per_iter = (time.time() - window_start) / window_iters
            self.logger.log(record, console=console, seconds_per_iter=sec_per_iter)
            self.finalize_pending_saves(blocking=False)
            saved = False
            if ck.save_interval and (iteration % ck.save_interval == 0 or iteration == t.iters):
                self.save(iteration)
                saved = True
            exit_reason = self._exit_reason(iteration)
            if exit_reason:
                if not saved:
                    self.save(iteration)
                if self.is_logger:
                    print(f"[prosec] {exit_reason}: saved iteration {iteration} and stopped; "
                          f"run the same command again to resume", flush=True)
                break
        self.finalize_pending_saves(blocking=True)  # the last checkpoint is COMPLETE before we report
        if self.is_logger:
            state = "done" if iteration >= t.iters else "stopped"
            print(f"[prosec] {state} at iteration {iteration}/{t.iters}. metrics: {self.logger.path}"
                  + (f" | tensorboard: {os.path.join(self.cfg.run_dir, 'tensorboard')}" if self.cfg.logging.tensorboard else ""),
                  flush=True)
        self.logger.close()
