"""One ProSeCo training (or validation) step on megatron-core's pipeline schedules.

The corrector input y = argmax x_theta(z_t) exists only on the *last* pipeline stage, after the
first forward. The step either runs both passes in ONE schedule call of 2m micro-batches, sending
each y_i from the last stage to the first as soon as it exists (training/one_call.py; chosen by
`schedule_mode`, "auto" when megatron's data flow makes that safe), or runs the schedule twice
over the same micro-batches (validation always does; this docstring describes that path):

    pass 1 (MDM)  forward/backward of x_theta(z_t) for every micro-batch; the last stage keeps
                  each micro-batch's argmax tokens y (a stop-gradient);
    hand-off      y is broadcast from the last stage to the pipeline group;
    pass 2 (SC)   forward/backward of x_theta(y) for every micro-batch;
    then one optimizer step on the accumulated gradients.

Because y carries no gradient, the accumulated gradient is exactly that of the joint loss
lambda_mdm L_MDM + lambda_sc L_SC (tests/unit/test_objective.py checks this). Pass 1 must neither
start data-parallel gradient reduction nor finalise gradients: megatron's schedule enables
grad sync for its last micro-batch and calls `config.finalize_model_grads_func` at its end, so
pass 1 runs with both disabled and gradients are reduced once, after pass 2. Running the passes
separately also lowers peak memory compared to holding both forwards' activations at once.

Every stage recomputes the noise of each micro-batch from (seed, sample index) (diffusion/noise.py),
so no noise tensors travel through the pipeline. The same holds for packing (`PackingSettings`,
diffusion/packing.py): every stage derives a micro-batch's attention mask (or thd packed-sequence
parameters) from its clean tokens, and variable-length cuts from (seed, sample index); both passes
of a micro-batch use the same mask, since it comes from x and not from the model input.

SFT (data.format=sft, `LossOptions.sft`; diffusion/sft.py). Every stage loads each micro-batch, its
prompt and padding masks included, so every stage keeps the prompt clean in z_t exactly as the first
one does, and the last stage scores only the response. y has x at the prompt before it leaves the
loss function, so the hand-off (broadcast or, in one call, the send to the first stage) carries it
as the corrector's input. The loss of a micro-batch of b examples is (1/b) sum u * term, u the
normaliser's weight per position; the reported mdm_loss, sc_loss and corrector_nll are the same
normalised sums over the global batch divided by its number of examples, and the fractions
(mask_fraction, corrector_input_error_rate) are per counted response position.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..diffusion import losses
from ..diffusion.noise import NoisedBatch, apply_forward_process, drop_labels, sample_times, token_uniforms
from ..diffusion.packing import PackingSettings, attention_inputs, fill_removed_positions, pack_microbatch
from ..diffusion.schedules import NoiseSchedule
from ..diffusion.sft import SFTSettings, keep_prompt_clean, prompt_restored, refuse_unexpected_prompt, sft_masks
from .faults import fault_injected
from .one_call import CorrectorInputChannel, SchedulePlan, plan_schedule

REPORT_KEYS = (
    "mdm_sum", "sc_sum", "sc_nll_sum", "tokens", "masked", "masked_correct", "errors", "errors_fixed", "removed",
    "examples", "counted",  # SFT only: examples, and positions the loss counts
)


class _PhaseClock:
    """Wall-clock seconds per phase, for benchmarks: synchronises the GPU at every lap so that
    kernels are counted, which is why training leaves it off (`enabled=False` records nothing)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.laps: dict = {}
        self._last = self._now() if enabled else 0.0

    @staticmethod
    def _now():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if not self.enabled:
            return
        now = self._now()
        self.laps[name] = now - self._last
        self._last = now


def _report(device, **values) -> dict:
    """A fixed-order vector of sums, so reports add up across micro-batches and ranks."""
    vec = torch.zeros(len(REPORT_KEYS), dtype=torch.float64, device=device)
    for key, value in values.items():
        vec[REPORT_KEYS.index(key)] = value
    return {"report": vec}


@dataclass
class NoiseSettings:
    seed: int
    eps: float
    antithetic: bool
    global_batch_size: int
    time_stream: int
    mask_stream: int
    cond_dropout: float = 0.0  # label-conditioned models: P(label -> null label)
    null_label: int = 0


