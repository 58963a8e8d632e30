"""Label conditioning for classifier-free guidance: condition dropout and the label embedding."""
from types import SimpleNamespace

import pytest
import torch

from prosec_mcore.config import Config, ConfigError, validate_config
from prosec_mcore.diffusion.noise import drop_labels
from prosec_mcore.model.time_embedding import TimestepEmbedder


def test_condition_dropout_is_a_seeded_bernoulli_per_sample():
    index = torch.arange(4000)
    labels = torch.ones(4000, dtype=torch.long)
    dropped = drop_labels(7, index, labels, 0.25, null_label=2)
    assert set(dropped.unique().tolist()) == {1, 2}
    assert abs((dropped == 2).float().mean().item() - 0.25) < 0.03
    assert torch.equal(dropped[100:200], drop_labels(7, index[100:200], labels[100:200], 0.25, 2))  # per sample
    assert not torch.equal(dropped, drop_labels(8, index, labels, 0.25, 2))
    assert torch.equal(drop_labels(7, index, labels, 0.0, 2), labels)


def embedder(num_classes):
    config = SimpleNamespace(params_dtype=torch.float32, init_method_std=0.02, sequence_parallel=False)
    return TimestepEmbedder(config, 16, seed=3, num_classes=num_classes)


def test_label_embedding_changes_the_conditioning_and_none_is_the_null_label():
    emb = embedder(2)
    sigma = torch.tensor([0.5, 0.5])
    c0, c1 = emb(sigma, torch.tensor([0, 0])), emb(sigma, torch.tensor([1, 1]))
    assert not torch.allclose(c0, c1)
    assert torch.equal(emb(sigma), emb(sigma, torch.tensor([2, 2])))
    base = embedder(0)
    assert not hasattr(base, "label_embedding") or base.label_embedding is None
    with pytest.raises(ValueError, match="no label conditioning"):
        base(sigma, torch.tensor([0, 1]))


def test_label_settings_are_validated():
    cfg = Config()
    cfg.model.num_classes = 2
    with pytest.raises(ConfigError, match="label conditioning needs both"):
        validate_config(cfg, cuda_available=False)
    cfg.data.labels = "labels.npy"
    cfg.model.time_conditioning = "none"
    with pytest.raises(ConfigError, match="needs model.time_conditioning=adaln"):
        validate_config(cfg, cuda_available=False)
    cfg.model.time_conditioning = "adaln"
    cfg.objective.cond_dropout = 1.0
    with pytest.raises(ConfigError, match="cond_dropout"):
        validate_config(cfg, cuda_available=False)
