"""The streamer's CUDA ordering (side stream, events, ring reuse, CUDA graphs) under perturbed timing.

One GPU plays N ranks: a loopback transport holds every virtual rank's shard and gathers by
copying them on the side stream after a random device-side sleep, while the experts kernel
sleeps on the compute stream before reading its weights. Correct event ordering gives the
dense reference exactly. CUDA graphs: layers captured one graph per layer (as vLLM's
piecewise graphs hold one MoE layer each) or all in one graph, replayed interleaved with
eager passes in random order. Negative controls remove one ordering each (the side stream's
wait on the "released" event; the engine's ``order_after_side_stream`` before a replay) and
must then produce wrong results, which shows the tests can fail. A one-rank group has nothing
to gather: whatever transport is named, its layers read the resident shards, eager and captured.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist

from zeroprefill.common.asyncep_moe import AsyncEPMoE, moe_reference
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.streamer import ExpertWeightStreamer
from zeroprefill.common.transport import GatherHandle, GatherTransport, ResidentOnly, make_transport
from zeroprefill.ports import free_port

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

E, H, I, LAYERS = 16, 256, 128, 4
SLEEP_CYCLES = 2_000_000  # ~1 ms at 2 GHz


class LoopbackTransport(GatherTransport):
    """All virtual ranks' shards in one process; a gather is a delayed on-device copy."""

    name = "loopback"

    def __init__(self, shards_by_rank: list[list[dict[str, torch.Tensor]]], max_sleep_cycles: int = SLEEP_CYCLES) -> None:
        super().__init__(None)
        self.world_size = len(shards_by_rank)
        self.rank = 0
        self.shards_by_rank = shards_by_rank
        self.max_sleep_cycles = max_sleep_cycles

    def gather(self, layer: int, name: str, out: torch.Tensor) -> GatherHandle:
        torch.cuda._sleep(random.randint(0, self.max_sleep_cycles))
        capacity = self.shards_by_rank[0][layer][name].shape[0]
        for r, shards in enumerate(self.shards_by_rank):
            out[r * capacity : (r + 1) * capacity].copy_(shards[layer][name], non_blocking=True)
        return GatherHandle()


