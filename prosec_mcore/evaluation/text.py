"""Text-sample metrics: unigram entropy, and the perplexity bound of a validation NELBO.

**Unigram entropy** catches a failure that generative perplexity rewards: a sampler that repeats
a few likely tokens ("the the the ...") gets a low (good-looking) perplexity under any evaluator
LM. MDLM and ReMDM therefore report, next to generative perplexity, the entropy of each sample's
own token histogram:

    H(x) = - sum_v p_v log p_v,   p_v = (number of positions of x holding token v) / len(x)

computed per sample in nats (natural log), then averaged over samples. A sample of L tokens
scores between 0 (one token repeated) and log L (all tokens distinct); compare samples with the
entropy of real text of the same length and tokenizer: values well below it flag repetition.
This is *not* the entropy of the token histogram of all samples pooled together.

**Perplexity bound.** A masked diffusion model's validation loss is a NELBO: an upper bound on
the negative log-likelihood, in nats per token. exp(NELBO per token) is therefore an upper bound
on the model's perplexity (the figure diffusion LM papers report as "PPL <=").
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch

Samples = Union[torch.Tensor, Sequence[Sequence[int]]]


def sample_unigram_entropy(tokens: Union[torch.Tensor, Sequence[int]],
                           ignore_ids: Iterable[int] = ()) -> float:
    """Entropy (nats) of one sample's empirical token distribution; NaN if no tokens are left
    after dropping ``ignore_ids`` (e.g. padding)."""
    tokens = torch.as_tensor(tokens).reshape(-1)
    ignore = torch.as_tensor(list(ignore_ids), dtype=tokens.dtype)
    if ignore.numel():
        tokens = tokens[~torch.isin(tokens, ignore)]
    if tokens.numel() == 0:
        return math.nan
    _, counts = torch.unique(tokens, return_counts=True)
    p = counts.double() / counts.sum()
    return float(torch.special.entr(p).sum())


def unigram_entropy(samples: Samples, ignore_ids: Iterable[int] = ()) -> float:
    """Mean over samples of :func:`sample_unigram_entropy` (MDLM/ReMDM's "entropy").

    ``samples``: a [batch, length] tensor of token ids, or a list of token-id sequences (lengths
    may differ). Tokens in ``ignore_ids`` are not counted (default: all tokens count, as in the
    reference implementations, which sample fixed-length sequences). Samples left empty are
    skipped; NaN if all are.
    """
    if isinstance(samples, torch.Tensor) and samples.dim() != 2:
        raise ValueError(f"samples must be [batch, length], got shape {tuple(samples.shape)}")
    ignore_ids = list(ignore_ids)
    values = [sample_unigram_entropy(s, ignore_ids) for s in samples]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def perplexity_bound(nelbo: float, num_tokens: Optional[float] = None) -> float:
    """exp(NELBO per token): an upper bound on perplexity.

    ``nelbo`` is per token (nats), or a sum over ``num_tokens`` tokens when that is given.
    Returns inf instead of overflowing (NELBO above ~709 nats per token).
    """
    per_token = nelbo / num_tokens if num_tokens is not None else nelbo
    try:
        return math.exp(per_token)
    except OverflowError:
        return math.inf
