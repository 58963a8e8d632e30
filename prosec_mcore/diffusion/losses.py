"""The ProSeCo objective (Schiff et al. 2026, Algorithm 1), written once for vocab-parallel logits.

Notation: x clean tokens, m the mask token, z_t the masked sequence, w(t) = -alpha'_t/(1-alpha_t),
x_theta(.) the network's distribution over the vocabulary with the mask token's logit set to
-inf (the model never predicts "mask"; vocabulary padding is suppressed the same way).

    L_MDM = sum over masked positions l of   w(t) * CE(x_theta(z_t)_l, x_l)

    y     = stopgrad(argmax x_theta(z_t))      at all positions (corrector_input="all",
                                               the reference recipe) or only at masked
                                               positions, x elsewhere ("masked")
    L_SC  = sum over all positions l of      w(t) * CE(x_theta(y)_l, x_l)
            ("errors up-weighted": at positions where y_l == x_l use -w(t) p_theta(x_l | y)
             instead of -w(t) log p_theta(x_l | y), so the gradient concentrates on mistakes)

    loss  = (lambda_mdm * L_MDM + lambda_sc * L_SC) / (number of tokens in the batch)

SFT (data.format=sft; diffusion/sft.py, docs/sft.md). A sample is (prompt p, response r): the model
learns p_theta(r | p), as LLaDA's SFT does, and the same algorithm runs with three changes:

    z_t   = the forward process on r only: prompt positions are never masked
    L_MDM = sum over masked *response* positions l of   u_l * w(t) * CE(x_theta(z_t)_l, x_l)
    y     = argmax x_theta(z_t) at response positions, x at prompt positions (both
            corrector_input modes: "masked" keeps x wherever nothing was masked)
    L_SC  = sum over *response* positions l of          u_l * w(t) * CE(x_theta(y)_l, x_l)
    loss  = (lambda_mdm * L_MDM + lambda_sc * L_SC) / (number of examples in the batch)

"Response" counts the response, its EOS and (objective.sft_pad_in_loss, LLaDA's choice) the EOS
padding after it. u_l is the normaliser: 1 / (the example's counted positions) for
objective.sft_normalization=response (LLaDA: each example's loss is its mean per response token),
1 / L for `tokens` (the pre-training normaliser: sum over the batch's positions, prompts
included). Prompt positions contribute exactly 0 to both terms and to every reported count.

The removed tail of a variable-length sample (diffusion/packing.py) is never masked and adds 0 to
both sums, yet still counts in the normaliser: every sample weighs L positions, however it is cut.

The corrector's second forward sees y alone: no carry-over of clean inputs, so it may change any
token. Because y is a stop-gradient, d(loss)/d(theta) is the sum of the two terms' gradients,
which lets a pipeline run the two forwards as two separate passes (see training/step.py).

Under tensor parallelism the logits are sharded over the vocabulary: the cross-entropy is
megatron-core's vocab-parallel one, and the argmax combines each shard's (max, index) across the
tensor-parallel group. With a group of size one every function here is plain PyTorch math.

The cross-entropy has three implementations of the same math (`cross_entropy`, chosen by
train.cross_entropy_loss_fusion / cross_entropy_fusion_impl, as in Megatron-LM): megatron-core's
plain vocab-parallel one, its `native` fused one (torch.compile-fused elementwise work and one
all-reduce instead of two; its backward returns bf16 logit gradients, so it is for bf16 runs),
and Transformer Engine's Triton kernel (`te`, GPU; it writes the logit gradient into the logits
tensor during the forward, so every other use of the logits, the argmax, comes first).

Memory. The logits [b, L, V/tp] are the largest activation of a step (micro-batch 4, L = 512 and
GPT-2's 50,257 ids: 412 MB in fp32), so `mdm_terms` and `sc_terms` make no copy of them of their
own: the never-predicted ids are set to -inf *in place* (`suppress_invalid_`) and the argmax reads
the logits in their own dtype. Both are exact. In place is safe under autograd because nothing
between the output layer and the loss keeps the logits for its backward (the output layer's
matmul keeps its input and weight, `transpose(0, 1).contiguous()` keeps nothing); were that ever
false, autograd's version counter would stop the backward with an error rather than compute a
wrong gradient. The fill itself stays out of the autograd graph: the cross-entropy's gradient at a
-inf logit is exactly 0, which is all masked_fill's backward would enforce, at the price of a
masked copy of the logit gradient (`suppress_invalid_`). The two functions therefore consume
their logits, as megatron's cross-entropy already does to fp32 logits (it turns them into the
softmax in place): a caller that needs the logits afterwards passes a clone. The argmax needs no
fp32 copy either: converting bf16 to fp32 is exact and order-preserving, so the maximum and its
first position are the same in either dtype (tests/unit/test_logits_memory.py checks all three:
values, ties, gradients).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from .sft import SFTSettings

CROSS_ENTROPY_IMPLS = ("none", "native", "te")


def invalid_vocab_mask(local_vocab: int, vocab_size: int, mask_id: int, device=None) -> torch.Tensor:
    """Bool [local_vocab]: True for the ids of this TP shard that must never be predicted.

    `vocab_size` is the *tokenizer's* vocabulary (1 + its largest id), not the model's row count.
    Invalid are the mask id, wherever it lies (last for our tokenizers, 126336 for LLaDA-8B,
    in the middle of its vocabulary), and every id >= vocab_size: the rows a pretrained model has beyond its tokenizer
    (LLaDA: up to 126464) and megatron's padding to a multiple of 128 * TP alike."""
    start = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    ids = torch.arange(start, start + local_vocab, device=device)
    return (ids == mask_id) | (ids >= vocab_size)


