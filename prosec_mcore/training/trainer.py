"""The ProSeCo pre-training loop on megatron-core (the same code on GPU and on CPU).

    trainer = Trainer(cfg)      # processes, data, model, optimizer; where the run starts
    trainer.train()             # iterate, validate, save; raises RunError when a run must stop

builds, in order: the process groups (runtime/distributed.py), the run's lifecycle (lifecycle.py:
the run-directory lock, where to start, saves, signals), the tokenizer and datasets (data/), the
model chunks of this rank (model/builder.py) wrapped in megatron-core DDP, the optimizer and LR
schedule (optim.py), the ProSeCo step (step.py) and the health guard (health.py). Each iteration
draws the global batch (split over data-parallel ranks and micro-batches), runs
`forward_backward`, lets the health guard judge the loss and gradient norm, applies the update
(`optimizer_step`), and logs iteration, the two loss terms, learning rate, gradient norm,
tokens/s and ETA.

Public API for tools and tests: `microbatches`, `forward_backward`, `optimizer_step`,
`train_step`, `validate`, `train`, the `objective` property, `add_gradient_hook`, `close`, and the
attributes `model` (DDP-wrapped chunks), `optimizer`, `cfg`, `ema` (the weights' EMA, ema.py, or
None) and `step` (the ProSeCoStep, whose `time_phases`/`last_timings` the benchmarks read).
"""
from __future__ import annotations

import os
import time

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from ..config import Config, ConfigError, validate_config
from ..config_loader import config_to_dict
from ..data import build_tokenizer, load_document_labels, make_batch_iterator
from ..data.loader import BatchLoader, describe_loading
from ..data.sources import build_run_data, data_state, data_state_changes
from ..diffusion.packing import PackingSettings
from ..diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME, STREAM_VALID_MASK, STREAM_VALID_TIME
from ..diffusion.schedules import build_schedule
from ..evaluation.likelihood import validation_metrics
from ..model.builder import build_model_chunks, padded_vocab_size, params_dtype
from ..model.layer_specs import attention_kernels, describe_backend
from ..perf.report import StepAccounting, startup_lines
from ..runtime import describe_cpu_compat, initialize_distributed
from ..runtime.init import init_weights_layout_independent
from .checkpoint import find_latest, load_checkpoint, load_weights
from .ema import WeightEMA
from .health import APPLY, SKIP, STOP, HealthGuard
from .lifecycle import RunLifecycle, StartPoint, UnhealthyTrainingError
from .metrics_logger import MetricsLogger
from .optim import build_optimizer, data_parallel_features, schedule_on_resume, wrap_ddp
from .step import NoiseSettings, ProSeCoStep, loss_options


def resolve_tokenizer_path(cfg: Config) -> str | None:
    """data.tokenizer.path, or for `hf_json` the tokenizer prepared with the corpus (<prepare_dir>);
    where the samples come from is data/sources.py's."""
    tok_path = cfg.data.tokenizer.path
    if tok_path is None and cfg.data.tokenizer.kind == "hf_json":
        tok_path = os.path.join(cfg.data.prepare_dir, "tokenizer.json")
    return tok_path


def build_run_tokenizer(cfg: Config, tok_path):
    """The run's tokenizer, with the special-token names of `data.tokenizer` (None: defaults)."""
    t = cfg.data.tokenizer
    return build_tokenizer(t.kind, tok_path, mask_token=t.mask_token, eod_token=t.eod_token, pad_token=t.pad_token)


def packing_settings(cfg: Config, tokenizer) -> PackingSettings | None:
    """Document attention and variable-length cuts (data.document_attention,
    data.variable_length_fraction; diffusion/packing.py), or None when both are off."""
    d = cfg.data
    if not d.document_attention and not d.variable_length_fraction:
        return None
    return PackingSettings(document_attention=d.document_attention, eod_id=tokenizer.eod,
                           variable_length_fraction=d.variable_length_fraction, seed=cfg.train.seed,
                           pad_id=tokenizer.pad)


