"""AsyncEP on 2 and 3 gloo ranks equals a dense single-process MoE.

Every rank builds the same full expert weights from a seed, keeps only its shard, streams
the layers with the real transport and streamer, and compares its own tokens' output with
the dense reference computed from the full weights. Scenarios cover uneven token counts, a
rank with zero tokens, E not divisible by N, both placements, prefetch depth 1 and 2,
several layers and several passes (cross-pass prefetch), and a perturbed schedule (random
delays in the transport and a kernel that checks its weights do not change under it). Each
scenario runs with a switch point: passes below it move tokens to the resident experts
(``TokenExchange``) instead of streaming weights; scenarios force either mode, or cross the
switch point pass by pass, and check that a pass that moves tokens leaves the ring as it was.
"""

from __future__ import annotations

import random
import time
from datetime import timedelta
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from tests.multiprocess import run_on_ranks
from zeroprefill.common.asyncep_moe import AsyncEPMoE, experts_reference, moe_reference, select_experts
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.streamer import ExpertWeightStreamer
from zeroprefill.common.token_exchange import TokenExchange
from zeroprefill.common.transport import GatherTimeoutError, GlooAllGather, make_transport

HIDDEN, INTERMEDIATE = 16, 8


@dataclass(frozen=True)
class Scenario:
    num_experts: int
    top_k: int
    tokens_per_rank: tuple[int, ...]
    num_layers: int = 3
    passes: int = 2
    prefetch_depth: int = 1
    placement: str = "linear"
    renormalize: bool = True
    perturb: bool = False
    switch_tokens: int = 0  # passes whose largest per-rank token count is below it move tokens
    # tokens per rank for each pass (overrides tokens_per_rank; lets passes cross the switch point)
    tokens_by_pass: tuple[tuple[int, ...], ...] = ()


def _full_weights(num_experts: int, num_layers: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        {
            "w13": torch.randn(num_experts, 2 * INTERMEDIATE, HIDDEN, generator=g) / HIDDEN**0.5,
            "w2": torch.randn(num_experts, HIDDEN, INTERMEDIATE, generator=g) / INTERMEDIATE**0.5,
        }
        for _ in range(num_layers)
    ]


class _DelayedGloo(GlooAllGather):
    """Gloo transport that sleeps a random few milliseconds before each gather."""

    def gather(self, layer, name, out):
        time.sleep(random.uniform(0.0, 0.01))
        return super().gather(layer, name, out)


def _checking_kernel(hidden, w13, w2, topk_weights, topk_ids, add_to=None):
    """Reference experts that fail if the gathered weights change while they compute."""
    before = (w13.sum().item(), w2.sum().item())
    time.sleep(random.uniform(0.0, 0.02))
    out = experts_reference(hidden, w13, w2, topk_weights, topk_ids, add_to=add_to)
    after = (w13.sum().item(), w2.sum().item())
    assert before == after, "a gather overwrote a ring slot while its layer was computing"
    return out


def _run_scenarios(rank: int, world_size: int, scenarios: list[Scenario]) -> None:
    random.seed(rank)
    for scenario in scenarios:
        layout = ExpertShardLayout(scenario.num_experts, world_size, scenario.placement)
        full = _full_weights(scenario.num_experts, scenario.num_layers)
        shards = [layout.shard_all(layer, rank) for layer in full]
        transport = _DelayedGloo(None) if scenario.perturb else make_transport("gloo")
        streamer = ExpertWeightStreamer(shards, layout, transport, prefetch_depth=scenario.prefetch_depth)
        kernel = _checking_kernel if scenario.perturb else None
        exchange = TokenExchange(layout, streamer.resident(0).row_of_expert)
        layers = [
            AsyncEPMoE(streamer, i, scenario.top_k, scenario.renormalize, experts_kernel=kernel,
                       exchange=exchange, switch_tokens=scenario.switch_tokens)
            for i in range(scenario.num_layers)
        ]
        g = torch.Generator().manual_seed(100 + rank)
        passes = scenario.tokens_by_pass or (scenario.tokens_per_rank,) * scenario.passes
        for tokens in passes:
            x = torch.randn(tokens[rank], HIDDEN, generator=g)
            moves_tokens = layers[0].moves_tokens(max(tokens))
            ring_before = (sorted(streamer._in_flight), streamer._next_to_acquire, streamer._next_to_issue)
            for i, layer in enumerate(layers):
                logits = torch.randn(x.shape[0], scenario.num_experts, generator=g)
                got = layer(x, logits, max_tokens=max(tokens))
                want = moe_reference(x, logits, full[i]["w13"], full[i]["w2"], scenario.top_k, scenario.renormalize)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{scenario} rank {rank} layer {i}: {m}")
                x = got + x  # residual: later layers see earlier layers' output
            if moves_tokens:  # no gather issued or consumed: the ring is as the last streamed pass left it
                assert (sorted(streamer._in_flight), streamer._next_to_acquire, streamer._next_to_issue) == ring_before
        streamer.close()


