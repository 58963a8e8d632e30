"""Prompted sampling (sampling/prompted.py) and the block sampler (sampling/blocks.py) on toy
denoisers: fixed prompts and filler at every sampler, the block sampler against a plain
re-implementation of the reference's loop, k tokens per step, blocks left to right, the EOS stop,
exact NFE, the corrector's region, and rows independent of the batch they are in."""

import pytest
import torch

from prosec_mcore.diffusion.schedules import build_schedule
from prosec_mcore.sampling import CorrectorSettings, FunctionDenoiser, SamplerSpec, generate_responses, layout_prompts
from prosec_mcore.sampling.blocks import _propose, sample_blocks, transfer_schedule
from prosec_mcore.sampling.generate import SAMPLERS, batch_generator

V, MASK, EOS = 14, 13, 0
SCHEDULE = build_schedule("loglinear", 1e-3)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 2, 5, 7]]  # distinct first tokens: row ids
GEN, BLOCK = 16, 4


class Toy:
    """A fixed random function of the sequence: token embedding, a context term (the mean over the
    row, or with ``causal`` the mean over positions <= i) and a position term. Records inputs."""

    def __init__(self, seed=0, causal=False, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        self.emb, self.out = torch.randn(V, 8, generator=g), torch.randn(8, V, generator=g) * scale
        self.ctx, self.pos = torch.randn(8, V, generator=g) * scale, torch.randn(64, V, generator=g) * scale
        self.causal, self.inputs = causal, []

    def __call__(self, tokens, sigma):
        self.inputs.append(tokens.clone())
        h = self.emb[tokens]
        if self.causal:
            context = h.cumsum(dim=1) / torch.arange(1, tokens.shape[1] + 1)[None, :, None]
        else:
            context = h.mean(dim=1, keepdim=True)
        return h @ self.out + context @ self.ctx + self.pos[: tokens.shape[1]]


def toy(**kwargs):
    net = Toy(**kwargs)
    return net, FunctionDenoiser(net, V, MASK, time_conditioned=False)


class Scripted:
    """Predicts a fixed response per row (the row is named by its first prompt token) with
    confidence decreasing left to right; ``script[first_token]`` lists the response tokens from
    the response start (EOS after them)."""

    def __init__(self, script):
        self.script, self.inputs = script, []

    def __call__(self, tokens, sigma):
        self.inputs.append(tokens.clone())
        logits = torch.zeros(*tokens.shape, V)
        for r, row in enumerate(tokens):
            first = int(row[0])
            start = len(next(p for p in PROMPTS if p[0] == first))
            target = self.script[first] + [EOS] * (tokens.shape[1] - start - len(self.script[first]))
            for j, token in enumerate(target):
                logits[r, start + j, token] = 8.0 - 0.1 * j
        return logits


def spec(sampler="blocks", steps=8, corrector_steps=0, every=1, **kwargs):
    return SamplerSpec(sampler=sampler, steps=steps, block_length=BLOCK,
                       corrector=CorrectorSettings(steps=corrector_steps, every=every), **kwargs)


def reference_blocks(den, row, start, gen_length, steps, block_length, threshold=None, corrector_steps=0,
                     every=1, eos=None):
    """The reference's loop (LLaDA's generate with ProSeCo's corrector, kuleshov-group/proseco
    llada/generate.py) for ONE row, written out independently: returns (tokens, unmask NFE, correct NFE)."""
    x, length = row.clone()[None], row.shape[0]
    nfe_unmask = nfe_correct = 0
    per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        lo, hi = start + b * block_length, start + (b + 1) * block_length
        k = [block_length // per_block + (1 if i < block_length % per_block else 0) for i in range(per_block)]
        i = 0
        while bool((x[0, lo:hi] == MASK).any()):
            log_probs = den(x, torch.zeros(1))
            nfe_unmask += 1
            if corrector_steps and (i + 1) % every == 0:
                draft = torch.where(x == MASK, log_probs.argmax(-1), x)
                for _ in range(corrector_steps):
                    log_probs = den(draft, torch.zeros(1))
                    nfe_correct += 1
                    out = log_probs.argmax(-1)
                    if torch.equal(out[0, start:hi], draft[0, start:hi]):
                        break
                    draft[0, start:hi] = out[0, start:hi]
                decoded = torch.zeros(length, dtype=torch.bool)
                decoded[start:hi] = x[0, start:hi] != MASK
                x[0, decoded] = out[0, decoded]
            probs = log_probs[0].exp()
            proposal = probs.argmax(-1)
            confidence = probs.gather(-1, proposal[:, None])[:, 0]
            masked = torch.zeros(length, dtype=torch.bool)
            masked[lo:hi] = x[0, lo:hi] == MASK
            confidence = torch.where(masked, confidence, torch.tensor(-1.0, dtype=torch.float64))
            if threshold is None:
                chosen = confidence.topk(k[i]).indices
            else:
                chosen = [j for j in range(length) if masked[j] and confidence[j] >= threshold]
                chosen = torch.tensor(chosen + [int(confidence.argmax())])
            x[0, chosen] = proposal[chosen]
            i += 1
        if eos is not None and int(x[0, hi - 1]) == eos:
            x[x == MASK] = eos
            break
    return x[0], nfe_unmask, nfe_correct


def run_blocks(den, prompts=PROMPTS, seed=0, eos=None, **kwargs):
    layout = layout_prompts(prompts, GEN, EOS, MASK)
    settings = dict(steps=8, block_length=BLOCK, eos_stop="off" if eos is None else "block")
    settings.update(kwargs)
    settings["corrector"] = CorrectorSettings(steps=settings.pop("corrector_steps", 0), every=settings.pop("every", 1))
    return layout, sample_blocks(den, SCHEDULE, layout.tokens, layout.start, GEN, batch_generator(seed, 0),
                                 eos_id=eos, **settings)


def test_layout_is_prompt_response_then_eos_filler():
    layout = layout_prompts([[1, 2], [3, 4, 5, 6]], 3, EOS, MASK)
    assert layout.tokens.tolist() == [[1, 2, MASK, MASK, MASK, EOS, EOS], [3, 4, 5, 6, MASK, MASK, MASK]]
    assert layout.start.tolist() == [2, 4] and torch.equal(layout.frozen, layout.tokens != MASK)
    with pytest.raises(ValueError, match="mask token"):
        layout_prompts([[1, MASK]], 3, EOS, MASK)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_prompt_and_filler_never_change_at_every_sampler(sampler):
    net, den = toy()
    settings = dict(eta=0.5, threshold=0.5) if sampler in ("remdm", "semi_ar") else {}
    out = generate_responses(spec(sampler, corrector_steps=2 if sampler in ("proseco", "blocks") else 0,
                                  **settings), den, SCHEDULE, PROMPTS, GEN, EOS, seed=3, batch_size=4)
    by_first = {p[0]: p for p in PROMPTS}
    for x in net.inputs:  # every network input, unmasking and correcting, sub-batches included
        assert x.shape[1] == 7 + GEN  # the longest prompt + GEN
        for row in x:
            prompt = by_first[int(row[0])]
            assert row[:len(prompt)].tolist() == prompt, sampler
            assert bool((row[len(prompt) + GEN:] == EOS).all()), sampler  # the filler
    assert len(out) == len(PROMPTS)
    for r, result in enumerate(out):
        assert len(result["ids"]) <= GEN and EOS not in result["ids"] and MASK not in result["ids"]
        assert result["nfe"] == result["nfe_unmask"] + result["nfe_correct"] > 0
        if sampler != "blocks":  # whole-sequence samplers: every row takes part in every pass
            assert result["nfe"] == result["batch_nfe"]
    assert max(r["nfe"] for r in out) <= out[0]["batch_nfe"] == den.calls


@pytest.mark.parametrize("settings", [dict(steps=8), dict(steps=12), dict(steps=16, threshold=0.3),
                                      dict(steps=8, corrector_steps=3), dict(steps=12, corrector_steps=2, every=2),
                                      dict(steps=8, threshold=0.4, corrector_steps=2)])
def test_block_sampler_equals_the_reference_loop_row_by_row(settings):
    """Each row of a batch of prompts of different lengths, EOS filler included, decoded as the
    reference decodes that row alone; the per-row NFE is the reference's count."""
    _, den = toy(scale=1.5)
    layout, result = run_blocks(den, **settings)
    for r in range(len(PROMPTS)):
        tokens, nfe_unmask, nfe_correct = reference_blocks(den, layout.tokens[r], int(layout.start[r]), GEN,
                                                           settings["steps"], BLOCK, settings.get("threshold"),
                                                           settings.get("corrector_steps", 0),
                                                           settings.get("every", 1))
        assert torch.equal(result.tokens[r], tokens), r
        assert (result.row_nfe_unmask[r], result.row_nfe_correct[r]) == (nfe_unmask, nfe_correct), r
    # the batch's NFE: every unmasking pass evaluates all unfinished rows at once
    assert result.nfe_unmask == max(result.row_nfe_unmask)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_k_tokens_per_step_blocks_left_to_right(remasking):
    net, den = toy()
    steps = 12  # 4 blocks of 4 positions, 3 steps each: 2, 1, 1 tokens
    layout, result = run_blocks(den, steps=steps, remasking=remasking)
    assert transfer_schedule(4, 3) == [2, 1, 1] and transfer_schedule(5, 2) == [3, 2]
    assert transfer_schedule(2, 3) == [1, 1, 0]
    seen = net.inputs + [result.tokens]
    assert len(net.inputs) == steps == result.nfe
    for n, (before, after) in enumerate(zip(seen, seen[1:])):
        block = n // 3
        for r in range(len(PROMPTS)):
            start = int(layout.start[r])
            lo, hi = start + block * BLOCK, start + (block + 1) * BLOCK
            new = ((before[r] == MASK) & (after[r] != MASK)).nonzero().flatten()
            assert len(new) == [2, 1, 1][n % 3], (n, r)          # k tokens per step, exactly
            assert bool(((new >= lo) & (new < hi)).all()), (n, r)  # inside the row's current block
            assert bool((after[r, start:lo] != MASK).all()) and bool((after[r, hi:start + GEN] == MASK).all())


def test_stop_at_eos_saves_evaluations():
    script = {1: [5, 6, 7, 8, 9], 4: [5] * 9 + [EOS, 3, 3], 11: [2] * GEN, 12: [7, 7, EOS, 3, 3, 3, 3, 3]}
    runs = {}
    for stop in ("off", "block", "any"):
        net = Scripted(script)
        den = FunctionDenoiser(net, V, MASK, time_conditioned=False)
        runs[stop] = generate_responses(spec(steps=8, eos_stop=stop), den, SCHEDULE, PROMPTS, GEN, EOS, seed=0,
                                        batch_size=4)
        assert runs[stop][0]["batch_nfe"] == den.calls
    ids = [r["ids"] for r in runs["off"]]
    assert ids == [[5, 6, 7, 8, 9], [5] * 9, [2] * GEN, [7, 7]]
    assert [r["ids"] for r in runs["block"]] == [r["ids"] for r in runs["any"]] == ids
    # 2 steps per block. off: 4 blocks each. block: up to the first block ending in EOS (row 0:
    # block 1, row 1: block 3, row 3: block 2). any: the first block holding an EOS (rows 1 and 3)
    assert [r["nfe"] for r in runs["off"]] == [8, 8, 8, 8]
    assert [r["nfe"] for r in runs["block"]] == [4, 8, 8, 6]
    assert [r["nfe"] for r in runs["any"]] == [4, 6, 8, 2]
    assert runs["off"][0]["batch_nfe"] == 8 and runs["any"][0]["batch_nfe"] == 8
    # when every row stops early, the batch does too
    early = [[1, 2, 3], [12, 2, 5, 7]]
    den = FunctionDenoiser(Scripted(script), V, MASK, time_conditioned=False)
    out = generate_responses(spec(steps=8), den, SCHEDULE, early, GEN, EOS, seed=0, batch_size=2)
    assert [r["nfe"] for r in out] == [4, 6] and den.calls == 6
    # the stopped row's region is EOS after its response, in the tokens the sampler returns
    layout, result = run_blocks(FunctionDenoiser(Scripted(script), V, MASK, time_conditioned=False), eos=EOS)
    assert result.eos_stopped == [True, False, False, True]  # row 1 ended in its last block
    assert result.tokens[0, 3:3 + GEN].tolist() == [5, 6, 7, 8, 9] + [EOS] * 11


def test_corrector_rewrites_decoded_tokens_inside_the_region_only():
    net, den = toy(scale=1.5)
    layout, result = run_blocks(den, steps=8, corrector_steps=3)
    inputs, by_first = list(net.inputs), {p[0]: r for r, p in enumerate(PROMPTS)}
    unmask_inputs, rewrites = [], 0
    for n, x in enumerate(inputs):
        if bool((x == MASK).any()):
            unmask_inputs.append(x)  # every row takes part (no EOS stop, no threshold)
            continue
        for row in x:  # a corrector input (rows at a fixed point have left): a draft or a corrected draft
            r, step = by_first[int(row[0])], len(unmask_inputs) - 1
            start = int(layout.start[r])
            region_end = start + (step // 2 + 1) * BLOCK
            before = unmask_inputs[-1][r]
            outside = torch.ones_like(before, dtype=torch.bool)
            outside[start:region_end] = False
            decided = before != MASK
            # outside the region the input is the step's draft: z_t's tokens and argmax at its masks
            draft = torch.where(decided, before, den(before[None], torch.zeros(1))[0].argmax(-1))
            assert torch.equal(row[outside], draft[outside]), (n, r)
    for step, (before, after) in enumerate(zip(unmask_inputs, unmask_inputs[1:] + [result.tokens])):
        changed = (before != MASK) & (after != before)  # decoded tokens the corrector rewrote
        rewrites += int(changed.sum())
        for r in range(len(PROMPTS)):
            cols, start = changed[r].nonzero().flatten(), int(layout.start[r])
            assert bool(((cols >= start) & (cols < start + (step // 2 + 1) * BLOCK)).all()), (step, r)
    assert rewrites > 0  # this toy model does get corrected
    assert result.nfe_correct == sum(1 for x in inputs if not bool((x == MASK).any()))
    assert result.corrector_loops == 8


@pytest.mark.parametrize("settings", [dict(steps=8, corrector_steps=3),
                                      dict(steps=16, threshold=0.2, corrector_steps=2),
                                      dict(steps=8, eos_stop="any")])
def test_rows_are_independent_of_their_batch(settings):
    """For a model whose output at a position depends on that row's earlier positions only (so
    the filler after a response does not matter), a row's response and NFE in a batch of prompts
    of different lengths are those of the row alone."""
    _, den = toy(causal=True, scale=2.0, seed=1)
    settings = dict(settings)
    corrector = CorrectorSettings(steps=settings.pop("corrector_steps", 0))
    s = SamplerSpec(sampler="blocks", block_length=BLOCK, corrector=corrector, **settings)
    eos = 3  # a token this model does produce, to exercise the EOS stop
    batched = generate_responses(s, den, SCHEDULE, PROMPTS, GEN, eos, seed=0, batch_size=4)
    alone = [generate_responses(s, den, SCHEDULE, [p], GEN, eos, seed=0)[0] for p in PROMPTS]
    for b, a in zip(batched, alone):
        assert b["ids"] == a["ids"] and b["nfe"] == a["nfe"] and b["nfe_correct"] == a["nfe_correct"]
    assert len({r["nfe"] for r in batched}) > 1  # the rows do finish at different times


def test_data_parallel_split_gives_the_same_responses():
    _, den = toy()
    s = spec("proseco", corrector_steps=1)
    whole = generate_responses(s, den, SCHEDULE, PROMPTS, GEN, EOS, seed=5, batch_size=2)
    parts = [generate_responses(s, den, SCHEDULE, PROMPTS, GEN, EOS, seed=5, batch_size=2, dp_rank=r, dp_size=2)
             for r in range(2)]
    merged = [a if a is not None else b for a, b in zip(*parts)]
    assert merged == whole and all(x is not None for x in whole)


def test_temperature_draws_from_the_tempered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    log_probs = probs.log().expand(1, 40000, 4)
    for temperature in (0.5, 2.0):
        proposal, confidence = _propose(log_probs, temperature, "low_confidence", torch.Generator().manual_seed(0))
        tempered = (probs.log() / temperature).softmax(-1)
        freq = torch.bincount(proposal.flatten(), minlength=4).double() / proposal.numel()
        assert (freq - tempered).abs().max() < 0.01  # 40,000 draws: standard error <= 0.0025
        assert torch.allclose(confidence, probs[proposal])  # the untempered probability
    greedy, _ = _propose(log_probs, 0.0, "low_confidence", torch.Generator())
    assert bool((greedy == 0).all())


def test_bad_settings_are_refused():
    _, den = toy()
    with pytest.raises(ValueError, match="multiple of the block length"):
        generate_responses(spec(), den, SCHEDULE, PROMPTS, 10, EOS, seed=0)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        generate_responses(spec(steps=6), den, SCHEDULE, PROMPTS, GEN, EOS, seed=0)
    for bad in (dict(remasking="lowest"), dict(eos_stop="never"), dict(temperature=-1.0), dict(threshold=0.0)):
        with pytest.raises(ValueError):
            spec(**bad)
    assert spec().describe()["threshold"] is None and spec("semi_ar").describe()["threshold"] == 0.9


def test_benchmark_settings_parse_into_sampler_specs():
    import importlib.util
    import os

    from prosec_mcore.cli_errors import UserInputError

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "sampling_throughput.py")
    module_spec = importlib.util.spec_from_file_location("sampling_throughput", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    s = bench.parse_setting("blocks steps=16 block_length=4 corrector.steps=1 corrector.every=2 threshold=0.9 "
                            "remasking=random")
    assert (s.sampler, s.steps, s.block_length, s.threshold, s.remasking) == ("blocks", 16, 4, 0.9, "random")
    assert (s.corrector.steps, s.corrector.every) == (1, 2)
    assert all(bench.parse_setting(t).sampler in SAMPLERS for t in bench.default_settings(32, 8))
    for bad in ("blocks steps", "blocks step=3", "beam steps=3", "blocks corrector.mode=beam"):
        with pytest.raises(UserInputError):
            bench.parse_setting(bad)


def test_blocks_in_unprompted_generation_after_a_prefix():
    from prosec_mcore.sampling import generate

    _, den = toy()
    prompt = torch.full((1, 19), MASK)
    prompt[0, :3] = torch.tensor([1, 2, 3])
    out = generate(spec(steps=8), den, SCHEDULE, 3, 3, 19, seed=0, prompt=prompt)
    assert out["tokens"][:, :3].tolist() == [[1, 2, 3]] * 3 and not bool((out["tokens"] == MASK).any())
    assert out["stats"]["nfe"] == 8  # 16 positions after the prefix, 4 blocks, k = 2, no EOS stop
    prompt[0, 10] = 4  # a template's fixed position inside the generated part: not a block layout
    with pytest.raises(ValueError, match="prefix"):
        generate(spec(steps=8), den, SCHEDULE, 3, 3, 19, seed=0, prompt=prompt)
