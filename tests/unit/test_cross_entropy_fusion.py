"""The fused cross-entropy (train.cross_entropy_loss_fusion) against plain PyTorch math.

`losses.cross_entropy(..., "native")` is megatron-core's fused kernel (torch.compile'd on this
CPU, as on a GPU), and it must give the ProSeCo losses what megatron's plain vocab-parallel one
gives: per-token -log softmax(x)[target] with the mask logit and padding suppressed, and the
gradient softmax - onehot scaled by each token's weight w(t). Reference: torch.log_softmax on the
full, unsharded fp32 logits. The logits are bf16, as in the runs the fusion is for.

Tolerances: the loss is computed in fp32 from the same bf16 inputs by both (observed: equal to
1e-6); the fused backward returns bf16 gradients, so they agree with the fp32 reference to bf16's
relative rounding (2^-8 = 0.4%, observed below 0.4%), and a gradient that is off by a wrong
shard, a missing weight or a missed suppression differs by O(1).
"""
from __future__ import annotations

from pathlib import Path

import torch

from prosec_mcore.diffusion import losses
from tests.distributed.launch import run_distributed

THIS_FILE = str(Path(__file__).resolve())
BATCH, SEQ, VOCAB, MASK_ID = 3, 10, 64, 63  # ids >= 60 act as padding beyond the tokenizer
TOKENIZER_VOCAB = 60
INVALID = (torch.arange(VOCAB) == MASK_ID) | (torch.arange(VOCAB) >= TOKENIZER_VOCAB)


def problem():
    """bf16 logits [b, L, V], clean targets (never the mask or padding), per-sample w(t), a mask."""
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(BATCH, SEQ, VOCAB, generator=gen) * 3).to(torch.bfloat16)
    clean = torch.randint(0, TOKENIZER_VOCAB - 1, (BATCH, SEQ), generator=gen)
    weight = torch.rand(BATCH, generator=gen) * 5 + 0.5
    masked = torch.rand(BATCH, SEQ, generator=gen) < 0.5
    return logits, clean, weight, masked


def reference(logits, clean, weight, masked):
    """Plain PyTorch: the weighted masked-diffusion loss and its gradient on the full vocabulary."""
    x = logits.float().requires_grad_()
    logp = torch.log_softmax(x.masked_fill(INVALID, float("-inf")), dim=-1)
    ce = -logp.gather(-1, clean[..., None]).squeeze(-1)
    (torch.where(masked, ce * weight[:, None], 0.0)).sum().backward()
    return ce.detach(), x.grad


def fused_terms(logits_shard, clean, weight, masked, fusion):
    """mdm_terms on this rank's vocabulary shard; returns the per-token CE, y and the shard's gradient."""
    x = logits_shard.detach().clone().requires_grad_()
    invalid = losses.invalid_vocab_mask(x.shape[-1], TOKENIZER_VOCAB, MASK_ID)
    terms = losses.mdm_terms(x, clean, masked, weight, invalid, fusion=fusion)
    terms.per_token.sum().backward()
    ce = torch.where(masked, terms.per_token.detach() / weight[:, None], 0.0)
    return ce, terms.corrector_input, x.grad


def check_against_reference(rank: int, tp: int):
    logits, clean, weight, masked = problem()
    ref_ce, ref_grad = reference(logits, clean, weight, masked)
    shard = VOCAB // tp
    rows = slice(rank * shard, (rank + 1) * shard)
    results = {}
    for fusion in ("none", "native"):
        ce, y, grad = fused_terms(logits[..., rows], clean, weight, masked, fusion)
        assert torch.allclose(ce, torch.where(masked, ref_ce, 0.0), rtol=1e-6, atol=1e-6), \
            f"{fusion}: CE differs from log_softmax by {(ce - torch.where(masked, ref_ce, 0.0)).abs().max()}"
        assert torch.equal(y, logits.float().masked_fill(INVALID, float("-inf")).argmax(-1)), \
            f"{fusion}: corrector input is not the argmax"
        scale = ref_grad[..., rows].abs().max()
        err = (grad.float() - ref_grad[..., rows]).abs().max() / scale
        assert err < 4e-3, f"{fusion}: gradient differs from the reference by {err:.2e} of its largest entry"
        assert torch.all(grad[..., losses.invalid_vocab_mask(shard, TOKENIZER_VOCAB, MASK_ID)] == 0)
        results[fusion] = err.item()
    print(f"rank {rank}/{tp}: relative gradient error none {results['none']:.2e}, native {results['native']:.2e}")


def tp2_worker():
    """Runs under torchrun on 2 ranks: each holds half the vocabulary. The kernel's functions run
    eagerly here (TP=1 above runs them torch.compile'd): what TP=2 adds is the all-reduce logic,
    and compiling in two processes on two cores would cost a minute."""
    import torch._dynamo

    from megatron.core import parallel_state

    torch._dynamo.config.disable = True

    from prosec_mcore.runtime import destroy_distributed, initialize_distributed

    initialize_distributed(tp=2, pp=1, seed=1)
    check_against_reference(parallel_state.get_tensor_model_parallel_rank(), 2)
    destroy_distributed()


def test_fused_cross_entropy_matches_log_softmax_at_tp1(single_process_world):
    check_against_reference(rank=0, tp=1)


def test_fused_cross_entropy_matches_log_softmax_at_tp2():
    out = run_distributed(f"{THIS_FILE}:tp2_worker", nproc=2, timeout=300)
    assert "rank 0/2" in out and "rank 1/2" in out


def test_corrector_terms_use_the_chosen_implementation(single_process_world, monkeypatch):
    """sc_terms reads the choice from LossOptions (the trainer sets it from train.*)."""
    logits, clean, weight, masked = problem()
    y = torch.where(masked, (clean + 1) % TOKENIZER_VOCAB, clean)
    invalid = losses.invalid_vocab_mask(VOCAB, TOKENIZER_VOCAB, MASK_ID)
    calls = []
    real = losses.cross_entropy
    monkeypatch.setattr(losses, "cross_entropy", lambda x, t, f: calls.append(f) or real(x, t, f))
    plain = losses.sc_terms(logits, clean, y, weight, invalid, losses.LossOptions())
    fused = losses.sc_terms(logits, clean, y, weight, invalid, losses.LossOptions(cross_entropy_fusion="native"))
    assert calls == ["none", "native"]
    assert torch.allclose(plain.per_token, fused.per_token, rtol=1e-6, atol=1e-6)
    assert plain.num_errors == fused.num_errors == masked.sum()
