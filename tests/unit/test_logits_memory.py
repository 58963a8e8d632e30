"""Less memory on the logits and on grouped-query attention, and an MDLM validation of one pass,
each against the implementation it replaces (copied below as REFERENCE_*, unchanged).

  * losses.mdm_terms / sc_terms suppress the never-predicted ids in place and take the argmax in
    the logits' own dtype: losses, corrector inputs, counts and every gradient are *bitwise* those
    of the reference (fp32, CPU, TP=1), on logits made as the model makes them (output layer, then
    transpose(0, 1).contiguous(), whose result is a view when b = 1) and through the real model;
  * the argmax: in bf16 it equals the argmax of an fp32 copy, ties included (first maximal id, also
    across two tensor-parallel shards); fp32 logits are compared in fp32 (no silent narrowing);
  * SDPAttention's grouped-query attention through SDPA's enable_gqa equals the repeated-K/V
    reference and megatron's unfused attention, with and without a document mask, with dropout,
    and PyTorch's CPU flash kernel runs it without repeating K/V (profiler trace);
  * validation of an MDLM run runs one forward per micro-batch and reports no corrector keys; a
    ProSeCo run's validation is bitwise the reference's.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch.profiler import ProfilerActivity, profile

from prosec_mcore.config import Config
from prosec_mcore.diffusion import losses
from prosec_mcore.diffusion.losses import LossOptions, cross_entropy
from prosec_mcore.evaluation.likelihood import CORRECTOR_KEYS, validation_metrics
from prosec_mcore.model.builder import build_model, transformer_config
from prosec_mcore.model.sdpa_attention import SDPAttention
from tests import reference_losses
from tests.compare import relative_error, set_generic_point
from tests.distributed.launch import run_distributed
from tests.unit.test_objective import make_step, text_microbatches

THIS_FILE = str(Path(__file__).resolve())
VOCAB, TOKENIZER_VOCAB, MASK_ID, HIDDEN = 64, 60, 59, 16  # ids 60..63: padding beyond the tokenizer


# ------------------------------------------------------------------ REFERENCE: the code before this change
# The code of prosec_mcore/diffusion/losses.py, evaluation/likelihood.py and
# model/sdpa_attention.py as it was before the in-place suppression, the native-dtype argmax,
# the MDLM validation without the corrector pass and SDPA's enable_gqa.

# The loss functions as they were live in tests/reference_losses.py (benchmarks/logits_memory.py
# measures the same code as "before").
REFERENCE_suppress_invalid = reference_losses.suppress_invalid
REFERENCE_vocab_parallel_argmax = reference_losses.vocab_parallel_argmax
REFERENCE_mdm_terms = reference_losses.mdm_terms
REFERENCE_sc_terms = reference_losses.sc_terms


def REFERENCE_validation_metrics(step, microbatches, noise, eval_iters):
    import math

    for chunk in step.model:
        chunk.eval()
    totals: dict = {}
    with torch.no_grad():
        for index in range(eval_iters):
            m = step.run(microbatches(index), noise, forward_only=True, with_corrector=True)
            for key in ("mdm_loss", "sc_loss", "corrector_nll", "corrector_accuracy_on_errors"):
                totals[key] = totals.get(key, 0.0) + m[key] / eval_iters
    return {
        "valid_nelbo": totals["mdm_loss"],
        "valid_ppl_bound": math.exp(min(totals["mdm_loss"], 50.0)),
        "valid_sc_loss": totals["sc_loss"],
        "valid_corrector_nll": totals["corrector_nll"],
        "valid_corrector_accuracy_on_errors": totals["corrector_accuracy_on_errors"],
    }


class REFERENCE_RepeatedKVAttention(SDPAttention):
    """SDPAttention's forward before enable_gqa: K/V repeated to one head per query head."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        seq, batch = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dropout = self.attention_dropout.p if self.training else 0.0
        attend = None if attention_mask is None else ~attention_mask
        context = self._attend(q, k, v, dropout, attend, False)  # enable_gqa=False: the call as it was
        return context.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)


# ------------------------------------------------------------------ the loss terms
INVALID = (torch.arange(VOCAB) == MASK_ID) | (torch.arange(VOCAB) >= TOKENIZER_VOCAB)


