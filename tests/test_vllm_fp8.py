"""Block-FP8 checkpoints under ``--moe-backend asyncep`` (vLLM plugin), on CPU.

- The AsyncEP FP8 method creates the parameters vLLM's own ``Fp8MoEMethod`` creates (names,
  shapes, dtypes, loader attributes), vLLM's FusedMoE weight loader fills both alike, and the
  layer then runs on its gathered FP8 weights and scales (one rank, a real vLLM layer).
- AsyncEP on 2 gloo ranks streams FP8 weights with their block scales (a padded shard
  included) and matches a dense reference on the dequantised float32 weights.
- Start-up: block FP8 is accepted (and plans at fp8); every other scheme is refused in one line.
- End to end: a DP=2 AsyncEP server on a tiny Qwen3-MoE with block-FP8 experts answers like
  stock vLLM on the same weights dequantised to bf16. Stock vLLM cannot serve the FP8
  checkpoint itself on CPU: its FP8 MoE has no CPU kernel (``Unsupported FP8 MoE backend:
  NONE``) and its FP8 linear layers need AMX; that comparison is the GPU test's
  (``tests/test_vllm_fp8_gpu.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from tests.multiprocess import run_on_ranks  # noqa: E402
from tests.vllm_servers import EMBED, TEXTS, post  # noqa: E402
from zeroprefill.common.asyncep_model import AsyncEPConfigError  # noqa: E402
from zeroprefill.common.asyncep_moe import AsyncEPMoE, experts_reference, select_experts  # noqa: E402
from zeroprefill.common.block_fp8 import FP8_DTYPE, dequantize_block_fp8, quantize_block_fp8  # noqa: E402
from zeroprefill.common.expert_sharding import ExpertShardLayout  # noqa: E402
from zeroprefill.common.streamer import ExpertWeightStreamer  # noqa: E402
from zeroprefill.common.transport import make_transport  # noqa: E402
from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe, quantize_checkpoint_block_fp8  # noqa: E402

HIDDEN, INTERMEDIATE = 256, 128  # two and one 128-wide blocks


def _fp8_experts(num_experts: int, seed: int) -> dict[str, torch.Tensor]:
    """Random experts in block FP8, as the loader leaves them: w13, w2 and their scales."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTERMEDIATE, HIDDEN, generator=g) / HIDDEN**0.5
    w2 = torch.randn(num_experts, HIDDEN, INTERMEDIATE, generator=g) / INTERMEDIATE**0.5
    w13_fp8, w13_scale = quantize_block_fp8(w13)
    w2_fp8, w2_scale = quantize_block_fp8(w2)
    return {"w13": w13_fp8, "w2": w2_fp8, "w13_scale": w13_scale, "w2_scale": w2_scale}


def _dequantized(experts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (dequantize_block_fp8(experts["w13"], experts["w13_scale"]),
            dequantize_block_fp8(experts["w2"], experts["w2_scale"]))


# -- the CPU experts reference ------------------------------------------------------------------

def test_experts_reference_runs_block_fp8_as_its_dequantised_weights():
    experts = _fp8_experts(4, seed=0)
    x = torch.randn(9, HIDDEN, dtype=torch.bfloat16)
    topk_weights, topk_ids = select_experts(torch.randn(9, 4), top_k=2, renormalize=True)
    got = experts_reference(x, experts["w13"], experts["w2"], topk_weights, topk_ids,
                            w13_scale=experts["w13_scale"], w2_scale=experts["w2_scale"])
    want = experts_reference(x.float(), *_dequantized(experts), topk_weights, topk_ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)  # bf16 output
    with pytest.raises(ValueError, match="need float8_e4m3fn w13 and w2 with both w13_scale and w2_scale"):
        experts_reference(x, experts["w13"], experts["w2"], topk_weights, topk_ids)


# -- AsyncEP on 2 gloo ranks: FP8 weights and block scales ---------------------------------------

def _stream_fp8_layers(rank: int, world_size: int, kernel: str) -> None:
    if kernel == "fused_experts":  # the GPU kernel, in the Triton interpreter (TRITON_INTERPRET=1)
        from zeroprefill.kernels import fused_experts, fused_experts_reference

        experts_kernel, reference, tolerance = fused_experts, fused_experts_reference, 1e-4
    else:
        experts_kernel, reference, tolerance = None, experts_reference, 1e-5
    num_experts, num_layers, top_k = 5, 2, 2  # 3 + 2 experts: rank 1's shard is padded
    layout = ExpertShardLayout(num_experts, world_size)
    full = [_fp8_experts(num_experts, seed=layer) for layer in range(num_layers)]
    streamer = ExpertWeightStreamer([layout.shard_all(layer, rank) for layer in full], layout, make_transport("gloo"))
    # FP8 gather buffers: one byte per weight (half of bf16), plus the float32 block scales.
    per_slot = sum(full[0][name][0].numel() * full[0][name].element_size() for name in full[0])
    assert streamer.gather_buffer_bytes == streamer.num_slots * layout.num_slots * per_slot
    layers = [AsyncEPMoE(streamer, i, top_k, renormalize=True, experts_kernel=experts_kernel) for i in range(num_layers)]
    assert layers[0].scale_names == ("w13_scale", "w2_scale")
    assert layers[0].experts_kernel is (experts_kernel or experts_reference)
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(2):  # a second pass re-gathers the overwritten slots
        x = torch.randn((4, 7)[rank], HIDDEN, generator=g)
        for i, layer in enumerate(layers):
            logits = torch.randn(x.shape[0], num_experts, generator=g)
            got = layer(x, logits)
            topk_weights, topk_ids = select_experts(logits, top_k, True)
            want = reference(x, full[i]["w13"], full[i]["w2"], topk_weights, topk_ids,
                             w13_scale=full[i]["w13_scale"], w2_scale=full[i]["w2_scale"])
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance,
                                       msg=lambda m: f"rank {rank} layer {i}: {m}")
            x = got + x
    streamer.close()


