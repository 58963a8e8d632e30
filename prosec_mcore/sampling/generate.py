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
from .samplers import CACHE_RULES, SampleResult, sample_proseco, sample_remdm, sample_semi_ar
from .steps import CorrectorSettings

SAMPLERS = ("mdlm", "proseco", "remdm", "semi_ar")


@dataclass
class SamplerSpec:
    """Which sampler, and its knobs (docs/sampling.md). ``corrector`` is used by ``proseco`` only."""

    sampler: str = "proseco"
    steps: int = 32                # T unmasking steps (mdlm, proseco, remdm)
    corrector: CorrectorSettings = field(default_factory=CorrectorSettings)
    use_cache: bool = True         # mdlm/proseco: reuse an output when allowed (cache_rule)
    eta: float = 0.02              # remdm
    block_length: int = 8          # semi_ar
    threshold: float = 0.9         # semi_ar
    top_p: float = 1.0             # mdlm/proseco/remdm: nucleus sampling, 1 = off (reference OWT: 0.9)
    cache_rule: str = "reference"  # mdlm/proseco: "reference" or "exact" (samplers.sample_proseco)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: choose one of {SAMPLERS}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cache_rule not in CACHE_RULES:
            raise ValueError(f"cache rule {self.cache_rule!r}: choose one of {CACHE_RULES}")

    def describe(self) -> dict:
        d = {"sampler": self.sampler}
        if self.sampler in ("mdlm", "proseco", "remdm"):
            d.update(steps=self.steps, top_p=self.top_p)
        if self.sampler in ("mdlm", "proseco"):
            d["cache"] = self.cache_rule if self.use_cache else "off"
        if self.sampler == "proseco":
            d.update({f"corrector_{k}": v for k, v in asdict(self.corrector).items()})
        if self.sampler == "remdm":
            d["eta"] = self.eta
        if self.sampler == "semi_ar":
            d.update(block_length=self.block_length, threshold=self.threshold)
        return d


def run_sampler(spec: SamplerSpec, denoiser, schedule, batch_size: int, length: int,
                generator: torch.Generator, prompt=None, prompt_mask=None, labels=None) -> SampleResult:
    """One batch with the sampler ``spec`` names."""
    common = dict(prompt=prompt, prompt_mask=prompt_mask, labels=labels)
    if spec.sampler in ("mdlm", "proseco"):
        corrector = spec.corrector if spec.sampler == "proseco" else None
        return sample_proseco(denoiser, schedule, batch_size, length, spec.steps, generator,
                              corrector, use_cache=spec.use_cache, top_p=spec.top_p,
                              cache_rule=spec.cache_rule, **common)
    if spec.sampler == "remdm":
        return sample_remdm(denoiser, schedule, batch_size, length, spec.steps, generator,
                            eta=spec.eta, top_p=spec.top_p, **common)
    return sample_semi_ar(denoiser, schedule, batch_size, length, spec.block_length, generator,
                          threshold=spec.threshold, **common)


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