def noise_settings(cfg: Config, valid: bool) -> NoiseSettings:
    """The diffusion noise of the run's training (or validation) batches: seed, eps, RNG streams."""
    o, t = cfg.objective, cfg.train
    return NoiseSettings(
        seed=t.seed, eps=o.eps_valid if valid else o.eps_train, antithetic=o.antithetic,
        global_batch_size=t.global_batch_size,
        time_stream=STREAM_VALID_TIME if valid else STREAM_TRAIN_TIME,
        mask_stream=STREAM_VALID_MASK if valid else STREAM_TRAIN_MASK,
        cond_dropout=0.0 if valid else o.cond_dropout, null_label=cfg.model.num_classes,
    )


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
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.run = RunLifecycle(cfg, self.device, self.is_logger)
        self.run.acquire()  # before anything is written into the run directory
        self.logger = None
        try:
            self._build(cfg, world_size)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config, world_size: int) -> None:
        tok_path = resolve_tokenizer_path(cfg)
        try:  # the data layer reports bad input (vocabulary/data mismatch, empty data) as ValueError
            self._build_data(cfg, tok_path)
        except ValueError as err:
            raise ConfigError(str(err)) from err

        t = cfg.train
        start = self.run.choose_start()
        # No random draw at construction (runtime/init.py): a fresh run draws each rank's shards of the
        # layout-independent initialisation; a resumed, loaded or pretrained run reads its weights.
        self.model = build_model_chunks(cfg, self.vocab_size, random_init=False)
        if start.kind == "fresh":
            init_weights_layout_independent(self.model, seed=t.seed)
        self.tconfig = self.model[0].config
        self.model = wrap_ddp(self.model, self.tconfig, cfg.parallel)
        # megatron-core's own gradient finalisation: DP reduction, SP norm reduction across TP, and
        # (config.has_cond_embedder) the sum of the time-embedder copies over the pipeline stages.
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = self.model[0].no_sync if len(self.model) == 1 else [m.no_sync for m in self.model]
        self.bf16 = params_dtype(t.precision) == torch.bfloat16
        self.optimizer, self.scheduler = build_optimizer(self.model, t, self.bf16, cfg.parallel)
        self.ema = WeightEMA(self.model, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        self.accounting = StepAccounting.for_run(cfg, padded_vocab_size(self.vocab_size), world_size)

        o = cfg.objective
        self.loss_opts = loss_options(cfg)  # with data.format=sft, the SFT settings (diffusion/sft.py)
        self.step = ProSeCoStep(self.model, self.tconfig, o.name, self.loss_opts,
                                build_schedule(o.schedule, o.schedule_eps), self.mask_id, self.tokenizer_vocab_size,
                                cfg.data.seq_length, t.micro_batch_size, packing=packing_settings(cfg, self.tokenizer),
                                schedule_mode=t.proseco_schedule)
        try:  # megatron's interleaved schedule may refuse 2m micro-batches in one call: say so now
            self.schedule_line = self.step.describe_schedule(self.num_microbatches)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.health = HealthGuard(cfg.health, self.device)
        self._gradient_hooks = []
        self.logger = MetricsLogger(cfg.run_dir, t.iters, enabled=self.is_logger,
                                    tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                    wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
                                    config_dict=config_to_dict(cfg))
        self._print_startup(tok_path)
        self.start_iteration = self._restore(start)
        self.run.install_signal_handlers()

    def _restore(self, start: StartPoint) -> int:
        """Load what `start` names (lifecycle.choose_start decided) and say what was used."""
        rng_restored = False
        iteration = 0
        # What a Hugging Face import recorded of its source (config, generation config, dtype):
        # carried into this run's checkpoints so that an export after training writes the
        # source family's config and ids (hf/convert.py).
        self.hf_source = (start.common or {}).get("hf_source")
        if start.kind == "pretrained":
            load_weights(self, start.path, start.common)
            if self.ema is not None:
                self.ema.reset()  # the average starts at the pretrained weights
        elif start.kind in ("load", "resume"):
            mode = "checkpoint"
            if not start.common.get("model_only"):
                mode, note = schedule_on_resume(start.common["config"].get("train", {}), self.cfg.train, start.path)
                self.scheduler.override_opt_param_scheduler = mode == "config"
                self.scheduler.use_checkpoint_opt_param_scheduler = mode == "checkpoint"
                if note and self.is_logger:
                    print(f"[prosec] {note}", flush=True)
            # megatron's param groups carry their own max_lr/min_lr, which the optimizer state restores
            # from the checkpoint: with this run's schedule, they must be this run's again.
            peaks = [(g.get("max_lr"), g.get("min_lr")) for g in self.optimizer.param_groups]
            iteration, rng_restored = load_checkpoint(self, start.path, start.common)
            if mode == "config":
                for group, (max_lr, min_lr) in zip(self.optimizer.param_groups, peaks):
                    group["max_lr"], group["min_lr"] = max_lr, min_lr
                self.scheduler.step(increment=0)  # the rate of the resumed step under this run's schedule
            self.health.load_state_dict(start.common.get("health", {}))
            changes = data_state_changes(start.common.get("data"), self.data.identity)
            if changes and self.is_logger:
                print(f"[prosec] note: the data differ from the checkpoint's ({'; '.join(changes)}): from iteration "
                      f"{iteration + 1} on, the batches are not those the saved run would have read", flush=True)
            self.run.last_saved = iteration
        if self.is_logger:
            print(f"[prosec] {self.run.describe_start(start, rng_restored)}", flush=True)
        return iteration

    @property
    def save_dir(self) -> str:
        """Where this run's checkpoints are (checkpoint.save_dir, or <run_dir>/checkpoints)."""
        return self.run.save_dir

    def extra_checkpoint_state(self, iteration: int) -> dict:
        """What a checkpoint keeps besides model, optimizer, schedule and RNG: the guard's counters,
        the data's identity and position (data/sources.py), and the Hugging Face source of
        imported weights."""
        extra = {"health": self.health.state_dict(),
                 "data": data_state(self.data.identity, iteration, self.cfg.train.global_batch_size, self.train_ds)}
        if self.hf_source:
            extra["hf_source"] = self.hf_source
        return extra

    def close(self) -> None:
        """Release the run directory and the logger (also called when construction fails)."""
        if self.logger is not None:
            self.logger.close()
        self.run.close()

    # ------------------------------------------------------------------ objective
    @property
    def objective(self) -> str:
        """The objective the next steps train: `proseco` or `mdlm` (benchmarks switch it)."""
        return self.step.objective

    @objective.setter
    def objective(self, name: str) -> None:
        if name not in ("proseco", "mdlm"):
            raise ValueError(f"objective must be proseco or mdlm, not {name!r}")
        self.step.objective = name

    def add_gradient_hook(self, hook) -> None:
        """Call `hook(trainer, iteration)` after each iteration's gradients are final (reduced over
        every parallel group) and before the update is applied: gradient checks and statistics."""
        self._gradient_hooks.append(hook)

    # ------------------------------------------------------------------ helpers
    def _build_data(self, cfg: Config, tok_path):
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
        # Validation reads the same eval_iters global batches every time (`validate`): that is all it needs.
        eval_samples = t.eval_iters * t.global_batch_size if t.eval_interval else 0
        self.data = build_run_data(cfg, self.tokenizer, (t.iters * t.global_batch_size, eval_samples, 0),
                                   os.path.join(cfg.run_dir, "dataset_cache"))
        self.train_ds, self.valid_ds = self.data.train, self.data.valid
        self.labels = load_document_labels(cfg.data.labels, self.train_ds, cfg.model.num_classes) \
            if cfg.data.labels else None

    def _print_startup(self, tok_path):
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
        if cfg.data.format == "sft":  # endless (a fresh order every epoch) over a known number of examples
            size = f"{len(self.train_ds)} examples, one per sample,"
        else:
            size = "streamed samples" if getattr(self.train_ds, "endless", False) else f"{len(self.train_ds)} samples"
        print(f"[prosec] objective={cfg.objective.name} schedule={cfg.objective.schedule} | data {self.data.description} "
              f"(train {size} of {cfg.data.seq_length} tokens) | tokenizer {tok_path}", flush=True)
        if cfg.objective.name == "proseco":
            print(f"[prosec] {self.schedule_line}", flush=True)
        d = cfg.data
        if d.format == "sft":
            o = cfg.objective
            print(f"[prosec] SFT: prompts never masked and never in the loss; loss normalised per "
                  f"{'example by its response length, then averaged over examples' if o.sft_normalization == 'response' else 'position (as pre-training)'}"
                  f"; EOS padding {'counted as response' if o.sft_pad_in_loss else 'noised but out of the loss'} "
                  f"(objective.sft_normalization={o.sft_normalization}, sft_pad_in_loss={o.sft_pad_in_loss})", flush=True)
        if d.document_attention or d.variable_length_fraction:
            parts = (["document attention: no position attends across an EOD"] if d.document_attention else []) + (
                [f"variable length: {d.variable_length_fraction:.3g} of the training samples cut to a random length "
                 f"(the rest takes no part)"] if d.variable_length_fraction else [])
            print(f"[prosec] packing: {' | '.join(parts)}", flush=True)
        if self.ema is not None:
            print(f"[prosec] EMA of the weights: decay {cfg.train.ema_decay}"
                  f"{' with warm-up min(decay, (1+n)/(10+n))' if cfg.train.ema_warmup else ''}; validation, "
                  f"sampling and export use the EMA weights", flush=True)
        print(f"[prosec] global batch {cfg.train.global_batch_size} = micro {cfg.train.micro_batch_size} x "
              f"{self.num_microbatches} accumulation x dp {self.dp_size}, assembled "
              f"{describe_loading(cfg.data.num_workers, cfg.data.prefetch)} | run dir {cfg.run_dir}", flush=True)

    def noise_settings(self, valid: bool) -> NoiseSettings:
        """The diffusion noise of a training (or validation) batch: seed, eps, the RNG streams."""
        return noise_settings(self.cfg, valid)

    def microbatches(self, index: int, split: str = "train") -> list:
        """This rank's micro-batches of global batch `index` (0-based) of the `train` or `valid`
        split. Training iteration k (as logged, from 1) reads training batch k - 1; validation
        always reads validation batches 0 .. eval_iters - 1."""
        return self._batches({"train": self.train_ds, "valid": self.valid_ds}[split]).microbatches(index)

    def _batches(self, dataset):
        """This rank's share of the global batches of `dataset` (data/batches.py)."""
        t = self.cfg.train
        return make_batch_iterator(dataset, t.global_batch_size, t.micro_batch_size, self.dp_rank, self.dp_size,
                                   labels=self.labels)

    # ------------------------------------------------------------------ one iteration
    def forward_backward(self, microbatches) -> dict:
        """Forward and backward of one global batch (both ProSeCo passes): afterwards the gradients
        are final, reduced over every parallel group, and the optimizer has not stepped. Returns
        the batch's global metrics (loss terms, accuracies)."""
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self.step.run(microbatches, self.noise_settings(valid=False))

    def optimizer_step(self, iteration: int, loss: float) -> dict:
        """Judge the iteration (health guard) and apply its update unless it must be skipped or the
        run stopped. Returns lr (the rate this step applies), grad_norm (the norm clipping uses:
        of the gradients counted once across TP, PP and DP) and `update` (applied | skipped |
        stopped, with the reason in `health_note`)."""
        out = {"lr": self.optimizer.param_groups[0]["lr"]}
        self.optimizer.prepare_grads()  # megatron: main grads from the model grads (idempotent)
        grad_norm = float(self.optimizer.get_grad_norm())
        verdict = self.health.agree(self.health.judge(iteration, loss, grad_norm))
        self.health.record(iteration, verdict, loss)
        out.update(grad_norm=grad_norm, update={APPLY: "applied", SKIP: "skipped", STOP: "stopped"}[verdict.action])
        if verdict.reason:
            out["health_note"] = verdict.reason
        if verdict.action == APPLY:
            # megatron's step prepares the grads again and recomputes the same norm for clipping:
            # the price of calling its public step() (a pass over the gradients) is small.
            ok, _, _ = self.optimizer.step()
            if ok:
                self.scheduler.step(increment=self.cfg.train.global_batch_size)
                if self.ema is not None:
                    self._update_ema()
            else:  # fp16 loss scaling found inf/nan: megatron skipped the update itself
                out["update"] = "skipped"
        return out

    def train_step(self, microbatches, iteration: int = 0) -> dict:
        """`forward_backward`, the gradient hooks, then `optimizer_step`: one training iteration."""
        metrics = self.forward_backward(microbatches)
        for hook in self._gradient_hooks:
            hook(self, iteration)
        metrics.update(self.optimizer_step(iteration, metrics["loss"]))
        return metrics

    def _update_ema(self) -> None:
        if self.cfg.parallel.overlap_param_gather:
            # the distributed optimizer's all-gather of the updated weights would otherwise wait
            # for the next forward (Megatron-LM's force_param_sync): the EMA needs them now
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)
        self.ema.update()

    def validate(self, weights: str | None = None) -> dict:
        """Validation NELBO, its perplexity bound, the corrector's loss and NLL on the validation
        split (evaluation/likelihood.py), the same batches and noise every time. weights: `ema`
        (the default when the run keeps an EMA, as the reference validates) or `raw`."""
        weights = weights or ("ema" if self.ema is not None else "raw")
        if weights == "ema" and self.ema is None:
            raise ValueError("validate(weights='ema') needs train.ema_decay > 0")
        run = lambda: validation_metrics(self.step, lambda index: self.microbatches(index, "valid"),  # noqa: E731
                                         self.noise_settings(valid=True), self.cfg.train.eval_iters)
        if weights == "raw":
            return run()
        with self.ema.swapped_in():
            return run()

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        """Train from `start_iteration` to train.iters, validating, saving and logging; stops
        early (after saving) on a signal, train.exit_file or train.exit_interval. Raises
        UnhealthyTrainingError or SaveFailedError (lifecycle.py) when the run cannot go on."""
        try:
            self._train()
        finally:
            self.close()

    def _train(self) -> None:
        t = self.cfg.train
        if self.start_iteration >= t.iters and self.is_logger:
            print(f"[prosec] nothing to do: the run is at iteration {self.start_iteration} and train.iters={t.iters}; "
                  f"raise train.iters to train further", flush=True)
        loader = self.batch_loader(self.start_iteration)
        try:
            self._iterate(loader)
        finally:
            loader.close()

    def batch_loader(self, start_index: int) -> BatchLoader:
        """The training batches from global batch `start_index` (0-based) to train.iters, assembled
        ahead of the loop as data.num_workers / data.prefetch say (data/loader.py)."""
        d = self.cfg.data
        return BatchLoader(self._batches(self.train_ds), start_index, self.cfg.train.iters, d.num_workers, d.prefetch)

    def _iterate(self, loader: BatchLoader) -> None:
        t, ck = self.cfg.train, self.cfg.checkpoint
        tokens_per_iter = t.global_batch_size * self.cfg.data.seq_length
        window_start, window_iters = time.time(), 0
        iteration = self.start_iteration
        for iteration in range(self.start_iteration + 1, t.iters + 1):
            _, microbatches = next(loader)
            begin = time.time()
            metrics = self.train_step(microbatches, iteration)
            elapsed = time.time() - begin
            window_iters += 1
            record = {"iteration": iteration, "loss": metrics["loss"], "mdm_loss": metrics["mdm_loss"],
                      "sc_loss": metrics["sc_loss"], "lr": metrics["lr"],
                      "tokens_per_s": tokens_per_iter / elapsed, "step_time_s": elapsed,
                      "data_wait_s": loader.wait_s,
                      **self.accounting.metrics(elapsed),
                      **{k: v for k, v in metrics.items() if k not in ("loss", "mdm_loss", "sc_loss", "tokens", "lr")}}
            stop = metrics["update"] == "stopped"
            if not stop and t.eval_interval and (iteration % t.eval_interval == 0 or iteration == t.iters):
                record.update(self.validate())
            console = (iteration % t.log_interval == 0 or iteration == t.iters or iteration == self.start_iteration + 1
                       or "health_note" in metrics)
            self.logger.log(record, console=console, seconds_per_iter=(time.time() - window_start) / window_iters)
            if "health_note" in metrics and self.is_logger:
                print(f"[prosec] health: {metrics['health_note']} -> update {metrics['update']}", flush=True)
            if stop:
                self._stop_unhealthy(iteration, metrics["health_note"])
            self.run.finalize_pending(blocking=False)
            if ck.save_interval and iteration % ck.save_interval == 0:
                self.save(iteration)
            exit_reason = self.run.exit_reason(iteration)
            if exit_reason:
                begin = time.time()
                self.save(iteration)
                self.run.finalize_pending(blocking=True)
                if self.is_logger:
                    print(f"[prosec] {exit_reason}: saved iteration {iteration} in {time.time() - begin:.1f} s and "
                          f"stopped; run the same command again to resume", flush=True)
                break
        else:
            if ck.save_at_end and iteration > self.start_iteration:
                self.save(iteration)
        self.run.finalize_pending(blocking=True)  # the last checkpoint is COMPLETE before we report
        if self.is_logger:
            state = "done" if iteration >= t.iters else "stopped"
            saved = f" | checkpoints: {self.save_dir}" if self.run.last_saved is not None else ""
            print(f"[prosec] {state} at iteration {iteration}/{t.iters}. metrics: {self.logger.path}"
                  + (f" | tensorboard: {os.path.join(self.cfg.run_dir, 'tensorboard')}" if self.cfg.logging.tensorboard else "")
                  + saved, flush=True)

    def save(self, iteration: int) -> str | None:
        """Save checkpoint `iteration` (a collective; see lifecycle.RunLifecycle.save)."""
        return self.run.save(self, iteration, healthy=self.health.healthy_at(iteration))

    def _stop_unhealthy(self, iteration: int, reason: str) -> None:
        self.run.finalize_pending(blocking=True)
        latest = find_latest(self.save_dir)
        keep = (f"the newest checkpoint, {latest}, holds healthy weights" if latest else
                "no checkpoint has been written yet")
        raise UnhealthyTrainingError(
            f"{reason}: the update was not applied and nothing was saved from it; {keep}. Lower train.lr (or "
            f"raise train.lr_warmup_iters) and run again to resume, or set health.nonfinite=skip to skip such updates")
