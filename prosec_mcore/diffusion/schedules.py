"""Noise schedules of the absorbing-state (masked) diffusion process.

A schedule gives alpha_t, the probability that a token is still clean at time t in [0, 1]
(alpha_0 ~ 1: nothing masked, alpha_1 ~ 0: everything masked). Everything the objective needs
follows from it:

    mask probability      1 - alpha_t
    loss weight           w(t) = -alpha'_t / (1 - alpha_t)       (the MDLM ELBO weight)
    noise level sigma     -log alpha_t                            (what the network is told)

Schedules (Sahoo et al. 2024, MDLM; Schiff et al. 2026, ProSeCo):
    loglinear  alpha_t = 1 - (1 - eps) t              w(t) = 1 / t      (the reference default)
    linear     alpha_t = 1 - t                         w(t) = 1 / t
    cosine     alpha_t = eps + (1 - eps) cos(pi t / 2)
"""
from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """Base class: subclasses define `alpha` and its time derivative `alpha_prime`."""

    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = -alpha'_t / (1 - alpha_t): the weight of the cross-entropy at time t."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise -log alpha_t, the time input of the reference DiT backbone."""
        return -torch.log(self.alpha(t))


class LogLinearSchedule(NoiseSchedule):
    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t):
        return torch.full_like(t, -(1.0 - self.eps))

    def loss_weight(self, t):
        return 1.0 / t  # exact simplification of -alpha'/(1-alpha); avoids round-off

    def sigma(self, t):
        return -torch.log1p(-(1.0 - self.eps) * t)


class LinearSchedule(NoiseSchedule):
    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return torch.full_like(t, -1.0)

    def loss_weight(self, t):
        return 1.0 / t

    def sigma(self, t):
        return -torch.log1p(-t)


class CosineSchedule(NoiseSchedule):
    name = "cosine"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return self.eps + (1.0 - self.eps) * torch.cos(t * math.pi / 2)

    def alpha_prime(self, t):
        return -(1.0 - self.eps) * (math.pi / 2) * torch.sin(t * math.pi / 2)


def build_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    """The schedule called `name` (loglinear | linear | cosine)."""
    if name == "loglinear":
        return LogLinearSchedule(eps)
    if name == "linear":
        return LinearSchedule()
    if name == "cosine":
        return CosineSchedule(eps)
    raise ValueError(f"unknown noise schedule {name!r}: use loglinear, linear or cosine")
