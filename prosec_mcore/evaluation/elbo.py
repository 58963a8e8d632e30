"""Conditional log-likelihood of a masked diffusion LM: LLaDA's Monte-Carlo ELBO estimator.

A masked diffusion LM has no left-to-right factorisation, so ``log p(target | prefix)`` is not a
sum of next-token log-probabilities. What it does have is a lower bound (the ELBO the model was
trained on, conditioned on an unmasked prefix). In its discrete form (LLaDA, Nie et al. 2025,
eq. 6 and its lm-eval code), for a target of T tokens:

    log p(target | prefix) >= E_l E_M [ (T / l) * sum_{j in M} log p_theta(target_j | prefix, target with M masked) ]

with l uniform on 1..T and M a uniformly random set of l target positions. The prefix is never
masked; only the masked target positions enter the sum; T / l undoes the fraction l / T of the
target that one draw scores (the masked-count form of the 1/t weight of the continuous ELBO).

The estimate averages ``mc_num`` draws. As LLaDA does, the draws of l are **stratified**: one
k ~ U{1..T}, then l_i = round(k + i T / n) wrapped into 1..T for i = 0..n-1, so the n draws cover
the range of l evenly instead of clustering (same expectation, lower variance). LLaDA stratifies
within each forward batch; here the strata span all ``mc_num`` draws of a pair, so the estimate
does not depend on the batch size.

**Reproducible and order-free.**  The draws of a (prefix, target) pair come from a generator seeded
by the seed and the pair's token ids, never by its position in a request list; rows are grouped
into forward batches by sequence length (the models attend over the whole sequence with no padding
mask, so only equally long rows may share a batch) in a canonical order. The same set of pairs
therefore gives the same numbers bit for bit however it is ordered or split into calls (which is
what lets the lm-eval adapter and the project's own evaluation agree exactly).

**Time input.**  A time-conditioned network (the DiT) is told sigma(t) at t = l / T, the masked
fraction of the target (the noise level at which training masks that fraction); networks that
ignore time (LLaDA-style) are unaffected.

:func:`greedy_matches` is LLaDA's ``suffix_greedy_prediction``: is the target what greedy decoding
produces, unmasking one target token per step (the most confident)? lm-eval's ``is_greedy`` (used
by e.g. LAMBADA's accuracy) asks for it; it costs T network passes per pair, so it is optional.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Sequence

import torch

from ..diffusion.noise import mix_seed

# A stream id of its own for mix_seed (diffusion/noise.py numbers the training and sampling
# streams 1..7; evaluation draws must never coincide with those).
STREAM_ELBO = 101

Pair = tuple[Sequence[int], Sequence[int]]


def pair_key(prefix: Sequence[int], target: Sequence[int]) -> int:
    """A 63-bit key of a (prefix, target) pair's token ids (stable across runs and machines)."""
    text = ",".join(map(str, prefix)) + "|" + ",".join(map(str, target))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def pair_generator(seed: int, prefix: Sequence[int], target: Sequence[int]) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, STREAM_ELBO, pair_key(prefix, target)))


