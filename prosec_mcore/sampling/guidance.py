"""Classifier-free guidance (CFG) for masked diffusion samplers.

A model trained with condition dropout (the label replaced by a "null" label with some
probability) predicts both p(x | z, c) and p(x | z).  Guidance with strength gamma samples
from the tilted distribution

    log p_gamma(x | z, c) = gamma * log p(x | z, c) + (1 - gamma) * log p(x | z) + const,

renormalised over the vocabulary: gamma = 1 is plain conditional sampling (one evaluation per
call), gamma != 1 pushes further towards (or away from) the condition and costs two evaluations
per call, which the NFE counters see through ``evals_per_call``.

The samplers may also want the two predictions separately (:meth:`GuidedDenoiser.predict`,
:meth:`GuidedDenoiser.combine`) and the conditional model alone
(:meth:`GuidedDenoiser.conditional`): the reference's ProSeCo sampler runs its corrector on the
conditional model (gamma = 1), drafts from the conditional prediction, and keeps the two
predictions apart in its cache (docs/sampling.md, "Guidance and the corrector").
"""

from __future__ import annotations

from typing import Optional

import torch

from .denoiser import Denoiser


class GuidedDenoiser(Denoiser):
    """Wraps a conditional denoiser (one that accepts ``labels``) into a guided one."""

    def __init__(self, base: Denoiser, labels: torch.Tensor, null_label: int, gamma: float):
        super().__init__(base.vocab_size, base.mask_id, base.time_conditioned, evals_per_call=1 if gamma == 1 else 2)
        self.base, self.labels, self.null_label, self.gamma = base, labels.long(), null_label, gamma

    def _labels(self, tokens: torch.Tensor, labels=None) -> torch.Tensor:
        return self.labels.expand(tokens.shape[0]) if labels is None else labels

    def conditional(self, tokens, sigma, labels=None) -> torch.Tensor:
        """log p(x | z, c): the conditional model alone (gamma = 1), one evaluation."""
        return self.base(tokens, sigma, self._labels(tokens, labels))

    def predict(self, tokens, sigma, labels=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(log p(x | z, c), log p(x | z)) of one guided call; the second is None at gamma = 1,
        where it is not needed (and not evaluated)."""
        self.calls += 1  # as __call__ counts a call
        return self._predict(tokens, sigma, labels)

    def _predict(self, tokens, sigma, labels=None):
        labels = self._labels(tokens, labels)
        conditional = self.base(tokens, sigma, labels)
        if self.gamma == 1:
            return conditional, None
        return conditional, self.base(tokens, sigma, torch.full_like(labels, self.null_label))

    def combine(self, conditional: torch.Tensor, unconditional: Optional[torch.Tensor]) -> torch.Tensor:
        """The guided log-probabilities from the two predictions (renormalised)."""
        if unconditional is None:
            return conditional
        mixed = self.gamma * conditional + (1.0 - self.gamma) * unconditional
        # -inf rows (the mask id) stay -inf; avoid inf - inf = nan when gamma > 1
        return mixed.masked_fill(torch.isinf(conditional), float("-inf")).log_softmax(dim=-1)

    def logits(self, tokens, sigma, labels=None):
        return self.combine(*self._predict(tokens, sigma, labels))
