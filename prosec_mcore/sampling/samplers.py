"""Samplers: MDLM ancestral sampling, ProSeCo (MDLM + corrector loops), ReMDM remasking and
semi-autoregressive blocks with a confidence threshold.

All share one contract: ``sampler(denoiser, ..., generator=g)`` returns a
:class:`SampleResult` with the tokens and the network evaluations (NFE) it spent, split into
unmasking evaluations and corrector evaluations.  ``prompt`` / ``prompt_mask`` fix given
positions (a prefix for prompting, any positions for infilling): they start unmasked, every
step leaves them as they are, and the corrector never rewrites them.

The time grid of the diffusion samplers is t_i = 1 - i/T, i = 0..T: T steps, ending at t = 0
where alpha = 1, so no mask survives the last step (the reference ends at t = 1e-5 and leaves
the rare surviving mask in place; ending at 0 removes that corner case at no extra cost).

docs/sampling.md describes every option, which one the reference uses and why the others exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .guidance import GuidedDenoiser
from .steps import (CorrectorSettings, corrector_loop, corrector_taus, fill_masks_with_argmax, sample_categorical,
                    top_p_filter, unmask_step)


@dataclass
class SampleResult:
    tokens: torch.Tensor         # [B, L], no mask left
    nfe_unmask: int = 0          # evaluations spent on unmasking (denoising) steps
    nfe_correct: int = 0         # evaluations spent inside corrector loops
    corrector_loops: int = 0
    early_stops: int = 0         # loops that ended at a fixed point before S evaluations

    @property
    def nfe(self) -> int:
        return self.nfe_unmask + self.nfe_correct

    def stats(self) -> dict:
        return {"nfe": self.nfe, "nfe_unmask": self.nfe_unmask, "nfe_correct": self.nfe_correct,
                "corrector_loops": self.corrector_loops, "early_stops": self.early_stops}


def initial_sequence(batch_size: int, length: int, mask_id: int, prompt: Optional[torch.Tensor],
                     prompt_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """All-mask sequences with the prompt positions filled in; returns (z, frozen)."""
    z = torch.full((batch_size, length), mask_id, dtype=torch.long)
    if prompt is None:
        return z, None
    prompt = prompt.long().expand(batch_size, length)
    frozen = (prompt != mask_id) if prompt_mask is None else prompt_mask.bool().expand(batch_size, length)
    if bool((prompt[frozen] == mask_id).any()):
        raise ValueError("a fixed prompt position holds the mask token")
    return torch.where(frozen, prompt, z), frozen


def _sigma(schedule, t: float, batch_size: int) -> torch.Tensor:
    return schedule.sigma(torch.full((batch_size,), t, dtype=torch.float64))


def _alpha(schedule, t: float) -> float:
    return float(schedule.alpha(torch.tensor(t, dtype=torch.float64)))


CACHE_RULES = ("reference", "exact")


@dataclass
class _Prediction:
    """What an unmasking step draws from: ``log_probs``, or under classifier-free guidance the
    conditional and unconditional predictions (``parts``), combined when used."""

    log_probs: Optional[torch.Tensor] = None
    parts: Optional[tuple] = None

    def guided(self, denoiser) -> torch.Tensor:
        return denoiser.combine(*self.parts) if self.parts is not None else self.log_probs

    def conditional(self) -> torch.Tensor:
        return self.parts[0] if self.parts is not None else self.log_probs


def _predict(denoiser, z, sigma, labels) -> _Prediction:
    if isinstance(denoiser, GuidedDenoiser):
        return _Prediction(parts=denoiser.predict(z, sigma, labels))
    return _Prediction(log_probs=denoiser(z, sigma, labels))


def corrector_sigmas(schedule, corrector: CorrectorSettings, sigma_t: torch.Tensor, batch_size: int):
    """The time inputs of one corrector loop: sigma(tau_j), j < S (``time="tau"``), or the
    step's sigma(t) for every evaluation (``time="t"``)."""
    if corrector.time == "t":
        return sigma_t
    return [_sigma(schedule, tau, batch_size) for tau in corrector_taus(corrector.steps)]


