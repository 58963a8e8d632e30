"""The library's ProSeCo sampler against an independent re-implementation of the paper's
Algorithms 2-3 with the rules of the authors' code (kuleshov-group/proseco, diffusion.py:
``_diffusion_sample``, ``_ddpm_denoise``, ``_cfg_denoise``, ``_corrector_denoise``).

``reference_sample`` below is written in plain PyTorch from that code's behaviour, in its
structure (a cache dict, copy-over log-probabilities, a corrector cache), and calls nothing of
``prosec_mcore.sampling`` but the toy network. The two must give the same tokens from the same
random draws and count the same network evaluations, for T < L, T = L and T > L, with and without
time conditioning, guidance and top-p. The rules it encodes:

* top-p (``sampling.nucleus_p``) filters the denoiser's probabilities before each unmasking draw
  and the corrector's before each corrector update, always keeping the most likely token; the
  cache holds the *filtered* distribution of an unguided step, which a reused step filters again;
* caching (``sampling.use_cache``): a step that unmasked nothing leaves its distribution for the
  next step, which evaluates nothing; after a corrector loop that is the corrector's (unfiltered)
  output on its draft. Inside a loop, an unchanged draft reuses the output (an argmax loop at a
  fixed point spends no more evaluations);
* the corrector's time input is sigma(tau_j), tau = linspace(1, 1e-5, S + 1);
* guidance: the draft is the argmax of the *conditional* prediction, the corrector runs on the
  conditional model (gamma = 1), the unmasking after it uses the corrector's output unguided and
  top-p filtered, and a corrector loop replaces only the conditional prediction in the cache.

Deliberate differences of the library, mirrored here so that tokens can match: the time grid ends
at t = 0 (the reference: 1e-5), the reference's discarded unmasking draw before a corrector loop is
not drawn, and top-p also filters guided unmasking steps (the reference's CFG path ignores
nucleus_p; its guidance runs use nucleus_p = 1). NFE: the reference counts one per cache-missing
step even under guidance, the library counts network passes (two per guided step at gamma != 1).
"""
import itertools
import math

import pytest
import torch

from prosec_mcore.diffusion.schedules import build_schedule
from prosec_mcore.sampling import CorrectorSettings, FunctionDenoiser, GuidedDenoiser, sample_proseco

V, MASK, NULL, EPS = 10, 9, 2, 1e-3   # vocabulary, mask id, null label (2 classes), loglinear eps
NEG = -1_000_000.0                     # the reference's neg_infinity


class ToyNetwork:
    """Fixed random linear map of the one-hot tokens, their mean (context), the position, sigma
    and the label: deterministic, cheap, and sensitive to every input."""

    def __init__(self, time_conditioned, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tok = torch.randn(V, V, generator=g, dtype=torch.float64) * 2
        self.ctx = torch.randn(V, V, generator=g, dtype=torch.float64) * 2
        self.pos = torch.randn(length, V, generator=g, dtype=torch.float64)
        self.time = torch.randn(V, generator=g, dtype=torch.float64) * (1.0 if time_conditioned else 0.0)
        self.label = torch.randn(NULL + 1, V, generator=g, dtype=torch.float64) * 1.5

    def __call__(self, tokens, sigma, labels=None):
        one_hot = torch.nn.functional.one_hot(tokens, V).double()
        logits = one_hot @ self.tok + one_hot.mean(1, keepdim=True) @ self.ctx + self.pos
        logits = logits + sigma.double()[:, None, None] * self.time
        if labels is not None:
            logits = logits + self.label[labels][:, None, :]
        return logits


# ----------------------------------------------------------------- the independent reference
def sigma_of(t, batch):
    return -torch.log1p(-(1.0 - EPS) * torch.full((batch,), t, dtype=torch.float64))


def nucleus(probs, p):
    if p >= 1.0:
        return probs
    sorted_probs, idx = torch.sort(probs, descending=True, dim=-1)
    top_p_mask = torch.cumsum(sorted_probs, dim=-1) <= p
    top_p_mask[..., 0] = True
    nucleus_probs = sorted_probs * top_p_mask
    nucleus_probs /= nucleus_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, idx, nucleus_probs)


def gumbel_argmax(probs, g):
    u = torch.rand(probs.shape, generator=g, dtype=torch.float64)
    return (probs / -torch.log(u.clamp_min(1e-300))).argmax(-1)