@pytest.mark.parametrize("kernel", ["experts_reference", "fused_experts"])
def test_asyncep_streams_fp8_weights_with_block_scales_on_two_ranks(kernel, monkeypatch):
    # experts_reference: the CPU path, against the dequantised weights. fused_experts: the
    # kernel the GPU runs gets the gathered FP8 weights and scales (padded slot included) in
    # the layout it takes, checked against its own definition (activations quantised too).
    # The ranks' fresh interpreters read TRITON_INTERPRET when they first import Triton.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run_on_ranks(2, _stream_fp8_layers, kernel)


# -- vLLM's FusedMoE layer: our method against vLLM's Fp8MoEMethod -----------------------------

def _compare_with_vllm_fp8_method(rank: int, world_size: int) -> None:
    from vllm.config import KernelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    import vllm.model_executor.layers.fused_moe as fused_moe
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

    from vllm_zeroprefill.asyncep_method import (
        AsyncEPBlockFp8FusedMoEMethod, AsyncEPFusedMoEMethod, model_loader,
    )
    from vllm_zeroprefill.plugin import register

    register()
    num_experts, top_k = 4, 2
    ignored = "model.layers.3.mlp.experts"
    # The layer factory: FusedMoEFactory where vLLM has it (0.32), FusedMoE in 0.26.
    make_fused_moe = getattr(fused_moe, "FusedMoEFactory", None) or fused_moe.FusedMoE
    block_fp8 = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic",
                          weight_block_size=[128, 128], ignored_layers=[ignored])

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)

    def moe_layer(backend: str, prefix: str, quant_config=block_fp8):
        config = VllmConfig(kernel_config=KernelConfig(moe_backend=backend),
                            parallel_config=ParallelConfig(enable_expert_parallel=True))
        with set_current_vllm_config(config):
            return make_fused_moe(num_experts=num_experts, top_k=top_k, hidden_size=HIDDEN,
                                   intermediate_size=INTERMEDIATE, params_dtype=torch.bfloat16,
                                   quant_config=quant_config, prefix=prefix).routed_experts

    stock = moe_layer("auto", "model.layers.0.mlp.experts")
    ours = moe_layer("asyncep", "model.layers.1.mlp.experts")
    assert type(stock.quant_method) is Fp8MoEMethod
    assert type(ours.quant_method) is AsyncEPBlockFp8FusedMoEMethod

    # The same parameters, with the same loader attributes.
    stock_params, our_params = dict(stock.named_parameters()), dict(ours.named_parameters())
    assert sorted(our_params) == sorted(stock_params) == [
        "w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv"]
    for name, want in stock_params.items():
        got = our_params[name]
        assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype), name
        assert sorted(vars(got)) == sorted(vars(want)), name
        for attr, value in vars(want).items():
            if attr != "weight_loader":  # each is bound to its own layer
                assert vars(got)[attr] == value, (name, attr)
    for attr in ("weight_block_size", "orig_dtype", "num_experts", "w13_input_scale", "w2_input_scale"):
        assert getattr(ours, attr) == getattr(stock, attr), attr

    # vLLM's weight loader fills both alike, checkpoint tensor by checkpoint tensor.
    checkpoint = _fp8_experts(num_experts, seed=7)
    for layer in (stock, ours):
        for expert in range(num_experts):
            for suffix, key in (("weight", "w13"), ("weight_scale_inv", "w13_scale")):
                rows = checkpoint[key].shape[1] // 2
                param = getattr(layer, f"w13_{suffix}")
                for shard_id, part in (("w1", slice(0, rows)), ("w3", slice(rows, 2 * rows))):
                    layer.weight_loader(param, checkpoint[key][expert, part], f"experts.w13_{suffix}", shard_id, expert)
            layer.weight_loader(layer.w2_weight, checkpoint["w2"][expert], "experts.w2_weight", "w2", expert)
            layer.weight_loader(layer.w2_weight_scale_inv, checkpoint["w2_scale"][expert],
                                "experts.w2_weight_scale_inv", "w2", expert)
    for name, want in stock_params.items():
        assert torch.equal(our_params[name].data.view(torch.uint8), want.data.view(torch.uint8)), name
    assert torch.equal(ours.w13_weight.data.view(torch.uint8), checkpoint["w13"].view(torch.uint8))

    # Handed over with its scales, the layer computes on the gathered FP8 experts.
    ours.quant_method.process_weights_after_loading(ours)
    assert all(p.numel() == 0 for p in our_params.values())  # vLLM's copy is freed
    # A MoE layer the FP8 config leaves unquantized cannot join FP8 layers in one stream.
    plain = moe_layer("asyncep", ignored)
    assert type(plain.quant_method) is AsyncEPFusedMoEMethod
    with pytest.raises(AsyncEPConfigError, match="stores its experts as bfloat16 but earlier layers as "
                                                 "float8_e4m3fn \\+ block scales"):
        plain.quant_method.process_weights_after_loading(plain)
    moe = model_loader().moe(ours)
    assert moe.scale_names == ("w13_scale", "w2_scale")
    x = torch.randn(6, HIDDEN, dtype=torch.bfloat16)
    topk_weights, topk_ids = select_experts(torch.randn(6, num_experts), top_k, True)
    got = moe.forward_routed(x, topk_weights, topk_ids)
    want = experts_reference(x.float(), *_dequantized(checkpoint), topk_weights, topk_ids)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    model_loader().model.close()

    # Another FP8 scheme reaching a FusedMoE layer is refused there too.
    with pytest.raises(AsyncEPConfigError, match="quantized with 'fp8' without weight_block_size"):
        moe_layer("asyncep", "model.layers.2.mlp.experts", Fp8Config(activation_scheme="dynamic"))


