"""Sampling from masked diffusion models: MDLM, ProSeCo (unmasking interleaved with corrector
loops), ReMDM remasking, semi-autoregressive blocks and classifier-free guidance.

    steps.py       the math: unmasking step, corrector loop, Gumbel-max draws
    samplers.py    the samplers, each returning tokens and NFE counts
    blocks.py      the paper's SFT sampler: semi-AR blocks, k tokens per step, corrector, EOS stop
    prompted.py    responses to prompts of different lengths (SFT layout), with any sampler
    guidance.py    classifier-free guidance as a denoiser wrapper
    denoiser.py    the network as samplers see it (megatron model, HF model, any function)
    generate.py    many samples in seeded batches, shared across data-parallel ranks
    loading.py     a denoiser from a distributed checkpoint or a Hugging Face folder

docs/sampling.md: every sampler option, the reference's defaults and the alternatives.
"""

from .blocks import BlockResult, sample_blocks
from .denoiser import Denoiser, FunctionDenoiser, hf_denoiser, megatron_denoiser
from .generate import SAMPLERS, SamplerSpec, generate, run_sampler
from .guidance import GuidedDenoiser
from .prompted import generate_responses, layout_prompts
from .samplers import CACHE_RULES, SampleResult, sample_mdlm, sample_proseco, sample_remdm, sample_semi_ar
from .steps import (CORRECTOR_GUIDANCE, CORRECTOR_MODES, CORRECTOR_TIMES, CorrectorSettings, corrector_loop,
                    top_p_filter, unmask_step)

__all__ = [
    "BlockResult", "CACHE_RULES", "CORRECTOR_GUIDANCE", "CORRECTOR_MODES", "CORRECTOR_TIMES", "CorrectorSettings",
    "Denoiser", "FunctionDenoiser", "GuidedDenoiser", "SAMPLERS", "SampleResult", "SamplerSpec", "corrector_loop",
    "generate", "generate_responses", "hf_denoiser", "layout_prompts", "megatron_denoiser", "run_sampler",
    "sample_blocks", "sample_mdlm", "sample_proseco", "sample_remdm", "sample_semi_ar", "top_p_filter", "unmask_step",
]
