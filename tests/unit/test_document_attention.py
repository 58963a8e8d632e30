"""Document attention and variable-length samples (diffusion/packing.py) on one process, fp32, CPU.

The claims, each against an independent computation:
  * a packed sample [doc A + EOD, doc B + EOD] gives at each document's positions the logits that
    the document gives alone (same sigma), for both local core attentions (SDPA, megatron's
    unfused), the adaLN layer (dit) and megatron's own layer (llama), with grouped-query
    attention. The documents sit at different offsets in the pack, so this also checks that
    rotary embeddings need no position reset. Tolerance: max |packed - alone| / max |alone| was
    at most 5.6e-7 over these models (fp32 round-off: different shapes and rotary angles);
    DOC_RTOL = 5e-6, while attention that crosses the boundary moves the logits by O(0.5);
  * attention across documents is exactly zero: d logits(A) / d embeddings(B) == 0 exactly;
  * the masks match a reference written from the definition ("i and j share a document iff no
    EOD lies in positions min(i, j) .. max(i, j) - 1"), and the step's losses match plain model
    calls that pass that mask to both passes (the corrector pass included);
  * variable length: cut_lengths' distribution; the removed part is never masked, adds 0 to the
    losses and counts, and a kept position's logits do not depend on the removed tokens;
  * with the options off the step is bitwise the unrestricted step.
"""
import dataclasses

import pytest
import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from prosec_mcore.config import Config
from prosec_mcore.diffusion.losses import LossOptions
from prosec_mcore.diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME
from prosec_mcore.diffusion.packing import (
    PackingSettings, attention_mask_from_segments, cu_seqlens_from_segments, cut_lengths, document_segments,
    packed_seq_params_from_segments, segment_ids,
)
from prosec_mcore.diffusion.schedules import build_schedule
from prosec_mcore.model.builder import build_model, transformer_config
from prosec_mcore.model.sdpa_attention import SDPAttention
from prosec_mcore.training.optim import wrap_ddp
from prosec_mcore.training.step import NoiseSettings, ProSeCoStep, noise_microbatch
from tests.compare import set_generic_point

VOCAB, EOD, PAD, MASK_ID = 50, 1, 0, 49
DOC_RTOL = 5e-6  # measured at most 5.6e-7 (module docstring)
MODELS = {  # style, time conditioning, local attention
    "dit-sdpa": ("dit", "adaln", "sdpa"),
    "dit-unfused": ("dit", "adaln", "unfused"),
    "llama-sdpa": ("llama", "none", "sdpa"),
    "llama-unfused": ("llama", "none", "unfused"),
}


def tiny_model(name: str):
    style, time_conditioning, attention = MODELS[name]
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, style=style, time_conditioning=time_conditioning,
                                    local_attention=attention, num_layers=2, num_query_groups=2)  # GQA: 4 heads, 2 groups
    model = build_model(cfg, VOCAB, backend="local")
    set_generic_point(model)  # every block (adaLN gates included) contributes
    return model


