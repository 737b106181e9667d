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

The same runs on block-FP8 experts (SGLang's ``Fp8MoEMethod`` with 128x128 blocks): e4m3
weights and their ``weight_scale_inv`` loaded by SGLang's loader, then SGLang's own
``process_weights_after_loading`` (its CUDA branch: without ``SGLANG_USE_CPU_ENGINE`` SGLang does
not take its CPU path, and DeepGEMM is off, as on an H100 under ``--moe-runner-backend auto``),
against SGLang's native MoE on the dequantised weights. Scales vary by orders of magnitude from
block to block, so a scale read from the wrong block or not at all shows. Stand-in layers holding
SGLang's real quantization methods check what is accepted, what is refused and why, and what a
loaded layer hands to the streamer.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_cpu import import_sglang, initialize_model_parallel, initialize_moe_config, publish  # noqa: E402

from zeroprefill.ports import free_port  # noqa: E402

NUM_EXPERTS, TOP_K = 8, 2
NUM_MOE_LAYERS, TOKENS_PER_RANK = 2, 5
#: (hidden, intermediate) per expert format; block FP8 needs whole 128-blocks (two and one here).
SIZES = {"unquantized": (32, 16), "block_fp8": (256, 128)}
FP8_BLOCK = [128, 128]


def _block_varied(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random weights whose magnitude changes by up to 64x from one 128x128 block to the next."""
    *lead, rows, cols = shape
    blocks = 4.0 ** torch.randint(-3, 1, (*lead, -(-rows // 128), -(-cols // 128)), generator=generator)
    magnitude = blocks.repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)[..., :rows, :cols]
    return torch.randn(shape, generator=generator) * magnitude / cols**0.5


def _full_experts(weight_format: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's experts as a checkpoint stores them: ``w1``/``w3``/``w2``, plus their
    ``*_scale_inv`` in block FP8; ``dense_w13``/``dense_w2`` are what they stand for, in float32."""
    from zeroprefill.common.block_fp8 import dequantize_block_fp8, quantize_block_fp8

    hidden, inter = SIZES[weight_format]
    shapes = {"w1": (NUM_EXPERTS, inter, hidden), "w3": (NUM_EXPERTS, inter, hidden),
              "w2": (NUM_EXPERTS, hidden, inter)}
    if weight_format == "unquantized":
        weights = {name: torch.randn(shape, generator=generator) / shape[-1] ** 0.5 for name, shape in shapes.items()}
        return weights | {"dense_w13": torch.cat([weights["w1"], weights["w3"]], dim=1), "dense_w2": weights["w2"]}
    weights = {}
    for name, shape in shapes.items():
        weights[name], weights[f"{name}_scale_inv"] = quantize_block_fp8(_block_varied(shape, generator))
    dense = {name: dequantize_block_fp8(weights[name], weights[f"{name}_scale_inv"]) for name in shapes}
    return weights | {"dense_w13": torch.cat([dense["w1"], dense["w3"]], dim=1), "dense_w2": dense["w2"]}


def _fused_moe(weight_format: str, layer_id: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """SGLang's FusedMoE for ``weight_format``, loaded by its own loader as a model's
    ``load_weights`` and ``process_weights_after_loading`` would."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    hidden, inter = SIZES[weight_format]
    quant_config = None
    if weight_format == "block_fp8":
        quant_config = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic",
                                 weight_block_size=FP8_BLOCK)
    layer = FusedMoE(
        num_experts=NUM_EXPERTS, hidden_size=hidden, intermediate_size=inter,
        layer_id=layer_id, top_k=TOP_K, params_dtype=torch.float32, quant_config=quant_config,
        prefix=f"model.layers.{layer_id}.mlp.experts",
    )
    suffixes = ["weight"] + (["weight_scale_inv"] if quant_config is not None else [])
    for expert in range(NUM_EXPERTS):
        for shard_id in ("w1", "w3", "w2"):
            for suffix in suffixes:
                name = f"experts.{'w2' if shard_id == 'w2' else 'w13'}_{suffix}"
                loaded = weights[shard_id if suffix == "weight" else f"{shard_id}_scale_inv"][expert]
                layer.weight_loader(getattr(layer, name.removeprefix("experts.")), loaded, name, shard_id, expert)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _worker(rank: int, world_size: int, port: int, model_dir: str, weight_format: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import_sglang()
    from sglang.srt.distributed.parallel_state import init_distributed_environment
    from sglang.srt.layers.moe.fused_moe_native import fused_moe_forward_native
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatcher, StandardDispatchOutput
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.runtime_context import get_parallel

    from sglang_zeroprefill import compat, cuda_graphs, launch_server
    from sglang_zeroprefill.moe import setup_asyncep
    from zeroprefill.common.asyncep_model import AsyncEPConfig, AsyncEPConfigError

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
    full = [_full_experts(weight_format, generator) for _ in range(NUM_MOE_LAYERS)]
    model = torch.nn.ModuleList()
    for layer_id, weights in enumerate(full):
        layer = _fused_moe(weight_format, layer_id, weights)
        assert isinstance(layer.dispatcher, StandardDispatcher)  # SGLang's choice for a2a none
        assert layer.num_local_experts == NUM_EXPERTS // world_size
        model.append(layer)
    hidden_size = SIZES[weight_format][0]
    group = get_parallel().moe_ep_group.device_group

    if weight_format == "block_fp8":  # one unquantized MoE layer among FP8 ones: refused before any gather
        other = _fused_moe("unquantized", NUM_MOE_LAYERS, _full_experts("unquantized", generator))
        with pytest.raises(AsyncEPConfigError, match="streams MoE layers of one format"):
            setup_asyncep(torch.nn.ModuleList([*model, other]), group, AsyncEPConfig(transport="gloo"))
    records = _Records()
    logging.getLogger("sglang_zeroprefill.moe").addHandler(records)
    logging.getLogger("sglang_zeroprefill.moe").setLevel(logging.INFO)
    state = setup_asyncep(model, group, AsyncEPConfig(transport="gloo"))
    expert_format = "float8_e4m3fn + block scales" if weight_format == "block_fp8" else "float32"
    assert any(f"MoE layers of {expert_format} experts" in message for message in records.messages), records.messages
    assert state.model.streamer in cuda_graphs._streamers  # every graph launch waits for its gathers
    scales = sorted(name for name in state.model.streamer.expert_shapes if name.endswith("_scale"))
    assert scales == (["w13_scale", "w2_scale"] if weight_format == "block_fp8" else [])
    topks = [TopK(top_k=TOP_K, renormalize=True, layer_id=layer.layer_id) for layer in model]
    tokens = torch.Generator().manual_seed(100 + rank)  # different tokens on every rank
    remote_ids_seen = False  # tokens routed to experts this rank does not store
    for _ in range(2):  # the second pass reuses ring slots and the cross-pass prefetch
        for layer, topk, weights in zip(model, topks, full):
            hidden = torch.randn(TOKENS_PER_RANK, hidden_size, generator=tokens)
            logits = torch.randn(TOKENS_PER_RANK, NUM_EXPERTS, generator=tokens)
            topk_output = topk.forward_native(hidden, logits)
            out = layer.forward(hidden, topk_output)
            dense = SimpleNamespace(w13_weight=weights["dense_w13"], w2_weight=weights["dense_w2"],
                                    moe_runner_config=layer.moe_runner_config)
            reference = fused_moe_forward_native(
                dense, StandardDispatchOutput(hidden, None, topk_output)
            ).hidden_states
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
            remote_ids_seen |= bool((topk_output.topk_ids // layer.num_local_experts != rank).any())
    assert remote_ids_seen
    # A rank with no tokens still joins every gather (lockstep); both ranks do it here.
    for layer, topk in zip(model, topks):
        empty = layer.forward(torch.empty(0, hidden_size), topk.empty_topk_output(torch.device("cpu")))
        assert empty.shape == (0, hidden_size)
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


@pytest.mark.parametrize("weight_format", list(SIZES))
def test_asyncep_fused_moe_on_two_gloo_ranks_matches_sglang_native_moe(weight_format: str, tmp_path: Path) -> None:
    pytest.importorskip("sglang")
    config = Path(__file__).resolve().parents[1] / "common" / "model_configs" / "qwen3-30b-a3b.json"
    (tmp_path / "config.json").write_text(config.read_text())  # resolution reads the model's config
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), weight_format), nprocs=2, join=True)


# -- which experts are served, and what a loaded layer hands to the streamer (stand-in layers) ----

LAYER_NAME = "model.layers.3.mlp.experts"
SERVED = ("AsyncEP serves unquantized experts and block-FP8 ones (128x128 weight_block_size, "
          "as Qwen3-*-FP8 ship)")


def _fp8_method(**config: object) -> object:
    """SGLang's real ``Fp8MoEMethod`` for an ``Fp8Config`` of ``config``."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

    return Fp8MoEMethod(Fp8Config(**config))


def _stand_in_layer(quant_method: object, **tensors: torch.Tensor) -> SimpleNamespace:
    """What ``check_fused_moe`` and ``expert_shards`` read of a ``FusedMoE``: a Qwen3-style layer."""
    config = SimpleNamespace(activation="silu", is_gated=True, apply_router_weight_on_input=False)
    params = {name: torch.nn.Parameter(tensor, requires_grad=False) for name, tensor in tensors.items()}
    return SimpleNamespace(layer_name=LAYER_NAME, quant_method=quant_method, moe_runner_config=config, with_bias=False,
                           num_fused_shared_experts=0, moe_tp_size=1, **params)


def _methods() -> dict[str, object]:
    from sglang.srt.layers.quantization import w8a8_fp8, w8a8_int8
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod

    class WrappedFp8MoEMethod(Fp8MoEMethod):  # as SGLang's MXFP4 re-quantizing methods build on it
        pass

    block = {"is_checkpoint_fp8_serialized": True, "weight_block_size": FP8_BLOCK}
    return {
        "block FP8": _fp8_method(**block),
        "per-tensor FP8 checkpoint": _fp8_method(is_checkpoint_fp8_serialized=True),
        "bf16 quantized online": _fp8_method(),
        "64x64 blocks": _fp8_method(is_checkpoint_fp8_serialized=True, weight_block_size=[64, 64]),
        "MXFP8": _fp8_method(is_checkpoint_fp8_serialized=True, use_mxfp8=True),
        "FP4 experts": _fp8_method(**block, is_fp4_experts=True),
        "W8A8 FP8 (per-channel)": w8a8_fp8.W8A8FP8MoEMethod(w8a8_fp8.W8A8Fp8Config(is_checkpoint_fp8_serialized=True)),
        "W8A8 int8": w8a8_int8.W8A8Int8MoEMethod(w8a8_int8.W8A8Int8Config({})),
        "Fp8MoEMethod subclass": WrappedFp8MoEMethod(_fp8_method(**block).quant_config),
    }


REFUSALS = {
    "per-tensor FP8 checkpoint": "per-tensor FP8 experts (Fp8MoEMethod without weight_block_size: per-tensor scales, "
                                 "or quantized online by --quantization fp8)",
    "bf16 quantized online": "per-tensor FP8 experts (Fp8MoEMethod without weight_block_size",
    "64x64 blocks": "block-FP8 experts in 64x64 blocks (Fp8MoEMethod)",
    "MXFP8": "MXFP8 experts (Fp8MoEMethod, 1x32 UE8M0 scales)",
    "FP4 experts": "FP4 experts (Fp8MoEMethod)",
    "W8A8 FP8 (per-channel)": "quantized experts (W8A8FP8MoEMethod)",
    "W8A8 int8": "quantized experts (W8A8Int8MoEMethod)",
    "Fp8MoEMethod subclass": "quantized experts (WrappedFp8MoEMethod)",
}


@pytest.fixture(scope="module")
def sglang_moe() -> object:
    import_sglang()
    from sglang_zeroprefill import moe

    return moe


def test_check_fused_moe_accepts_unquantized_and_block_fp8_experts(sglang_moe: object) -> None:
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    for method in (UnquantizedFusedMoEMethod(), _methods()["block FP8"]):
        sglang_moe.check_fused_moe(_stand_in_layer(method))


@pytest.mark.parametrize("scheme", list(REFUSALS))
def test_check_fused_moe_refuses_every_other_format_in_one_line(scheme: str, sglang_moe: object) -> None:
    from zeroprefill.common.asyncep_model import AsyncEPConfigError

    with pytest.raises(AsyncEPConfigError) as raised:
        sglang_moe.check_fused_moe(_stand_in_layer(_methods()[scheme]))
    message = str(raised.value)
    assert message.startswith(f"--moe-a2a-backend asyncep: MoE layer {LAYER_NAME} has {REFUSALS[scheme]}")
    assert message.endswith(f"; {SERVED}") and "\n" not in message


def _loaded_block_fp8(num_experts: int = 4, hidden: int = 256, inter: int = 128) -> dict[str, torch.Tensor]:
    """A block-FP8 layer's parameters as SGLang leaves them on an H100: e4m3 weights, float32 scales."""
    from zeroprefill.common.block_fp8 import quantize_block_fp8

    generator = torch.Generator().manual_seed(1)
    w13, w13_scale = quantize_block_fp8(torch.randn(num_experts, 2 * inter, hidden, generator=generator))
    w2, w2_scale = quantize_block_fp8(torch.randn(num_experts, hidden, inter, generator=generator))
    return {"w13_weight": w13, "w2_weight": w2, "w13_weight_scale_inv": w13_scale, "w2_weight_scale_inv": w2_scale}


def test_expert_shards_hand_block_fp8_scales_over_in_place(sglang_moe: object) -> None:
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    layer = _stand_in_layer(_methods()["block FP8"], **_loaded_block_fp8())
    shards = sglang_moe.expert_shards(layer)
    assert sorted(shards) == ["w13", "w13_scale", "w2", "w2_scale"]
    for name, param in [("w13", "w13_weight"), ("w2", "w2_weight"), ("w13_scale", "w13_weight_scale_inv"),
                        ("w2_scale", "w2_weight_scale_inv")]:
        assert shards[name].data_ptr() == getattr(layer, param).data_ptr()  # SGLang's tensors, not copies
    unquantized = _stand_in_layer(UnquantizedFusedMoEMethod(), w13_weight=torch.zeros(4, 32, 16),
                                  w2_weight=torch.zeros(4, 16, 16))
    assert sorted(sglang_moe.expert_shards(unquantized)) == ["w13", "w2"]


@pytest.mark.parametrize(("change", "reason"), [
    ("ue8m0", "block scales requantized to UE8M0 for DeepGEMM (SGLang does so where DeepGEMM runs the experts on "
              "Blackwell); set SGLANG_ENABLE_JIT_DEEPGEMM=0"),
    ("transposed scales", "block-FP8 experts in a layout SGLang prepared for another MoE kernel"),
    ("e4m3fnuz weights", "block-FP8 experts in a layout SGLang prepared for another MoE kernel"),
    ("rocm", "block-FP8 experts on ROCm, which SGLang rescales to float8_e4m3fnuz"),
    ("amx", "experts packed for AMX by SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1)"),
])
def test_expert_shards_refuse_layouts_sglang_prepared_for_other_kernels(
    change: str, reason: str, sglang_moe: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeroprefill.common.asyncep_model import AsyncEPConfigError

    tensors = _loaded_block_fp8()
    if change == "transposed scales":  # e.g. an MN-major scale layout: [E, I/128, H/128] for w2
        tensors["w2_weight_scale_inv"] = tensors["w2_weight_scale_inv"].transpose(1, 2).contiguous()
    if change == "e4m3fnuz weights":
        tensors["w13_weight"] = tensors["w13_weight"].view(torch.float8_e4m3fnuz)
    layer = _stand_in_layer(_methods()["block FP8"], **tensors)
    if change == "ue8m0":
        layer.w2_weight_scale_inv.format_ue8m0 = True
    if change == "rocm":
        monkeypatch.setattr(torch.version, "hip", "6.4")
    if change == "amx":
        layer.use_intel_amx_backend = True
    with pytest.raises(AsyncEPConfigError) as raised:
        sglang_moe.expert_shards(layer)
    assert str(raised.value).startswith(f"--moe-a2a-backend asyncep: MoE layer {LAYER_NAME} has {reason}")


def test_block_fp8_experts_are_planned_at_fp8(sglang_moe: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from zeroprefill.common import layouts
    from zeroprefill.common.asyncep_model import AsyncEPConfig

    planned = []

    def switch_point_on_gpus(spec, device_name, num_ranks, context_tokens, dtype, transport):
        planned.append(dtype)
        return 1024

    monkeypatch.setattr(layouts, "switch_point_on_gpus", switch_point_on_gpus)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    config = Path(__file__).resolve().parents[1] / "common" / "model_configs" / "qwen3-30b-a3b.json"
    model = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: json.loads(config.read_text())))
    for dtype in ("fp8", "bf16"):
        tokens = sglang_moe.planned_switch_tokens(model, 2, torch.device("cuda"), AsyncEPConfig(), dtype)
        assert tokens == 1024
    assert planned == ["fp8", "bf16"]
