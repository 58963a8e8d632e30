"""Unigram entropy and the perplexity bound against values computed by hand."""
import math

import pytest
import torch

from prosec_mcore.evaluation.text import perplexity_bound, sample_unigram_entropy, unigram_entropy


def test_single_sample_entropy_by_hand():
    assert sample_unigram_entropy([0, 0, 1, 1]) == pytest.approx(math.log(2))
    assert sample_unigram_entropy([7, 7, 7, 7]) == 0.0
    assert sample_unigram_entropy([3, 1, 4, 2]) == pytest.approx(math.log(4))  # all distinct: log L
    # p = (3/4, 1/4)
    assert sample_unigram_entropy(torch.tensor([5, 5, 5, 9])) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_entropy_is_averaged_per_sample_not_pooled():
    # Each sample repeats one token: per-sample entropy 0, although the pooled histogram
    # (two tokens, equally often) has entropy log 2.
    assert unigram_entropy(torch.tensor([[0, 0], [1, 1]])) == 0.0
    assert unigram_entropy(torch.tensor([[0, 0, 1, 1], [5, 5, 5, 5]])) == pytest.approx(math.log(2) / 2)
    # ragged lists: (log 2 + log 3) / 2
    assert unigram_entropy([[1, 2], [1, 2, 3]]) == pytest.approx((math.log(2) + math.log(3)) / 2)
    with pytest.raises(ValueError, match="batch, length"):
        unigram_entropy(torch.tensor([0, 0, 1, 1]))  # one sample must be given as a batch of one


def test_ignored_ids_are_not_counted():
    pad = 9
    assert sample_unigram_entropy([0, 0, 1, 1, pad, pad, pad], ignore_ids=[pad]) == pytest.approx(math.log(2))
    assert sample_unigram_entropy([0, 0, 1, 1, pad, pad, pad]) > math.log(2)  # pad counted otherwise
    assert math.isnan(sample_unigram_entropy([pad, pad], ignore_ids=[pad]))
    # a sample left empty is skipped in the mean; all empty -> NaN
    assert unigram_entropy([[pad, pad], [0, 1]], ignore_ids=[pad]) == pytest.approx(math.log(2))
    assert math.isnan(unigram_entropy([[pad]], ignore_ids=[pad]))


def test_perplexity_bound():
    assert perplexity_bound(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity_bound(10.0, num_tokens=5) == pytest.approx(math.exp(2.0))  # a sum over 5 tokens
    assert perplexity_bound(0.0) == 1.0
    assert perplexity_bound(1000.0) == math.inf  # instead of OverflowError
