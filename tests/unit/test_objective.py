"""The ProSeCo objective as the training step computes it, against plain PyTorch.

The reference below re-derives docs/method.md section 1 from scratch with torch.log_softmax and
torch.argmax on the same model and the same noise: mask-logit (and padding) suppression, the
argmax corrector input, w(t), both loss terms, every option, and the normalisation by the number
of tokens of the whole global batch. The step under test runs the real megatron-core schedule,
megatron DDP and the vocab-parallel cross-entropy.
"""
import dataclasses

import pytest
import torch

from prosec_mcore.config import Config
from prosec_mcore.diffusion.losses import LossOptions
from prosec_mcore.diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME
from prosec_mcore.diffusion.schedules import build_schedule
from prosec_mcore.model.builder import build_model
from megatron.core.distributed import finalize_model_grads
from prosec_mcore.training.optim import wrap_ddp
from prosec_mcore.training.step import NoiseSettings, ProSeCoStep, noise_microbatch
from tests.compare import set_generic_point

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
        "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date.")
CHARS = sorted(set(TEXT))
VOCAB = len(CHARS) + 1  # + the mask token
MASK_ID = VOCAB - 1
SEQ, MICRO, NUM_MICRO = 24, 2, 2


def text_microbatches():
    ids = torch.tensor([CHARS.index(c) for c in TEXT])
    mbs = []
    for j in range(NUM_MICRO):
        rows = [ids[(j * MICRO + i) * SEQ:(j * MICRO + i + 1) * SEQ] for i in range(MICRO)]
        pos = torch.arange(j * MICRO, (j + 1) * MICRO)
        mbs.append({"tokens": torch.stack(rows), "sample_index": 100 + pos, "batch_position": pos,
                    "global_batch_index": torch.full((MICRO,), 3)})
    return mbs


def make_step(objective="proseco", opts=None, style="dit", time_conditioning="adaln", schedule="loglinear"):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, style=style, time_conditioning=time_conditioning, num_layers=2)
    cfg.data.seq_length = SEQ
    model = build_model(cfg, VOCAB)
    # The project's generic point (tests/compare.py): every parameter perturbed by seeded noise,
    # adaLN gates included (zero at init, which would hide the blocks' gradients). The noise is
    # small (0.08 on matrices, 0.1 on vectors) so attention stays well-conditioned: a saturated
    # softmax would make its gradient a difference of near-equal numbers, whose fp32 round-off
    # (different between attention kernels and summation orders) is large relative to the result.
    set_generic_point(model)
    chunks = wrap_ddp([model], model.config)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = chunks[0].no_sync
    step = ProSeCoStep(chunks, model.config, objective, opts or LossOptions(), build_schedule(schedule), MASK_ID, VOCAB, SEQ, MICRO)
    noise = NoiseSettings(seed=5, eps=1e-3, antithetic=True, global_batch_size=MICRO * NUM_MICRO,
                          time_stream=STREAM_TRAIN_TIME, mask_stream=STREAM_TRAIN_MASK)
    return step, chunks, model, noise


def reference_terms(model, noised, opts: LossOptions):
    """Plain-PyTorch L_MDM and L_SC (each already divided by the tokens of the whole batch)."""
    mdm, sc, tokens = 0.0, 0.0, 0
    for nb in noised:
        x, w = nb.clean, nb.weight[:, None]
        logits = model(nb.noised, nb.sigma).float().clone()
        logits[..., MASK_ID] = float("-inf")
        logits[..., VOCAB:] = float("-inf")  # vocabulary padding
        ce = -torch.log_softmax(logits, -1).gather(-1, x[..., None]).squeeze(-1)
        mdm = mdm + (w * ce * nb.masked).sum()
        y = logits.detach().argmax(-1)
        if opts.corrector_input == "masked":
            y = torch.where(nb.masked, y, x)
        logits2 = model(y, nb.sigma).float().clone()
        logits2[..., MASK_ID] = float("-inf")
        logits2[..., VOCAB:] = float("-inf")
        ce2 = -torch.log_softmax(logits2, -1).gather(-1, x[..., None]).squeeze(-1)
        ww = w if opts.weighted_corrector_loss else torch.ones_like(w)
        per = torch.where(y != x, ww * ce2, -ww * torch.exp(-ce2)) if opts.errors_upweighted else ww * ce2
        sc = sc + per.sum()
        tokens += x.numel()
    return mdm / tokens, sc / tokens


