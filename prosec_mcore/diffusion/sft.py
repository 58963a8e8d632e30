"""Supervised fine-tuning: the forward process and the loss normaliser on (prompt, response) samples.

An SFT sample (data.format=sft, docs/sft.md) is one example laid out as LLaDA's SFT lays it out:

    [ prompt tokens | response tokens | the response's EOS | EOS padding ... ]   (data.seq_length)

with two per-token masks from the data: `prompt_mask` (True at the prompt) and `pad_mask` (True
at the padding after the response's own EOS). The model learns p_theta(response | prompt):

* the prompt is never masked: the forward process masks every position as in pre-training (the
  same uniforms from (seed, sample index), diffusion/noise.py), then puts the prompt back, so the
  noise stays a pure function of (seed, sample index) and of the data;
* the prompt is never in the loss: neither the MDM term nor the corrector's term counts it;
* the corrector input y (ProSeCo) is the argmax at response positions and x at the prompt;
* padding is response in LLaDA's SFT (masked, predicted, counted); objective.sft_pad_in_loss=false
  still masks it (the model input is the same) but adds nothing to the loss or its normaliser.

The normaliser (objective.sft_normalization) is written as a weight u[i, l] per position, so that
a micro-batch of b examples contributes

    loss_mb = (1 / b) * sum_i sum_l u[i, l] * term[i, l]

    response  (default; LLaDA's SFT)  u[i, l] = 1 / n_i at counted positions, 0 elsewhere, with n_i
              the example's counted positions: response + its EOS + padding (pad_in_loss) or
              response + its EOS (not). Each example weighs the same, however long its answer,
              and the loss is the mean over examples of each example's per-token loss.
    tokens    (the pre-training normaliser)  u[i, l] = 1 / L at counted positions: the sum of the
              terms over the number of positions of the batch, prompts included.

megatron's schedule divides loss_mb by the number of micro-batches and DDP averages over
data-parallel ranks, so the step's gradient is that of (1 / G) sum over the G examples of the
global batch, for any split into ranks and micro-batches. Why `response` is the default: it is
what LLaDA (whose weights the paper fine-tunes) does (ML-GSAI/LLaDA GUIDELINES.md: the token loss
divided by the answer length, then by the batch size); with heavy EOS padding it also keeps a long
answer from dominating a batch of short ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError

SFT_NORMALIZATIONS = ("response", "tokens")


@dataclass(frozen=True)
class SFTSettings:
    """How the objective treats SFT samples (objective.sft_normalization, objective.sft_pad_in_loss)."""

    normalization: str = "response"
    pad_in_loss: bool = True

    def __post_init__(self):
        if self.normalization not in SFT_NORMALIZATIONS:
            raise ValueError(f"objective.sft_normalization={self.normalization!r} is not one of "
                             f"{', '.join(SFT_NORMALIZATIONS)}")


@dataclass
class SFTMasks:
    """What a noised SFT micro-batch adds to the pre-training one ([b, L] each, on the tokens' device)."""

    prompt: torch.Tensor  # bool: the prompt positions (never masked, never in the loss)
    counted: torch.Tensor  # bool: the positions the loss counts (response, its EOS, padding when it counts)
    weight: torch.Tensor  # float32: u[i, l], the normaliser's weight of each position (0 where not counted)


def loss_positions(prompt_mask: torch.Tensor, pad_mask: torch.Tensor, settings: SFTSettings):
    """(counted [b, L] bool, u [b, L] float32) for the given prompt and padding masks."""
    counted = ~prompt_mask if settings.pad_in_loss else ~(prompt_mask | pad_mask)
    if settings.normalization == "response":
        per_example = counted.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)  # n_i
    else:
        per_example = torch.full((counted.shape[0], 1), float(counted.shape[1]), device=counted.device)
    weight = torch.where(counted, 1.0 / per_example, torch.zeros((), device=counted.device))
    return counted, weight


def sft_masks(mb: dict, settings: SFTSettings, device) -> SFTMasks:
    """The SFT masks of micro-batch `mb`, which must carry the data's "prompt_mask" and "pad_mask"
    (a run whose data has none stops here, at its first batch, with one line: ConfigError)."""
    missing = [key for key in ("prompt_mask", "pad_mask") if key not in mb]
    if missing:
        raise ConfigError(f"data.format=sft, but the micro-batches carry no {' / '.join(missing)}: the data is "
                         f"not SFT data; preprocess it with tools/preprocess_data.py --sft (docs/sft.md)")
    prompt = torch.as_tensor(mb["prompt_mask"]).to(device=device, dtype=torch.bool)
    pad = torch.as_tensor(mb["pad_mask"]).to(device=device, dtype=torch.bool)
    if prompt.shape != mb["tokens"].shape or pad.shape != prompt.shape:
        raise ValueError(f"SFT micro-batch: prompt_mask {tuple(prompt.shape)} / pad_mask {tuple(pad.shape)} do "
                         f"not match tokens {tuple(mb['tokens'].shape)}")
    counted, weight = loss_positions(prompt, pad, settings)
    return SFTMasks(prompt=prompt, counted=counted, weight=weight)


def refuse_unexpected_prompt(mb: dict) -> None:
    """A pre-training step given SFT micro-batches would noise and score the prompts: refuse."""
    if "prompt_mask" in mb:
        raise ConfigError("the micro-batches carry a prompt mask (SFT data) but data.format=text: set "
                          "data.format=sft to train on them as (prompt, response) pairs")


def keep_prompt_clean(noised, masks: SFTMasks) -> None:
    """In place on a NoisedBatch (diffusion/noise.py): the prompt is unmasked in z_t and `masked`."""
    noised.masked = noised.masked & ~masks.prompt
    noised.noised = torch.where(masks.prompt, noised.clean, noised.noised)
    noised.sft = masks


def prompt_restored(y: torch.Tensor, noised) -> torch.Tensor:
    """The corrector input y with x at the prompt (unchanged for a pre-training batch)."""
    masks = getattr(noised, "sft", None)
    if masks is None:
        return y
    return torch.where(masks.prompt, noised.clean, y)
