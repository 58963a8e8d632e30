"""Sampler invariants on small deterministic denoisers (no megatron needed)."""

import math

import pytest
import torch

from prosec_mcore.diffusion.schedules import build_schedule
from prosec_mcore.sampling import (CorrectorSettings, FunctionDenoiser, GuidedDenoiser, SamplerSpec,
                                   corrector_loop, generate, sample_mdlm, sample_proseco, sample_remdm,
                                   sample_semi_ar, unmask_step)

V, MASK, L = 12, 11, 16  # vocabulary of 12 ids, the mask is the last one
SCHEDULE = build_schedule("loglinear", 1e-3)


class ToyNetwork:
    """A fixed random function of the whole sequence: token embeddings, their mean (context) and
    a position term. Records every input it sees."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, 8, generator=g)
        self.out = torch.randn(8, V, generator=g)
        self.ctx = torch.randn(8, V, generator=g)
        self.pos = torch.randn(L, V, generator=g)
        self.inputs = []

    def __call__(self, tokens, sigma, labels=None):
        self.inputs.append(tokens.clone())
        h = self.emb[tokens]
        logits = h @ self.out + h.mean(dim=1, keepdim=True) @ self.ctx + self.pos[: tokens.shape[1]]
        if labels is not None:
            logits = logits + 2.0 * torch.nn.functional.one_hot(labels % V, V)[:, None, :]
        return logits


def toy(time_conditioned=True, **kwargs):
    net = ToyNetwork(**kwargs)
    return net, FunctionDenoiser(net, V, MASK, time_conditioned=time_conditioned)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mdlm_only_ever_unmasks_and_ends_without_masks():
    net, den = toy()
    out = sample_mdlm(den, SCHEDULE, 4, L, 10, gen())
    assert not bool((out.tokens == MASK).any())
    seen = net.inputs + [out.tokens]
    for before, after in zip(seen, seen[1:]):
        decided = before != MASK
        assert torch.equal(after[decided], before[decided])  # once a token, always that token
        assert bool(((after != MASK) >= decided).all())
    assert out.nfe_unmask == 10 and out.nfe_correct == 0


def test_nfe_matches_schedule_and_cache_reuses_unchanged_inputs():
    _, den = toy(time_conditioned=True)
    # the exact rule: sigma changes every step, so a time-conditioned model is always evaluated
    assert sample_mdlm(den, SCHEDULE, 2, L, 64, gen(), cache_rule="exact").nfe == 64
    net, den = toy(time_conditioned=False)
    out = sample_mdlm(den, SCHEDULE, 2, L, 64, gen())
    distinct = len({tuple(x.flatten().tolist()) for x in net.inputs})
    assert out.nfe == den.calls == distinct < 64  # 64 steps for 32 tokens: many steps change nothing
    assert sample_mdlm(den, SCHEDULE, 2, L, 64, gen(), use_cache=False).nfe == 64
    exact = sample_mdlm(den, SCHEDULE, 2, L, 64, gen(), cache_rule="exact")
    assert torch.equal(exact.tokens, out.tokens) and exact.nfe == out.nfe  # same rule without a corrector


def test_reference_cache_rule_reuses_for_time_conditioned_models_too():
    net, den = toy(time_conditioned=True)
    out = sample_mdlm(den, SCHEDULE, 2, L, 64, gen())
    masks = [int((x == MASK).sum()) for x in net.inputs]
    assert out.nfe == len(masks) < 64  # a step that unmasked nothing leaves its output to the next
    assert all(a > b for a, b in zip(masks, masks[1:]))  # so every evaluation sees a new sequence


def test_after_a_corrector_loop_the_reference_rule_unmasks_from_its_output():
    """T > L: many steps unmask nothing. The reference rule then draws the next step from the
    corrector's output (no evaluation); the exact rule evaluates the corrected sequence."""
    settings = CorrectorSettings(steps=2, every=1)
    counts = {}
    for rule in ("reference", "exact"):
        net, den = toy(time_conditioned=False)
        out = sample_proseco(den, SCHEDULE, 1, L, 48, gen(3), settings, cache_rule=rule)
        masks = [int((x == MASK).sum()) for x in net.inputs if bool((x == MASK).any())]
        counts[rule] = (out.nfe_unmask, masks)
    reference, exact = counts["reference"], counts["exact"]
    assert all(a > b for a, b in zip(reference[1], reference[1][1:]))
    assert any(a == b for a, b in zip(exact[1], exact[1][1:]))  # the same masks, evaluated again
    assert reference[0] < exact[0]


