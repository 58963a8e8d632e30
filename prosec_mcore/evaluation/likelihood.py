"""Likelihood metrics of a model on the validation split: the trainer's validation, and the same
numbers for any saved checkpoint.

    validation NELBO   the MDM loss at eps_valid per token; exp(NELBO) bounds the perplexity
    corrector loss     the corrector's loss on its own argmax input, as trained (w(t)-weighted)
    corrector NLL      the mean -log p_theta(x | y) per token
    corrector accuracy on errors: where y != x, how often the corrector restores x

The corrector numbers need a second forward pass (on y), half the cost of validation. A run with
objective=mdlm never trains the corrector, so its validation skips that pass and returns the NELBO
and its bound only: the corrector keys are absent (CORRECTOR_KEYS), not zero or NaN, so nothing
mistakes them for a measurement. `with_corrector=True` asks for them anyway (the corrector NLL of
an MDLM model, as a baseline for a ProSeCo one).

`validation_metrics` is what `Trainer.validate` runs; `evaluate_checkpoint` runs it on a
checkpoint of any layout, loaded at tensor-parallel size `tp` without optimizer or DDP, on the
same validation batches and noise as the run's own validation (same seed, same split sizes), so
it reproduces the logged values.
"""
from __future__ import annotations

import math
import os
import tempfile


# The metrics that only the corrector pass measures (absent when it does not run).
CORRECTOR_KEYS = ("valid_sc_loss", "valid_corrector_nll", "valid_corrector_accuracy_on_errors")


def validation_metrics(step, microbatches, noise, eval_iters: int, with_corrector: bool | None = None) -> dict:
    """Run `step` (a ProSeCoStep) forward-only over validation batches 0 .. eval_iters - 1
    (`microbatches(index)` gives this rank's micro-batches of one). with_corrector: also run the
    corrector pass and report CORRECTOR_KEYS; None: only when the step's objective is proseco."""
    import torch

    with_corrector = step.objective == "proseco" if with_corrector is None else with_corrector
    sources = {"valid_nelbo": "mdm_loss"}
    if with_corrector:
        sources.update(zip(CORRECTOR_KEYS, ("sc_loss", "corrector_nll", "corrector_accuracy_on_errors")))
    for chunk in step.model:
        chunk.eval()
    totals = dict.fromkeys(sources, 0.0)
    with torch.no_grad():
        for index in range(eval_iters):
            m = step.run(microbatches(index), noise, forward_only=True, with_corrector=with_corrector)
            for key, source in sources.items():
                totals[key] += m[source] / eval_iters
    metrics = {"valid_nelbo": totals["valid_nelbo"], "valid_ppl_bound": math.exp(min(totals["valid_nelbo"], 50.0))}
    metrics.update((key, totals[key]) for key in CORRECTOR_KEYS if with_corrector)
    return metrics


def evaluate_checkpoint(checkpoint: str, tp: int = 1, eval_iters: int | None = None, weights: str = "ema",
                        with_corrector: bool | None = None) -> dict:
    """Validation metrics of `checkpoint` (a checkpoint, or a run directory's latest). `eval_iters`
    defaults to the run's train.eval_iters, which reproduces its logged validation. weights: the
    EMA weights when the checkpoint has them (`ema`, as training validates) or the raw ones.
    with_corrector: as `validation_metrics` (None: the run's objective decides)."""
    from megatron.core import parallel_state

    from ..data import make_batch_iterator
    from ..data.sources import build_run_data
    from ..diffusion.schedules import build_schedule
    from ..training.checkpoint import load_model_for_inference
    from ..training.step import NoiseSettings, ProSeCoStep, loss_options
    from ..training.trainer import build_run_tokenizer, noise_settings, packing_settings, resolve_tokenizer_path

    model, cfg, common, path = load_model_for_inference(checkpoint, tp, weights)
    t = cfg.train
    eval_iters = eval_iters or t.eval_iters
    tok_path = resolve_tokenizer_path(cfg)
    tokenizer = build_run_tokenizer(cfg, tok_path)
    # The run's own validation set (the same request, hence the same samples in the same order),
    # larger only when more batches are asked for than the run validated on.
    valid_samples = max(eval_iters, t.eval_iters) * t.global_batch_size
    with tempfile.TemporaryDirectory(prefix="prosec_eval_") as cache:
        valid = build_run_data(cfg, tokenizer, (t.global_batch_size, valid_samples, 0), cache).valid
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        labels = None
        if cfg.data.labels:
            from ..data import load_document_labels

            labels = load_document_labels(cfg.data.labels, valid, cfg.model.num_classes)
        batches = make_batch_iterator(valid, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size,
                                      labels=labels)
        o = cfg.objective
        step = ProSeCoStep([model], model.config, o.name, loss_options(cfg), build_schedule(o.schedule, o.schedule_eps),
                           common.get("mask_id", tokenizer.mask_id), common.get("tokenizer_vocab_size", tokenizer.vocab_size),
                           cfg.data.seq_length, t.micro_batch_size, packing=packing_settings(cfg, tokenizer))
        noise: NoiseSettings = noise_settings(cfg, valid=True)
        metrics = validation_metrics(step, batches.microbatches, noise, eval_iters, with_corrector)
    metrics.update(checkpoint=os.path.abspath(path), iteration=int(common.get("iteration", 0)), eval_iters=eval_iters,
                   weights=common["weights"],
                   eval_tokens=eval_iters * t.global_batch_size * cfg.data.seq_length)
    return metrics