def noised_batches(step, noise):
    return [noise_microbatch(mb, step.schedule, noise, MASK_ID, torch.device("cpu")) for mb in text_microbatches()]


OPTIONS = [
    dict(),
    dict(corrector_input="masked"),
    dict(errors_upweighted=True),
    dict(weighted_corrector_loss=False, lambda_mdm=0.7, lambda_sc=1.3),
    dict(corrector_input="masked", errors_upweighted=True, weighted_corrector_loss=False),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "reference")
def test_losses_equal_plain_pytorch(single_process_world, options):
    opts = LossOptions(**options)
    step, chunks, model, noise = make_step("proseco", opts)
    metrics = step.run(text_microbatches(), noise, forward_only=True)
    with torch.no_grad():
        ref_mdm, ref_sc = reference_terms(model, noised_batches(step, noise), opts)
    assert metrics["mdm_loss"] == pytest.approx(ref_mdm.item(), rel=1e-5)
    assert metrics["sc_loss"] == pytest.approx(ref_sc.item(), rel=1e-5, abs=1e-6)
    assert metrics["loss"] == pytest.approx(opts.lambda_mdm * ref_mdm.item() + opts.lambda_sc * ref_sc.item(), rel=1e-5)


@pytest.mark.parametrize("style,time_conditioning,schedule", [("llama", "none", "cosine"), ("dit", "adaln", "linear")])
def test_losses_equal_plain_pytorch_other_models(single_process_world, style, time_conditioning, schedule):
    step, chunks, model, noise = make_step("proseco", None, style, time_conditioning, schedule)
    metrics = step.run(text_microbatches(), noise, forward_only=True)
    with torch.no_grad():
        ref_mdm, ref_sc = reference_terms(model, noised_batches(step, noise), LossOptions())
    assert metrics["mdm_loss"] == pytest.approx(ref_mdm.item(), rel=1e-5)
    assert metrics["sc_loss"] == pytest.approx(ref_sc.item(), rel=1e-5)


def _count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("objective", ["proseco", "mdlm"])
def test_gradient_is_sum_of_the_two_terms(single_process_world, objective):
    opts = LossOptions(lambda_mdm=0.8, lambda_sc=1.2, errors_upweighted=True)
    step, chunks, model, noise = make_step(objective, opts)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_mdm, ref_sc = reference_terms(model, noised_batches(step, noise), opts)
    g_mdm = torch.autograd.grad(opts.lambda_mdm * ref_mdm, params, retain_graph=True, allow_unused=True)
    g_sc = torch.autograd.grad(opts.lambda_sc * ref_sc, params, allow_unused=True)

    calls = _count_forwards(model)
    chunks[0].zero_grad_buffer()
    metrics = step.run(text_microbatches(), noise)
    assert len(calls) == (2 if objective == "proseco" else 1) * NUM_MICRO
    if objective == "mdlm":
        assert metrics["sc_loss"] == 0.0
    checked = 0
    for p, a, b in zip(params, g_mdm, g_sc):
        expected = (a if a is not None else torch.zeros_like(p))
        if objective == "proseco" and b is not None:
            expected = expected + b
        # float32: the step accumulates 2 x NUM_MICRO backward passes into DDP's buffer, the
        # reference differentiates one summed loss; round-off is relative to the largest entry.
        torch.testing.assert_close(p.main_grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item() + 1e-8)
        checked += int(expected.abs().sum() > 0)
    assert checked > len(params) // 2  # most parameters receive a non-zero gradient at this point
