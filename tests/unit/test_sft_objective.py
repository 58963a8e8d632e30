"""The SFT objective (data.format=sft) as the training step computes it, against plain PyTorch.

The reference below writes docs/sft.md's objective from scratch, on the same model and the same
random draws (the per-sample times and per-token uniforms of diffusion/noise.py are the noise; the
rest is recomputed here): alpha_t and w(t) of the log-linear schedule, the forward process with the
prompt put back, the never-predicted ids at -inf, the cross-entropy by log_softmax, y by argmax with
x at the prompt, the positions the loss counts (the response, its EOS and, when
objective.sft_pad_in_loss, the EOS padding) and the normaliser (per example by its counted
positions, or per position as in pre-training). The step under test runs megatron-core's schedule,
megatron DDP and the vocab-parallel cross-entropy, both objectives, both normalisations, padding in
and out, and is compared on the reported loss terms, the corrector's input and every parameter's
gradient before any optimizer step, from a generic point (every parameter perturbed, adaLN gates
included: tests/compare.py).
"""
import dataclasses

import pytest
import torch

from megatron.core.distributed import finalize_model_grads
from prosec_mcore.config import Config, ConfigError, validate_config
from prosec_mcore.diffusion.losses import LossOptions
from prosec_mcore.diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME, sample_times, token_uniforms
from prosec_mcore.diffusion.schedules import build_schedule
from prosec_mcore.diffusion.sft import SFTSettings
from prosec_mcore.model.builder import build_model
from prosec_mcore.training.optim import wrap_ddp
from prosec_mcore.training.step import NoiseSettings, ProSeCoStep, loss_options, noise_microbatch
from tests.compare import set_generic_point

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
        "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date.")
CHARS = sorted(set(TEXT))
EOS = len(CHARS)
VOCAB = len(CHARS) + 2  # + EOS + the mask token
MASK_ID = VOCAB - 1
SEQ, MICRO, NUM_MICRO = 24, 2, 2
SCHEDULE_EPS = 1e-3  # build_schedule("loglinear")'s default
# (prompt length, response length without its EOS) per example: padding from 0 to 13 positions
SHAPES = [(5, 8), (9, 14), (3, 4), (7, 10)]


def sft_microbatches():
    """Two micro-batches of two examples, laid out as the data layer writes them (LLaDA's SFT):
    prompt, response, the response's EOS, EOS padding to SEQ; prompt_mask / pad_mask beside."""
    ids = [CHARS.index(c) for c in TEXT]
    rows, prompts, pads, start = [], [], [], 0
    for p_len, r_len in SHAPES:
        body = ids[start:start + p_len + r_len] + [EOS]
        start += 17
        rows.append(body + [EOS] * (SEQ - len(body)))
        prompts.append([i < p_len for i in range(SEQ)])
        pads.append([i >= len(body) for i in range(SEQ)])
    tokens, prompt, pad = torch.tensor(rows), torch.tensor(prompts), torch.tensor(pads)
    mbs = []
    for j in range(NUM_MICRO):
        rows_j = slice(j * MICRO, (j + 1) * MICRO)
        pos = torch.arange(j * MICRO, (j + 1) * MICRO)
        mbs.append({"tokens": tokens[rows_j], "prompt_mask": prompt[rows_j], "pad_mask": pad[rows_j],
                    "sample_index": 200 + pos, "batch_position": pos, "global_batch_index": torch.full((MICRO,), 4)})
    return mbs


NOISE = NoiseSettings(seed=11, eps=1e-3, antithetic=True, global_batch_size=MICRO * NUM_MICRO,
                      time_stream=STREAM_TRAIN_TIME, mask_stream=STREAM_TRAIN_MASK)


def make_step(objective, opts):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_layers=2, hidden_size=32, num_attention_heads=4,
                                    ffn_hidden_size=64, time_embedding_dim=32)
    cfg.data.seq_length = SEQ
    model = build_model(cfg, VOCAB)
    set_generic_point(model)  # not the adaLN-zero start: every block contributes to the gradients
    chunks = wrap_ddp([model], model.config)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = chunks[0].no_sync
    step = ProSeCoStep(chunks, model.config, objective, opts, build_schedule("loglinear"), MASK_ID, VOCAB, SEQ,
                       MICRO)
    return step, chunks, model


