"""The network as the samplers see it: ``log p_theta(x | z, sigma)`` over the tokenizer's ids.

Every sampler in this package talks to a :class:`Denoiser`: a callable that maps a batch of
token ids ``[B, L]`` (masked, partly masked or fully unmasked sequences) and the noise level
``sigma [B]`` to float64 log-probabilities ``[B, L, V]`` over the *tokenizer's* vocabulary:

* the mask token gets probability 0 (the model never predicts ``[MASK]``),
* rows the model has beyond the tokenizer (megatron pads the vocabulary to a multiple of
  128 x TP; LLaDA's 126,464 rows for a 126,349-id tokenizer) are dropped,
* float64, as the reference samplers use, so that Gumbel-max sampling of tiny probabilities is
  not distorted by rounding.

``time_conditioned`` says whether the output depends on sigma; when it does not (LLaDA-style
models and the DiT fed sigma = 0), the last output for an unchanged input is exactly what a new
evaluation would give (the samplers' ``exact`` cache rule relies on it; their default, the
reference's rule, reuses outputs whatever the model: docs/sampling.md).
``evals_per_call`` is the number of network evaluations one call costs (2 under classifier-free
guidance), which is what the NFE counters add up.

Implementations: :class:`FunctionDenoiser` wraps any ``logits = f(tokens, sigma)`` (tests, the
Hugging Face model, toy models); :func:`megatron_denoiser` wraps a megatron ``ProSeCoModel``,
gathering its vocab-parallel logits across tensor-parallel ranks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Logits = Callable[..., torch.Tensor]


class Denoiser:
    """Base class; subclasses implement :meth:`logits` (``[B, L, >= vocab_size]``)."""

    def __init__(self, vocab_size: int, mask_id: int, time_conditioned: bool,
                 evals_per_call: int = 1):
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.time_conditioned, self.evals_per_call = time_conditioned, evals_per_call
        self.calls = 0  # how many times the network ran (x evals_per_call = NFE)

    def logits(self, tokens: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        logits = self.logits(tokens, sigma, labels)
        if logits.shape[:2] != tokens.shape or logits.shape[-1] < self.vocab_size:
            raise ValueError(f"denoiser returned logits of shape {tuple(logits.shape)} for tokens "
                             f"{tuple(tokens.shape)} and a vocabulary of {self.vocab_size}")
        self.calls += 1
        logits = logits[..., :self.vocab_size].to(torch.float64)
        logits[..., self.mask_id] = float("-inf")
        return logits.log_softmax(dim=-1)


class FunctionDenoiser(Denoiser):
    """A denoiser around ``fn(tokens, sigma) -> logits`` (or ``fn(tokens, sigma, labels)`` when
    ``conditional``)."""

    def __init__(self, fn: Logits, vocab_size: int, mask_id: int, time_conditioned: bool = True,
                 conditional: bool = False):
        super().__init__(vocab_size, mask_id, time_conditioned)
        self.fn, self.conditional = fn, conditional

    def logits(self, tokens, sigma, labels=None):
        if labels is not None and not self.conditional:
            raise ValueError("this denoiser was not trained with a condition; drop the labels")
        return self.fn(tokens, sigma, labels) if self.conditional else self.fn(tokens, sigma)


class MegatronDenoiser(Denoiser):
    """A megatron ``ProSeCoModel`` (one pipeline stage holding every layer, any TP size).

    Every tensor-parallel rank runs the same sampler with the same seed; the all-gather of the
    vocab-parallel logits gives every rank identical full logits, so all ranks draw the same
    tokens without further communication.
    """

    def __init__(self, model, vocab_size: int, mask_id: int):
        if not (model.pre_process and model.post_process):
            raise ValueError("sampling needs the whole model on one pipeline stage (PP=1); "
                             "checkpoints reshard on load, so sample with --pp 1 (any --tp)")
        conditioned = model.time_conditioning == "adaln" and not model.config.zero_timestep
        super().__init__(vocab_size, mask_id, time_conditioned=conditioned)
        self.model = model.eval()
        self.num_classes = model.config.num_classes  # > 0: accepts labels; num_classes is the null label

    def logits(self, tokens, sigma, labels=None):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if labels is not None and not self.num_classes:
            raise ValueError("this model was trained without labels (model.num_classes=0)")
        device = next(self.model.parameters()).device
        sigma = sigma.to(device=device, dtype=torch.float32)
        labels = None if labels is None else labels.to(device).expand(tokens.shape[0])
        out = self.model(tokens.to(device), sigma, labels)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            out = gather_from_tensor_model_parallel_region(out)
        return out.float().cpu()


def megatron_denoiser(model, vocab_size: int, mask_id: int) -> MegatronDenoiser:
    """Wrap a megatron ProSeCoModel (unwrapped from DDP) as a :class:`Denoiser`."""
    return MegatronDenoiser(model, vocab_size, mask_id)


def hf_denoiser(hf_model, vocab_size: int, mask_id: int,
                time_conditioned: Optional[bool] = None) -> FunctionDenoiser:
    """Wrap an exported Hugging Face model (``AutoModelForMaskedLM``, ``trust_remote_code``).

    The DiT export takes ``(input_ids, timesteps)``; the LLaDA export takes ``input_ids`` only.
    """
    config = hf_model.config
    takes_time = getattr(config, "model_type", "") == "proseco"  # the DiT family
    if time_conditioned is None:  # the DiT export zeroes sigma unless time_conditioning is on
        time_conditioned = takes_time and bool(getattr(config, "time_conditioning", False))

    def fn(tokens, sigma):
        with torch.no_grad():
            if takes_time:
                out = hf_model(input_ids=tokens, timesteps=sigma.float())
            else:
                out = hf_model(input_ids=tokens)
        return out.logits if hasattr(out, "logits") else out

    return FunctionDenoiser(fn, vocab_size, mask_id, time_conditioned)
