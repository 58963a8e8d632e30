"""The forward (masking) process, drawn as a pure function of (seed, sample identity).

Distributed training needs every random draw of the objective to be reproducible from the
sample alone, never from the rank that happens to hold it:
  * every tensor-parallel peer must mask a sample identically (otherwise their gradients
    disagree silently),
  * every pipeline stage must be able to recompute the t and mask that the first stage used,
  * a resumed run must redraw exactly the noise of the uninterrupted run,
  * changing the data-parallel size must not change the noise.

So each draw gets its own counter-based seed, mixed from (run seed, stream, index), and a private
`torch.Generator`: the per-token uniforms of a sample depend on (seed, global sample index) only;
the antithetic time offset depends on (seed, global batch index) only, and sample i of a global
batch of n gets the stratified time

    u_i = (r / n + i / n) mod 1,      t_i = (1 - eps) u_i + eps,

so the n times of a global batch cover [eps, 1] evenly (low-discrepancy), however the batch is
split across ranks and micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .schedules import NoiseSchedule

# Streams keep independent draws apart (training vs validation, time vs mask).
STREAM_TRAIN_TIME = 1
STREAM_TRAIN_MASK = 2
STREAM_VALID_TIME = 3
STREAM_VALID_MASK = 4
STREAM_SAMPLING = 5
STREAM_LABEL_DROPOUT = 6
STREAM_VARIABLE_LENGTH = 7  # which samples are cut short, and where (diffusion/packing.py)

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, stream: int, index: int) -> int:
    """A well-spread 63-bit seed for draw `index` of `stream` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def keyed_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A private CPU generator for draw `index` of `stream`: the same numbers on every rank."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(seed, stream, index))
    return gen


def _uniform(seed: int, stream: int, index: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=keyed_generator(seed, stream, index), dtype=torch.float64)


def sample_times(
    seed: int,
    sample_index: torch.Tensor,
    global_batch_index: torch.Tensor,
    batch_position: torch.Tensor,
    global_batch_size: int,
    eps: float,
    antithetic: bool = True,
    stream: int = STREAM_TRAIN_TIME,
) -> torch.Tensor:
    """Diffusion time t in [eps, 1] for each sample of a micro-batch (float64, on CPU)."""
    times = []
    for s, g, p in zip(sample_index.tolist(), global_batch_index.tolist(), batch_position.tolist()):
        if antithetic:
            r = _uniform(seed, stream, g, 1)[0].item()
            u = (r / global_batch_size + p / global_batch_size) % 1.0
        else:
            u = _uniform(seed, stream, s, 1)[0].item()
        times.append((1.0 - eps) * u + eps)
    return torch.tensor(times, dtype=torch.float64)


def token_uniforms(seed: int, sample_index: torch.Tensor, seq_length: int, stream: int = STREAM_TRAIN_MASK) -> torch.Tensor:
    """Per-token uniforms in [0, 1) of each sample, shape [b, L], float64 on CPU."""
    return torch.stack([_uniform(seed, stream, s, seq_length) for s in sample_index.tolist()])


@dataclass
class NoisedBatch:
    """One micro-batch after the forward process. All tensors live on the tokens' device."""

    clean: torch.Tensor  # x, [b, L] int64
    noised: torch.Tensor  # z_t, [b, L] int64
    masked: torch.Tensor  # positions replaced by the mask token, [b, L] bool
    t: torch.Tensor  # [b] float32
    weight: torch.Tensor  # w(t), [b] float32
    sigma: torch.Tensor  # -log alpha_t, [b] float32 (time input of the network)
    labels: Optional[torch.Tensor] = None  # class labels after condition dropout, [b] int64
    # Positions that take part in the sample, [b, L] bool; None: all of them. A variable-length cut
    # (diffusion/packing.py) removes the tail of a sample: never masked, no loss, no attention.
    keep: Optional[torch.Tensor] = None
    # SFT samples (diffusion/sft.py: SFTMasks): the prompt, kept clean in `noised` and out of
    # `masked`, and the loss positions with their normaliser weights; None: pre-training.
    sft: Optional[object] = None


def drop_labels(seed: int, sample_index: torch.Tensor, labels: torch.Tensor, p: float, null_label: int,
                stream: int = STREAM_LABEL_DROPOUT) -> torch.Tensor:
    """Condition dropout for classifier-free guidance: each sample's label becomes `null_label`
    with probability p, decided by (seed, sample index) alone, like the rest of the noise."""
    if p <= 0:
        return labels
    drop = torch.tensor([_uniform(seed, stream, s, 1).item() < p for s in sample_index.tolist()])
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def apply_forward_process(
    tokens: torch.Tensor,
    t: torch.Tensor,
    uniforms: torch.Tensor,
    schedule: NoiseSchedule,
    mask_id: int,
) -> NoisedBatch:
    """z_t: each position is masked independently with probability 1 - alpha_t."""
    t = t.to(torch.float64)
    move = uniforms < schedule.mask_probability(t)[:, None]
    move = move.to(tokens.device)
    noised = torch.where(move, torch.full_like(tokens, mask_id), tokens)
    return NoisedBatch(
        clean=tokens,
        noised=noised,
        masked=move,
        t=t.float().to(tokens.device),
        weight=schedule.loss_weight(t).float().to(tokens.device),
        sigma=schedule.sigma(t).float().to(tokens.device),
    )