def reference(model, opts: LossOptions, with_corrector: bool):
    """Plain PyTorch: (mdm_loss, sc_loss, corrector_nll, mask_fraction, [y per micro-batch]), the
    loss terms already normalised as the step reports them (their sum is differentiable)."""
    sft = opts.sft
    mdm = sc = nll = 0.0
    masked_count = counted_count = 0
    ys = []
    for mb in sft_microbatches():
        x, prompt, pad = mb["tokens"], mb["prompt_mask"], mb["pad_mask"]
        b, L = x.shape
        t = sample_times(NOISE.seed, mb["sample_index"], mb["global_batch_index"], mb["batch_position"],
                         NOISE.global_batch_size, NOISE.eps, NOISE.antithetic, NOISE.time_stream)
        uniforms = token_uniforms(NOISE.seed, mb["sample_index"], L, NOISE.mask_stream)
        alpha = 1.0 - (1.0 - SCHEDULE_EPS) * t  # log-linear schedule
        masked = (uniforms < (1.0 - alpha)[:, None]) & ~prompt  # the prompt is never masked
        z = torch.where(masked, torch.full_like(x, MASK_ID), x)
        w = (1.0 / t).float()[:, None]  # -alpha'/(1 - alpha) = 1/t
        sigma = (-torch.log(alpha)).float()
        counted = ~prompt if sft.pad_in_loss else ~prompt & ~pad
        denom = counted.sum(1, keepdim=True).float() if sft.normalization == "response" else torch.full((b, 1), float(L))

        def log_probs(tokens):
            logits = model(tokens, sigma).float().clone()
            logits[..., MASK_ID] = float("-inf")
            logits[..., VOCAB:] = float("-inf")  # megatron pads the vocabulary
            return torch.log_softmax(logits, dim=-1)

        logp = log_probs(z)
        ce = -logp.gather(-1, x[..., None]).squeeze(-1)
        mdm = mdm + (w * ce * (masked & counted) / denom).sum()
        masked_count += int((masked & counted).sum())
        counted_count += int(counted.sum())
        y = logp.detach().argmax(-1)
        if opts.corrector_input == "masked":
            y = torch.where(masked, y, x)
        y = torch.where(prompt, x, y)
        ys.append(y)
        if with_corrector:
            ce2 = -log_probs(y).gather(-1, x[..., None]).squeeze(-1)
            ww = w if opts.weighted_corrector_loss else torch.ones_like(w)
            per = torch.where(y != x, ww * ce2, -ww * torch.exp(-ce2)) if opts.errors_upweighted else ww * ce2
            sc = sc + (per * counted / denom).sum()
            nll = nll + (ce2 * counted / denom).sum().item()
    n = len(SHAPES)
    return mdm / n, sc / n, nll / n, masked_count / counted_count, ys


def _capture_inputs(model):
    inputs = []
    model.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
    return inputs


CASES = [(objective, norm, pad) for objective in ("proseco", "mdlm") for norm in ("response", "tokens")
         for pad in (True, False)]


@pytest.mark.parametrize("objective,normalization,pad_in_loss", CASES,
                         ids=[f"{o}-{n}-pad_{'in' if p else 'out'}" for o, n, p in CASES])
def test_sft_loss_and_gradients_equal_plain_pytorch(single_process_world, objective, normalization, pad_in_loss):
    extra = dict(errors_upweighted=True, lambda_mdm=0.8, lambda_sc=1.3) if normalization == "tokens" else {}
    opts = LossOptions(sft=SFTSettings(normalization, pad_in_loss), **extra)
    step, chunks, model = make_step(objective, opts)
    proseco = objective == "proseco"
    params = [p for p in model.parameters() if p.requires_grad]
    ref_mdm, ref_sc, ref_nll, ref_mask_fraction, ref_ys = reference(model, opts, proseco)
    ref_total = opts.lambda_mdm * ref_mdm + (opts.lambda_sc * ref_sc if proseco else 0.0)
    expected = torch.autograd.grad(ref_total, params, allow_unused=True)

    inputs = _capture_inputs(model)
    chunks[0].zero_grad_buffer()
    metrics = step.run(sft_microbatches(), NOISE)

    # float32 throughout: the step sums micro-batch losses in another order than the reference's one
    # expression; measured over the 8 cases: <= 1.2e-7 relative on the losses, so rel 1e-5.
    assert metrics["mdm_loss"] == pytest.approx(ref_mdm.item(), rel=1e-5)
    assert metrics["mask_fraction"] == pytest.approx(ref_mask_fraction, rel=1e-12)
    if proseco:
        assert metrics["sc_loss"] == pytest.approx(ref_sc.item(), rel=1e-5)
        assert metrics["corrector_nll"] == pytest.approx(ref_nll, rel=1e-5)
        # the corrector's inputs are the last NUM_MICRO forwards: y == argmax on the response, x on the prompt
        for y, want, mb in zip(inputs[NUM_MICRO:], ref_ys, sft_microbatches()):
            assert torch.equal(y[mb["prompt_mask"]], mb["tokens"][mb["prompt_mask"]])
            assert torch.equal(y, want)
    else:
        assert metrics["sc_loss"] == 0.0 and len(inputs) == NUM_MICRO
    assert metrics["loss"] == pytest.approx(ref_total.item(), rel=1e-5)

    checked = 0
    for p, g in zip(params, expected):
        g = torch.zeros_like(p) if g is None else g
        # DDP accumulates 2 x NUM_MICRO backward passes; the reference differentiates one sum. Round-off
        # relative to the tensor's largest entry, as tests/unit/test_objective.py (measured <= 5.6e-7).
        torch.testing.assert_close(p.main_grad, g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-8)
        checked += int(g.abs().sum() > 0)
    assert checked > len(params) // 2


