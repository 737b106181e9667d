"""Routing skew model: the bias hits its expert max/mean, and EP-rank imbalance grows with N."""

from __future__ import annotations

import pytest
import torch

from zeroprefill.common.routing_skew import (expected_max_over_mean_load, expected_rank_imbalance,
                                             popularity_biases)


def test_popularity_biases_hit_the_expert_target():
    biases, alphas = popularity_biases(32, 4, num_layers=2, expert_max_over_mean=1.5, seed=0, samples=8192)
    assert biases.shape == (2, 32) and all(a > 0 for a in alphas)
    for layer, bias in enumerate(biases):
        assert expected_max_over_mean_load(bias, 4, 8192, seed=layer) == pytest.approx(1.5, abs=0.01)
    assert not torch.equal(biases[0].argsort(), biases[1].argsort())  # other hot experts per layer
    with pytest.raises(ValueError, match="at least 1.0"):
        popularity_biases(32, 4, 1, 0.5, seed=0)


def test_rank_imbalance_grows_as_ranks_own_fewer_experts():
    assert expected_rank_imbalance(32, 4, 4, 1.0) == 1.0
    assert expected_rank_imbalance(32, 4, 1, 1.5) == 1.0
    two, eight = expected_rank_imbalance(32, 4, 2, 1.5), expected_rank_imbalance(32, 4, 8, 1.5)
    assert 1.0 < two < eight < 1.5  # sums of 16 vs 4 expert loads; one expert alone would be 1.5
    assert expected_rank_imbalance(32, 4, 32, 1.5) == pytest.approx(1.5, abs=0.05)
    with pytest.raises(ValueError, match="num_ranks"):
        expected_rank_imbalance(32, 4, 64, 1.5)
