"""The building blocks of every sampler: one unmasking step and one corrector loop.

Read beside docs/method.md section 2 (Algorithms 2 and 3 of the paper).

**Unmasking step (MDLM ancestral sampling).**  Going from time t to s < t, a position that is
still masked in z_t becomes token v with probability (alpha_s - alpha_t) / (1 - alpha_t) *
p_theta(v | z_t) and stays masked with probability (1 - alpha_s) / (1 - alpha_t); positions
already unmasked are copied (the "carry-over" of the absorbing process).  At s = 0 (alpha = 1)
every remaining mask is filled, so T steps on the grid t_i = 1 - i/T finish with no mask left.

**Corrector loop (ProSeCo).**  A self-correcting model has learned to map a *fully unmasked*
draft y to a better sequence.  Starting from y_0 = the current sequence with every mask replaced
by argmax p_theta(. | z_t), the loop runs S times y <- mode(p_theta(. | y)) with mode one of

* ``argmax``:  every position takes its most likely token;
* ``sample``:  every position draws from p_theta;
* ``top_k``:   only the k most confident positions whose argmax differs from y change;

and stops early once y is a fixed point (an argmax update changed nothing: evaluating again would
return the same y).  The corrected tokens are written into the positions z_t had already
unmasked; positions that were still masked are then unmasked *from the corrector's last
logits*, so the loop costs S network evaluations and the unmasking step none.

Categorical draws use the Gumbel-max trick in float64 (``probs / Exp(1)`` then argmax), as the
reference samplers do, with a private ``torch.Generator`` so a seed fixes every draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

CORRECTOR_MODES = ("argmax", "sample", "top_k")


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of (unnormalised, non-negative) ``probs [..., V]``: argmax of
    probs / E with E ~ Exp(1), in float64."""
    uniform = torch.rand(probs.shape, generator=generator, dtype=torch.float64)
    exponential = -torch.log(uniform.clamp_min(1e-300))
    return (probs.to(torch.float64) / exponential).argmax(dim=-1)


def unmask_step(z: torch.Tensor, log_probs: torch.Tensor, alpha_t: float, alpha_s: float,
                mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """z_t -> z_s: fill each masked position with prob (alpha_s - alpha_t)/(1 - alpha_t)."""
    probs = log_probs.exp() * (alpha_s - alpha_t)
    probs[..., mask_id] = 1.0 - alpha_s  # "stay masked"
    drawn = sample_categorical(probs, generator)
    return torch.where(z == mask_id, drawn, z)


def fill_masks_with_argmax(z: torch.Tensor, log_probs: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The corrector's starting draft y_0: z with every mask replaced by its argmax token."""
    return torch.where(z == mask_id, log_probs.argmax(dim=-1), z)


@dataclass
class CorrectorSettings:
    """S (``steps``) evaluations per loop, every ``every`` (omega) unmasking steps."""

    steps: int = 0
    every: int = 1
    mode: str = "argmax"
    top_k: int = 1
    early_stop: bool = True

    def __post_init__(self):
        if self.mode not in CORRECTOR_MODES:
            raise ValueError(f"corrector mode {self.mode!r}: choose one of {CORRECTOR_MODES}")
        if self.steps < 0 or self.every < 1 or self.top_k < 1:
            raise ValueError("corrector steps must be >= 0, every >= 1 and top_k >= 1")


@dataclass
class CorrectorResult:
    tokens: torch.Tensor      # y after the loop
    log_probs: torch.Tensor   # the last evaluation's output (used for the next unmasking)
    evaluations: int          # network evaluations spent (<= steps)
    stopped_early: bool


def corrector_update(y: torch.Tensor, log_probs: torch.Tensor, settings: CorrectorSettings,
                     generator: torch.Generator, frozen: Optional[torch.Tensor]) -> torch.Tensor:
    """One update y -> mode(p_theta(. | y)); ``frozen`` positions (prompts) never change."""
    if settings.mode == "sample":
        new = sample_categorical(log_probs.exp(), generator)
    else:
        new = log_probs.argmax(dim=-1)
    if settings.mode == "top_k":
        confidence = log_probs.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        confidence = confidence.masked_fill(new == y, float("-inf"))
        if frozen is not None:
            confidence = confidence.masked_fill(frozen, float("-inf"))
        k = min(settings.top_k, y.shape[1])
        top = confidence.topk(k, dim=-1)
        chosen = torch.zeros_like(y, dtype=torch.bool).scatter(1, top.indices, top.values > float("-inf"))
        new = torch.where(chosen, new, y)
    if frozen is not None:
        new = torch.where(frozen, y, new)
    return new


def corrector_loop(denoiser, y: torch.Tensor, sigma: torch.Tensor, settings: CorrectorSettings,
                   generator: torch.Generator, frozen: Optional[torch.Tensor] = None,
                   labels=None) -> CorrectorResult:
    """Run up to ``settings.steps`` corrector evaluations on the draft ``y`` (no masks)."""
    log_probs, used, stopped = None, 0, False
    for _ in range(settings.steps):
        log_probs = denoiser(y, sigma, labels)
        used += 1
        new = corrector_update(y, log_probs, settings, generator, frozen)
        fixed_point = bool((new == y).all())
        y = new
        if fixed_point and settings.early_stop and settings.mode != "sample":
            stopped = used < settings.steps
            break
    return CorrectorResult(y, log_probs, used, stopped)