ALWAYS_MOVE_TOKENS = 10**6
SCENARIOS_2 = [
    Scenario(num_experts=8, top_k=2, tokens_per_rank=(5, 0)),  # rank 1 idle
    Scenario(num_experts=7, top_k=3, tokens_per_rank=(9, 2), prefetch_depth=2),  # E % N != 0
    Scenario(num_experts=6, top_k=2, tokens_per_rank=(4, 7), placement="round_robin", renormalize=False),
    Scenario(num_experts=8, top_k=2, tokens_per_rank=(6, 3), num_layers=4, passes=3, perturb=True),
    Scenario(num_experts=5, top_k=2, tokens_per_rank=(3, 4), num_layers=2, prefetch_depth=2, perturb=True),
    # moving tokens in every pass: a rank with no tokens still joins every exchange
    Scenario(num_experts=8, top_k=2, tokens_per_rank=(5, 0), switch_tokens=ALWAYS_MOVE_TOKENS),
    Scenario(num_experts=6, top_k=3, tokens_per_rank=(4, 7), placement="round_robin", renormalize=False,
             switch_tokens=ALWAYS_MOVE_TOKENS),
    # crossing the switch point (6 tokens) pass by pass, the ring's prefetch kept across token passes
    Scenario(num_experts=8, top_k=2, tokens_per_rank=(), num_layers=3, switch_tokens=6,
             tokens_by_pass=((3, 2), (9, 4), (0, 5), (1, 1), (6, 0), (2, 7), (5, 5))),
    Scenario(num_experts=7, top_k=3, tokens_per_rank=(), num_layers=4, prefetch_depth=2, switch_tokens=6, perturb=True,
             tokens_by_pass=((8, 8), (2, 3), (3, 2), (7, 1), (0, 0), (4, 9))),
]
SCENARIOS_3 = [
    Scenario(num_experts=8, top_k=2, tokens_per_rank=(3, 11, 0), prefetch_depth=2),  # 8 % 3 != 0
    Scenario(num_experts=9, top_k=4, tokens_per_rank=(0, 0, 5), num_layers=2, passes=3),
    Scenario(num_experts=7, top_k=2, tokens_per_rank=(4, 1, 6), perturb=True),
    Scenario(num_experts=8, top_k=3, tokens_per_rank=(0, 6, 2), switch_tokens=ALWAYS_MOVE_TOKENS),
    Scenario(num_experts=9, top_k=4, tokens_per_rank=(), num_layers=3, switch_tokens=5,
             tokens_by_pass=((1, 0, 3), (6, 2, 2), (4, 4, 0), (0, 9, 1), (2, 2, 2))),
]


def test_asyncep_matches_dense_reference_two_ranks() -> None:
    run_on_ranks(2, _run_scenarios, SCENARIOS_2)


def test_asyncep_matches_dense_reference_three_ranks() -> None:
    run_on_ranks(3, _run_scenarios, SCENARIOS_3)


def _skip_a_layer(rank: int, world_size: int) -> None:
    # The weight gathers run on their own group (as in serving); its short gloo timeout lets
    # the abandoned collective end after the test instead of at the default 60 s.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=4))
    layout = ExpertShardLayout(4, world_size)
    full = _full_weights(4, 2)
    streamer = ExpertWeightStreamer(
        [layout.shard_all(layer, rank) for layer in full], layout, make_transport("gloo", group),
        timeout_s=2.0,
    )
    layer0 = AsyncEPMoE(streamer, 0, 2, True)
    if rank == 0:
        with pytest.raises(GatherTimeoutError, match=r"MoE layer 0 did not complete on rank 0 of 2"):
            layer0(torch.randn(3, HIDDEN), torch.randn(3, 4))
    # rank 1 skips the layer: it "died" or diverged from lockstep.
    dist.barrier()


def test_stuck_gather_names_layer_and_rank() -> None:
    run_on_ranks(2, _skip_a_layer)


def _gather_fp8(rank: int, world_size: int) -> None:
    layout = ExpertShardLayout(4, world_size)
    torch.manual_seed(0)  # the same full weights on every rank
    full = {"w13": (torch.randn(4, 2 * INTERMEDIATE, HIDDEN) * 8).to(torch.float8_e4m3fn),
            "w13_scale": torch.rand(4, 1, 1)}
    streamer = ExpertWeightStreamer([layout.shard_all(full, rank)], layout, make_transport("gloo"))
    gathered = streamer.acquire(0).gathered.tensors  # gloo's AllGather fills every rank's rows
    assert gathered["w13"].dtype == torch.float8_e4m3fn
    assert torch.equal(gathered["w13"].view(torch.uint8), full["w13"].view(torch.uint8))
    assert torch.equal(gathered["w13_scale"], full["w13_scale"])
    streamer.release(0)
    streamer.close()


def test_gloo_gathers_fp8_shards_bytewise() -> None:
    run_on_ranks(2, _gather_fp8)


def _skipped_slots(rank: int, world_size: int) -> None:
    """An engine's padding rows reach the layer with expert id -1: they count in neither mode."""
    layout = ExpertShardLayout(8, world_size)
    full = _full_weights(8, 2)
    streamer = ExpertWeightStreamer([layout.shard_all(w, rank) for w in full], layout, make_transport("gloo"))
    exchange = TokenExchange(layout, streamer.resident(0).row_of_expert)
    g = torch.Generator().manual_seed(7 + rank)
    for switch_tokens in (0, ALWAYS_MOVE_TOKENS):  # streamed weights, then moved tokens
        layers = [AsyncEPMoE(streamer, i, 2, True, exchange=exchange, switch_tokens=switch_tokens) for i in range(2)]
        for i, layer in enumerate(layers):
            x = torch.randn(6, HIDDEN, generator=g)
            weights, ids = select_experts(torch.randn(6, 8, generator=g), 2, True)
            ids[1, 0] = ids[4, 1] = -1
            ids[5] = -1  # a whole padding row
            got = layer.forward_routed(x, weights, ids, max_tokens=6)
            want = experts_reference(x, full[i]["w13"], full[i]["w2"], weights, ids)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert got[5].abs().max() == 0
    streamer.close()


def test_skipped_slots_count_in_neither_mode() -> None:
    run_on_ranks(2, _skipped_slots)