def stratified_counts(target_len: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n mask counts in 1..target_len: one k ~ U{1..T}, then round(k + i T / n) wrapped into 1..T."""
    k = int(torch.randint(1, target_len + 1, (), generator=generator))
    x = torch.round(k + torch.arange(n, dtype=torch.float64) * (target_len / n)).long()
    return (x - 1) % target_len + 1


def draw_masks(counts: torch.Tensor, target_len: int, generator: torch.Generator) -> torch.Tensor:
    """[n, T] bool: row i masks a uniformly random set of counts[i] target positions (those whose
    rank in a random permutation is below the count)."""
    ranks = torch.stack([torch.randperm(target_len, generator=generator) for _ in range(len(counts))])
    return ranks < counts.unsqueeze(1)


def mc_draws(seed: int, prefix: Sequence[int], target: Sequence[int], mc_num: int):
    """(counts [mc_num], masks [mc_num, T]) of a pair: all the randomness of its estimate."""
    g = pair_generator(seed, prefix, target)
    counts = stratified_counts(len(target), mc_num, g)
    return counts, draw_masks(counts, len(target), g)


def _sigma(schedule, fraction: torch.Tensor) -> torch.Tensor:
    return schedule.sigma(fraction.to(torch.float64)).float()


def _batches(groups: dict, batch_size: int):
    """Chunks of at most batch_size rows, each of one sequence length, in a canonical order."""
    for length in sorted(groups):
        rows = sorted(groups[length], key=lambda r: r[0])
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size]


@torch.no_grad()
def elbo_loglikelihoods(denoiser, schedule, pairs: Sequence[Pair], mc_num: int = 128, batch_size: int = 32,
                        seed: int = 0) -> list[float]:
    """The ELBO estimate of log p(target | prefix) for each (prefix, target) pair of token ids, in
    order (module docstring). An empty target has log-probability 0. ``batch_size``: rows (pair x
    draw) per network pass."""
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be >= 1, got {mc_num} and {batch_size}")
    unique = {}  # key -> (prefix, target): a pair asked for twice is estimated once
    for prefix, target in pairs:
        unique.setdefault((pair_key(prefix, target), tuple(prefix), tuple(target)), None)
    groups = defaultdict(list)  # length -> [(sort key, pair key, draw index, tokens, mask, count)]
    for key, prefix, target in unique:
        if not target:
            continue
        counts, masks = mc_draws(seed, prefix, target, mc_num)
        seq = torch.tensor(prefix + target, dtype=torch.long)
        for m in range(mc_num):
            full = torch.cat([torch.zeros(len(prefix), dtype=torch.bool), masks[m]])  # the prefix never masked
            groups[len(seq)].append(((key, m), (key, prefix, target), m, seq, full, int(counts[m])))
    terms = {k: torch.zeros(mc_num, dtype=torch.float64) for k in unique}
    for rows in _batches(groups, batch_size):
        clean = torch.stack([r[3] for r in rows])
        masked = torch.stack([r[4] for r in rows])
        counts = torch.tensor([r[5] for r in rows], dtype=torch.float64)
        target_len = torch.tensor([len(r[1][2]) for r in rows], dtype=torch.float64)
        noisy = clean.masked_fill(masked, denoiser.mask_id)
        log_probs = denoiser(noisy, _sigma(schedule, counts / target_len)).cpu()  # [b, L, V] float64
        token_lp = log_probs.gather(-1, clean.unsqueeze(-1)).squeeze(-1)
        scored = torch.where(masked, token_lp, torch.zeros_like(token_lp)).sum(dim=1)  # masked targets only
        for r, value in zip(rows, scored * target_len / counts):
            terms[r[1]][r[2]] = value
    means = {k: float(v.mean()) if k[2] else 0.0 for k, v in terms.items()}
    return [means[(pair_key(p, t), tuple(p), tuple(t))] for p, t in pairs]


@torch.no_grad()
def greedy_matches(denoiser, schedule, pairs: Sequence[Pair], batch_size: int = 32) -> list[bool]:
    """Whether each target is what greedy decoding after its prefix gives: from the target fully
    masked, each step commits the argmax at the masked position of highest confidence (LLaDA's
    ``suffix_greedy_prediction``). Pairs of the same prefix and target lengths share passes."""
    groups = defaultdict(list)
    for i, (prefix, target) in enumerate(pairs):
        groups[(len(prefix), len(target))].append(i)
    out = [True] * len(pairs)  # an empty target is trivially greedy
    for (p_len, t_len), members in sorted(groups.items()):
        if t_len == 0:
            continue
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            clean = torch.tensor([list(pairs[i][0]) + list(pairs[i][1]) for i in idx], dtype=torch.long)
            tokens = clean.clone()
            tokens[:, p_len:] = denoiser.mask_id
            rows = torch.arange(len(idx))
            for step in range(t_len):
                fraction = torch.full((len(idx),), (t_len - step) / t_len, dtype=torch.float64)
                log_probs = denoiser(tokens, _sigma(schedule, fraction)).cpu()
                confidence, proposal = log_probs.max(dim=-1)
                confidence = confidence.masked_fill(tokens != denoiser.mask_id, float("-inf"))
                where = confidence.argmax(dim=1)
                tokens[rows, where] = proposal[rows, where]
            for r, i in enumerate(idx):
                out[i] = bool((tokens[r, p_len:] == clean[r, p_len:]).all())
    return out