def reference_mask(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, 1, L, L] True = masked out, from the definition, position pair by position pair."""
    b, length = tokens.shape
    mask = torch.zeros(b, 1, length, length, dtype=torch.bool)
    for r in range(b):
        row = tokens[r].tolist()
        for i in range(length):
            for j in range(length):
                lo, hi = min(i, j), max(i, j)
                mask[r, 0, i, j] = eod in row[lo:hi]
    return mask


def documents():
    gen = torch.Generator().manual_seed(0)
    doc_a = torch.randint(2, MASK_ID, (7,), generator=gen).tolist() + [EOD]
    doc_b = torch.randint(2, MASK_ID, (11,), generator=gen).tolist() + [EOD]
    return doc_a, doc_b


def relative_error(x, reference):
    return ((x - reference).abs().max() / reference.abs().max()).item()


# ----------------------------------------------------------------------------------- packing functions
def test_segments_masks_and_cu_seqlens_follow_the_definition():
    tokens = torch.tensor([[5, EOD, 3, 4, EOD, EOD, 7]])
    assert document_segments(tokens, EOD).tolist() == [[0, 0, 1, 1, 1, 2, 3]]  # an EOD closes its document
    assert cu_seqlens_from_segments(document_segments(tokens, EOD)).tolist() == [0, 2, 5, 6, 7]
    # cut at length 3: the removed part [4, EOD, EOD, 7] is one segment after the last kept
    cut = segment_ids(tokens, EOD, torch.tensor([3]))
    assert cut.tolist() == [[0, 0, 1, 2, 2, 2, 2]]
    assert segment_ids(tokens, None, torch.tensor([3])).tolist() == [[0, 0, 0, 1, 1, 1, 1]]
    assert segment_ids(tokens, None, torch.tensor([7])).tolist() == [[0] * 7]
    # two samples read as one flat pack: the second sample starts a segment of its own
    two = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    cu = cu_seqlens_from_segments(two)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 4, 8]

    gen = torch.Generator().manual_seed(1)
    random_tokens = torch.randint(0, 4, (3, 17), generator=gen)  # EOD = 1: many documents, some empty
    assert torch.equal(attention_mask_from_segments(segment_ids(random_tokens, EOD)), reference_mask(random_tokens, EOD))


def test_packed_seq_params_describe_the_documents_of_one_sample():
    tokens = torch.tensor([[5, EOD, 3, 4, EOD, EOD, 7, 8]])
    params = packed_seq_params_from_segments(segment_ids(tokens, EOD))
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 2, 5, 6, 8]
    assert params.max_seqlen_q == params.max_seqlen_kv == 3
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        packed_seq_params_from_segments(segment_ids(tokens.repeat(2, 1), EOD))


def test_packing_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="eod"):
        PackingSettings(document_attention=True)
    with pytest.raises(ValueError, match="variable_length_fraction"):
        PackingSettings(variable_length_fraction=1.5)


def test_cut_lengths_distribution():
    """P(cut) = fraction, lengths uniform in [1, L]; drawn from (seed, sample index) alone."""
    n, length, fraction = 10000, 32, 0.1
    lengths = cut_lengths(3, torch.arange(n), length, fraction)
    assert lengths.dtype == torch.long and lengths.shape == (n,)
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= length
    # a cut sample keeps all L positions with probability 1/L, so P(length < L) = f (1 - 1/L)
    p = fraction * (1 - 1 / length)
    shorter = int((lengths < length).sum())
    assert abs(shorter - n * p) < 5 * (n * p * (1 - p)) ** 0.5  # 5 binomial standard deviations
    cut = lengths[lengths < length]
    assert set(cut.tolist()) == set(range(1, length))  # every shorter length occurs (about 31 times each)
    assert abs(cut.double().mean().item() - length / 2) < 5 * (length / (12 ** 0.5)) / len(cut) ** 0.5
    # fraction 1: every sample is cut, each length 1 .. L (L included) with probability 1 / L
    counts = torch.bincount(cut_lengths(3, torch.arange(n, 2 * n), length, 1.0), minlength=length + 1)
    assert counts[0] == 0 and len(counts) == length + 1
    assert (counts[1:] - n / length).abs().max() < 5 * (n / length * (1 - 1 / length)) ** 0.5
    assert torch.equal(cut_lengths(3, torch.tensor([17, 4, 17]), length, fraction), lengths[[17, 4, 17]])
    assert not torch.equal(cut_lengths(4, torch.arange(200), length, 0.5), cut_lengths(3, torch.arange(200), length, 0.5))
    assert cut_lengths(3, torch.arange(50), length, 0.0).tolist() == [length] * 50
    assert (cut_lengths(3, torch.arange(50), length, 1.0) <= length).all()


# ----------------------------------------------------------------------------------- core attention
@pytest.mark.parametrize("core", [SDPAttention, DotProductAttention], ids=["sdpa", "unfused"])
def test_core_attention_applies_a_given_mask_under_no_mask_type(single_process_world, core):
    """Built with AttnMaskType.no_mask (as our specs build it), each core attention applies the mask
    it is handed: its output equals softmax over the allowed keys only, written out here with GQA."""
    heads, groups, dim, seq, batch = 4, 2, 8, 10, 2
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_attention_heads=heads, hidden_size=heads * dim, num_query_groups=groups)
    attention = core(transformer_config(cfg), layer_number=1, attn_mask_type=AttnMaskType.no_mask, attention_type="self")
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(seq, batch, heads, dim, generator=gen)
    k, v = (torch.randn(seq, batch, groups, dim, generator=gen) for _ in range(2))
    tokens = torch.randint(0, 4, (batch, seq), generator=gen)
    mask = reference_mask(tokens, EOD)
    out = attention(q, k, v, attention_mask=mask)
    # reference: [b, heads, s, s] scores, masked entries removed before the softmax
    kk, vv = (t.repeat_interleave(heads // groups, dim=2).permute(1, 2, 0, 3) for t in (k, v))
    scores = q.permute(1, 2, 0, 3) @ kk.transpose(-1, -2) / dim ** 0.5
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    expected = (probs @ vv).permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
    assert relative_error(out, expected) < 1e-5  # fp32 round-off: observed 9e-8


def test_sdpa_refuses_packed_sequences(single_process_world):
    cfg = Config()
    attention = SDPAttention(transformer_config(cfg), layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                             attention_type="self")
    q = torch.zeros(4, 1, cfg.model.num_attention_heads, cfg.model.hidden_size // cfg.model.num_attention_heads)
    params = packed_seq_params_from_segments(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="packed"):
        attention(q, q, q, attention_mask=None, packed_seq_params=params)


# ----------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_documents_give_the_logits_of_each_document_alone(single_process_world, name):
    model = tiny_model(name)
    doc_a, doc_b = documents()
    clean = torch.tensor([doc_a + doc_b, doc_b + doc_a])  # each document at two offsets
    model_input = clean.clone()
    model_input[0, len(doc_a) - 1] = MASK_ID  # the segments come from the clean tokens, not the input
    model_input[1, 2] = MASK_ID
    sigma = torch.tensor([0.7, 1.9])
    mask = attention_mask_from_segments(segment_ids(clean, EOD))
    with torch.no_grad():
        packed = model(model_input, sigma, attention_mask=mask)
        unrestricted = model(model_input, sigma)
        worst, crossing = 0.0, 0.0
        for row in range(2):
            offset = 0
            for doc in (doc_a, doc_b) if row == 0 else (doc_b, doc_a):
                span = slice(offset, offset + len(doc))
                alone = model(model_input[row:row + 1, span], sigma[row:row + 1])[0]
                worst = max(worst, relative_error(packed[row, span], alone))
                crossing = max(crossing, relative_error(unrestricted[row, span], alone))
                offset += len(doc)
    assert worst < DOC_RTOL, f"{name}: a packed document differs from the document alone by {worst:.2e}"
    assert crossing > 1e-2  # without the mask the documents do see each other


@pytest.mark.parametrize("name", list(MODELS))
def test_no_gradient_crosses_a_document_boundary(single_process_world, name):
    """d logits(A) / d embedding(B) is exactly zero: the cross-document attention weights are 0."""
    model = tiny_model(name)
    doc_a, doc_b = documents()
    clean = torch.tensor([doc_a + doc_b])
    embedded = []

    def keep_embedding(module, inputs, output):
        output.retain_grad()
        embedded.append(output)

    handle = model.embedding.register_forward_hook(keep_embedding)
    try:
        for mask, expect_zero in ((attention_mask_from_segments(segment_ids(clean, EOD)), True), (None, False)):
            embedded.clear()
            logits = model(clean, torch.tensor([1.1]), attention_mask=mask)
            logits[0, :len(doc_a)].square().sum().backward()
            grad = embedded[0].grad[:, 0]  # [s, h]
            into_b, into_a = grad[len(doc_a):].abs().max().item(), grad[:len(doc_a)].abs().max().item()
            assert into_a > 0
            assert (into_b == 0.0) if expect_zero else (into_b > 0), (name, mask is not None, into_b)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["dit-sdpa", "llama-unfused"])
def test_kept_positions_ignore_the_removed_part(single_process_world, name):
    """With a cut at length l (and documents), the kept logits are bitwise those of any other tokens
    in the removed part: the removed segment is invisible (its weights are exactly 0)."""
    model = tiny_model(name)
    doc_a, doc_b = documents()
    clean = torch.tensor([doc_a + doc_b])
    length = torch.tensor([13])
    other = clean.clone()
    other[0, 13:] = torch.arange(13, clean.shape[1]) % 40 + 2
    sigma = torch.tensor([0.9])
    with torch.no_grad():
        logits = model(clean, sigma, attention_mask=attention_mask_from_segments(segment_ids(clean, EOD, length)))
        changed = model(other, sigma, attention_mask=attention_mask_from_segments(segment_ids(other, EOD, length)))
        without_cut = model(other, sigma, attention_mask=attention_mask_from_segments(segment_ids(other, EOD)))
    assert torch.equal(logits[0, :13], changed[0, :13])
    assert not torch.allclose(logits[0, :13], without_cut[0, :13], atol=1e-3)  # doc B's kept start saw its tail


def test_model_refuses_packed_sequences_of_several_samples(single_process_world):
    model = tiny_model("dit-sdpa")
    params = packed_seq_params_from_segments(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        model(torch.zeros(2, 6, dtype=torch.long), torch.ones(2), packed_seq_params=params)


# ----------------------------------------------------------------------------------- training step
SEQ, MICRO, NUM_MICRO = 20, 2, 2
NOISE = NoiseSettings(seed=5, eps=1e-3, antithetic=True, global_batch_size=MICRO * NUM_MICRO,
                      time_stream=STREAM_TRAIN_TIME, mask_stream=STREAM_TRAIN_MASK)


def step_microbatches(first_index=100):
    doc_a, doc_b = documents()
    stream = torch.tensor((doc_a + doc_b + doc_b[:5] + [EOD] + doc_a[3:]) * 3)
    mbs = []
    for j in range(NUM_MICRO):
        rows = [stream[(j * MICRO + i) * SEQ + 3 * i:(j * MICRO + i + 1) * SEQ + 3 * i] for i in range(MICRO)]
        pos = torch.arange(j * MICRO, (j + 1) * MICRO)
        mbs.append({"tokens": torch.stack(rows), "sample_index": first_index + pos, "batch_position": pos,
                    "global_batch_index": torch.full((MICRO,), 3)})
    return mbs


def wrapped_model(name):
    model = tiny_model(name)
    chunks = wrap_ddp([model], model.config)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = chunks[0].no_sync
    return chunks, model


def make_step(chunks, packing, objective="proseco", opts=None):
    return ProSeCoStep(chunks, chunks[0].config, objective, opts or LossOptions(), build_schedule("loglinear"), MASK_ID,
                       VOCAB, SEQ, MICRO, packing=packing)


def reference_metrics(model, microbatches, schedule, opts, lengths_of=None):
    """Plain model calls, both passes with reference_mask; a cut sample (lengths_of: sample index ->
    length) has its removed part unmasked, padded, in its own segment and out of every sum."""
    sums = dict(mdm=0.0, sc=0.0, tokens=0, masked=0, errors=0, removed=0)
    for mb in microbatches:
        nb = noise_microbatch(mb, schedule, NOISE, MASK_ID, torch.device("cpu"))
        x, w = nb.clean, nb.weight[:, None]
        keep = torch.ones_like(x, dtype=torch.bool)
        mask = reference_mask(x, EOD)
        for r, index in enumerate(mb["sample_index"].tolist()):
            length = (lengths_of or {}).get(index, SEQ)
            keep[r, length:] = False
            mask[r, 0, :length, length:] = mask[r, 0, length:, :length] = True
            mask[r, 0, length:, length:] = False
        masked = nb.masked & keep
        z = torch.where(keep, torch.where(masked, MASK_ID, x), PAD)

        def log_probs(inputs):
            logits = model(inputs, nb.sigma, attention_mask=mask).float().clone()
            logits[..., MASK_ID] = float("-inf")
            logits[..., VOCAB:] = float("-inf")
            return torch.log_softmax(logits, -1)

        first = log_probs(z)
        ce = -first.gather(-1, x[..., None]).squeeze(-1)
        sums["mdm"] += (w * ce * masked).sum().item()
        y = torch.where(keep, first.argmax(-1), PAD)
        ce2 = -log_probs(y).gather(-1, x[..., None]).squeeze(-1)
        errors = (y != x) & keep
        per = torch.where(errors, w * ce2, -w * torch.exp(-ce2)) if opts.errors_upweighted else w * ce2
        sums["sc"] += (per * keep).sum().item()
        sums["tokens"] += x.numel()
        sums["masked"] += masked.sum().item()
        sums["errors"] += errors.sum().item()
        sums["removed"] += (~keep).sum().item()
    n = sums["tokens"]
    return dict(mdm_loss=sums["mdm"] / n, sc_loss=sums["sc"] / n, mask_fraction=sums["masked"] / n,
                corrector_input_error_rate=sums["errors"] / n, removed_fraction=sums["removed"] / n)


@pytest.mark.parametrize("name", ["dit-sdpa", "llama-unfused"])
def test_step_uses_the_document_mask_in_both_passes(single_process_world, name):
    opts = LossOptions(errors_upweighted=True)
    packing = PackingSettings(document_attention=True, eod_id=EOD, pad_id=PAD, seed=5)
    chunks, model = wrapped_model(name)
    step = make_step(chunks, packing, opts=opts)
    metrics = step.run(step_microbatches(), NOISE, forward_only=True)
    with torch.no_grad():
        expected = reference_metrics(model, step_microbatches(), step.schedule, opts)
        unrestricted = make_step(chunks, None, opts=opts).run(step_microbatches(), NOISE, forward_only=True)
    for key in ("mdm_loss", "sc_loss"):  # fp32 round-off: observed at most 4.3e-8 relative
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
        assert abs(unrestricted[key] - expected[key]) > 1e-3 * abs(expected[key]), key  # the mask matters
    assert "removed_fraction" not in metrics


def test_step_cuts_samples_out_of_masking_losses_and_counts(single_process_world):
    """fraction 1: every sample is cut (most to fewer than L positions). Losses and counts equal the
    reference that leaves the removed part out; training cuts by default, validation does not."""
    opts = LossOptions(errors_upweighted=True)
    packing = PackingSettings(document_attention=True, eod_id=EOD, pad_id=PAD, seed=5, variable_length_fraction=1.0)
    chunks, model = wrapped_model("dit-sdpa")
    step = make_step(chunks, packing, opts=opts)
    mbs = step_microbatches()
    lengths_of = {}
    for mb in mbs:
        for index, length in zip(mb["sample_index"].tolist(), cut_lengths(5, mb["sample_index"], SEQ, 1.0).tolist()):
            lengths_of[index] = length
    assert min(lengths_of.values()) < SEQ // 2 < max(lengths_of.values())  # the draw cuts short and long
    metrics = step.run(mbs, NOISE, forward_only=True, variable_length=True)
    with torch.no_grad():
        expected = reference_metrics(model, step_microbatches(), step.schedule, opts, lengths_of)
    assert expected["removed_fraction"] > 0.2
    for key in ("mdm_loss", "sc_loss"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    for key in ("mask_fraction", "corrector_input_error_rate", "removed_fraction"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key
    # the removed tokens themselves play no part
    changed = step_microbatches()
    for mb in changed:
        for r, index in enumerate(mb["sample_index"].tolist()):
            mb["tokens"][r, lengths_of[index]:] = 7
    again = step.run(changed, NOISE, forward_only=True, variable_length=True)
    assert all(again[key] == metrics[key] for key in metrics)
    # a training step cuts by default (and backpropagates); forward-only runs score whole samples
    chunks[0].zero_grad_buffer()
    trained = step.run(step_microbatches(), NOISE)
    assert trained["removed_fraction"] == metrics["removed_fraction"]
    assert trained["mdm_loss"] == pytest.approx(metrics["mdm_loss"], rel=1e-6)
    assert "removed_fraction" not in step.run(step_microbatches(), NOISE, forward_only=True)


@pytest.mark.parametrize("objective", ["proseco", "mdlm"])
def test_options_off_give_bitwise_the_unrestricted_step(single_process_world, objective):
    """No packing, packing with both options off, and a fraction so small that no sample of these
    batches is cut: the same metrics and gradients, bit for bit."""
    chunks, model = wrapped_model("dit-sdpa")
    runs = []
    for packing in (None, PackingSettings(eod_id=EOD, pad_id=PAD),
                    PackingSettings(eod_id=EOD, pad_id=PAD, seed=5, variable_length_fraction=1e-9)):
        chunks[0].zero_grad_buffer()
        metrics = make_step(chunks, packing, objective).run(step_microbatches(), NOISE)
        metrics.pop("removed_fraction", None)
        runs.append((metrics, {n: p.main_grad.clone() for n, p in model.named_parameters()}))
    for metrics, grads in runs[1:]:
        assert metrics == runs[0][0]
        assert all(torch.equal(grads[n], runs[0][1][n]) for n in grads)


def test_te_layers_get_thd_parameters_and_one_sample_per_micro_batch(single_process_world):
    """Transformer Engine cannot run here; a local model labelled "te" shows the wiring: the step
    refuses micro-batches of 2, and with 1 it hands thd parameters (no mask) down the model, through
    the adaLN layer, to the core attention (where SDPA refuses them)."""
    chunks, model = wrapped_model("dit-sdpa")
    model.backend = "te"  # what builder.py records for Transformer Engine layers
    packing = PackingSettings(document_attention=True, eod_id=EOD)
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        ProSeCoStep(chunks, model.config, "proseco", LossOptions(), build_schedule("loglinear"), MASK_ID, VOCAB, SEQ, 2,
                    packing=packing)
    step = ProSeCoStep(chunks, model.config, "proseco", LossOptions(), build_schedule("loglinear"), MASK_ID, VOCAB,
                       SEQ, 1, packing=packing)
    single = [{key: value[r:r + 1] for key, value in mb.items()} for mb in step_microbatches() for r in range(MICRO)]
    with pytest.raises(ValueError, match=r"packed \(thd\)"):
        step.run(single, NOISE, forward_only=True)