def test_prompt_is_never_masked_and_adds_exactly_zero(single_process_world):
    """The forward process leaves the prompt clean at every time (t reaches ~1 here, where a response
    is all but fully masked), and the loss functions give the prompt's logits exactly zero gradient."""
    opts = LossOptions(sft=SFTSettings("response", True))
    step, _, _ = make_step("proseco", opts)
    saw_late_time = False
    for g in range(6):
        for mb in sft_microbatches():
            mb["global_batch_index"] = torch.full((MICRO,), g)
            nb = noise_microbatch(mb, step.schedule, NOISE, MASK_ID, torch.device("cpu"), opts.sft)
            prompt = mb["prompt_mask"]
            assert not (nb.masked & prompt).any()
            assert torch.equal(nb.noised[prompt], mb["tokens"][prompt])
            assert torch.equal(nb.masked, nb.noised == MASK_ID)
            saw_late_time |= bool((nb.t > 0.9).any())
            # the response is noised as in pre-training: the same draw, the prompt put back
            plain = noise_microbatch({k: v for k, v in mb.items() if k not in ("prompt_mask", "pad_mask")},
                                     step.schedule, NOISE, MASK_ID, torch.device("cpu"))
            assert torch.equal(nb.masked, plain.masked & ~prompt)
    assert saw_late_time

    nb = noise_microbatch(sft_microbatches()[0], step.schedule, NOISE, MASK_ID, torch.device("cpu"), opts.sft)
    store = {}
    logits = torch.randn(MICRO, SEQ, VOCAB, requires_grad=True)
    loss, _ = step._mdm_loss(nb, 0, store, 1.0, None, logits)
    loss.backward()
    prompt = nb.sft.prompt
    assert logits.grad[prompt].abs().max() == 0.0 and logits.grad[nb.masked].abs().max() > 0
    assert torch.equal(store[0][prompt], nb.clean[prompt])
    logits2 = torch.randn(MICRO, SEQ, VOCAB, requires_grad=True)
    loss2, _ = step._sc_loss(nb, 0, store, 1.0, logits2)
    loss2.backward()
    assert logits2.grad[prompt].abs().max() == 0.0 and logits2.grad.abs().sum(-1)[~prompt].min() > 0


def test_sft_settings_come_from_the_config_and_bad_input_is_refused(single_process_world):
    cfg = Config()
    assert loss_options(cfg).sft is None
    cfg.data.format = "sft"
    cfg.objective.sft_normalization, cfg.objective.sft_pad_in_loss = "tokens", False
    assert loss_options(cfg).sft == SFTSettings("tokens", False)
    with pytest.raises(ConfigError, match="data.variable_length_fraction"):
        validate_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, variable_length_fraction=0.01)))
    with pytest.raises(ConfigError, match="data.document_attention"):
        validate_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, document_attention=True)))

    # data.format=sft on micro-batches without masks, and SFT micro-batches in a pre-training step: one line each
    schedule = build_schedule("loglinear")
    mb = sft_microbatches()[0]
    text_mb = {k: v for k, v in mb.items() if k not in ("prompt_mask", "pad_mask")}
    with pytest.raises(ConfigError, match="data.format=sft, but the micro-batches carry no prompt_mask / pad_mask"):
        noise_microbatch(text_mb, schedule, NOISE, MASK_ID, "cpu", SFTSettings())
    with pytest.raises(ConfigError, match="set data.format=sft"):
        noise_microbatch(mb, schedule, NOISE, MASK_ID, "cpu")