def reference_sample(net, B, L, T, S, every, g, top_p, label=None, gamma=None):
    """Returns (tokens, denoising NFE, corrector NFE, events) counted as the reference counts."""
    guided = gamma is not None
    cond = None if label is None else torch.full((B,), label)

    def forward(x, sigma, c):  # self.forward with the subs parameterisation (copy-over)
        logits = net(x, sigma, c).double()
        logits[..., MASK] += NEG
        unmasked = x != MASK
        logits[unmasked] = NEG
        logits[unmasked, x[unmasked]] = 0
        return logits.log_softmax(-1)

    def backbone(y, sigma, c):  # the corrector calls the backbone: no copy-over
        logits = net(y, sigma, c).double()
        logits[..., MASK] += NEG
        return logits.log_softmax(-1)

    xt = torch.full((B, L), MASK)
    cache, nfe_den, nfe_cor = None, 0, 0
    events = {"reused": 0, "reused_corrector_output": 0}
    taus = torch.linspace(1, 1e-5, S + 1, dtype=torch.float64)
    for i in range(T):
        t, s = 1.0 - i / T, 1.0 - (i + 1) / T  # (the library's grid, ending at 0)
        alpha_t, alpha_s = 1.0 - (1.0 - EPS) * t, 1.0 - (1.0 - EPS) * s
        sigma_t = sigma_of(t, B)
        if cache is None:
            nfe_den += 1
            if guided:
                cache = {"cond": forward(xt, sigma_t, cond),
                         "uncond": None if gamma == 1 else forward(xt, sigma_t, torch.full((B,), NULL))}
            else:
                cache = {"x": forward(xt, sigma_t, cond)}
        else:
            events["reused"] += 1
            events["reused_corrector_output"] += int(cache.get("from_corrector", False))
        if guided:  # _cfg_denoise (+ top-p, see the module docstring)
            if cache["uncond"] is None:
                x_theta = cache["cond"].exp()
            else:
                x_theta = (gamma * cache["cond"] + (1 - gamma) * cache["uncond"]).softmax(-1)
            x_theta = nucleus(x_theta, top_p)
            cache = {"cond": cache["cond"], "uncond": cache["uncond"]}
        else:       # _ddpm_denoise: the cache keeps the filtered distribution
            x_theta = nucleus(cache["x"].exp(), top_p)
            cache = {"x": x_theta.log()}
        if S > 0 and (i + 1) % every == 0:
            draft_lp = cache["cond"] if guided else cache["x"]
            y = draft_lp.argmax(-1)
            corrector_cache, clp = None, None
            for j in range(S):
                if corrector_cache is None:
                    nfe_cor += 1
                    clp = backbone(y, sigma_of(float(taus[j]), B), cond)  # gamma = 1
                new = nucleus(clp.exp(), top_p).argmax(-1)
                corrector_cache = clp if torch.equal(new, y) else None
                y = new
            xt = torch.where(xt != MASK, y, xt)
            cache["cond" if guided else "x"] = clp
            cache["from_corrector"] = True
            x_theta = nucleus(clp.exp(), top_p)  # _ddpm_denoise on the corrector's output
        q_xs = x_theta * (alpha_s - alpha_t)   # (the reference divides by 1 - alpha_t: same argmax)
        q_xs[..., MASK] = 1.0 - alpha_s
        xs = torch.where(xt != MASK, xt, gumbel_argmax(q_xs, g))
        if not torch.equal(xs, xt):
            cache = None
        xt = xs
    return xt, nfe_den, nfe_cor, events


# ----------------------------------------------------------------------------------- the tests
SHAPES = [(4, 8), (8, 8), (20, 8)]              # (T, L): T < L, T = L, T > L
CORRECTORS = [(0, 1), (1, 1), (3, 1), (2, 3)]   # (S, omega)
TOP_PS = [1.0, 0.7]
B = 3
SCHEDULE = build_schedule("loglinear", EPS)


@pytest.mark.parametrize("time_conditioned", [False, True])
@pytest.mark.parametrize("gamma", [None, 1.0, 2.0])
def test_library_sampler_is_token_identical_to_the_reference(time_conditioned, gamma):
    events = {"reused": 0, "reused_corrector_output": 0}
    for (T, L), (S, every), top_p in itertools.product(SHAPES, CORRECTORS, TOP_PS):
        net = ToyNetwork(time_conditioned, L)
        label = None if gamma is None else 1
        seed = 1000 * T + 10 * S + every
        want, den, cor, ev = reference_sample(net, B, L, T, S, every, torch.Generator().manual_seed(seed),
                                              top_p, label, gamma)
        for k in events:
            events[k] += ev[k]
        if gamma is None:
            denoiser = FunctionDenoiser(net, V, MASK, time_conditioned=time_conditioned)
        else:
            base = FunctionDenoiser(net, V, MASK, time_conditioned=time_conditioned, conditional=True)
            denoiser = GuidedDenoiser(base, torch.tensor([label]), NULL, gamma)
        got = sample_proseco(denoiser, SCHEDULE, B, L, T, torch.Generator().manual_seed(seed),
                             CorrectorSettings(steps=S, every=every), top_p=top_p)
        case = f"T={T} L={L} S={S} omega={every} top_p={top_p}"
        assert torch.equal(got.tokens, want), case
        assert got.nfe_unmask == den * denoiser.evals_per_call, case
        assert got.nfe_correct == cor, case
    # the cases do exercise the caching rules: reused steps, and reused corrector outputs
    assert events["reused"] > 20 and events["reused_corrector_output"] > 5, events


def test_top_p_keeps_the_most_likely_token_even_above_p():
    probs = torch.tensor([[0.05, 0.8, 0.1, 0.05], [0.3, 0.3, 0.2, 0.2]], dtype=torch.float64)
    from prosec_mcore.sampling import top_p_filter

    got = top_p_filter(probs.log(), 0.5).exp()
    assert torch.allclose(got, nucleus(probs, 0.5))
    assert torch.equal(got[0] > 0, torch.tensor([False, True, False, False]))  # 0.8 > p, still kept
    assert torch.allclose(top_p_filter(probs.log(), 0.65).exp()[1], torch.tensor([.5, .5, 0, 0], dtype=torch.float64))
    assert torch.equal(top_p_filter(probs.log(), 1.0), probs.log())
    assert math.isclose(float(got.sum()), 2.0)