def test_top_p():
    net, den = toy()
    plain = sample_mdlm(den, SCHEDULE, 3, L, 8, gen(5))
    assert torch.equal(sample_mdlm(den, SCHEDULE, 3, L, 8, gen(5), top_p=1.0).tokens, plain.tokens)
    assert not torch.equal(sample_mdlm(den, SCHEDULE, 3, L, 8, gen(5), top_p=0.5).tokens, plain.tokens)
    # a tiny p keeps only the most likely token: every unmasked token is the argmax of its step
    net.inputs.clear()
    greedy = sample_mdlm(den, SCHEDULE, 3, L, 8, gen(5), top_p=1e-9, use_cache=False)
    for before, after in zip(net.inputs, net.inputs[1:] + [greedy.tokens]):
        new = (before == MASK) & (after != MASK)
        assert torch.equal(after[new], den(before, torch.zeros(3)).argmax(-1)[new])
    # the corrector's draws are filtered too: a sampling corrector at a tiny p is the argmax one
    _, den = toy()
    draft = torch.zeros(2, L, dtype=torch.long)
    sampled = corrector_loop(den, draft, torch.zeros(2), CorrectorSettings(steps=3, mode="sample"), gen(), top_p=1e-9)
    argmax = corrector_loop(den, draft, torch.zeros(2), CorrectorSettings(steps=3), gen())
    assert torch.equal(sampled.tokens, argmax.tokens)
    remdm = sample_remdm(den, SCHEDULE, 2, L, 6, gen(), eta=0.3, top_p=0.5).tokens
    assert not bool((remdm == MASK).any())
    assert not torch.equal(remdm, sample_remdm(den, SCHEDULE, 2, L, 6, gen(), eta=0.3).tokens)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            SamplerSpec(top_p=bad)
        with pytest.raises(ValueError, match="top_p"):
            sample_mdlm(den, SCHEDULE, 1, L, 4, gen(), top_p=bad)


def test_corrector_time_input_tau_or_t():
    seen = []

    def fn(tokens, sigma):
        if not bool((tokens == MASK).any()):  # a corrector input (a draft has no masks)
            seen.append(float(sigma[0]))
        return ToyNetwork()(tokens, sigma)

    den = FunctionDenoiser(fn, V, MASK, time_conditioned=True)
    for time in ("tau", "t"):
        seen.clear()
        sample_proseco(den, SCHEDULE, 2, L, 4, gen(), CorrectorSettings(steps=3, every=2, early_stop=False, time=time))
        assert len(seen) == 6  # two loops (after steps 2 and 4) of three evaluations
        if time == "tau":  # tau_j = 1, 1 - (1 - 1e-5)/3, 1 - 2 (1 - 1e-5)/3 in every loop
            taus = torch.tensor([1.0, 1 - (1 - 1e-5) / 3, 1 - 2 * (1 - 1e-5) / 3], dtype=torch.float64)
            assert seen == pytest.approx(SCHEDULE.sigma(taus).tolist() * 2, rel=1e-12)
        else:  # the sigma of the step each loop runs at: t = 3/4, then 1/4
            steps_t = torch.tensor([0.75, 0.25], dtype=torch.float64)
            assert seen == pytest.approx([float(x) for x in SCHEDULE.sigma(steps_t) for _ in range(3)], rel=1e-12)
    with pytest.raises(ValueError, match="corrector time"):
        CorrectorSettings(time="sigma")


def test_corrector_guidance_conditional_or_guided():
    net = ToyNetwork()
    labels_seen = []

    def fn(tokens, sigma, labels):
        if not bool((tokens == MASK).any()):
            labels_seen.append(int(labels[0]))
        return net(tokens, sigma, labels)

    base = FunctionDenoiser(fn, V, MASK, conditional=True)
    guided = GuidedDenoiser(base, torch.tensor([3]), null_label=9, gamma=2.0)
    runs = {}
    for mode in ("conditional", "guided"):
        labels_seen.clear()
        settings = CorrectorSettings(steps=2, every=2, early_stop=False, guidance=mode)
        runs[mode] = sample_proseco(guided, SCHEDULE, 2, L, 4, gen(), settings, use_cache=False)
        assert runs[mode].nfe_unmask == 2 * 4  # guided unmasking steps cost two evaluations
        if mode == "conditional":  # the corrector runs on the conditional model: one evaluation each
            assert set(labels_seen) == {3} and runs[mode].nfe_correct == 2 * 2
        else:
            assert set(labels_seen) == {3, 9} and runs[mode].nfe_correct == 2 * 2 * 2
    assert not torch.equal(runs["conditional"].tokens, runs["guided"].tokens)
    with pytest.raises(ValueError, match="corrector guidance"):
        CorrectorSettings(guidance="none")


