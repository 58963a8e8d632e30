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
from prosec_mcore.runtime.init import name_seed

from tests.cli import read_metrics


MATRIX_NOISE = 0.08  # std of the noise added to every matrix (init std 0.02): activations stay O(1)
VECTOR_NOISE = 0.1  # std of the noise added to every vector (norm weights 1, biases and adaLN 0 at init)


def generic_value(name: str, current: torch.Tensor, seed: int) -> torch.Tensor:
    """`current` (a full, unsplit parameter) plus seeded noise drawn from (seed, name) alone.

    At initialisation adaLN's modulation is zero: every gate is 0, the attention and MLP branches
    are hidden from the logits and receive no gradient, so a layout bug inside a block would not
    show. Perturbing *every* parameter, gates included, makes every block contribute from the first
    step. The noise depends only on the name, so each layout (which sees the parameter under its
    global name, split or not) gets the same values."""
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    noise = torch.randn(current.shape, generator=gen) * (MATRIX_NOISE if current.dim() > 1 else VECTOR_NOISE)
    return current.detach().float().cpu() + noise


def set_generic_point(model, seed: int = 0) -> dict:
    """Perturb every parameter of one unsplit model (any module: megatron or Hugging Face) in
    place and return the new state as fp32 CPU tensors."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(generic_value(name, p, seed).to(device=p.device, dtype=p.dtype))
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def set_generic_point_distributed(model_chunks, seed: int = 0) -> None:
    """The same point for this rank's model chunks at any TP/PP/VPP/DP layout: each parameter is
    perturbed under its global name, on the full tensor, then sliced as tensor parallelism splits
    it. The unsplit value comes from gathering the shards (all-gather over TP), so it is the
    TP1/PP1 initialisation (layout-independent, runtime/init.py) plus the same noise."""
    from megatron.core import parallel_state

    from prosec_mcore.runtime.init import full_shape, global_parameter_names, tp_slice

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for chunk in model_chunks:
            module = chunk.module if hasattr(chunk, "module") else chunk
            for name, p in global_parameter_names(module).items():
                full = _gather_tp(p, tp_size, full_shape(p, tp_size))
                p.copy_(tp_slice(generic_value(name, full, seed), p, tp_rank, tp_size).to(p.dtype))


def _gather_tp(param, tp_size: int, shape) -> torch.Tensor:
    """The full tensor of a tensor-parallel parameter (megatron's stride-aware split, inverted)."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return param.detach().float().cpu()
    parts = [torch.empty_like(param) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, param.detach().contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    dim, stride = param.partition_dim, param.partition_stride
    chunks = [torch.split(part, param.shape[dim] // stride, dim=dim) for part in parts]
    # rank r holds chunks r, r + tp, r + 2 tp, ... of the full tensor (stride pieces each)
    ordered = [chunks[r][k] for k in range(stride) for r in range(tp_size)]
    full = torch.cat(ordered, dim=dim).float().cpu()
    assert list(full.shape) == list(shape), (full.shape, shape)
    return full


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