def output_layer_problem(batch: int, seq: int = 9, seed: int = 0):
    """An output layer's weight and a function making its logits as ProSeCoModel does
    (linear on [s, b, h], then transpose(0, 1).contiguous()), plus targets, w(t), a mask, keep."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seq, batch, HIDDEN, generator=gen)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.7).requires_grad_()
    clean = torch.randint(0, TOKENIZER_VOCAB - 1, (batch, seq), generator=gen)
    w_t = torch.rand(batch, generator=gen) * 5 + 0.5
    masked = torch.rand(batch, seq, generator=gen) < 0.5
    keep = torch.rand(batch, seq, generator=gen) < 0.8
    make = lambda: F.linear(hidden, weight).transpose(0, 1).contiguous()  # noqa: E731
    return weight, make, clean, w_t, masked, keep


def both_terms(impl, make, clean, w_t, masked, keep, opts):
    """MDM terms on one forward, SC terms on another (y from the first), as the step runs them."""
    mdm_fn, sc_fn = (losses.mdm_terms, losses.sc_terms) if impl == "new" else (REFERENCE_mdm_terms, REFERENCE_sc_terms)
    mdm = mdm_fn(make(), clean, masked, w_t, INVALID, opts.corrector_input, opts.cross_entropy_fusion)
    sc = sc_fn(make(), clean, mdm.corrector_input, w_t, INVALID, opts, keep=keep)
    return mdm, sc


def bits(t: torch.Tensor) -> torch.Tensor:
    """The fp32 bit patterns: equal bits, not just equal values (+0 and -0 differ here)."""
    return t.view(torch.int32)


LOSS_OPTIONS = [LossOptions(), LossOptions(corrector_input="masked", errors_upweighted=True),
                LossOptions(weighted_corrector_loss=False)]


@pytest.mark.parametrize("batch", [1, 3], ids=["b1-contiguous-returns-a-view", "b3"])
@pytest.mark.parametrize("opts", LOSS_OPTIONS, ids=["reference", "masked-upweighted", "unweighted"])
@pytest.mark.parametrize("with_keep", [False, True], ids=["all", "keep"])
def test_terms_and_gradients_are_bitwise_the_reference(single_process_world, batch, opts, with_keep):
    weight, make, clean, w_t, masked, keep = output_layer_problem(batch)
    assert (make()._base is not None) == (batch == 1)  # b = 1: contiguous() returned the transposed view
    keep = keep if with_keep else None
    results = {}
    for impl in ("reference", "new"):
        mdm, sc = both_terms(impl, make, clean, w_t, masked, keep, opts)
        (grad,) = torch.autograd.grad(mdm.per_token.sum() + sc.per_token.sum(), weight)
        results[impl] = (mdm, sc, grad)
    (mdm_ref, sc_ref, grad_ref), (mdm, sc, grad) = results["reference"], results["new"]
    for name in ("per_token", "corrector_input", "accuracy_on_masked"):
        assert torch.equal(getattr(mdm, name), getattr(mdm_ref, name)), name
    for name in ("per_token", "nll_per_token", "correct_on_errors", "num_errors"):
        assert torch.equal(getattr(sc, name), getattr(sc_ref, name)), name
    assert torch.equal(bits(grad), bits(grad_ref))


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_model_gradients_are_bitwise_the_reference(single_process_world, micro_batch):
    """Through ProSeCoModel (megatron's output layer and its transpose): every parameter's gradient."""
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_layers=1)
    model = build_model(cfg, TOKENIZER_VOCAB, backend="local")  # 128 rows: 68 padding ids
    set_generic_point(model)
    invalid = losses.invalid_vocab_mask(model.vocab_size, TOKENIZER_VOCAB, MASK_ID)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, TOKENIZER_VOCAB - 1, (micro_batch, 12), generator=gen)
    masked = torch.rand(clean.shape, generator=gen) < 0.5
    noised, sigma, w_t = torch.where(masked, MASK_ID, clean), torch.rand(micro_batch, generator=gen), torch.ones(micro_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for impl in ("reference", "new"):
        mdm_fn, sc_fn = (losses.mdm_terms, losses.sc_terms) if impl == "new" else (REFERENCE_mdm_terms, REFERENCE_sc_terms)
        mdm = mdm_fn(model(noised, sigma), clean, masked, w_t, invalid)
        sc = sc_fn(model(mdm.corrector_input, sigma), clean, mdm.corrector_input, w_t, invalid, LossOptions())
        grads[impl] = torch.autograd.grad(mdm.per_token.sum() + sc.per_token.sum(), params)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(grads["new"], grads["reference"]))
    assert sum(int(g.abs().sum() > 0) for g in grads["new"]) > len(params) // 2


def test_suppression_is_in_place_except_on_a_leaf_that_requires_grad():
    logits = torch.randn(2, 3, VOCAB) * 1.0  # a non-leaf, as a model's output
    out = losses.suppress_invalid_(logits, INVALID)
    assert out.data_ptr() == logits.data_ptr() and torch.all(logits[..., INVALID] == float("-inf"))
    leaf = torch.randn(2, 3, VOCAB, requires_grad=True)
    copy = losses.suppress_invalid_(leaf, INVALID)
    assert copy.data_ptr() != leaf.data_ptr() and torch.isfinite(leaf).all()
    assert torch.equal(copy, losses.suppress_invalid(leaf, INVALID))


def test_in_place_on_a_tensor_autograd_saved_fails_loudly():
    """Why in place cannot silently corrupt a gradient: had an op before the loss kept the logits
    for its backward (exp keeps its output), autograd's version counter stops the backward."""
    x = torch.randn(2, VOCAB, requires_grad=True)
    saved = x.exp()
    losses.suppress_invalid_(saved, INVALID)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


# ------------------------------------------------------------------ the argmax
def first_max_index(x: torch.Tensor) -> torch.Tensor:
    """Independent: the lowest id holding the row maximum, by comparison with the maximum."""
    top = x.float().amax(-1, keepdim=True)
    ids = torch.arange(x.shape[-1]).expand_as(x)
    return torch.where(x.float() == top, ids, x.shape[-1]).amin(-1)


def tied_bf16_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """bf16 logits with many ties: values on a coarse grid, each row's maximum at several ids."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 6, (rows, vocab), generator=gen) * 0.5).to(torch.bfloat16)
    for r in range(rows):
        spots = torch.randint(0, vocab, (1 + r % 5,), generator=gen)
        x[r, spots] = 3.0  # the maximum, at 1..5 places (one row: at id 0 and vocab-1 too)
    x[0, 0] = x[0, -1] = 3.0
    return x


@pytest.mark.parametrize("vocab", [64, 50257])
def test_argmax_in_bf16_is_the_argmax_of_an_fp32_copy_ties_included(single_process_world, vocab):
    x = tied_bf16_logits(24, vocab).view(2, 12, vocab)
    got = losses.vocab_parallel_argmax(x)
    assert torch.equal(got, REFERENCE_vocab_parallel_argmax(x))
    assert torch.equal(got, first_max_index(x))  # the tie rule: the lowest id
    assert (x == x.amax(-1, keepdim=True)).sum(-1).max() > 1  # there were ties


def test_argmax_of_fp32_logits_is_taken_in_fp32(single_process_world):
    """Maxima that differ by less than bf16's resolution (2^-8): a narrowed argmax would see ties
    and pick the first id; the fp32 one picks the true maximum."""
    x = torch.zeros(4, VOCAB)
    x[:, 5] = 1.0
    x[:, 40] = 1.0 + 2 ** -12  # bf16(1 + 2^-12) == 1.0
    assert torch.equal(losses.vocab_parallel_argmax(x), torch.full((4,), 40))


def test_argmax_allocates_no_copy_of_the_logits(single_process_world):
    x = tied_bf16_logits(8, 50257).view(2, 4, 50257)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        losses.vocab_parallel_argmax(x)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    assert allocated < x.numel() * x.element_size() / 10, allocated  # the reference allocates 2x its size


def tp2_argmax_worker():
    """Two tensor-parallel ranks, each with half of a bf16 vocabulary whose maxima are tied within
    and across the halves: the combined argmax is the lowest id of the full row."""
    from prosec_mcore.runtime import destroy_distributed, initialize_distributed

    initialize_distributed(tp=2, pp=1, seed=1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    full = tied_bf16_logits(24, 128, seed=3)
    full[1, 64] = full[1, 100] = 9.0  # maximum only in the second half, twice
    full[2, 10] = full[2, 70] = 9.0  # tied across the halves: rank 0 wins
    half = full.view(2, 12, 128)[..., rank * 64:(rank + 1) * 64]
    got = losses.vocab_parallel_argmax(half)
    assert torch.equal(got, first_max_index(full).view(2, 12)), (got, first_max_index(full))
    print(f"rank {rank}/2: argmax ok")
    destroy_distributed()


def test_argmax_combines_tensor_parallel_shards_ties_to_the_lowest_id():
    out = run_distributed(f"{THIS_FILE}:tp2_argmax_worker", nproc=2, timeout=180)
    assert "rank 0/2: argmax ok" in out and "rank 1/2: argmax ok" in out


# ------------------------------------------------------------------ grouped-query attention
SEQ, BATCH, HEADS, HEAD_DIM = 16, 2, 8, 8
# SDPA with enable_gqa against SDPA on repeated K/V and megatron's unfused attention: the same fp32
# math in another order (the GQA kernel sums a K/V head's gradient over its query heads itself,
# the reference in repeat_interleave's backward). Measured max |a - b| / max |b| over the output and
# dq, dk, dv (values up to 30): at most 2.6e-7 against either; with dropout (PyTorch's math kernel
# both ways on CPU) exactly 0. GQA_RTOL = 1e-5, while a wrong head grouping differs by O(0.1).
GQA_RTOL = 1e-5


def attention_modules(groups: int, dropout: float = 0.0):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_attention_heads=HEADS, hidden_size=HEADS * HEAD_DIM,
                                    num_query_groups=groups, attention_dropout=dropout)
    config = transformer_config(cfg)
    make = lambda cls: cls(config, layer_number=1, attn_mask_type=AttnMaskType.no_mask, attention_type="self")  # noqa: E731
    return {"sdpa": make(SDPAttention), "reference": make(REFERENCE_RepeatedKVAttention),
            "unfused": make(DotProductAttention)}


def qkv(groups: int):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=gen) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


def document_mask():
    """megatron's bool mask [b, 1, s, s], True = masked out: two documents per sample."""
    doc = (torch.arange(SEQ) >= torch.tensor([[5], [11]])).long()  # sample 0 splits at 5, sample 1 at 11
    return (doc[:, :, None] != doc[:, None, :])[:, None]


def forward_and_grads(module, inputs, mask, rng_states=None):
    if rng_states is not None:  # replay the dropout: the RNG tracker's stream SDPAttention draws from
        tensor_parallel.get_cuda_rng_tracker().set_states(dict(rng_states))  # set_states keeps the dict
    out = module(*inputs, attention_mask=mask)
    return [out.detach(), *torch.autograd.grad(out.square().sum(), inputs)]


@pytest.mark.parametrize("groups", [2, 1, 4], ids=["gqa", "mqa", "gqa-group-2"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "document-mask"])
def test_gqa_through_sdpa_equals_repeated_kv_and_megatron(single_process_world, groups, with_mask):
    modules = attention_modules(groups)
    inputs, mask = qkv(groups), document_mask() if with_mask else None
    got = forward_and_grads(modules["sdpa"], inputs, mask)
    for other in ("reference", "unfused"):
        want = forward_and_grads(modules[other], inputs, mask)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert relative_error(a, b) < GQA_RTOL, (other, name, relative_error(a, b))


def test_gqa_with_dropout_equals_repeated_kv_under_the_same_seed(single_process_world):
    modules = attention_modules(2, dropout=0.3)
    for m in modules.values():
        m.train()
    inputs, states = qkv(2), tensor_parallel.get_cuda_rng_tracker().get_states()
    got = forward_and_grads(modules["sdpa"], inputs, document_mask(), states)
    want = forward_and_grads(modules["reference"], inputs, document_mask(), states)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert relative_error(a, b) < GQA_RTOL, (name, relative_error(a, b))
    no_dropout = forward_and_grads(attention_modules(2)["sdpa"], inputs, document_mask())
    assert not torch.allclose(got[0], no_dropout[0])  # dropout did act


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "document-mask"])
def test_cpu_flash_kernel_runs_gqa_without_repeating_kv(single_process_world, with_mask):
    """The profiler trace of forward and backward: PyTorch's CPU flash kernel, and no repeat of K/V
    (no aten::repeat_interleave, no math kernel) anywhere."""
    module = attention_modules(2)["sdpa"]
    inputs, mask = qkv(2), document_mask() if with_mask else None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module(*inputs, attention_mask=mask).sum().backward()
    ops = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops
    assert not ops & {"aten::repeat_interleave", "aten::_scaled_dot_product_attention_math"}, sorted(ops)