def test_sampling_corrector_reuses_the_output_of_an_unchanged_draft():
    # one-hot logits that ignore the input: every draw is the target, so after the first update
    # the draft never changes and each further draw reuses the output (no evaluation)
    target = torch.randint(0, MASK, (L,), generator=gen(7))
    position_logits = torch.nn.functional.one_hot(target, V) * 1e4
    den = FunctionDenoiser(lambda tokens, sigma: position_logits.expand(tokens.shape[0], L, V), V, MASK)
    draft = torch.zeros(2, L, dtype=torch.long)
    loop = corrector_loop(den, draft, torch.zeros(2), CorrectorSettings(steps=5, mode="sample"), gen())
    assert loop.evaluations == 2 and torch.equal(loop.tokens, target.expand(2, L))
    always = corrector_loop(den, draft, torch.zeros(2), CorrectorSettings(steps=5, mode="sample", early_stop=False),
                            gen())
    assert always.evaluations == 5 and torch.equal(always.tokens, loop.tokens)


def test_load_from_checkpoint_refuses_unknown_weights():
    from prosec_mcore.sampling.loading import load_from_checkpoint

    with pytest.raises(ValueError, match="ema or raw"):
        load_from_checkpoint("/nonexistent", weights="best")


def test_proseco_with_zero_corrector_steps_is_mdlm_draw_for_draw():
    _, den = toy()
    mdlm = sample_mdlm(den, SCHEDULE, 3, L, 8, gen(5))
    proseco = sample_proseco(den, SCHEDULE, 3, L, 8, gen(5), CorrectorSettings(steps=0, every=1))
    assert torch.equal(mdlm.tokens, proseco.tokens) and mdlm.nfe == proseco.nfe


def test_proseco_nfe_split_between_unmasking_and_correcting():
    _, den = toy()
    settings = CorrectorSettings(steps=3, every=2, mode="sample")  # no early stop when sampling
    out = sample_proseco(den, SCHEDULE, 2, L, 8, gen(), settings)
    assert out.corrector_loops == 4 and out.nfe_correct == 12 and out.nfe_unmask == 8
    assert not bool((out.tokens == MASK).any())


def test_corrector_changes_only_unmasked_positions():
    net, den = toy()
    z = torch.full((2, L), MASK)
    z[:, :6] = torch.arange(6)
    log_probs = den(z, torch.zeros(2))
    draft = torch.where(z == MASK, log_probs.argmax(-1), z)
    loop = corrector_loop(den, draft, torch.zeros(2), CorrectorSettings(steps=4), gen())
    merged = torch.where(z != MASK, loop.tokens, z)
    assert torch.equal(merged[:, 6:], z[:, 6:])  # masked positions stay masked for unmasking
    assert not torch.equal(merged[:, :6], z[:, :6])  # this toy model does rewrite some tokens


def test_early_stop_at_fixed_point():
    # logits that ignore the input: the first update reaches argmax, the second changes nothing
    position_logits = torch.randn(L, V, generator=gen(7))
    den = FunctionDenoiser(lambda tokens, sigma: position_logits.expand(tokens.shape[0], L, V), V, MASK)
    draft = torch.zeros(2, L, dtype=torch.long)
    loop = corrector_loop(den, draft, torch.zeros(2), CorrectorSettings(steps=6), gen())
    assert loop.evaluations == 2 and loop.stopped_early
    target = position_logits[:, :MASK].argmax(-1)
    assert torch.equal(loop.tokens, target.expand(2, L))
    no_stop = corrector_loop(den, draft, torch.zeros(2), CorrectorSettings(steps=6, early_stop=False), gen())
    assert no_stop.evaluations == 6 and torch.equal(no_stop.tokens, loop.tokens)


def test_top_k_changes_at_most_k_positions_per_evaluation():
    _, den = toy()
    draft = torch.zeros(3, L, dtype=torch.long)
    one = corrector_loop(den, draft, torch.zeros(3), CorrectorSettings(steps=1, mode="top_k", top_k=2), gen())
    changed = (one.tokens != draft).sum(dim=1)
    assert bool((changed <= 2).all()) and bool((changed >= 1).all())


