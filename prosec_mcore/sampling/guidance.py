"""Classifier-free guidance (CFG) for masked diffusion samplers.

A model trained with condition dropout (the label replaced by a "null" label with some
probability) predicts both p(x | z, c) and p(x | z).  Guidance with strength gamma samples
from the tilted distribution

    log p_gamma(x | z, c) = gamma * log p(x | z, c) + (1 - gamma) * log p(x | z) + const,

renormalised over the vocabulary: gamma = 1 is plain conditional sampling (one evaluation per
call), gamma != 1 pushes further towards (or away from) the condition and costs two evaluations
per call, which the NFE counters see through ``evals_per_call``.
"""

from __future__ import annotations

import torch

from .denoiser import Denoiser


class GuidedDenoiser(Denoiser):
    """Wraps a conditional denoiser (one that accepts ``labels``) into a guided one."""

    def __init__(self, base: Denoiser, labels: torch.Tensor, null_label: int, gamma: float):
        super().__init__(base.vocab_size, base.mask_id, base.time_conditioned, evals_per_call=1 if gamma == 1 else 2)
        self.base, self.labels, self.null_label, self.gamma = base, labels.long(), null_label, gamma

    def logits(self, tokens, sigma, labels=None):
        labels = self.labels.expand(tokens.shape[0]) if labels is None else labels
        conditional = self.base(tokens, sigma, labels)
        if self.gamma == 1:
            return conditional
        unconditional = self.base(tokens, sigma, torch.full_like(labels, self.null_label))
        mixed = self.gamma * conditional + (1.0 - self.gamma) * unconditional
        # -inf rows (the mask id) stay -inf; avoid inf - inf = nan when gamma > 1
        return mixed.masked_fill(torch.isinf(conditional), float("-inf"))
