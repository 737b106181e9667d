"""AsyncEP inside SGLang's real ``FusedMoE`` on gloo ranks (CPU), against SGLang's reference path.

Each rank is a fresh process that resolves ``--moe-a2a-backend asyncep`` through our launcher,
publishes the config and builds SGLang's parallel groups over gloo exactly as a scheduler does,
then builds two ``FusedMoE`` layers with SGLang's own constructor (so SGLang's
``create_moe_dispatcher`` chooses the dispatcher and ``--ep-size`` decides which experts each
rank stores), loads the full expert weights through SGLang's ``weight_loader`` and routes with
SGLang's ``TopK``. Every rank has *different* tokens. The output of ``FusedMoE.forward`` (our
``run_moe_core`` hook: streamer gather + experts) must equal SGLang's
``fused_moe_forward_native`` over all experts, on every rank, for two passes. The decision
points where the installed release's decoder layers choose the DP gather before the MoE and
the sum after it (``compat.py`` names them per release) must skip both.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_cpu import import_sglang, initialize_model_parallel, initialize_moe_config, publish  # noqa: E402

NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 8, 2, 32, 16
NUM_MOE_LAYERS, TOKENS_PER_RANK = 2, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, model_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import_sglang()
    from sglang.srt.distributed.parallel_state import init_distributed_environment
    from sglang.srt.layers.moe.fused_moe_native import fused_moe_forward_native
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatcher, StandardDispatchOutput
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.runtime_context import get_parallel

    from sglang_zeroprefill import compat, cuda_graphs, launch_server
    from sglang_zeroprefill.moe import setup_asyncep
    from zeroprefill.common.asyncep_model import AsyncEPConfig

    n = str(world_size)
    server_args = launch_server.prepare([
        "--model-path", model_dir, "--device", "cpu", "--moe-a2a-backend", "asyncep",
        "--tp-size", n, *compat.attention_dp_flags(world_size).split(), "--ep-size", n,
    ])
    compat.resolve(server_args)
    publish(server_args, rank)
    init_distributed_environment(
        world_size=world_size, rank=rank, local_rank=rank, backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{port}",
    )
    initialize_model_parallel(world_size)
    initialize_moe_config(server_args)
    _check_no_dp_gather_and_no_sum_around_the_experts()

    generator = torch.Generator().manual_seed(0)  # same full weights on every rank
    full = [
        {
            "w1": torch.randn(NUM_EXPERTS, INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN**0.5,
            "w3": torch.randn(NUM_EXPERTS, INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN**0.5,
            "w2": torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE**0.5,
        }
        for _ in range(NUM_MOE_LAYERS)
    ]
    model = torch.nn.ModuleList()
    for layer_id, weights in enumerate(full):
        layer = FusedMoE(
            num_experts=NUM_EXPERTS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            layer_id=layer_id, top_k=TOP_K, params_dtype=torch.float32,
            prefix=f"model.layers.{layer_id}.mlp.experts",
        )
        assert isinstance(layer.dispatcher, StandardDispatcher)  # SGLang's choice for a2a none
        assert layer.num_local_experts == NUM_EXPERTS // world_size
        for expert in range(NUM_EXPERTS):
            for shard_id, param in (("w1", layer.w13_weight), ("w3", layer.w13_weight), ("w2", layer.w2_weight)):
                name = "experts.w2_weight" if shard_id == "w2" else "experts.w13_weight"
                layer.weight_loader(param, weights[shard_id][expert], name, shard_id, expert)
        model.append(layer)

    state = setup_asyncep(model, get_parallel().moe_ep_group.device_group, AsyncEPConfig(transport="gloo"))
    assert state.model.streamer in cuda_graphs._streamers  # every graph launch waits for its gathers
    topks = [TopK(top_k=TOP_K, renormalize=True, layer_id=layer.layer_id) for layer in model]
    tokens = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank
    remote_ids_seen = False  # tokens routed to experts this rank does not store
    for _ in range(2):  # the second pass reuses ring slots and the cross-pass prefetch
        for layer, topk, weights in zip(model, topks, full):
            hidden = torch.randn(TOKENS_PER_RANK, HIDDEN, generator=tokens)
            logits = torch.randn(TOKENS_PER_RANK, NUM_EXPERTS, generator=tokens)
            topk_output = topk.forward_native(hidden, logits)
            out = layer.forward(hidden, topk_output)
            dense = SimpleNamespace(
                w13_weight=torch.cat([weights["w1"], weights["w3"]], dim=1),
                w2_weight=weights["w2"],
                moe_runner_config=layer.moe_runner_config,
            )
            reference = fused_moe_forward_native(
                dense, StandardDispatchOutput(hidden, None, topk_output)
            ).hidden_states
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
            remote_ids_seen |= bool((topk_output.topk_ids // layer.num_local_experts != rank).any())
    assert remote_ids_seen
    # A rank with no tokens still joins every gather (lockstep); both ranks do it here.
    for layer, topk in zip(model, topks):
        empty = layer.forward(torch.empty(0, HIDDEN), topk.empty_topk_output(torch.device("cpu")))
        assert empty.shape == (0, HIDDEN)
    state.close()
    assert state.model.streamer not in cuda_graphs._streamers


def _check_no_dp_gather_and_no_sum_around_the_experts() -> None:
    """Ask the release's own decision points, through the modules models import them from."""
    import importlib

    from sglang_zeroprefill import compat

    for target in compat.moe_input_stays_local_targets():
        module, name = target.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name)(), target
    try:  # SGLang 0.5.17 - 0.5.20: the decoder layer's scatter mode for a sparse MLP
        from sglang.srt.layers.communicator import LayerScatterModes, ScatterMode
    except ImportError:  # 0.5.21+: the layer boundary picks a sparse FFN's rows with the helper it imported
        from sglang.srt.layers.layer_boundary import factories

        assert factories.is_moe_input_scattered_across_dp_ranks()
    else:
        assert LayerScatterModes._compute_mlp_mode(SimpleNamespace(is_layer_sparse=True)) == ScatterMode.SCATTERED
    import sglang.srt.layers.moe as moe_package  # where Qwen2/3-MoE blocks import it from

    assert moe_package.should_skip_post_experts_all_reduce(is_tp_path=False)
    assert moe_package.should_skip_post_experts_all_reduce(is_tp_path=True)


def test_asyncep_fused_moe_on_two_gloo_ranks_matches_sglang_native_moe(tmp_path: Path) -> None:
    pytest.importorskip("sglang")
    config = Path(__file__).resolve().parents[1] / "common" / "model_configs" / "qwen3-30b-a3b.json"
    (tmp_path / "config.json").write_text(config.read_text())  # resolution reads the model's config
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
