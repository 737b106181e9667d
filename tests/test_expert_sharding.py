"""Expert shard layout: vLLM's EP placement, padding, slot map."""

import pytest
import torch

from zeroprefill.common.expert_sharding import ExpertShardLayout


@pytest.mark.parametrize("num_experts,world_size", [(8, 2), (7, 2), (8, 3), (128, 4), (5, 5)])
@pytest.mark.parametrize("placement", ["linear", "round_robin"])
def test_every_expert_owned_once_and_slot_map_points_at_it(num_experts, world_size, placement):
    layout = ExpertShardLayout(num_experts, world_size, placement)
    owned = [e for r in range(world_size) for e in layout.experts_of_rank(r)]
    assert sorted(owned) == list(range(num_experts))
    assert layout.capacity == -(-num_experts // world_size)
    full = torch.arange(num_experts, dtype=torch.float32)[:, None].expand(num_experts, 3).contiguous() + 1
    gathered = torch.cat([layout.shard(full, r) for r in range(world_size)])
    assert gathered.shape[0] == layout.num_slots
    slots = [rank * layout.capacity + row for rank, row in layout.home_of_expert()]
    assert torch.equal(gathered[slots], full)
    padding = sorted(set(range(layout.num_slots)) - set(slots))
    assert torch.all(gathered[padding] == 0)


def test_linear_placement_matches_vllm_expert_map():
    # vLLM determine_expert_map: base = E // N, the first E % N ranks get one more, contiguous.
    layout = ExpertShardLayout(7, 3)
    assert [layout.experts_of_rank(r) for r in range(3)] == [(0, 1, 2), (3, 4), (5, 6)]
    assert layout.home_of_expert() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_round_robin_placement():
    layout = ExpertShardLayout(6, 2, "round_robin")
    assert layout.experts_of_rank(0) == (0, 2, 4)
    assert layout.home_of_expert() == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 2, "world_size": 3}, "exceeds num_experts"),
        ({"num_experts": 0, "world_size": 1}, "num_experts must be positive"),
        ({"num_experts": 4, "world_size": 2, "placement": "random"}, "unknown placement"),
    ],
)
def test_bad_layouts_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertShardLayout(**kwargs)


def test_shard_rejects_wrong_expert_count():
    with pytest.raises(ValueError, match="num_experts=4 rows"):
        ExpertShardLayout(4, 2).shard(torch.zeros(5, 2), 0)


def test_pad_shard_pads_short_shards_and_rejects_long_ones():
    layout = ExpertShardLayout(7, 2)  # capacity 4; rank 1 owns 3 experts
    padded = layout.pad_shard(torch.ones(3, 2))
    assert padded.shape == (4, 2) and padded[3].eq(0).all() and padded[:3].eq(1).all()
    with pytest.raises(ValueError, match="at most capacity=4 experts, got 5"):
        layout.pad_shard(torch.ones(5, 2))


@pytest.mark.parametrize("num_experts,world_size,placement,rank,expected", [
    (128, 1, "linear", 0, "0-127 (128 experts)"),
    (10, 3, "linear", 1, "4-6 (3 experts)"),
    (6, 3, "round_robin", 2, "2, 5 (2 experts)"),
    (3, 3, "linear", 2, "2 (1 expert)"),
])
def test_describe_experts_of_rank_writes_runs(num_experts, world_size, placement, rank, expected):
    layout = ExpertShardLayout(num_experts, world_size, placement)
    assert layout.describe_experts_of_rank(rank) == expected
