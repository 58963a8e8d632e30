"""Comparisons shared by the CPU tests and the GPU tests (tests/gpu): two builds of the same
network on the same weights, and two training runs on the same data and noise.

The CPU tiers use them on pairs that must agree to fp32 round-off (megatron's unfused attention
against SDPA); tests/gpu uses the same code on the pairs only a GPU can run (the TE spec against
the local spec in bf16, FP8 runs against a bf16 run), so what the GPU tests rely on has run here.
"""
from __future__ import annotations

import dataclasses

import torch

from prosec_mcore.config import Config
from prosec_mcore.model.builder import build_model

from tests.cli import read_metrics


def set_generic_point(model, seed: int = 0, scale: float = 0.08) -> dict:
    """Overwrite every parameter with seeded noise and return the state as fp32 CPU tensors.

    At initialisation adaLN's gates are zero, which hides the attention and MLP branches from the
    logits; a generic point lets every layer matter. `scale` keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * (scale if p.dim() > 1 else 0.1) + (p.dim() == 1)
            p.copy_(noise.to(p.dtype))
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def forward_and_grads(model_overrides: dict, vocab: int, backend: str, state: dict | None = None,
                      precision: str = "fp32", seq: int = 16, batch: int = 2):
    """Build the model, load `state` (or set a generic point), run one forward on fixed tokens and
    sigma; return (state, logits as fp32, {parameter name: gradient as fp32})."""
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, **model_overrides)
    cfg.train.precision = precision
    cfg.data.seq_length = seq
    model = build_model(cfg, vocab, backend=backend)
    params = dict(model.named_parameters())
    if state is None:
        state = set_generic_point(model)
    else:
        assert set(params) == set(state), f"parameters differ: {sorted(set(params) ^ set(state))}"
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.dtype))
    device = next(model.parameters()).device
    tokens = (torch.arange(batch * seq, device=device).reshape(batch, seq) * 7) % vocab
    sigma = torch.linspace(0.2, 2.0, batch, device=device)
    logits = model(tokens, sigma=sigma)
    grads = torch.autograd.grad(logits.float().square().mean(), list(params.values()))
    return state, logits.detach().float().cpu(), {n: g.float().cpu() for n, g in zip(params, grads)}


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """max |x - reference| / max |reference|: one number per tensor, insensitive to its scale."""
    return ((x - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()


def loss_gap(run_a, run_b, key: str = "loss", last: int = 10) -> float:
    """Mean relative gap |a - b| / b of a logged loss over the last `last` iterations of two runs
    that logged the same iterations (same seed: same data, same noise)."""
    a, b = read_metrics(run_a), read_metrics(run_b)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b], "the runs logged different iterations"
    pairs = [(x[key], y[key]) for x, y in zip(a[-last:], b[-last:])]
    return sum(abs(x - y) / abs(y) for x, y in pairs) / len(pairs)