def sample_proseco(denoiser, schedule, batch_size: int, length: int, steps: int,
                   generator: torch.Generator, corrector: Optional[CorrectorSettings] = None,
                   prompt: Optional[torch.Tensor] = None, prompt_mask: Optional[torch.Tensor] = None,
                   use_cache: bool = True, labels=None, top_p: float = 1.0,
                   cache_rule: str = "reference") -> SampleResult:
    """ProSeCo sampling (Algorithms 2 and 3); with no corrector (or S = 0) this is exactly MDLM
    ancestral sampling, draw for draw.

    Each of the ``steps`` unmasking steps draws from the network's output on z_t, top-p
    filtered. Every ``corrector.every``-th step first runs a corrector loop on the draft (z_t
    with its masks filled by argmax), writes the corrected tokens into the positions z_t had
    already unmasked, and takes its unmasking step from the corrector's last output (no extra
    evaluation).

    Reusing an output (``use_cache``), by ``cache_rule``:

    * ``reference`` (the reference's rule): when an unmasking step unmasked nothing, the next step
      draws from the same distribution without evaluating, whatever the model (time input
      included). After a corrector loop that distribution is the corrector's output on its
      draft. Without guidance the reused distribution is the top-p-filtered one, which the next
      step filters again (as the reference does); under guidance the two predictions are kept and
      combined again, a corrector loop replacing the conditional one.
    * ``exact``: reuse only an output of the very same input, and only for a model that ignores
      sigma (the output is then exactly what a new evaluation would give).
    """
    if steps < 1:
        raise ValueError(f"need at least one unmasking step, got {steps}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if cache_rule not in CACHE_RULES:
        raise ValueError(f"cache rule {cache_rule!r}: choose one of {CACHE_RULES}")
    corrector = corrector or CorrectorSettings(steps=0)
    mask_id, cost = denoiser.mask_id, denoiser.evals_per_call
    guided = isinstance(denoiser, GuidedDenoiser)
    conditional_corrector = guided and corrector.guidance == "conditional"
    corrector_net = denoiser.conditional if conditional_corrector else denoiser
    corrector_cost = 1 if conditional_corrector else cost
    z, frozen = initial_sequence(batch_size, length, mask_id, prompt, prompt_mask)
    result = SampleResult(z)
    grid = [1.0 - i / steps for i in range(steps + 1)]
    cached = None        # reference rule: what the next step draws from, if the last unmasked nothing
    last_input = None    # exact rule: (input, prediction) of the last evaluation
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        sigma = _sigma(schedule, t, batch_size)
        if cached is not None:
            prediction = cached
        elif (cache_rule == "exact" and use_cache and not denoiser.time_conditioned
              and last_input is not None and torch.equal(last_input[0], z)):
            prediction = last_input[1]
        else:
            prediction = _predict(denoiser, z, sigma, labels)
            result.nfe_unmask += cost
            last_input = (z, prediction)
        log_probs = top_p_filter(prediction.guided(denoiser), top_p)
        # what the reference keeps when this step unmasks nothing: the filtered distribution,
        # or the raw predictions under guidance
        keep = prediction if guided else _Prediction(log_probs=log_probs)
        if corrector.steps and (i + 1) % corrector.every == 0:
            draft_from = prediction.conditional() if conditional_corrector else log_probs
            draft = fill_masks_with_argmax(z, draft_from, mask_id)
            loop = corrector_loop(corrector_net, draft, corrector_sigmas(schedule, corrector, sigma, batch_size),
                                  corrector, generator, frozen, labels, top_p)
            result.nfe_correct += loop.evaluations * corrector_cost
            result.corrector_loops += 1
            result.early_stops += int(loop.stopped_early)
            z = torch.where(z != mask_id, loop.tokens, z)
            log_probs = top_p_filter(loop.log_probs, top_p)  # unguided under conditional guidance
            if conditional_corrector:
                keep = _Prediction(parts=(loop.log_probs, prediction.parts[1]))
            else:
                keep = _Prediction(log_probs=loop.log_probs)
        new_z = unmask_step(z, log_probs, _alpha(schedule, t), _alpha(schedule, s), mask_id, generator)
        reuse_next = cache_rule == "reference" and use_cache and torch.equal(new_z, z)
        cached = keep if reuse_next else None
        z = new_z
    result.tokens = z
    return result


def sample_mdlm(denoiser, schedule, batch_size: int, length: int, steps: int,
                generator: torch.Generator, **kwargs) -> SampleResult:
    """MDLM ancestral sampling (ProSeCo sampling without corrector loops)."""
    return sample_proseco(denoiser, schedule, batch_size, length, steps, generator, None, **kwargs)


def sample_remdm(denoiser, schedule, batch_size: int, length: int, steps: int,
                 generator: torch.Generator, eta: float = 0.02,
                 prompt: Optional[torch.Tensor] = None, prompt_mask: Optional[torch.Tensor] = None,
                 labels=None, top_p: float = 1.0) -> SampleResult:
    """ReMDM remasking (Wang et al. 2025, the "cap" schedule): from t to s every decoded token
    is re-masked with probability rho = min(eta, (1 - alpha_s) / alpha_t), and masked positions
    unmask with probability (alpha_s - (1 - rho) alpha_t) / (1 - alpha_t), which keeps the
    marginal mask rate 1 - alpha_s of the forward process. rho = 0 at the last step. Tokens are
    drawn from the top-p-filtered output."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ReMDM eta must be in [0, 1], got {eta}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    mask_id = denoiser.mask_id
    z, frozen = initial_sequence(batch_size, length, mask_id, prompt, prompt_mask)
    result = SampleResult(z)
    for i in range(steps):
        t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
        alpha_t, alpha_s = _alpha(schedule, t), _alpha(schedule, s)
        rho = min(eta, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else 0.0
        log_probs = top_p_filter(denoiser(z, _sigma(schedule, t, batch_size), labels), top_p)
        result.nfe_unmask += denoiser.evals_per_call
        probs = log_probs.exp() * (alpha_s - (1.0 - rho) * alpha_t)
        probs[..., mask_id] = max(1.0 - alpha_s - rho * alpha_t, 0.0)
        drawn = sample_categorical(probs, generator)
        remask = torch.rand(z.shape, generator=generator, dtype=torch.float64) < rho
        if frozen is not None:
            remask &= ~frozen
        z = torch.where(z == mask_id, drawn, torch.where(remask, torch.full_like(z, mask_id), z))
    result.tokens = z
    return result


def sample_semi_ar(denoiser, schedule, batch_size: int, length: int, block_length: int,
                   generator: torch.Generator, threshold: float = 0.9,
                   prompt: Optional[torch.Tensor] = None, prompt_mask: Optional[torch.Tensor] = None,
                   labels=None) -> SampleResult:
    """Semi-autoregressive decoding in blocks (LLaDA / Fast-dLLM style): blocks of
    ``block_length`` positions are filled left to right; within the current block each
    evaluation commits every masked position whose argmax probability exceeds ``threshold``,
    and at least the single most confident one, so a block of b positions costs at most b
    evaluations. The model sees the later blocks as masks (bidirectional attention).
    sigma is that of the current fraction of masked positions."""
    if block_length < 1 or not 0.0 < threshold <= 1.0:
        raise ValueError("block_length must be >= 1 and threshold in (0, 1]")
    del generator  # deterministic: argmax decoding
    mask_id = denoiser.mask_id
    z, _ = initial_sequence(batch_size, length, mask_id, prompt, prompt_mask)
    result = SampleResult(z)
    positions = torch.arange(length)
    for start in range(0, length, block_length):
        in_block = (positions >= start) & (positions < start + block_length)
        while True:
            candidates = (z == mask_id) & in_block
            if not bool(candidates.any()):
                break
            t = float((z == mask_id).float().mean())
            log_probs = denoiser(z, _sigma(schedule, t, batch_size), labels)
            result.nfe_unmask += denoiser.evals_per_call
            confidence, prediction = log_probs.max(dim=-1)
            confidence = confidence.masked_fill(~candidates, float("-inf"))
            commit = candidates & (confidence > math.log(threshold))
            best = confidence.argmax(dim=-1, keepdim=True)
            has_candidates = candidates.any(dim=-1, keepdim=True)
            commit |= torch.zeros_like(commit).scatter(1, best, has_candidates)
            z = torch.where(commit, prediction, z)
    result.tokens = z
    return result