# ------------------------------------------------------------------ MDLM validation
def count_forwards(model) -> list:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_mdlm_validation_runs_one_pass_and_reports_no_corrector(single_process_world):
    step, _, model, noise = make_step("mdlm")
    batches = lambda index: text_microbatches()  # noqa: E731
    calls = count_forwards(model)
    mdlm = validation_metrics(step, batches, noise, eval_iters=2)
    assert len(calls) == 2 * len(text_microbatches())  # one forward per micro-batch, no corrector pass
    assert set(mdlm) == {"valid_nelbo", "valid_ppl_bound"} and not set(CORRECTOR_KEYS) & set(mdlm)
    calls.clear()
    asked = validation_metrics(step, batches, noise, eval_iters=2, with_corrector=True)
    assert len(calls) == 2 * 2 * len(text_microbatches()) and set(CORRECTOR_KEYS) <= set(asked)
    step.objective = "proseco"  # the same weights, as the trainer's objective setter switches it
    proseco = validation_metrics(step, batches, noise, eval_iters=2)
    assert set(CORRECTOR_KEYS) <= set(proseco)
    assert mdlm["valid_nelbo"] == proseco["valid_nelbo"] == asked["valid_nelbo"]  # the MDM pass is the same


def test_proseco_validation_is_bitwise_the_reference(single_process_world):
    step, _, _, noise = make_step("proseco")
    got = validation_metrics(step, lambda index: text_microbatches(), noise, eval_iters=2)
    want = REFERENCE_validation_metrics(step, lambda index: text_microbatches(), noise, eval_iters=2)
    assert list(got) == list(want) and got == want
