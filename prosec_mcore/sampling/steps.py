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
return the same y, and the reference reuses that output instead of evaluating; a ``sample`` loop
whose draw changed nothing likewise draws again from the same output, at no evaluation).  The corrected tokens are written into the positions z_t had already
unmasked; positions that were still masked are then unmasked *from the corrector's last
logits*, so the loop costs S network evaluations and the unmasking step none.

**Nucleus (top-p) sampling.**  With ``top_p < 1`` every distribution a token is drawn from (the
denoiser's, for unmasking, and the corrector's) keeps only its most likely tokens, in order of
probability, while their cumulative probability stays <= p (the most likely token always stays),
renormalised: :func:`top_p_filter`. Argmax is unchanged by it.

**The corrector's time input.**  The reference feeds the corrector sigma(tau_j) for its j-th
evaluation, tau_j = 1 - j (1 - 1e-5) / S (``torch.linspace(1, 1e-5, S + 1)[j]``): a schedule that
restarts at tau = 1 in every loop (``time="tau"``); ``time="t"`` feeds the sigma of the current
unmasking step instead.  Models that ignore sigma see no difference.

Categorical draws use the Gumbel-max trick in float64 (``probs / Exp(1)`` then argmax), as the
reference samplers do, with a private ``torch.Generator`` so a seed fixes every draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

CORRECTOR_MODES = ("argmax", "sample", "top_k")
CORRECTOR_TIMES = ("tau", "t")                    # the reference's sigma(tau_j); the step's sigma(t)
CORRECTOR_GUIDANCE = ("conditional", "guided")    # the reference's gamma = 1; the guided model
CORRECTOR_TAU_EPS = 1e-5                          # the reference's corrector grid ends at 1e-5


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of (unnormalised, non-negative) ``probs [..., V]``: argmax of
    probs / E with E ~ Exp(1), in float64."""
    uniform = torch.rand(probs.shape, generator=generator, dtype=torch.float64)
    exponential = -torch.log(uniform.clamp_min(1e-300))
    return (probs.to(torch.float64) / exponential).argmax(dim=-1)


def top_p_filter(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of ``log_probs [..., V]``: sort the probabilities in decreasing order,
    keep those whose cumulative sum is <= ``top_p`` and always the first (most likely) one, zero
    the rest and renormalise; returns log-probabilities (-inf where zeroed). ``top_p >= 1``
    returns the input unchanged."""
    if top_p >= 1.0:
        return log_probs
    probs = log_probs.exp()
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(dim=-1) <= top_p
    keep[..., 0] = True
    kept = sorted_probs * keep
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, order, kept).log()


def corrector_taus(steps: int) -> list[float]:
    """tau_0..tau_{S-1} of the reference's corrector time schedule: linspace(1, 1e-5, S + 1)[:S]."""
    return torch.linspace(1.0, CORRECTOR_TAU_EPS, steps + 1, dtype=torch.float64)[:steps].tolist()


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
    """S (``steps``) evaluations per loop, every ``every`` (omega) unmasking steps.

    ``time``: the time input of the corrector's evaluations, ``tau`` (the reference: sigma(tau_j)
    with tau_j running from 1 towards 0 inside each loop) or ``t`` (the current step's sigma).
    ``guidance``: under classifier-free guidance, ``conditional`` (the reference: the loop runs
    on the conditional model, gamma = 1, starts from the conditional prediction's argmax, and the
    unmasking step after it uses its output unguided) or ``guided`` (the guided model throughout).
    """

    steps: int = 0
    every: int = 1
    mode: str = "argmax"
    top_k: int = 1
    early_stop: bool = True
    time: str = "tau"
    guidance: str = "conditional"

    def __post_init__(self):
        if self.mode not in CORRECTOR_MODES:
            raise ValueError(f"corrector mode {self.mode!r}: choose one of {CORRECTOR_MODES}")
        if self.time not in CORRECTOR_TIMES:
            raise ValueError(f"corrector time {self.time!r}: choose one of {CORRECTOR_TIMES}")
        if self.guidance not in CORRECTOR_GUIDANCE:
            raise ValueError(f"corrector guidance {self.guidance!r}: choose one of {CORRECTOR_GUIDANCE}")
        if self.steps < 0 or self.every < 1 or self.top_k < 1:
            raise ValueError("corrector steps must be >= 0, every >= 1 and top_k >= 1")


@dataclass
class CorrectorResult:
    tokens: torch.Tensor      # y after the loop
    log_probs: torch.Tensor   # the last evaluation's output, before top-p (the next unmasking's input)
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


def corrector_loop(denoiser, y: torch.Tensor, sigma: Union[torch.Tensor, Sequence[torch.Tensor]],
                   settings: CorrectorSettings, generator: torch.Generator,
                   frozen: Optional[torch.Tensor] = None, labels=None, top_p: float = 1.0) -> CorrectorResult:
    """Run up to ``settings.steps`` corrector evaluations on the draft ``y`` (no masks).

    ``sigma``: one tensor ``[B]`` for every evaluation, or one per evaluation (S tensors).
    ``denoiser``: any ``f(tokens, sigma, labels) -> log-probs``. The updates draw from the
    top-p-filtered output; the result keeps the unfiltered one.
    """
    sigmas = [sigma] * settings.steps if isinstance(sigma, torch.Tensor) else list(sigma)
    if len(sigmas) != settings.steps:
        raise ValueError(f"need {settings.steps} corrector time inputs, got {len(sigmas)}")
    log_probs, used, reuse = None, 0, False
    for j in range(settings.steps):
        if not reuse:
            log_probs = denoiser(y, sigmas[j], labels)
            used += 1
        new = corrector_update(y, top_p_filter(log_probs, top_p), settings, generator, frozen)
        unchanged = bool((new == y).all())
        y = new
        reuse = unchanged and settings.early_stop
        if reuse and settings.mode != "sample":
            break  # a fixed point: every further update would return this y again
    return CorrectorResult(y, log_probs, used, used < settings.steps)
