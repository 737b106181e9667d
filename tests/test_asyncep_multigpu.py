"""AsyncEP on two GPUs with the real transports, eager and CUDA-graph passes interleaved.

Each rank keeps its shard of every layer, streams the rest with NCCL or the copy engine, and
runs the experts with the production kernel (``zeroprefill.kernels.fused_experts``, bf16).
After one eager warm-up pass every layer is captured into a CUDA graph of its own (as vLLM's
piecewise graphs hold one MoE layer each); then eager passes and replays follow in an order
both ranks share, as vLLM's data-parallel ranks do. Each output is compared with a dense
fp32 reference from the full weights. An odd layer count makes the last layer's slot the
first layer's (the ring's wrap-around case); depth 2 adds a slot that holds a single layer.

Switch point: the layers also run with one between two batch sizes, each size captured as
vLLM captures its sizes: passes of the small size move tokens (NCCL all-to-all on the
transport's group, inside the graphs too), passes of the large one stream weights, in an
order that interleaves both modes, eager and replayed.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.multiprocess import run_on_ranks
from zeroprefill.common.asyncep_moe import AsyncEPMoE, moe_reference
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.streamer import ExpertWeightStreamer
from zeroprefill.common.token_exchange import TokenExchange
from zeroprefill.common.transport import make_transport

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

E, H, I, TOP_K, LAYERS, TOKENS = 16, 512, 256, 4, 5, 96
STEPS = ["graph", "eager", "graph", "graph", "eager", "eager", "graph", "eager"]


def _full_weights(device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(7)
    return [{"w13": (torch.randn(E, 2 * I, H, device=device, generator=g) / H**0.5).bfloat16(),
             "w2": (torch.randn(E, H, I, device=device, generator=g) / I**0.5).bfloat16()}
            for _ in range(LAYERS)]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


class _Size:
    """One captured batch size: static inputs, a graph per layer, their outputs."""

    def __init__(self, tokens: int, layers: list[AsyncEPMoE], device: torch.device) -> None:
        self.tokens = tokens
        self.x = [torch.empty(tokens, H, device=device, dtype=torch.bfloat16) for _ in layers]
        self.logits = [torch.empty(tokens, E, device=device) for _ in layers]
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outs: list[torch.Tensor] = []

    def refill(self, inputs: torch.Generator) -> None:
        for x, logits in zip(self.x, self.logits):
            x.copy_(torch.randn(self.tokens, H, device=x.device, generator=inputs))
            logits.copy_(torch.randn(self.tokens, E, device=x.device, generator=inputs))


def _eager_and_graph_passes(rank: int, world_size: int, transport_name: str, depth: int, copy_streams: int,
                            switch_tokens: int) -> None:
    device = torch.device("cuda", rank)
    full = _full_weights(device)
    layout = ExpertShardLayout(E, world_size)
    shards = [layout.shard_all(w, rank) for w in full]
    transport = make_transport(transport_name, None, device, copy_streams)
    streamer = ExpertWeightStreamer(shards, layout, transport, prefetch_depth=depth)
    exchange = TokenExchange(layout, streamer.resident(0).row_of_expert, transport.group)
    layers = [AsyncEPMoE(streamer, j, TOP_K, True, exchange=exchange, switch_tokens=switch_tokens)
              for j in range(LAYERS)]
    inputs = torch.Generator(device=device).manual_seed(100 + rank)
    sizes = [_Size(TOKENS, layers, device), _Size(TOKENS // 3, layers, device)]
    for size in sizes:  # one eager pass of each size, then every layer captured at each size
        size.refill(inputs)
        for j, layer in enumerate(layers):
            layer(size.x[j], size.logits[j], max_tokens=size.tokens)
    for size in sizes:
        for j, layer in enumerate(layers):
            streamer.order_after_side_stream()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                size.outs.append(layer(size.x[j], size.logits[j], max_tokens=size.tokens))
            size.graphs.append(graph)
    for index, step in enumerate(STEPS):
        size = sizes[index % 2]  # both ranks choose the same size, as vLLM's DP ranks agree on one
        size.refill(inputs)
        wants = [moe_reference(size.x[j].float(), size.logits[j], full[j]["w13"].float(), full[j]["w2"].float(),
                               TOP_K, True) for j in range(LAYERS)]
        if step == "eager":
            got = [layer(size.x[j], size.logits[j], max_tokens=size.tokens) for j, layer in enumerate(layers)]
        else:
            for graph in size.graphs:
                streamer.order_after_side_stream()
                graph.replay()
            got = [out.clone() for out in size.outs]
        for j in range(LAYERS):
            error = _relative_error(got[j], wants[j])
            mode = "tokens" if layers[j].moves_tokens(size.tokens) else "weights"
            assert error < 3e-2, (f"rank {rank} {transport_name} x{copy_streams} depth {depth} {step} {size.tokens} "
                                  f"tokens ({mode}) layer {j}: error {error:.3g}")
    torch.cuda.synchronize()
    streamer.close()


def _run(rank: int, world_size: int, transport_name: str, copy_streams: int) -> None:
    random.seed(0)
    for depth in (1, 2):
        # weights in every pass; then the small size below the switch point, the large one above it
        for switch_tokens in (0, TOKENS):
            _eager_and_graph_passes(rank, world_size, transport_name, depth, copy_streams, switch_tokens)


# The copy engine also with 3 streams: E/2 = 8 experts per shard split 3-3-2, forked and joined
# inside every captured gather.
@pytest.mark.parametrize(("transport_name", "copy_streams"), [("nccl", 1), ("copy_engine", 1), ("copy_engine", 3)])
def test_two_gpus_eager_and_graph_passes_match_reference(transport_name, copy_streams):
    run_on_ranks(2, _run, transport_name, copy_streams, backend="nccl")
