"""Noise schedules and the forward process, checked against their definitions."""
import math

import pytest
import torch

from prosec_mcore.diffusion.noise import (
    STREAM_TRAIN_MASK, apply_forward_process, sample_times, token_uniforms,
)
from prosec_mcore.diffusion.schedules import build_schedule


@pytest.mark.parametrize("name", ["loglinear", "linear", "cosine"])
def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    schedule = build_schedule(name, eps=1e-3)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    alpha = schedule.alpha(t)
    (alpha_prime,) = torch.autograd.grad(alpha.sum(), t)  # derivative by autograd, independent of the code
    expected = -alpha_prime / (1 - alpha.detach())
    torch.testing.assert_close(schedule.loss_weight(t.detach()), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(schedule.sigma(t.detach()), -torch.log(alpha.detach()), rtol=1e-10, atol=0)


def test_loglinear_matches_reference_values():
    s = build_schedule("loglinear", eps=1e-3)
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.mask_probability(t), (1 - 1e-3) * t)
    torch.testing.assert_close(s.loss_weight(t), 1 / t)
    assert s.alpha(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(1e-3)


def _times(indices, positions, batch, n=8, seed=7, eps=1e-3, antithetic=True):
    idx = torch.tensor(indices)
    return sample_times(seed, idx, torch.full_like(idx, batch), torch.tensor(positions), n, eps, antithetic)


def test_antithetic_times_cover_each_stratum_once():
    n, eps = 8, 0.1
    t = _times(list(range(n)), list(range(n)), batch=3, n=n, eps=eps)
    u = (t - eps) / (1 - eps)
    strata = sorted(int(math.floor(x * n + 1e-9)) for x in u.tolist())
    assert strata == list(range(n))
    assert t.min() >= eps and t.max() <= 1.0


def test_times_do_not_depend_on_how_the_batch_is_split():
    whole = _times(list(range(16, 24)), list(range(8)), batch=2)
    halves = torch.cat([_times([16, 17, 18, 19], [0, 1, 2, 3], batch=2), _times([20, 21, 22, 23], [4, 5, 6, 7], batch=2)])
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)
    other_batch = _times(list(range(16, 24)), list(range(8)), batch=5)
    assert not torch.equal(whole, other_batch)


def test_mask_noise_is_a_function_of_sample_index_only():
    a = token_uniforms(11, torch.tensor([5, 9, 42]), 32)
    b = token_uniforms(11, torch.tensor([42, 5]), 32)  # other micro-batch, other positions
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[0], b[1], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], token_uniforms(12, torch.tensor([5]), 32)[0])  # seed matters
    assert not torch.equal(a[0], token_uniforms(11, torch.tensor([5]), 32, stream=STREAM_TRAIN_MASK + 2)[0])


def test_forward_process_masks_with_probability_one_minus_alpha():
    schedule = build_schedule("loglinear")
    tokens = torch.arange(4000).remainder(50).view(2, 2000)
    t = torch.tensor([0.2, 0.8], dtype=torch.float64)
    nb = apply_forward_process(tokens, t, token_uniforms(3, torch.tensor([0, 1]), 2000), schedule, mask_id=99)
    assert torch.equal(nb.noised == 99, nb.masked)
    assert torch.equal(nb.noised[~nb.masked], tokens[~nb.masked])
    frac = nb.masked.float().mean(1)
    assert abs(frac[0].item() - 0.2 * 0.999) < 0.03 and abs(frac[1].item() - 0.8 * 0.999) < 0.03
    torch.testing.assert_close(nb.weight, (1 / t).float())
