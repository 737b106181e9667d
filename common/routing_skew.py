"""Routing skew: how uneven expert popularity becomes an uneven expert-parallel rank.

The model (the benchmark harness routes its "skewed" batches with it): in every MoE layer a
token's router logits are ``N(0, 1)`` plus a per-expert popularity bias ``alpha * z``,
``z ~ N(0, 1)^E`` (log-normal popularity, other hot experts in every layer), and ``alpha`` is
set so that top-k routing's max/mean *expert* load hits a target (``expert_max_over_mean``;
1.0 is perfectly balanced).

Under expert parallelism each rank runs the tokens of its own ``E / N`` experts, so a layer
waits for its busiest rank: what slows EP is the max/mean *rank* load, the sum of the expert
loads a rank owns (vLLM's linear placement, :class:`ExpertShardLayout`). The fewer experts a
rank owns, the less their loads average out, so the same expert skew costs EP more at 8 GPUs
than at 2. AsyncEP and TP split tokens, not experts, over the ranks: every rank sees the
same expert mix, and skew does not unbalance them.

API:

- ``expected_max_over_mean_load(bias, top_k, samples, seed)``: simulated max/mean expert load
  of top-k routing over ``N(0, 1)`` logits plus ``bias [E]``.
- ``popularity_biases(num_experts, top_k, num_layers, expert_max_over_mean, seed)``: the
  per-layer biases (``[layers, E]``) and their ``alpha``.
- ``expected_rank_imbalance(num_experts, top_k, num_ranks, expert_max_over_mean)``: mean over
  layers of the expected max/mean EP-rank load (1.0 when the target is 1.0).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from zeroprefill.common.expert_sharding import ExpertShardLayout

#: Layers averaged by :func:`expected_rank_imbalance` (each draws its own hot experts).
IMBALANCE_LAYERS = 16
#: Routed tokens simulated per bias evaluation.
SAMPLES = 16384


def expected_max_over_mean_load(bias: torch.Tensor, top_k: int, samples: int, seed: int) -> float:
    """Max/mean expert load of top-k routing over N(0, 1) logits plus ``bias [E]`` (simulated)."""
    loads = _expert_loads(bias, top_k, samples, seed)
    return float(loads.max() / loads.mean())


def popularity_biases(num_experts: int, top_k: int, num_layers: int, expert_max_over_mean: float, seed: int,
                      samples: int = SAMPLES) -> tuple[torch.Tensor, list[float]]:
    """Per-layer popularity ``alpha_l * z_l`` (``[layers, E]`` float32 on CPU) and the ``alpha_l``.

    ``alpha_l`` is bisected on [0, 4] so that :func:`expected_max_over_mean_load` of the layer's
    bias is ``expert_max_over_mean``.
    """
    if expert_max_over_mean < 1.0:
        raise ValueError(f"expert_max_over_mean is max/mean load, at least 1.0; got {expert_max_over_mean}")
    gen = torch.Generator().manual_seed(seed)
    rows, alphas = [], []
    for layer in range(num_layers):
        z = torch.randn(num_experts, generator=gen)
        low, high = 0.0, 4.0
        for _ in range(20):
            mid = (low + high) / 2
            if expected_max_over_mean_load(mid * z, top_k, samples, seed + layer) < expert_max_over_mean:
                low = mid
            else:
                high = mid
        alphas.append((low + high) / 2)
        rows.append(alphas[-1] * z)
    return torch.stack(rows), alphas


@lru_cache(maxsize=64)
def expected_rank_imbalance(num_experts: int, top_k: int, num_ranks: int, expert_max_over_mean: float,
                            seed: int = 0) -> float:
    """Mean over :data:`IMBALANCE_LAYERS` layers of max/mean EP-rank load under the skew model.

    Expert loads are counted over :data:`SAMPLES` simulated tokens per layer (a large batch: the
    extra imbalance of a small one is not included) and summed over each rank's experts in
    vLLM's linear placement.
    """
    if num_ranks < 1 or num_ranks > num_experts:
        raise ValueError(f"num_ranks must be in [1, {num_experts}], got {num_ranks}")
    if expert_max_over_mean == 1.0 or num_ranks == 1:
        return 1.0
    biases, _ = popularity_biases(num_experts, top_k, IMBALANCE_LAYERS, expert_max_over_mean, seed)
    layout = ExpertShardLayout(num_experts, num_ranks)
    ratios = []
    for layer, bias in enumerate(biases):
        loads = _expert_loads(bias, top_k, SAMPLES, seed + layer)
        rank_loads = torch.stack([loads[list(layout.experts_of_rank(r))].sum() for r in range(num_ranks)])
        ratios.append(float(rank_loads.max() / rank_loads.mean()))
    return sum(ratios) / len(ratios)


def _expert_loads(bias: torch.Tensor, top_k: int, samples: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(samples, bias.numel(), generator=gen) + bias[None, :]
    ids = torch.topk(logits, top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(ids, minlength=bias.numel()).float()
