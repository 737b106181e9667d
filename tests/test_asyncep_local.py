"""AsyncEP layer and streamer in one process: routing, errors, ordering, resident shards.

One rank has nothing to stream (every expert is resident). The streaming logic is exercised in
one process by :class:`_LoopbackTransport`, which plays rank 0 of two and serves rank 1's
shards from the full weights it was given.
"""

import pytest
import torch

from zeroprefill.common.asyncep_moe import AsyncEPMoE, experts_reference, moe_reference, select_experts
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.streamer import ExpertWeightStreamer
from zeroprefill.common.transport import GatherHandle, GatherTransport, ResidentOnly, make_transport

E, H, I = 6, 8, 4


class _LoopbackTransport(GatherTransport):
    """Rank 0 of two, in one process: rank 1's shards come from the full weights; records which
    layer each gather fetches, in issue order. Its buffers hold the remote shard only, as the
    copy engine's do."""

    name = "loopback"

    def __init__(self, full: list[dict[str, torch.Tensor]], layout: ExpertShardLayout) -> None:
        super().__init__(None)
        self.rank, self.world_size = 0, 2
        self.peer_shards = [layout.shard_all(f, 1) for f in full]
        self.layers: list[int] = []

    @property
    def is_collective(self) -> bool:
        return False

    def gathered_rows(self, capacity: int) -> int:
        return capacity

    def gathered_row_of_rank(self, rank: int, capacity: int) -> int | None:
        return 0 if rank == 1 else None

    def gather(self, layer, name, out):
        if name == "w13":
            self.layers.append(layer)
        out.copy_(self.peer_shards[layer][name])
        return GatherHandle()


def _full(num_layers: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"w13": torch.randn(E, 2 * I, H, generator=g), "w2": torch.randn(E, H, I, generator=g)}
            for _ in range(num_layers)]


def _recorded_streamer(num_layers: int, prefetch_depth: int):
    full = _full(num_layers)
    layout = ExpertShardLayout(E, 2)
    transport = _LoopbackTransport(full, layout)
    streamer = ExpertWeightStreamer([layout.shard_all(f, 0) for f in full], layout, transport,
                                    prefetch_depth=prefetch_depth)
    return full, streamer, transport


def _streamer(num_layers=2, prefetch_depth=1):
    full, streamer, _ = _recorded_streamer(num_layers, prefetch_depth)
    return full, streamer


def test_select_experts_softmax_renormalised_and_sigmoid():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    w, ids = select_experts(logits, 2, renormalize=True)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    p = torch.softmax(logits, -1)[0]
    w_raw, _ = select_experts(logits, 2, renormalize=False)
    torch.testing.assert_close(w_raw[0], p[[3, 2]])
    w_sig, _ = select_experts(logits, 2, renormalize=False, scoring_func="sigmoid")
    torch.testing.assert_close(w_sig[0], torch.sigmoid(logits[0, [3, 2]]))


def test_streamed_layer_equals_reference_over_passes():
    full, streamer = _streamer(num_layers=3, prefetch_depth=2)
    layers = [AsyncEPMoE(streamer, i, 2, True) for i in range(3)]
    for _ in range(3):
        for i, layer in enumerate(layers):
            x, logits = torch.randn(5, H), torch.randn(5, E)
            torch.testing.assert_close(layer(x, logits), moe_reference(x, logits, full[i]["w13"], full[i]["w2"], 2, True))
    streamer.close()


def test_zero_tokens_still_acquire_and_release():
    _, streamer = _streamer()
    layer = AsyncEPMoE(streamer, 0, 2, True)
    assert layer(torch.zeros(0, H), torch.zeros(0, E)).shape == (0, H)
    AsyncEPMoE(streamer, 1, 2, True)(torch.zeros(0, H), torch.zeros(0, E))


@pytest.mark.parametrize(
    "hidden,logits,match",
    [
        ((3, H + 1), (3, E), r"hidden_states must be \[tokens, 8\]"),
        ((3, H), (3, E - 1), r"router_logits must have shape \(3, 6\)"),
        ((3, H), (4, E), r"router_logits must have shape \(3, 6\)"),
    ],
)
def test_bad_activations_are_rejected(hidden, logits, match):
    _, streamer = _streamer()
    with pytest.raises(ValueError, match=match):
        AsyncEPMoE(streamer, 0, 2, True)(torch.randn(*hidden), torch.randn(*logits))