def _slow_kernel(hidden, w13, w2, topk_weights, topk_ids, add_to=None, max_sleep_cycles: int = 3 * SLEEP_CYCLES):
    """Dense per-(token, k) experts with no host sync, after a device-side sleep; an id of -1
    skips its slot, ``add_to`` receives the sum.

    The host runs ahead of a lagging compute stream, as in serving; a gather that does not
    wait for the slot's release then overwrites weights this kernel has not read yet.
    """
    torch.cuda._sleep(random.randint(max_sleep_cycles // 3, max_sleep_cycles))
    present = topk_ids >= 0
    ids = topk_ids.clamp(min=0)
    gate_up = torch.einsum("th,tkih->tki", hidden, w13[ids])
    act = torch.nn.functional.silu(gate_up[..., :I]) * gate_up[..., I:]
    y = torch.einsum("tki,tkhi->tkh", act, w2[ids])
    out = (y * (topk_weights * present)[..., None]).sum(dim=1)
    return out if add_to is None else add_to.add_(out)


def _weights(device, layers: int = LAYERS):
    g = torch.Generator(device=device).manual_seed(0)
    return [{"w13": torch.randn(E, 2 * I, H, device=device, generator=g) / H**0.5,
             "w2": torch.randn(E, H, I, device=device, generator=g) / I**0.5} for _ in range(layers)]


def _loopback_streamer(world_size: int, depth: int, layers: int = LAYERS, gather_sleep: int = SLEEP_CYCLES):
    full = _weights("cuda", layers)
    layout = ExpertShardLayout(E, world_size)
    shards = [[layout.shard_all(w, r) for w in full] for r in range(world_size)]
    streamer = ExpertWeightStreamer(shards[0], layout, LoopbackTransport(shards, gather_sleep), prefetch_depth=depth)
    return full, streamer


def _max_error(streamer: ExpertWeightStreamer, full, passes: int = 3) -> float:
    layers = [AsyncEPMoE(streamer, j, 4, True, experts_kernel=_slow_kernel) for j in range(len(full))]
    outputs, wants = [], []
    for _ in range(passes):
        for j, layer in enumerate(layers):
            x = torch.randn(64, H, device="cuda")
            logits = torch.randn(64, E, device="cuda")
            outputs.append(layer(x, logits))
            wants.append(moe_reference(x, logits, full[j]["w13"], full[j]["w2"], 4, True))
    torch.cuda.synchronize()
    streamer.close()
    return max((o - w).abs().max().item() for o, w in zip(outputs, wants))


@pytest.mark.parametrize("world_size,depth", [(2, 1), (3, 2), (4, 1)])
def test_perturbed_ring_reuse_matches_reference(world_size, depth):
    random.seed(world_size)
    full, streamer = _loopback_streamer(world_size, depth)
    assert _max_error(streamer, full) < 1e-4


def test_negative_control_without_release_wait_corrupts(monkeypatch):
    random.seed(0)
    full, streamer = _loopback_streamer(2, 1)
    monkeypatch.setattr(streamer, "_wait_for_release", lambda slot: None)
    assert _max_error(streamer, full) > 1e-2


def _graph_passes(streamer, full, steps: list[str], kernel, order_before_replay: bool = True,
                  one_graph: bool = False, tokens: int = 64) -> float:
    """Warm up eagerly, capture every layer, then run ``steps`` ("eager" / "graph") in order.

    Mimics vLLM: the engine calls ``order_after_side_stream`` before each capture and each
    replay; a graph reads its inputs from static buffers refilled before every replay.
    """
    layers = [AsyncEPMoE(streamer, j, 4, True, experts_kernel=kernel) for j in range(len(full))]
    static_x = [torch.randn(tokens, H, device="cuda") for _ in layers]
    static_logits = [torch.randn(tokens, E, device="cuda") for _ in layers]
    for j, layer in enumerate(layers):  # warm-up: one eager pass before any capture
        layer(static_x[j], static_logits[j])
    graphs, outs = [], []
    streamer.order_after_side_stream()
    if one_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [layer(static_x[j], static_logits[j]) for j, layer in enumerate(layers)]
        graphs.append(graph)
    else:
        for j, layer in enumerate(layers):
            streamer.order_after_side_stream()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs.append(layer(static_x[j], static_logits[j]))
            graphs.append(graph)
    errors = []
    for step in steps:
        for j in range(len(layers)):
            static_x[j].normal_()
            static_logits[j].normal_()
        wants = [moe_reference(static_x[j], static_logits[j], full[j]["w13"], full[j]["w2"], 4, True)
                 for j in range(len(layers))]
        if step == "eager":
            got = [layer(static_x[j], static_logits[j]) for j, layer in enumerate(layers)]
        else:
            for graph in graphs:
                if order_before_replay:
                    streamer.order_after_side_stream()
                graph.replay()
            got = [out.clone() for out in outs]
        errors += [(g - w).abs().max() for g, w in zip(got, wants)]
    torch.cuda.synchronize()
    streamer.close()
    return max(e.item() for e in errors)


@pytest.mark.parametrize("layers,depth", [(4, 1), (5, 1), (5, 2), (3, 2), (2, 1)])
@pytest.mark.parametrize("one_graph", [False, True], ids=["per-layer-graphs", "one-graph"])
def test_captured_passes_interleaved_with_eager_match_reference(layers, depth, one_graph):
    random.seed(layers * 10 + depth)
    full, streamer = _loopback_streamer(2, depth, layers)
    steps = ["graph", "graph", "eager", "graph", "eager", "eager", "graph", "eager", "graph"]
    assert _graph_passes(streamer, full, steps, _slow_kernel, one_graph=one_graph) < 1e-4


def test_negative_control_replay_without_ordering_after_eager_gathers_corrupts():
    # Slow gathers, fast experts: an eager pass leaves the next pass's first gathers in flight,
    # and a replay that is not ordered after them reads slots those gathers have not filled.
    random.seed(1)
    full, streamer = _loopback_streamer(2, 1, layers=4, gather_sleep=20 * SLEEP_CYCLES)

    def fast_kernel(*args, add_to=None):
        return _slow_kernel(*args, add_to=add_to, max_sleep_cycles=3)

    steps = ["eager", "graph"] * 4
    assert _graph_passes(streamer, full, steps, fast_kernel, order_before_replay=False) > 1e-2


def test_capture_before_any_eager_pass_is_refused():
    full, streamer = _loopback_streamer(2, 1)
    layer = AsyncEPMoE(streamer, 0, 4, True, experts_kernel=_slow_kernel)
    x, logits = torch.randn(8, H, device="cuda"), torch.randn(8, E, device="cuda")
    with pytest.raises(RuntimeError, match="before a whole eager forward pass has run"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            layer(x, logits)


@pytest.fixture(scope="module")
def one_rank_nccl_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("transport", ["nccl", "copy_engine"])
def test_one_rank_reads_resident_shards_eager_and_captured(one_rank_nccl_group, transport):
    full = _weights("cuda")
    layout = ExpertShardLayout(E, 1)
    streamer = ExpertWeightStreamer([layout.shard_all(w, 0) for w in full], layout,
                                    make_transport(transport, None, torch.device("cuda")))
    assert isinstance(streamer.transport, ResidentOnly) and streamer.gather_buffer_bytes == 0
    steps = ["graph", "eager", "graph", "eager"]
    assert _graph_passes(streamer, full, steps, _slow_kernel) < 1e-4