def test_fp8_method_creates_and_loads_what_vllms_fp8_method_does():
    run_on_ranks(1, _compare_with_vllm_fp8_method)


# -- start-up: what is accepted, what is refused -------------------------------------------------

def _unsupported_quant_configs():
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    return {
        "'fp8' without weight_block_size": Fp8Config(activation_scheme="dynamic"),
        "'fp8' with weight_block_size [64, 64]": Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic",
                                                           weight_block_size=[64, 64]),
        "'fp8' stored as 'mxfp4'": Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[128, 128],
                                             store_dtype="mxfp4"),
        "'auto_awq'": get_quantization_config("awq").from_config({"bits": 4, "group_size": 128, "zero_point": True}),
        "'auto_gptq'": get_quantization_config("gptq").from_config(
            {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "lm_head": False}),
        "'mxfp4'": get_quantization_config("mxfp4")(),
    }


def test_only_block_fp8_is_accepted():
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    from vllm_zeroprefill.validation import block_fp8_weight_block

    assert block_fp8_weight_block(None) is None
    assert block_fp8_weight_block(Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[128, 128])) == (128, 128)
    for scheme, quant_config in _unsupported_quant_configs().items():
        with pytest.raises(AsyncEPConfigError) as refused:
            block_fp8_weight_block(quant_config)
        message = str(refused.value)
        assert f"this model is quantized with {scheme}" in message and "\n" not in message
        assert "block-FP8 ones (quantization_config quant_method 'fp8' with weight_block_size [128, 128]" in message