def test_bad_layer_configuration_is_rejected():
    _, streamer = _streamer()
    with pytest.raises(ValueError, match=r"top_k=7 must be in 1..6"):
        AsyncEPMoE(streamer, 0, 7, True)
    with pytest.raises(ValueError, match="layer 5 is outside"):
        AsyncEPMoE(streamer, 5, 2, True)
    with pytest.raises(ValueError, match="unknown scoring_func"):
        AsyncEPMoE(streamer, 0, 2, True, scoring_func="tanh")


def test_out_of_order_layers_are_rejected():
    _, streamer = _streamer()
    with pytest.raises(RuntimeError, match="acquired MoE layer 1 but layer 0 is next"):
        AsyncEPMoE(streamer, 1, 2, True)(torch.randn(2, H), torch.randn(2, E))


def test_mismatched_shards_are_rejected():
    layout = ExpertShardLayout(4, 1)
    good = {"w13": torch.zeros(4, 2 * I, H), "w2": torch.zeros(4, H, I)}
    transport = ResidentOnly()
    with pytest.raises(ValueError, match=r"layer 1 shard 'w2' has shape \(4, 8, 5\), expected \(4, 8, 4\)"):
        ExpertWeightStreamer([good, {"w13": good["w13"], "w2": torch.zeros(4, H, I + 1)}], layout, transport)
    with pytest.raises(ValueError, match=r"shard 'w13' has shape \(3, 8, 8\), expected \(4, 8, 8\)"):
        ExpertWeightStreamer([{"w13": torch.zeros(3, 2 * I, H), "w2": good["w2"]}], layout, transport)
    with pytest.raises(ValueError, match="layer 1 has expert tensors"):
        ExpertWeightStreamer([good, {"w13": good["w13"]}], layout, transport)
    with pytest.raises(ValueError, match="prefetch_depth must be >= 1"):
        ExpertWeightStreamer([good], layout, transport, prefetch_depth=0)
    with pytest.raises(ValueError, match="layout has world_size=2"):
        ExpertWeightStreamer([good], ExpertShardLayout(4, 2), transport)
    with pytest.raises(ValueError, match="unknown transport"):
        make_transport("carrier-pigeon")


def test_prefetch_issues_ahead_and_is_idempotent():
    full, streamer = _streamer(num_layers=3, prefetch_depth=2)
    streamer.prefetch()
    streamer.prefetch()
    assert sorted(streamer._in_flight) == [0, 1, 2]
    x, logits = torch.randn(4, H), torch.randn(4, E)
    out = AsyncEPMoE(streamer, 0, 2, True)(x, logits)
    torch.testing.assert_close(out, moe_reference(x, logits, full[0]["w13"], full[0]["w2"], 2, True))


def test_forward_routed_equals_forward_and_checks_shapes():
    full, streamer = _streamer(num_layers=1)
    layer = AsyncEPMoE(streamer, 0, 2, True)
    x, logits = torch.randn(5, H), torch.randn(5, E)
    weights, ids = select_experts(logits, 2, True)
    torch.testing.assert_close(layer.forward_routed(x, weights, ids.int()), layer(x, logits))
    with pytest.raises(ValueError, match=r"must both be \[tokens=5, top_k\]"):
        layer.forward_routed(x, weights[:, :1], ids)


def test_one_rank_has_no_gather_buffers_and_reads_its_shards_in_place():
    full = _full(3)
    layout = ExpertShardLayout(E, 1)
    shards = [layout.shard_all(f, 0) for f in full]
    transport = make_transport("auto")
    assert isinstance(transport, ResidentOnly)
    streamer = ExpertWeightStreamer(shards, layout, transport, prefetch_depth=2)
    assert streamer.gather_buffer_bytes == 0 and streamer.num_slots == 0 and not streamer.streams_weights
    read = []

    def kernel(hidden, w13, w2, topk_weights, topk_ids, add_to=None):
        read.append(w13.data_ptr())
        return experts_reference(hidden, w13, w2, topk_weights, topk_ids, add_to=add_to)

    layers = [AsyncEPMoE(streamer, j, 2, True, experts_kernel=kernel) for j in range(3)]
    for j in (0, 1, 2, 0):  # no ordering to keep: nothing is in flight
        x, logits = torch.randn(4, H), torch.randn(4, E)
        torch.testing.assert_close(layers[j](x, logits), moe_reference(x, logits, full[j]["w13"], full[j]["w2"], 2, True))
        assert read[-1] == shards[j]["w13"].data_ptr()


