"""Generate many samples in batches with one sampler spec, reproducibly.

Batch ``b`` of a run draws from its own generator seeded by (seed, b), so the samples depend on
the seed and the batch size only: not on how many data-parallel ranks share the work (rank r of
D takes batches r, r + D, ...) nor on the tensor-parallel size (every TP rank draws the same
tokens).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..diffusion.noise import STREAM_SAMPLING, mix_seed
from .blocks import EOS_STOPS, REMASKING, sample_blocks_prefix
from .samplers import CACHE_RULES, SampleResult, sample_proseco, sample_remdm, sample_semi_ar
from .steps import CorrectorSettings

SAMPLERS = ("mdlm", "proseco", "remdm", "semi_ar", "blocks")
SEMI_AR_THRESHOLD = 0.9  # semi_ar's threshold when none is given (blocks: None = k tokens per step)


@dataclass
class SamplerSpec:
    """Which sampler, and its knobs (docs/sampling.md). ``corrector`` is used by ``proseco`` and
    ``blocks``."""

    sampler: str = "proseco"
    steps: int = 32                # T unmasking steps (mdlm, proseco, remdm); blocks: over all blocks
    corrector: CorrectorSettings = field(default_factory=CorrectorSettings)
    use_cache: bool = True         # mdlm/proseco: reuse an output when allowed (cache_rule)
    eta: float = 0.02              # remdm
    block_length: int = 8          # semi_ar, blocks
    threshold: Optional[float] = None  # semi_ar (None: 0.9); blocks (None: k tokens per step)
    top_p: float = 1.0             # mdlm/proseco/remdm: nucleus sampling, 1 = off (reference OWT: 0.9)
    cache_rule: str = "reference"  # mdlm/proseco: "reference" or "exact" (samplers.sample_proseco)
    remasking: str = "low_confidence"  # blocks: which k positions a step commits (or "random")
    temperature: float = 0.0       # blocks: 0 = argmax proposals, T > 0 = Gumbel draws at T
    eos_stop: str = "block"        # blocks: stop a row at EOS ("block": the reference's rule, "any", "off")

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: choose one of {SAMPLERS}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cache_rule not in CACHE_RULES:
            raise ValueError(f"cache rule {self.cache_rule!r}: choose one of {CACHE_RULES}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking {self.remasking!r}: choose one of {REMASKING}")
        if self.eos_stop not in EOS_STOPS:
            raise ValueError(f"eos_stop {self.eos_stop!r}: choose one of {EOS_STOPS}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.steps < 1 or self.block_length < 1:
            raise ValueError(f"steps and block_length must be >= 1, got {self.steps} and {self.block_length}")

    @property
    def semi_ar_threshold(self) -> float:
        return SEMI_AR_THRESHOLD if self.threshold is None else self.threshold

    def describe(self) -> dict:
        d = {"sampler": self.sampler}
        if self.sampler in ("mdlm", "proseco", "remdm"):
            d.update(steps=self.steps, top_p=self.top_p)
        if self.sampler in ("mdlm", "proseco"):
            d["cache"] = self.cache_rule if self.use_cache else "off"
        if self.sampler == "blocks":
            d.update(steps=self.steps, block_length=self.block_length, remasking=self.remasking,
                     temperature=self.temperature, threshold=self.threshold, eos_stop=self.eos_stop)
        if self.sampler in ("proseco", "blocks"):
            skip = ("guidance",) if self.sampler == "blocks" else ()
            d.update({f"corrector_{k}": v for k, v in asdict(self.corrector).items() if k not in skip})
        if self.sampler == "remdm":
            d["eta"] = self.eta
        if self.sampler == "semi_ar":
            d.update(block_length=self.block_length, threshold=self.semi_ar_threshold)
        return d

    def block_kwargs(self) -> dict:
        """The block sampler's options (``blocks.sample_blocks`` keywords)."""
        return dict(remasking=self.remasking, temperature=self.temperature, threshold=self.threshold,
                    corrector=self.corrector, eos_stop=self.eos_stop)


def run_sampler(spec: SamplerSpec, denoiser, schedule, batch_size: int, length: int,
                generator: torch.Generator, prompt=None, prompt_mask=None, labels=None) -> SampleResult:
    """One batch with the sampler ``spec`` names. ``blocks`` here generates after a common prefix
    (or from nothing) with no EOS stop; prompts of different lengths go through
    ``prompted.generate_responses``."""
    common = dict(prompt=prompt, prompt_mask=prompt_mask, labels=labels)
    if spec.sampler in ("mdlm", "proseco"):
        corrector = spec.corrector if spec.sampler == "proseco" else None
        return sample_proseco(denoiser, schedule, batch_size, length, spec.steps, generator,
                              corrector, use_cache=spec.use_cache, top_p=spec.top_p,
                              cache_rule=spec.cache_rule, **common)
    if spec.sampler == "remdm":
        return sample_remdm(denoiser, schedule, batch_size, length, spec.steps, generator,
                            eta=spec.eta, top_p=spec.top_p, **common)
    if spec.sampler == "blocks":
        return sample_blocks_prefix(denoiser, schedule, batch_size, length, generator, spec.steps,
                                    spec.block_length, prompt, prompt_mask, labels=labels,
                                    **{**spec.block_kwargs(), "eos_stop": "off"})
    return sample_semi_ar(denoiser, schedule, batch_size, length, spec.block_length, generator,
                          threshold=spec.semi_ar_threshold, **common)


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, STREAM_SAMPLING, batch_index))


def generate(spec: SamplerSpec, denoiser, schedule, num_samples: int, batch_size: int,
             length: int, seed: int, dp_rank: int = 0, dp_size: int = 1, prompt=None,
             prompt_mask=None, labels=None, progress: Optional[callable] = None) -> dict:
    """Sample this rank's share of ``num_samples`` sequences.

    Returns ``{"tokens": [n, L] LongTensor, "batch_indices": [...], "stats": {...}}`` where the
    stats sum NFE over batches and give the NFE *per sample batch* (what a paper's "NFE" is).
    """
    n_batches = -(-num_samples // batch_size)
    mine = list(range(dp_rank, n_batches, dp_size))
    outputs, totals = [], {"nfe": 0, "nfe_unmask": 0, "nfe_correct": 0, "corrector_loops": 0,
                           "early_stops": 0}
    start = time.time()
    for k, b in enumerate(mine):
        size = min(batch_size, num_samples - b * batch_size)
        result = run_sampler(spec, denoiser, schedule, size, length, batch_generator(seed, b),
                             prompt, prompt_mask, labels)
        outputs.append(result.tokens)
        for key, value in result.stats().items():
            totals[key] += value
        if progress:
            progress(k + 1, len(mine), time.time() - start)
    per_batch = {f"{k}_per_batch": v / max(len(mine), 1) for k, v in totals.items()
                 if k.startswith("nfe")}
    tokens = torch.cat(outputs) if outputs else torch.empty(0, length, dtype=torch.long)
    return {"tokens": tokens, "batch_indices": mine,
            "stats": {**totals, **per_batch, "batches": len(mine), "seconds": time.time() - start}}
