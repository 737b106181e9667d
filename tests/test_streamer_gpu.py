"""The streamer's CUDA ordering (side stream, events, ring reuse) under perturbed timing.

One GPU plays N ranks: a loopback transport holds every virtual rank's shard and gathers by
copying them on the side stream after a random device-side sleep, while the experts kernel
sleeps on the compute stream before reading its weights. Correct event ordering gives the
dense reference exactly; the negative control removes the side stream's wait on the
"released" event and must then produce wrong results, which shows the test can fail.
Real transports (NCCL, copy engine) run on a one-rank group to exercise their code paths.
"""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch
import torch.distributed as dist

from zeroprefill.common.asyncep_moe import AsyncEPMoE, moe_reference
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.streamer import ExpertWeightStreamer
from zeroprefill.common.transport import GatherHandle, GatherTransport, make_transport

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

E, H, I, LAYERS = 16, 256, 128, 4
SLEEP_CYCLES = 2_000_000  # ~1 ms at 2 GHz


class LoopbackTransport(GatherTransport):
    """All virtual ranks' shards in one process; a gather is a delayed on-device copy."""

    name = "loopback"

    def __init__(self, shards_by_rank: list[list[dict[str, torch.Tensor]]]) -> None:
        super().__init__(None)
        self.world_size = len(shards_by_rank)
        self.rank = 0
        self.shards_by_rank = shards_by_rank

    def gather(self, layer: int, name: str, out: torch.Tensor) -> GatherHandle:
        torch.cuda._sleep(random.randint(0, SLEEP_CYCLES))
        capacity = self.shards_by_rank[0][layer][name].shape[0]
        for r, shards in enumerate(self.shards_by_rank):
            out[r * capacity : (r + 1) * capacity].copy_(shards[layer][name], non_blocking=True)
        return GatherHandle()


def _slow_kernel(hidden, w13, w2, topk_weights, topk_ids):
    """Dense per-(token, k) experts with no host sync, after a device-side sleep.

    The host runs ahead of a lagging compute stream, as in serving; a gather that does not
    wait for the slot's release then overwrites weights this kernel has not read yet.
    """
    torch.cuda._sleep(random.randint(SLEEP_CYCLES, 3 * SLEEP_CYCLES))
    gate_up = torch.einsum("th,tkih->tki", hidden, w13[topk_ids])
    act = torch.nn.functional.silu(gate_up[..., :I]) * gate_up[..., I:]
    y = torch.einsum("tki,tkhi->tkh", act, w2[topk_ids])
    return (y * topk_weights[..., None]).sum(dim=1)


def _weights(device):
    g = torch.Generator(device=device).manual_seed(0)
    return [{"w13": torch.randn(E, 2 * I, H, device=device, generator=g) / H**0.5,
             "w2": torch.randn(E, H, I, device=device, generator=g) / I**0.5} for _ in range(LAYERS)]


def _max_error(streamer: ExpertWeightStreamer, full, passes: int = 3) -> float:
    layers = [AsyncEPMoE(streamer, j, 4, True, experts_kernel=_slow_kernel) for j in range(LAYERS)]
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
    full = _weights("cuda")
    layout = ExpertShardLayout(E, world_size)
    shards = [[layout.shard_all(w, r) for w in full] for r in range(world_size)]
    streamer = ExpertWeightStreamer(shards[0], layout, LoopbackTransport(shards), prefetch_depth=depth)
    assert _max_error(streamer, full) < 1e-4


def test_negative_control_without_release_wait_corrupts(monkeypatch):
    random.seed(0)
    full = _weights("cuda")
    layout = ExpertShardLayout(E, 2)
    shards = [[layout.shard_all(w, r) for w in full] for r in range(2)]
    streamer = ExpertWeightStreamer(shards[0], layout, LoopbackTransport(shards), prefetch_depth=1)
    streamer._slot_used = _NeverUsed()  # the side stream never waits for a slot's release
    assert _max_error(streamer, full) > 1e-2


class _NeverUsed(list):
    def __init__(self) -> None:
        super().__init__([False] * 8)

    def __setitem__(self, index, value) -> None:
        pass


@pytest.fixture(scope="module")
def one_rank_nccl_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("transport", ["nccl", "copy_engine"])
def test_real_transports_on_one_rank(one_rank_nccl_group, transport):
    full = _weights("cuda")
    layout = ExpertShardLayout(E, 1)
    streamer = ExpertWeightStreamer([layout.shard_all(w, 0) for w in full], layout,
                                    make_transport(transport, None, torch.device("cuda")))
    assert _max_error(streamer, full) < 1e-4