@pytest.mark.parametrize("sampler", ["mdlm", "proseco", "remdm", "semi_ar"])
def test_prompt_positions_never_change(sampler):
    net, den = toy()
    prompt = torch.full((1, L), MASK)
    prompt[0, :3] = torch.tensor([1, 2, 3])   # a prefix ...
    prompt[0, 10] = 7                         # ... and an infilling constraint
    spec = SamplerSpec(sampler=sampler, steps=8, corrector=CorrectorSettings(steps=2, mode="sample"),
                       eta=0.5, block_length=4, threshold=0.5)
    out = generate(spec, den, SCHEDULE, 5, 5, L, seed=1, prompt=prompt)["tokens"]
    fixed = prompt[0] != MASK
    assert bool((out[:, fixed] == prompt[0, fixed]).all())
    assert all(bool((x[:, fixed] == prompt[0, fixed]).all()) for x in net.inputs)
    assert not bool((out == MASK).any())


def test_remdm_remasks_and_finishes():
    net, den = toy()
    out = sample_remdm(den, SCHEDULE, 4, L, 20, gen(), eta=0.5)
    assert out.nfe == 20 and not bool((out.tokens == MASK).any())
    remasked = any(bool(((a != MASK) & (b == MASK)).any()) for a, b in zip(net.inputs, net.inputs[1:]))
    assert remasked  # unlike MDLM, decoded tokens do go back to the mask


def test_semi_ar_fills_blocks_left_to_right():
    net, den = toy()
    out = sample_semi_ar(den, SCHEDULE, 2, L, 4, gen(), threshold=0.99)
    assert not bool((out.tokens == MASK).any()) and out.nfe == len(net.inputs) <= L
    for x in net.inputs:
        decided = (x != MASK).any(dim=0).nonzero().flatten()
        if decided.numel():
            block_end = (int(decided.max()) // 4 + 1) * 4
            assert bool((x[:, block_end:] == MASK).all())
    # threshold 1e-9: every position of a block commits at once -> one evaluation per block
    assert sample_semi_ar(toy()[1], SCHEDULE, 2, L, 4, gen(), threshold=1e-9).nfe == L // 4


def test_unmask_step_follows_the_reverse_process():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(V), -1)
    probs[MASK] = 0
    probs /= probs.sum()
    log_probs = probs.log().expand(4000, 8, V).clone()
    z = torch.full((4000, 8), MASK)
    alpha_t, alpha_s = 0.2, 0.6
    out = unmask_step(z, log_probs, alpha_t, alpha_s, MASK, gen())
    unmasked = out != MASK
    expected = (alpha_s - alpha_t) / (1 - alpha_t)
    assert abs(unmasked.float().mean().item() - expected) < 0.01
    freq = torch.bincount(out[unmasked], minlength=V).double() / unmasked.sum()
    assert (freq - probs.double()).abs().max().item() < 0.01


def test_classifier_free_guidance_formula_and_cost():
    net = ToyNetwork()
    base = FunctionDenoiser(net, V, MASK, conditional=True)
    tokens, sigma = torch.zeros(2, L, dtype=torch.long), torch.zeros(2)
    labels, null = torch.tensor([3, 3]), 9
    cond, uncond = base(tokens, sigma, labels), base(tokens, sigma, torch.full((2,), null))
    for gamma in (1.0, 2.5):
        guided = GuidedDenoiser(base, labels, null, gamma)(tokens, sigma)
        expected = (gamma * cond + (1 - gamma) * uncond)
        expected[..., MASK] = -math.inf
        assert torch.allclose(guided, expected.log_softmax(-1), atol=1e-12)
    guided = GuidedDenoiser(base, labels, null, 2.0)
    assert sample_mdlm(guided, SCHEDULE, 2, L, 5, gen()).nfe == 10  # two evaluations per step
    assert sample_mdlm(GuidedDenoiser(base, labels, null, 1.0), SCHEDULE, 2, L, 5, gen()).nfe == 5


def test_generation_is_independent_of_data_parallel_split():
    _, den = toy()
    spec = SamplerSpec(sampler="proseco", steps=6, corrector=CorrectorSettings(steps=2))
    whole = generate(spec, den, SCHEDULE, 10, 4, L, seed=3)
    parts = [generate(spec, den, SCHEDULE, 10, 4, L, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    by_batch = {}
    for part in parts:
        for k, b in enumerate(part["batch_indices"]):
            by_batch[b] = part["tokens"][k * 4:(k + 1) * 4]
    assert torch.equal(torch.cat([by_batch[b] for b in sorted(by_batch)]), whole["tokens"])
    assert whole["tokens"].shape == (10, L)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="corrector mode"):
        CorrectorSettings(mode="beam")
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerSpec(sampler="ddim")
    with pytest.raises(ValueError, match="mask token"):
        sample_mdlm(toy()[1], SCHEDULE, 1, L, 4, gen(), prompt=torch.full((1, L), MASK),
                    prompt_mask=torch.ones(1, L, dtype=torch.bool))