def test_two_ranks_read_the_resident_shard_in_place_and_gather_only_the_other():
    full, streamer, transport = _recorded_streamer(num_layers=2, prefetch_depth=1)
    capacity = streamer.layout.capacity
    assert streamer.gather_buffer_bytes == streamer.num_slots * capacity * (2 * I * H + H * I) * 4
    read = []

    def kernel(hidden, w13, w2, topk_weights, topk_ids, add_to=None):
        read.append((w13.data_ptr(), topk_ids.clone()))
        return experts_reference(hidden, w13, w2, topk_weights, topk_ids, add_to=add_to)

    layer = AsyncEPMoE(streamer, 0, 2, True, experts_kernel=kernel)
    x, logits = torch.randn(6, H), torch.randn(6, E)
    torch.testing.assert_close(layer(x, logits), moe_reference(x, logits, full[0]["w13"], full[0]["w2"], 2, True))
    (resident_ptr, resident_ids), (gathered_ptr, gathered_ids) = read
    assert resident_ptr == streamer.resident(0).tensors["w13"].data_ptr()
    assert gathered_ptr == streamer._slots[0]["w13"].data_ptr()
    _, ids = select_experts(logits, 2, True)
    mine = ids < capacity  # rank 0 holds experts 0..2
    assert torch.equal(resident_ids, torch.where(mine, ids, -1))
    assert torch.equal(gathered_ids, torch.where(mine, -1, ids - capacity))


@pytest.mark.parametrize("num_layers,depth", [(4, 1), (5, 1), (3, 1), (5, 2), (2, 1), (3, 2), (1, 1), (7, 3)])
def test_slots_are_pass_aligned_and_single_layer_slots_are_gathered_once(num_layers, depth):
    full, streamer, transport = _recorded_streamer(num_layers, depth)
    slots = min(depth + 1, num_layers)
    buffers_read = []

    def kernel(hidden, w13, w2, topk_weights, topk_ids, add_to=None):
        if add_to is not None:  # the second call of a layer reads the ring slot
            buffers_read.append(w13.data_ptr())
        return experts_reference(hidden, w13, w2, topk_weights, topk_ids, add_to=add_to)

    layers = [AsyncEPMoE(streamer, j, 2, True, experts_kernel=kernel) for j in range(num_layers)]
    per_pass = []
    for _ in range(3):
        before = len(transport.layers)
        for j, layer in enumerate(layers):
            x, logits = torch.randn(3, H), torch.randn(3, E)
            torch.testing.assert_close(layer(x, logits), moe_reference(x, logits, full[j]["w13"], full[j]["w2"], 2, True))
            assert buffers_read[-1] == streamer._slots[j % slots]["w13"].data_ptr()  # layer j: slot j % S
        per_pass.append(transport.layers[before:])
    # A slot holding a single layer (s + S >= L) is gathered on the first pass only.
    overwritten = [j for j in range(slots) if j + slots < num_layers]
    steady = list(range(slots, num_layers)) + overwritten  # this pass's late layers, the next's first
    assert per_pass[1] == per_pass[2] == steady
    assert per_pass[0] == list(range(num_layers)) + overwritten


@pytest.mark.parametrize("num_layers,depth", [(4, 1), (5, 1), (3, 1), (5, 2), (2, 1), (3, 2), (1, 1), (7, 3), (48, 1), (94, 2)])
def test_a_captured_pass_issues_the_eager_pass_gathers_in_the_same_order(num_layers, depth):
    # Collective transports stay in lockstep only if a replayed pass and an eager one gather
    # the same layers in the same order (the capture-time schedule is a pure function).
    _, streamer, transport = _recorded_streamer(num_layers, depth)
    layers = [AsyncEPMoE(streamer, j, 2, True) for j in range(num_layers)]
    for _ in range(2):
        before = len(transport.layers)
        for layer in layers:
            layer(torch.randn(2, H), torch.randn(2, E))
    eager_steady = transport.layers[before:]
    captured = [j for layer in range(num_layers) for j in streamer._captured_gathers(layer)]
    assert captured == eager_steady


