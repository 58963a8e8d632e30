"""The weights' EMA (training/ema.py) against a plain float64 EMA written here, and the label
combination of the time embedder (model/time_embedding.py) against its formula.

Tolerance: the EMA is kept in float32; over 6 updates of weights ~N(0, 1) its distance to the
float64 recurrence is at most ~2e-7 (measured 1.2e-7), so 1e-6 absolute.
"""
import torch
import pytest

from prosec_mcore.training.ema import WeightEMA, ema_decay_at


def reference_ema(snapshots, decay, warmup):
    """ema_0 = w_0; ema_n = d_n ema_{n-1} + (1 - d_n) w_n, d_n = min(decay, (1+n)/(10+n)) with warm-up."""
    ema = snapshots[0].double()
    for n, w in enumerate(snapshots[1:], start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = d * ema + (1 - d) * w.double()
    return ema


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_plain_recurrence(warmup):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    ema = WeightEMA([model], decay=0.7, warmup=warmup)
    snapshots = {name: [p.detach().clone()] for name, p in model.named_parameters()}
    for _ in range(6):  # stands for optimizer steps
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for name, p in model.named_parameters():
            snapshots[name].append(p.detach().clone())
    assert ema.num_updates == 6
    for (name, _), shadow in zip(model.named_parameters(), ema.shadow):
        want = reference_ema(snapshots[name], 0.7, warmup)
        assert (shadow.double() - want).abs().max().item() < 1e-6, name


def test_warmup_values_are_the_reference_ones():
    assert ema_decay_at(0.9999, 1, True) == pytest.approx(2 / 11)
    assert ema_decay_at(0.9999, 1000, True) == pytest.approx(1001 / 1010)
    assert ema_decay_at(0.9999, 10**6, True) == 0.9999
    assert ema_decay_at(0.9999, 1, False) == 0.9999


def test_swapped_in_uses_the_average_and_restores_the_weights_bitwise():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 4)
    ema = WeightEMA([model], decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # shadow = w0 + 0.5
    raw = model.weight.detach().clone()
    x = torch.randn(2, 4)
    with ema.swapped_in():
        assert torch.equal(model.weight, ema.shadow[0])
        assert not torch.equal(model.weight, raw)
        out_ema = model(x)
    assert torch.equal(model.weight, raw)
    assert not torch.allclose(model(x), out_ema)


def test_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightEMA([torch.nn.Linear(2, 2)], decay=1.0)


@pytest.mark.parametrize("combination", ["silu_sum", "sum_silu"])
def test_label_combination_formulas(combination):
    from types import SimpleNamespace

    import torch.nn.functional as F

    from prosec_mcore.model.time_embedding import TimestepEmbedder, sinusoidal_embedding

    config = SimpleNamespace(params_dtype=torch.float32, init_method_std=0.5, sequence_parallel=False)
    emb = TimestepEmbedder(config, 16, seed=3, num_classes=2, label_combination=combination)
    sigma, labels = torch.tensor([0.3, 1.7]), torch.tensor([0, 2])
    time_part = emb.fc2(F.silu(emb.fc1(sinusoidal_embedding(sigma))))
    label_part = emb.label_embedding(labels)
    want = F.silu(time_part) + F.silu(label_part) if combination == "silu_sum" else F.silu(time_part + label_part)
    torch.testing.assert_close(emb(sigma, labels), want, rtol=0, atol=0)


def test_a_checkpoint_is_refused_by_a_run_with_the_other_label_combination():
    """Checkpoints from before model.label_combination existed were trained with sum_silu."""
    from prosec_mcore.config import ConfigError
    from prosec_mcore.config_loader import config_to_dict, load_config
    from prosec_mcore.training.checkpoint import check_compatible, upgrade_saved_config

    run = load_config(["model.num_classes=2"])  # default silu_sum
    saved = config_to_dict(run)
    del saved["model"]["label_combination"]  # an older checkpoint
    assert upgrade_saved_config(saved)["model"]["label_combination"] == "sum_silu"
    with pytest.raises(ConfigError, match="model.label_combination='sum_silu' but this run has 'silu_sum'"):
        check_compatible(saved, run, 100, "ckpt")
    check_compatible(saved, load_config(["model.num_classes=2", "model.label_combination=sum_silu"]), 100, "ckpt")
    unlabelled = config_to_dict(load_config([]))  # no label embedding: nothing to refuse
    del unlabelled["model"]["label_combination"]
    check_compatible(unlabelled, load_config([]), 100, "ckpt")