def noise_microbatch(mb: dict, schedule: NoiseSchedule, settings: NoiseSettings, mask_id: int, device,
                     sft: SFTSettings | None = None) -> NoisedBatch:
    """z_t for one micro-batch: a pure function of the samples' global indices and the seed (and,
    for SFT, of the data's prompt mask: the prompt is put back after the same draw)."""
    t = sample_times(settings.seed, mb["sample_index"], mb["global_batch_index"], mb["batch_position"],
                     settings.global_batch_size, settings.eps, settings.antithetic, settings.time_stream)
    u = token_uniforms(settings.seed, mb["sample_index"], mb["tokens"].shape[1], settings.mask_stream)
    noised = apply_forward_process(mb["tokens"].to(device), t, u, schedule, mask_id)
    if "labels" in mb:
        labels = drop_labels(settings.seed, mb["sample_index"], mb["labels"], settings.cond_dropout, settings.null_label)
        noised.labels = labels.to(device)
    if sft is not None:
        keep_prompt_clean(noised, sft_masks(mb, sft, device))
    else:
        refuse_unexpected_prompt(mb)
    return noised


def loss_options(cfg) -> losses.LossOptions:
    """The objective's options, plus the cross-entropy implementation that train.* chooses and, for
    data.format=sft, the SFT settings (objective.sft_normalization, objective.sft_pad_in_loss)."""
    o, t = cfg.objective, cfg.train
    sft = SFTSettings(o.sft_normalization, o.sft_pad_in_loss) if cfg.data.format == "sft" else None
    return losses.LossOptions(o.lambda_mdm, o.lambda_sc, o.corrector_input, o.errors_upweighted,
                              o.weighted_corrector_loss,
                              t.cross_entropy_fusion_impl if t.cross_entropy_loss_fusion else "none", sft)


