"""The Monte-Carlo ELBO estimator (evaluation/elbo.py) against plain PyTorch, on toy denoisers."""

import pytest
import torch

from prosec_mcore.diffusion.schedules import build_schedule
from prosec_mcore.evaluation.elbo import elbo_loglikelihoods, greedy_matches, mc_draws, stratified_counts
from prosec_mcore.sampling import FunctionDenoiser

V, MASK = 12, 11
SCHEDULE = build_schedule("loglinear", 1e-3)


class ContextNetwork:
    """Logits that depend on every token of the sequence (their mean) and on sigma, so a masked
    prompt or a wrong time input changes the result."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.emb, self.out, self.ctx = (torch.randn(V, 8, generator=g), torch.randn(8, V, generator=g),
                                        torch.randn(8, V, generator=g))
        self.time = torch.randn(V, generator=g)

    def __call__(self, tokens, sigma):
        h = self.emb[tokens]
        return h @ self.out + h.mean(dim=1, keepdim=True) @ self.ctx + sigma[:, None, None] * self.time


def reference_elbo(net, prefix, target, counts, masks):
    """Plain PyTorch, one draw at a time: mask the chosen target positions, log-softmax over the
    vocabulary without the mask id, sum -CE at the masked targets, weight by T / l, average."""
    T, values = len(target), []
    for count, mask in zip(counts.tolist(), masks):
        seq = torch.tensor(prefix + target)
        noisy = seq.clone()
        noisy[len(prefix):][mask] = MASK
        sigma = SCHEDULE.sigma(torch.tensor([count / T], dtype=torch.float64)).float()
        logits = net(noisy[None], sigma)[0].double()
        logits[:, MASK] = float("-inf")
        lp = torch.log_softmax(logits, dim=-1)[torch.arange(len(seq)), seq]
        values.append(lp[len(prefix):][mask].sum().item() * T / count)
    return sum(values) / len(values)


PAIRS = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 1]), ([2, 2, 4], [5, 6]), ([], [3, 3, 3]),
         ([1, 2, 3], [4, 5]), ([5, 5], [])]


def test_elbo_equals_plain_pytorch_with_the_same_draws():
    net = ContextNetwork()
    denoiser = FunctionDenoiser(net, V, MASK)
    got = elbo_loglikelihoods(denoiser, SCHEDULE, PAIRS, mc_num=6, batch_size=4, seed=3)
    for (prefix, target), value in zip(PAIRS, got):
        if not target:
            assert value == 0.0
            continue
        counts, masks = mc_draws(3, prefix, target, 6)
        want = reference_elbo(net, prefix, target, counts, masks)
        # float32 logits of a batch of 4 vs one row may differ by a few ulp; measured: 4e-9 relative
        # on this toy (the float64 sums keep that size), so 1e-6 leaves ample margin.
        assert value == pytest.approx(want, rel=1e-6)
    assert got[0] == got[4]  # the same pair, the same draws


def test_elbo_ignores_order_and_batching_and_is_exact_for_a_context_free_model():
    net = ContextNetwork(seed=1)
    denoiser = FunctionDenoiser(net, V, MASK)
    base = elbo_loglikelihoods(denoiser, SCHEDULE, PAIRS, mc_num=5, batch_size=3, seed=7)
    order = [3, 0, 5, 2, 1, 4]
    shuffled = elbo_loglikelihoods(denoiser, SCHEDULE, [PAIRS[i] for i in order], mc_num=5, batch_size=3, seed=7)
    assert shuffled == [base[i] for i in order]  # bit for bit: the same rows in the same batches
    other_seed = elbo_loglikelihoods(denoiser, SCHEDULE, PAIRS, mc_num=5, batch_size=3, seed=8)
    assert other_seed[0] != base[0]

    # A model whose prediction ignores the input and the position, scored on targets that repeat one
    # token: each of the l masked terms is the same log q(t), so every draw of the estimator gives
    # (T / l) * l * log q(t) = T log q(t), the exact log-likelihood (a wrong weight fails at once).
    row = torch.randn(V, generator=torch.Generator().manual_seed(0))
    fixed = FunctionDenoiser(lambda tokens, sigma: row.expand(*tokens.shape, V), V, MASK)
    lp = torch.log_softmax(torch.cat([row[:MASK], row[MASK + 1:]]).double(), dim=-1)  # ids 0..10
    pairs = [([1, 2], [4, 4]), ([6], [7] * 5), ([], [3, 3, 3])]
    for (prefix, target), value in zip(pairs, elbo_loglikelihoods(fixed, SCHEDULE, pairs, mc_num=4, batch_size=8)):
        exact = len(target) * lp[target[0]].item()
        assert value == pytest.approx(exact, rel=1e-12)  # float64 sums of equal terms: round-off ~1e-15


def test_stratified_counts_cover_the_range():
    g = torch.Generator().manual_seed(0)
    for T in (1, 5, 9):
        counts = stratified_counts(T, T, g)
        assert sorted(counts.tolist()) == list(range(1, T + 1))  # n = T: every l exactly once
        counts = stratified_counts(T, 3 * T, g)
        assert counts.min() >= 1 and counts.max() <= T and torch.bincount(counts).tolist()[1:] == [3] * T
    counts, masks = mc_draws(0, [1], [2, 3, 4, 5], 8)
    assert masks.sum(dim=1).tolist() == counts.tolist()


def test_greedy_matches_plain_loop():
    net = ContextNetwork(seed=2)
    denoiser = FunctionDenoiser(net, V, MASK)

    def plain_greedy(prefix, t_len):
        seq = torch.tensor(prefix + [MASK] * t_len)
        for step in range(t_len):
            sigma = SCHEDULE.sigma(torch.tensor([(t_len - step) / t_len], dtype=torch.float64)).float()
            logits = net(seq[None], sigma)[0].double()
            logits[:, MASK] = float("-inf")
            conf, arg = torch.log_softmax(logits, -1).max(-1)
            conf[seq != MASK] = float("-inf")
            j = int(conf.argmax())
            seq[j] = arg[j]
        return seq[len(prefix):].tolist()

    prefixes = [[1, 2], [3, 4], [5, 6], [7]]
    greedy = [plain_greedy(p, 3) for p in prefixes]
    pairs = [(prefixes[0], greedy[0]), (prefixes[1], greedy[1][:2] + [(greedy[1][2] + 1) % MASK]),
             (prefixes[2], greedy[2]), (prefixes[3], greedy[3])]
    assert greedy_matches(denoiser, SCHEDULE, pairs, batch_size=2) == [True, False, True, True]