def suppress_invalid(logits: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` with the never-predicted ids at -inf (for callers that keep the logits)."""
    return logits.masked_fill(invalid, float("-inf"))


def suppress_invalid_(logits: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
    """Set the logits of never-predicted ids to -inf in place and return them (no copy), for the
    cross-entropy and the argmax of this module only.

    The fill is not recorded by autograd, so its backward allocates no masked copy of the logit
    gradient either. The gradient is still that of `suppress_invalid`: masked_fill's backward would
    zero the gradient at the filled ids, and the cross-entropy's gradient there is already exactly
    0 (softmax at a -inf logit is exp(-inf) = 0, and no target is an invalid id). A leaf tensor that
    requires grad (a test's input; a model's output never is one) is not changed: it gets the copy."""
    if logits.is_leaf and logits.requires_grad:
        return suppress_invalid(logits, invalid)
    with torch.no_grad():
        logits.masked_fill_(invalid, float("-inf"))
    return logits


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, fusion: str = "none") -> torch.Tensor:
    """Per-token -log softmax(logits)[target], [b, L] fp32, for logits sharded over the vocabulary.

    fusion: "none" (megatron-core's vocab_parallel_cross_entropy), "native" (megatron-core's fused
    kernel) or "te" (Transformer Engine's). The three agree up to floating-point rounding; the
    tests compare them (tests/unit/test_cross_entropy_fusion.py, at TP=1 and TP=2)."""
    if fusion == "none":
        return vocab_parallel_cross_entropy(logits, target)
    group = parallel_state.get_tensor_model_parallel_group()
    if fusion == "native":
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        return fused_vocab_parallel_cross_entropy(logits, target, group)
    if fusion == "te":
        from megatron.core.extensions.transformer_engine import te_parallel_cross_entropy

        if te_parallel_cross_entropy is None:
            raise RuntimeError("cross_entropy_fusion_impl=te needs Transformer Engine's parallel cross-entropy, "
                               "which does not import here; use native")
        return te_parallel_cross_entropy(logits.contiguous(), target.contiguous(), group).float()
    raise ValueError(f"unknown cross-entropy implementation {fusion!r}; expected one of {CROSS_ENTROPY_IMPLS}")


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over a vocab-sharded last dimension. Ties go to the lowest id, as torch.argmax.

    Read in the logits' own dtype: bf16 -> fp32 is exact and order-preserving, so an fp32 copy of
    the logits would find the same maximum at the same first position (torch.max over a dimension
    returns the first maximal index, on CPU and GPU). Only the per-position maxima, [b, L], are
    widened to fp32 for the exchange between shards (exact, and every backend reduces fp32)."""
    local_max, local_idx = logits.max(dim=-1)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local_idx
    local_max = local_max.float()
    global_idx = local_idx + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = parallel_state.get_tensor_model_parallel_group()
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    idxs = [torch.empty_like(global_idx) for _ in range(tp)]
    torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
    torch.distributed.all_gather(idxs, global_idx.contiguous(), group=group)
    best_rank = torch.stack(maxes).argmax(dim=0, keepdim=True)  # first (lowest) rank wins ties
    return torch.stack(idxs).gather(0, best_rank).squeeze(0)


@dataclass
class LossOptions:
    lambda_mdm: float = 1.0
    lambda_sc: float = 1.0
    corrector_input: str = "all"  # all | masked
    errors_upweighted: bool = False
    weighted_corrector_loss: bool = True
    cross_entropy_fusion: str = "none"  # none | native | te (see `cross_entropy`)
    sft: SFTSettings | None = None  # data.format=sft: prompt kept clean and out of the loss (diffusion/sft.py)


@dataclass
class MDMTerms:
    per_token: torch.Tensor  # w(t) * CE at masked positions, 0 elsewhere, [b, L] (differentiable)
    corrector_input: torch.Tensor  # y, [b, L] int64 (no grad)
    accuracy_on_masked: torch.Tensor  # scalar: argmax == x at masked positions


@dataclass
class SCTerms:
    per_token: torch.Tensor  # corrector loss per position, [b, L] (differentiable)
    nll_per_token: torch.Tensor  # -log p_theta(x | y) per position, [b, L] (reporting, unweighted)
    correct_on_errors: torch.Tensor  # scalar: #positions with y != x that the corrector fixes
    num_errors: torch.Tensor  # scalar: #positions with y != x


def mdm_terms(logits: torch.Tensor, clean, masked, weight, invalid, corrector_input: str = "all",
              fusion: str = "none") -> MDMTerms:
    """First forward: the masked-diffusion loss on z_t and the corrector input y.

    logits: [b, L, V/tp] from x_theta(z_t), consumed (overwritten in place, see the module
    docstring); clean, masked: [b, L]; weight: w(t), [b].
    """
    logits = suppress_invalid_(logits, invalid)
    y = vocab_parallel_argmax(logits.detach())  # before the cross-entropy: TE's kernel overwrites logits
    ce = cross_entropy(logits, clean, fusion)  # [b, L]
    per_token = torch.where(masked, ce * weight[:, None], torch.zeros_like(ce))
    if corrector_input == "masked":
        y = torch.where(masked, y, clean)
    n_masked = masked.sum().clamp(min=1)
    accuracy = ((y == clean) & masked).sum().float() / n_masked
    return MDMTerms(per_token=per_token, corrector_input=y, accuracy_on_masked=accuracy)


def sc_terms(logits: torch.Tensor, clean, corrector_input, weight, invalid, opts: LossOptions,
             keep: torch.Tensor | None = None) -> SCTerms:
    """Second forward: the self-correction loss of x_theta(y) against x at every position.

    logits: [b, L, V/tp] from x_theta(y), consumed like mdm_terms'. keep: [b, L] bool, the positions
    that take part (None: all). The removed part of a cut sample (diffusion/packing.py) adds
    exactly 0 to the loss, the NLL and the counts."""
    logits = suppress_invalid_(logits, invalid)
    prediction = vocab_parallel_argmax(logits.detach())
    ce = cross_entropy(logits, clean, opts.cross_entropy_fusion)  # -log p_theta(x | y), [b, L]
    w = weight[:, None] if opts.weighted_corrector_loss else torch.ones_like(weight)[:, None]
    errors = corrector_input != clean
    if opts.errors_upweighted:
        per_token = torch.where(errors, w * ce, -w * torch.exp(-ce))
    else:
        per_token = w * ce
    if keep is not None:
        per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
        ce = torch.where(keep, ce, torch.zeros_like(ce))
        errors = errors & keep
    return SCTerms(
        per_token=per_token,
        nll_per_token=ce.detach(),
        correct_on_errors=((prediction == clean) & errors).sum().float(),
        num_errors=errors.sum().float(),
    )