def test_layers_adopted_while_loading_are_not_adopted_again():
    # An engine hands each layer over as it loads it; the streamer built later lists them all.
    g = torch.Generator().manual_seed(0)
    full = [{"w13": torch.randn(E, 2 * I, H, generator=g), "w2": torch.randn(E, H, I, generator=g)} for _ in range(3)]
    layout = ExpertShardLayout(E, 2)
    transport = _LoopbackTransport(full, layout)
    shards = [layout.shard_all(f, 0) for f in full]
    transport.adopt(shards[0])
    transport.adopt(shards[1])
    streamer = ExpertWeightStreamer(shards, layout, transport)
    assert transport.num_layers == 3
    x, logits = torch.randn(4, H), torch.randn(4, E)
    for j in range(3):
        got = AsyncEPMoE(streamer, j, 2, True)(x, logits)
        torch.testing.assert_close(got, moe_reference(x, logits, full[j]["w13"], full[j]["w2"], 2, True))
    other = _LoopbackTransport(full, layout)
    other.adopt(shards[0])
    with pytest.raises(ValueError, match="register must list them first"):
        other.register([shards[1], shards[0]])


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ZEROPREFILL_ASYNCEP_TRANSPORT": "pigeon"}, "ZEROPREFILL_ASYNCEP_TRANSPORT='pigeon' is not a transport"),
        ({"ZEROPREFILL_ASYNCEP_PREFETCH_DEPTH": "two"}, "ZEROPREFILL_ASYNCEP_PREFETCH_DEPTH='two' is not a whole number"),
        ({"ZEROPREFILL_ASYNCEP_PREFETCH_DEPTH": "0"}, "ZEROPREFILL_ASYNCEP_PREFETCH_DEPTH=0 must be at least 1"),
        ({"ZEROPREFILL_ASYNCEP_COPY_STREAMS": "many"}, "ZEROPREFILL_ASYNCEP_COPY_STREAMS='many' is not a whole number"),
        ({"ZEROPREFILL_ASYNCEP_COPY_STREAMS": "9"}, "ZEROPREFILL_ASYNCEP_COPY_STREAMS=9 must be 1 to 8"),
        ({"ZEROPREFILL_ASYNCEP_SWITCH_TOKENS": "lots"}, "ZEROPREFILL_ASYNCEP_SWITCH_TOKENS='lots' is not a whole number"),
        ({"ZEROPREFILL_ASYNCEP_SWITCH_TOKENS": "-5"}, r"ZEROPREFILL_ASYNCEP_SWITCH_TOKENS=-5 must be a token count >= 0"),
    ],
)
def test_asyncep_config_from_the_environment_names_the_variable(environ, message):
    from zeroprefill.common.asyncep_model import AsyncEPConfig, AsyncEPConfigError

    with pytest.raises(AsyncEPConfigError, match=message):
        AsyncEPConfig.from_env(environ)
    assert AsyncEPConfig.from_env({}) == AsyncEPConfig("auto", 1)
    assert AsyncEPConfig.from_env({"ZEROPREFILL_ASYNCEP_TRANSPORT": "nccl",
                                   "ZEROPREFILL_ASYNCEP_PREFETCH_DEPTH": "2"}) == AsyncEPConfig("nccl", 2)
    assert AsyncEPConfig.from_env({"ZEROPREFILL_ASYNCEP_COPY_STREAMS": "4"}).copy_streams == 4
    assert AsyncEPConfig.from_env({"ZEROPREFILL_ASYNCEP_SWITCH_TOKENS": "4096"}).switch_tokens == 4096
    assert AsyncEPConfig.from_env({}).switch_tokens is None  # the engine plugin takes the planner's


def test_copy_engine_transport_takes_its_stream_count():
    from zeroprefill.common.transport import CopyEngineGather

    assert CopyEngineGather(copy_streams=3).copy_streams == 3
    assert CopyEngineGather().copy_streams == 1
    assert isinstance(make_transport("copy_engine", copy_streams=3), ResidentOnly)  # one rank: nothing to pull
    with pytest.raises(ValueError, match="copy_streams must be at least 1, got 0"):
        CopyEngineGather(copy_streams=0)