def _tiny_fp8_checkpoint(out: Path, experts_only: bool = False) -> Path:
    config = TinyMoEConfig(num_experts=8, top_k=2, hidden_size=HIDDEN, expert_intermediate_size=INTERMEDIATE,
                           num_attention_heads=4, num_kv_heads=2, head_dim=64)
    return quantize_checkpoint_block_fp8(generate_tiny_moe(out, config), experts_only=experts_only)


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    return _tiny_fp8_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-moe-fp8"))


def test_block_fp8_checkpoint_starts_and_plans_at_fp8(tiny_fp8):
    from tests.test_vllm_plugin import _engine_config
    from vllm_zeroprefill.validation import expert_weight_dtype

    config = _engine_config(tiny_fp8, dtype="bfloat16")
    assert config.model_config.quantization == "fp8"
    assert config.scheduler_config.scheduler_cls == "vllm_zeroprefill.scheduler.PrefillOnlyScheduler"
    assert expert_weight_dtype(config) == "fp8"


def test_block_fp8_experts_must_tile_in_whole_blocks(tiny_fp8, tmp_path):
    from tests.test_vllm_plugin import _engine_config

    model = _with_config(tiny_fp8, tmp_path / "i192", moe_intermediate_size=192)  # only the config is read
    with pytest.raises(AsyncEPConfigError, match="intermediate size is a multiple of 128; this model's is 192"):
        _engine_config(model, dtype="bfloat16")


def _with_config(model: Path, out: Path, **changes) -> Path:
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


_START_UP = """
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
args = parser.parse_args(["--model", {model!r}, "--runner", "pooling", "--convert", "embed",
                          "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "256",
                          "--moe-backend", "asyncep", "--data-parallel-size", "2",
                          "--enable-expert-parallel"])
EngineArgs.from_cli_args(args).create_engine_config()
print("config built")
"""


def test_per_tensor_fp8_checkpoint_is_refused_at_start_up_in_one_line(tiny_fp8, tmp_path):
    per_tensor = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    model = _with_config(tiny_fp8, tmp_path / "per-tensor-fp8", quantization_config=per_tensor)
    result = subprocess.run([sys.executable, "-c", _START_UP.format(model=str(model))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "config built" not in result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --moe-backend asyncep serves unquantized checkpoints and block-FP8 ones (quantization_config "
        "quant_method 'fp8' with weight_block_size [128, 128], as Qwen3-*-FP8 ship); this model is quantized "
        "with 'fp8' without weight_block_size (per-tensor scales, or quantized online): serve a supported "
        "checkpoint or drop --moe-backend asyncep"
    )


# -- end to end: a DP=2 AsyncEP server on FP8 experts ------------------------------------------

def _dequantized_checkpoint(fp8_model: Path, out: Path) -> Path:
    """The same model with every FP8 weight dequantised to bf16 and no quantization_config."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(fp8_model, out)
    tensors = load_file(str(out / "model.safetensors"))
    plain = {name: (dequantize_block_fp8(t, tensors[name + "_scale_inv"]).to(torch.bfloat16)
                    if t.dtype == FP8_DTYPE else t)
             for name, t in tensors.items() if not name.endswith("_scale_inv")}
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.slow
def test_asyncep_server_on_fp8_experts_answers_like_stock_on_the_dequantised_weights(tmp_path):
    from vllm_zeroprefill.server import VllmServer, asyncep_args

    fp8_model = _tiny_fp8_checkpoint(tmp_path / "fp8-experts", experts_only=True)
    reference_model = _dequantized_checkpoint(fp8_model, tmp_path / "dequantised")
    bf16 = [*EMBED, "--dtype", "bfloat16"]  # vLLM runs FP8 checkpoints with bf16 activations
    asyncep = VllmServer(fp8_model, [*bf16, *asyncep_args(2)], tmp_path / "asyncep.log", num_ranks=2)
    stock = VllmServer(reference_model, bf16, tmp_path / "stock.log", num_ranks=1)
    try:
        asyncep.start()
        stock.start()
        asyncep.wait_healthy()
        stock.wait_healthy()
        got = [d["embedding"] for d in post(asyncep, "/v1/embeddings", {"model": str(fp8_model), "input": TEXTS})["data"]]
        want = [d["embedding"] for d in post(stock, "/v1/embeddings", {"model": str(reference_model), "input": TEXTS})["data"]]
    finally:
        asyncep.stop()
        stock.stop()
    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() > 0.999, f"cosines {cosines}"  # bf16 activations on both sides
    log = asyncep.log_path.read_text(errors="replace")
    assert "AsyncEP: 2 MoE layers of 8 experts (float8_e4m3fn + block scales)" in log