def _backend_of(chunk) -> str:
    """The layers a (possibly DDP-wrapped) model chunk was built with: "te" or "local" (builder.py)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return getattr(chunk, "backend", "local")


class ProSeCoStep:
    """Runs the forward/backward work of one global batch and returns its metrics.

    `vocab_size` is the tokenizer's vocabulary: ids at or beyond it (model rows of a pretrained
    vocabulary, megatron padding) and `mask_id` are never predicted (losses.invalid_vocab_mask).
    `packing` (diffusion/packing.py): document attention and variable-length samples; None, or
    settings that enable neither, run exactly the unrestricted computation.
    `loss_opts.sft` (diffusion/sft.py): SFT micro-batches (prompt kept clean and out of the loss);
    None: pre-training, whose micro-batches must carry no prompt mask.
    `schedule_mode` (train.proseco_schedule): "auto" | "one_call" | "two_call", how a ProSeCo
    training step uses megatron's schedule (training/one_call.py; `describe_schedule`)."""

    def __init__(self, model_chunks, config, objective: str, loss_opts: losses.LossOptions,
                 schedule: NoiseSchedule, mask_id: int, vocab_size: int, seq_length: int, micro_batch_size: int,
                 *, packing: PackingSettings | None = None, schedule_mode: str = "auto"):
        self.model = model_chunks
        self.config = config  # the TransformerConfig that megatron's schedule reads
        self.objective = objective
        self.opts = loss_opts
        self.schedule = schedule
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._invalid = None
        self.time_phases = False  # benchmarks set it to fill `last_timings`
        self.last_timings: dict = {}
        self.packing = packing
        self.backend = _backend_of(model_chunks[0])
        plan_schedule(schedule_mode, 1, 1, 1)  # an unknown mode fails here, at construction
        self.schedule_mode = schedule_mode
        self._plans: dict = {}
        if loss_opts.sft is not None and packing is not None and packing.restricts_attention:
            raise ValueError("data.format=sft takes one example per sample: data.document_attention and "
                             "data.variable_length_fraction do not apply; turn them off")
        if packing is not None and packing.restricts_attention and self.backend == "te" and micro_batch_size != 1:
            raise ValueError(f"data.document_attention / data.variable_length_fraction on the Transformer Engine layers "
                             f"use megatron's thd format, which takes train.micro_batch_size=1 (got {micro_batch_size})")

    # ----------------------------------------------------------------- loss functions (last stage)
    def _invalid_ids(self, logits):
        if self._invalid is None or self._invalid.shape[0] != logits.shape[-1]:
            self._invalid = losses.invalid_vocab_mask(logits.shape[-1], self.vocab_size, self.mask_id, logits.device)
        return self._invalid

    def _mdm_loss(self, nb: NoisedBatch, index: int, store: dict, scale: float, channel, logits):
        """`scale`: 2 in a one-call step (megatron divides by 2m micro-batches there, not m);
        `channel` (one call) sends y_i to the first stage at once."""
        terms = losses.mdm_terms(logits, nb.clean, nb.masked, nb.weight, self._invalid_ids(logits),
                                 self.opts.corrector_input, self.opts.cross_entropy_fusion)
        # A cut sample's removed positions (never masked, so no MDM loss) get the same input in the
        # corrector pass as in this one; an SFT prompt is given as it is (y = x there).
        pad_id = self.packing.pad_id if self.packing is not None else None
        store[index] = fill_removed_positions(nb, prompt_restored(terms.corrector_input, nb), pad_id)
        if channel is not None:
            channel.send(store[index])
        if nb.sft is not None:
            return self._sft_mdm_loss(nb, terms, store[index], scale, logits.device)
        mdm_sum = terms.per_token.sum()
        masked = nb.masked.sum().float()
        removed = {} if nb.keep is None else {"removed": (~nb.keep).sum().float()}
        report = _report(logits.device, mdm_sum=mdm_sum.detach(), tokens=float(nb.clean.numel()), masked=masked,
                         masked_correct=terms.accuracy_on_masked * masked, **removed)
        return scale * self.opts.lambda_mdm * mdm_sum / nb.clean.numel(), report

    def _sft_mdm_loss(self, nb: NoisedBatch, terms: losses.MDMTerms, y, scale: float, device):
        """The MDM loss of an SFT micro-batch: response positions only, each weighted by its
        normaliser weight u (diffusion/sft.py); divided by the micro-batch's examples."""
        counted, u = nb.sft.counted, nb.sft.weight
        mdm_sum = (terms.per_token * u).sum()
        masked = nb.masked & counted
        examples = nb.clean.shape[0]
        report = _report(device, mdm_sum=mdm_sum.detach(), tokens=float(nb.clean.numel()), examples=float(examples),
                         counted=counted.sum().float(), masked=masked.sum().float(),
                         masked_correct=((y == nb.clean) & masked).sum().float())
        return scale * self.opts.lambda_mdm * mdm_sum / examples, report

    def _sc_loss(self, nb: NoisedBatch, index: int, store: dict, scale: float, logits):
        """The corrector loss of micro-batch `index`, whose y the MDM loss left in `store`."""
        keep = nb.keep if nb.sft is None else nb.sft.counted  # SFT: response positions only
        terms = losses.sc_terms(logits, nb.clean, store[index], nb.weight, self._invalid_ids(logits), self.opts,
                                keep=keep)
        if nb.sft is not None:
            u = nb.sft.weight
            sc_sum = (terms.per_token * u).sum()
            report = _report(logits.device, sc_sum=sc_sum.detach(), sc_nll_sum=(terms.nll_per_token * u).sum(),
                             errors=terms.num_errors, errors_fixed=terms.correct_on_errors)
            return scale * self.opts.lambda_sc * sc_sum / nb.clean.shape[0], report
        sc_sum = terms.per_token.sum()
        report = _report(logits.device, sc_sum=sc_sum.detach(), sc_nll_sum=terms.nll_per_token.sum(),
                         errors=terms.num_errors, errors_fixed=terms.correct_on_errors)
        return scale * self.opts.lambda_sc * sc_sum / nb.clean.numel(), report

    # ----------------------------------------------------------------- schedule passes
    def schedule_plan(self, num_microbatches: int) -> SchedulePlan:
        """One call or two for a ProSeCo training step of `num_microbatches` per rank (cached)."""
        key = (self.schedule_mode, num_microbatches)  # benchmarks switch schedule_mode between steps
        if key not in self._plans:
            self._plans[key] = plan_schedule(
                self.schedule_mode, parallel_state.get_pipeline_model_parallel_world_size(), len(self.model),
                num_microbatches, getattr(self.config, "microbatch_group_size_per_vp_stage", None))
        return self._plans[key]

    def describe_schedule(self, num_microbatches: int) -> str:
        """One line for the trainer's start-up report: how a training step calls the schedule."""
        if self.objective != "proseco":
            return f"{self.objective} schedule: one call of {num_microbatches} micro-batches"
        return self.schedule_plan(num_microbatches).description

    def _run_pass(self, items, forward_only: bool, first_of_two: bool):
        """One call of megatron's schedule over `items` = [(model_input, sigma, labels, segments, loss_fn),
        ...] (the same list for every model chunk, or one list per chunk); `model_input` may be a
        callable that produces the input ids when the forward starts. `segments`
        (diffusion/packing.py; None: attention unrestricted) become the attention mask or thd
        parameters of this backend just for the forward that uses them."""
        per_chunk = items if items and isinstance(items[0], list) else [items] * len(self.model)
        # The interleaved schedule reads one iterator per model chunk, each over all micro-batches.
        iterator = iter(per_chunk[0]) if len(self.model) == 1 else [iter(chunk_items) for chunk_items in per_chunk]

        def forward_step(data_iterator, model):
            model_input, sigma, labels, segments, loss_fn = next(data_iterator)
            if callable(model_input):
                model_input = model_input()
            kwargs = {} if segments is None else attention_inputs(segments, self.backend)
            if labels is not None:
                kwargs["labels"] = labels
            return model(model_input, sigma, **kwargs), loss_fn

        saved = (self.config.no_sync_func, self.config.grad_sync_func, self.config.finalize_model_grads_func)
        outer = contextlib.ExitStack()
        if first_of_two and not forward_only:
            # Keep DDP in "not the last micro-batch" mode for the whole pass, and do not finalise.
            for chunk in self.model:
                if hasattr(chunk, "no_sync"):
                    outer.enter_context(chunk.no_sync())
            self.config.no_sync_func = contextlib.nullcontext
            self.config.grad_sync_func = None
            self.config.finalize_model_grads_func = None
        try:
            with outer:
                out = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iterator,
                    model=self.model,
                    num_microbatches=len(per_chunk[0]),
                    seq_length=self.seq_length,
                    micro_batch_size=self.micro_batch_size,
                    forward_only=forward_only,
                )
        finally:
            self.config.no_sync_func, self.config.grad_sync_func, self.config.finalize_model_grads_func = saved
        return out

    def _share_corrector_inputs(self, store: dict, count: int, like: torch.Tensor) -> list:
        """Send the last stage's argmax tokens of every micro-batch to all pipeline stages."""
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return [store[i] for i in range(count)]
        if parallel_state.is_pipeline_last_stage():
            stacked = torch.stack([store[i] for i in range(count)])
        else:
            stacked = torch.empty((count,) + tuple(like.shape), dtype=torch.long, device=like.device)
        torch.distributed.broadcast(stacked, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
        return list(stacked.unbind(0))

    def _one_call_items(self, noised, segments, store: dict, channel: CorrectorInputChannel) -> list:
        """Per model chunk: the m MDM micro-batches, then the m SC micro-batches (one_call.py).
        Only the first virtual stage needs y_i as input ids (received when its forward starts);
        the other stages take the shape from z_t, the last reads y_i from `store` in the loss."""
        p_rank = parallel_state.get_pipeline_model_parallel_rank()
        p_size = parallel_state.get_pipeline_model_parallel_world_size()
        mdm = [(nb.noised, nb.sigma, nb.labels, seg, partial(self._mdm_loss, nb, i, store, 2.0, channel))
               for i, (nb, seg) in enumerate(zip(noised, segments))]
        per_chunk = []
        for c in range(len(self.model)):
            first = p_rank == 0 and c == 0
            sc = []
            for i, (nb, seg) in enumerate(zip(noised, segments)):
                if not first:
                    model_input = nb.noised  # shape only: this stage's input comes from the previous one
                elif p_size == 1:
                    model_input = partial(store.__getitem__, i)
                else:
                    model_input = partial(channel.receive, nb.clean)
                sc.append((model_input, nb.sigma, nb.labels, seg, partial(self._sc_loss, nb, i, store, 2.0)))
            per_chunk.append(mdm + sc)
        return per_chunk

    def run(self, microbatches: list, noise: NoiseSettings, forward_only: bool = False, with_corrector=None,
            variable_length: bool | None = None) -> dict:
        """Forward (and backward unless forward_only) of one global batch; returns global metrics.

        variable_length: cut samples as `self.packing.variable_length_fraction` asks; None: only when
        training (not forward_only), so validation and evaluation score whole samples.
        With `self.time_phases` set, `self.last_timings` keeps the seconds spent in each phase
        (noise, mdm_pass, handoff, sc_pass; a one-call step: noise, joint_pass) for the benchmark tools.
        """
        with_corrector = self.objective == "proseco" if with_corrector is None else with_corrector
        cut = not forward_only if variable_length is None else variable_length
        clock = _PhaseClock(self.time_phases)
        noised = [noise_microbatch(mb, self.schedule, noise, self.mask_id, self.device, self.opts.sft)
                  for mb in microbatches]
        if not forward_only and fault_injected("nonfinite", int(microbatches[0]["global_batch_index"][0]) + 1):
            noised[0].weight = noised[0].weight * float("nan")  # a test's diverging batch (faults.py)
        segments = [None if self.packing is None else pack_microbatch(mb["sample_index"], nb, self.packing, cut)
                    for mb, nb in zip(microbatches, noised)]
        clock.lap("noise")
        store: dict = {}
        if with_corrector and not forward_only and self.schedule_plan(len(noised)).one_call:
            channel = CorrectorInputChannel()
            reports = list(self._run_pass(self._one_call_items(noised, segments, store, channel), False, False))
            channel.finish()
            clock.lap("joint_pass")
        else:
            items = [(nb.noised, nb.sigma, nb.labels, seg, partial(self._mdm_loss, nb, i, store, 1.0, None))
                     for i, (nb, seg) in enumerate(zip(noised, segments))]
            reports = list(self._run_pass(items, forward_only, first_of_two=with_corrector))
            clock.lap("mdm_pass")
            if with_corrector:
                ys = self._share_corrector_inputs(store, len(noised), noised[0].clean)
                clock.lap("handoff")
                # The corrector pass of a micro-batch attends exactly as its MDM pass: the same segments.
                items = [(y, nb.sigma, nb.labels, seg, partial(self._sc_loss, nb, i, store, 1.0))
                         for i, (nb, y, seg) in enumerate(zip(noised, ys, segments))]
                reports += list(self._run_pass(items, forward_only, first_of_two=False))
                clock.lap("sc_pass")
        self.last_timings = clock.laps
        return self._reduce_reports(reports, with_removed=cut and self.packing is not None
                                    and self.packing.variable_length_fraction > 0)

    def _reduce_reports(self, reports, with_removed: bool = False) -> dict:
        """Sum the per-micro-batch sums over micro-batches, data-parallel ranks and stages.
        `tokens` counts every position of the samples (the loss normaliser); with variable-length
        cuts, `removed_fraction` says which share of them was cut away."""
        total = torch.zeros(len(REPORT_KEYS), dtype=torch.float64, device=self.device)
        for r in reports:
            total += r["report"].to(device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # only the last stage has values
            torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        s = dict(zip(REPORT_KEYS, total.tolist()))
        tokens = max(s["tokens"], 1.0)
        sft = self.opts.sft is not None
        # The loss terms are divided as the loss is (SFT: u-weighted sums over the batch's examples,
        # diffusion/sft.py), the fractions by the positions the loss counts (SFT: the response's).
        per_loss = max(s["examples"], 1.0) if sft else tokens
        per_position = max(s["counted"], 1.0) if sft else tokens
        metrics = {
            "mdm_loss": s["mdm_sum"] / per_loss,
            "sc_loss": s["sc_sum"] / per_loss,
            "corrector_nll": s["sc_nll_sum"] / per_loss,
            "mask_fraction": s["masked"] / per_position,
            "denoiser_accuracy": s["masked_correct"] / max(s["masked"], 1.0),
            "corrector_accuracy_on_errors": s["errors_fixed"] / max(s["errors"], 1.0),
            "corrector_input_error_rate": s["errors"] / per_position,
            "tokens": s["tokens"],
        }
        if sft:
            metrics["response_fraction"] = s["counted"] / tokens  # the share of positions the loss counts
        if with_removed:
            metrics["removed_fraction"] = s["removed"] / tokens
        metrics["loss"] = self.opts.lambda_mdm * metrics["mdm_loss"] + self.opts.lambda_sc * metrics["sc_loss"]
        return metrics
