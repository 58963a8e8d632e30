"""Prompted sampling for SFT models: responses to a batch of prompts of different lengths.

**Layout.**  A batch of prompts becomes one tensor of the SFT training layout (contract 1 of the
SFT work, LLaDA's SFT): row r is its prompt, then ``gen_length`` masked positions to generate,
then EOS filler up to the batch's common length (longest prompt + ``gen_length``)::

    row 0:  p p p p p | M M M M M M M M | E E E
    row 1:  p p p p p p p p | M M M M M M M M |

The prompt and the filler are fixed (every sampler leaves them as they are, the corrector never
rewrites them); the response region of each row starts right after its own prompt, so a row sees
exactly what training showed the model: prompt, response, EOS padding to the end. The response
is read from the region up to (excluding) its first EOS.

*Why not an attention mask* (left-padding the prompts so that every response starts at the same
column, and masking the padding out of attention)?  The models trained here attend
bidirectionally over the whole sequence with no padding mask: the SFT layout pads with EOS
*inside* the attended sequence, and the model learns that EOS after a response is followed by
EOS. Right-side EOS filler is therefore in-distribution and needs no model support, while
left padding would put tokens the model never saw before a prompt (and the megatron model, the
Hugging Face export and LLaDA's weights would each need a padding mask threaded through). The
price: a row's filler length depends on the longest prompt of its batch, so a model may condition
slightly on it (as it does on the padding during training).

**Every sampler.**  ``blocks`` (the paper's setting, blocks.py) decodes each row's region block by
block from its own start, stops at EOS and counts NFE per row; the whole-sequence samplers
(``mdlm``, ``proseco``, ``remdm``, ``semi_ar``) denoise the regions with the prompt and filler as
fixed positions, and every row of a batch shares the batch's NFE.

Batch ``b`` (prompts ``b * batch_size`` ...) draws from its own generator seeded by (seed, b), as
``generate.generate`` does, so the responses depend on the seed and the batch size only, not on
how many data-parallel ranks share the batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .blocks import sample_blocks
from .generate import SamplerSpec, batch_generator, run_sampler


@dataclass
class PromptLayout:
    tokens: torch.Tensor   # [B, L]: prompt, gen_length masks, EOS filler
    start: torch.Tensor    # [B]: where each row's response region begins (its prompt length)
    frozen: torch.Tensor   # [B, L] bool: the prompt and the filler

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def layout_prompts(prompts: Sequence[Sequence[int]], gen_length: int, eos_id: int, mask_id: int) -> PromptLayout:
    """The batch tensor of the module docstring for ``prompts`` (token ids)."""
    if gen_length < 1:
        raise ValueError(f"the generation length must be >= 1, got {gen_length}")
    if eos_id == mask_id:
        raise ValueError(f"the EOS id {eos_id} is the mask id")
    lengths = [len(p) for p in prompts]
    length = max(lengths) + gen_length
    tokens = torch.full((len(prompts), length), eos_id, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids = torch.as_tensor(list(prompt), dtype=torch.long)
        if bool((ids == mask_id).any()):
            raise ValueError(f"prompt {r} holds the mask token (id {mask_id})")
        tokens[r, :len(ids)] = ids
        tokens[r, len(ids):len(ids) + gen_length] = mask_id
    start = torch.tensor(lengths, dtype=torch.long)
    return PromptLayout(tokens, start, tokens != mask_id)


def response_ids(row: torch.Tensor, start: int, gen_length: int, eos_id: int) -> list[int]:
    """A row's response: its region, up to and excluding the first EOS."""
    region = row[start:start + gen_length].tolist()
    return region[:region.index(eos_id)] if eos_id in region else region


def generate_batch(spec: SamplerSpec, denoiser, schedule, prompts: Sequence[Sequence[int]], gen_length: int,
                   eos_id: int, generator: torch.Generator, labels=None) -> list[dict]:
    """Responses to one batch of prompts (one dict per prompt, the keys of
    :func:`generate_responses`, plus ``batch_nfe``: the network passes of the whole batch)."""
    layout = layout_prompts(prompts, gen_length, eos_id, denoiser.mask_id)
    if spec.sampler == "blocks":
        result = sample_blocks(denoiser, schedule, layout.tokens, layout.start, gen_length, generator, spec.steps,
                               spec.block_length, eos_id=eos_id, labels=labels, **spec.block_kwargs())
        per_row = [result.row_stats(r) for r in range(len(prompts))]
    else:
        result = run_sampler(spec, denoiser, schedule, len(prompts), layout.length, generator,
                             prompt=layout.tokens, prompt_mask=layout.frozen, labels=labels)
        shared = {"nfe": result.nfe, "nfe_unmask": result.nfe_unmask, "nfe_correct": result.nfe_correct}
        per_row = [dict(shared) for _ in prompts]
    return [{"ids": response_ids(result.tokens[r], int(layout.start[r]), gen_length, eos_id), **per_row[r],
             "batch_nfe": result.nfe} for r in range(len(prompts))]


def generate_responses(spec: SamplerSpec, denoiser, schedule, prompts: list[list[int]], gen_length: int,
                       eos_id: int, seed: int, batch_size: int = 8, dp_rank: int = 0, dp_size: int = 1,
                       progress: Optional[Callable] = None) -> list[Optional[dict]]:
    """Responses to ``prompts`` (token ids), in order: per prompt ``{"ids": the response up to and
    excluding the first EOS, "nfe", "nfe_unmask", "nfe_correct": the network evaluations this
    prompt took part in, "batch_nfe": those of its whole batch, "batch": its batch index}``.

    Consecutive prompts form batches of ``batch_size``; batch b draws from the generator seeded by
    (seed, b). With ``dp_size > 1`` this rank runs batches dp_rank, dp_rank + dp_size, ... and
    leaves None for the others' prompts (gather and merge them). ``progress(done, total)`` is
    called after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[Optional[dict]] = [None] * len(prompts)
    batches = list(range(dp_rank, -(-len(prompts) // batch_size), dp_size))
    for done, b in enumerate(batches, 1):
        rows = range(b * batch_size, min((b + 1) * batch_size, len(prompts)))
        results = generate_batch(spec, denoiser, schedule, [prompts[i] for i in rows], gen_length, eos_id,
                                 batch_generator(seed, b))
        for i, result in zip(rows, results):
            out[i] = {**result, "batch": b}
        if progress:
            progress(done, len(batches))
    return out
