"""Real vLLM on two GPUs: ``--moe-backend asyncep`` serves block-FP8 checkpoints.

How to run (a machine with 2 GPUs and vLLM 0.26-0.33; docs/gpu.md)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
    ZEROPREFILL_FP8_CHECK_JSON=benchmarks/results/vllm_fp8-h200x2.json \\
        python -m pytest -m gpu tests/test_vllm_fp8_gpu.py

``-k tiny`` and ``-k shapes`` run the two parts separately and merge into the same file.

tiny: a generated Qwen3-MoE checkpoint in block FP8 as Qwen3-*-FP8 ship it (every decoder
projection e4m3 with 128x128 ``weight_scale_inv``, router included; 128 experts, top-8, as
Qwen3-235B routes), served with vLLM's defaults (bf16 activations, torch.compile, CUDA
graphs) by stock vLLM (one GPU, its own FP8 MoE path) and by AsyncEP (DP=2), which gathers
the FP8 experts with their scales and runs ``zeroprefill.kernels.fused_experts``. Both
quantise activations per 1x128 group, each with its own kernels, so they differ by FP8
rounding as well as bf16: ``/v1/embeddings`` and ``/pooling`` must agree to cosine 0.99, 500
mixed concurrent requests to that or 1.5x stock's own spread across batchings, whichever is
looser; the record keeps the minimum cosine. Logs clean, graphs captured, and the AsyncEP
log names the FP8 gather buffers.

shapes: ``common/model_configs/qwen3-235b-a22b-fp8.json`` (Qwen3-235B-A22B-FP8's shapes and
quantization config) with ``--load-format dummy``, reduced with ``--hf-overrides
'{"num_hidden_layers": N}'`` to the most layers of those tried that start on two H200s: AsyncEP
starts, answers 32K-token requests, and its gather buffers are the planner's FP8 figure (half
of bf16, plus the block scales).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from tests.vllm_servers import (  # noqa: E402
    EMBED, TEXTS, cosines, gather_buffer_lines, gpu_server_pair, mixed_requests, post, send_all, serve_long_requests,
    values,
)
from zeroprefill.common.model_spec import MoEModelSpec  # noqa: E402
from zeroprefill.tiny_model import (  # noqa: E402
    TinyMoEConfig, generate_tiny_moe, quantize_checkpoint_block_fp8, write_dummy_checkpoint,
)

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu, pytest.mark.slow]
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MIN_COSINE = 0.99  # FP8 on both sides, each with its own kernels and activation rounding
TINY = TinyMoEConfig(num_experts=128, top_k=8, num_layers=4, hidden_size=256, expert_intermediate_size=128,
                     num_attention_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048)
TINY_SERVER_ARGS = [*EMBED, "--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.05",
                    "--kv-cache-memory-bytes", str(1 << 30)]
LONG_TEXTS = [" ".join(TEXTS) * 3, "expert " * 400]  # under --max-model-len 2048
# Layer counts to try, largest first. Per GPU at FP8: 1.13 GiB of experts per layer (half of
# 128) and two 2.25 GiB gather buffers; 80 layers hold about what 40 bf16 layers did.
SHAPE_LAYERS = [80, 72]
SHAPE_MODEL = "qwen3-235b-a22b-fp8"
_ERROR_LINE = re.compile(r"\bERROR\b|Traceback \(most recent call last\)")
_GATHER_GIB = re.compile(r"gather buffers = ([0-9.]+) GiB")


@pytest.fixture(scope="module")
def record():
    return {"tiny": {"min_cosine": 1.0, "requests": 0, "requests_failed": 0}, "shapes": {}}


@pytest.fixture(autouse=True)
def _save_after_each_test(record):
    yield  # after every test: a run cut short keeps what it measured
    path = os.environ.get("ZEROPREFILL_FP8_CHECK_JSON")
    if path:
        _merge_json(Path(path), record)


def _merge_json(path: Path, record: dict) -> None:
    import vllm

    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("tiny", {}).update(record["tiny"])
    data.setdefault("shapes", {}).update(record["shapes"])
    data["vllm_version"] = vllm.__version__
    data["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    data["command"] = ("ZEROPREFILL_FP8_CHECK_JSON=<file> NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
                       "python -m pytest -m gpu tests/test_vllm_fp8_gpu.py")
    summary = data.setdefault("summary", {})
    summary.update(vllm_version=vllm.__version__, min_cosine=data["tiny"].get("min_cosine"),
                   requests_failed=data["tiny"].get("requests_failed"),
                   real_shapes_served=sorted(name for name, s in data["shapes"].items() if s.get("answered_32k")))
    path.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Stock vLLM (1 GPU) and AsyncEP (DP=2) on the same block-FP8 checkpoint."""
    tmp = tmp_path_factory.mktemp("vllm-fp8-gpu")
    model = quantize_checkpoint_block_fp8(generate_tiny_moe(tmp / "tiny-qwen3-moe-fp8", TINY))
    stock, asyncep = gpu_server_pair(model, TINY_SERVER_ARGS, tmp, "tiny-fp8")
    try:
        for server in (stock.start(), asyncep.start()):
            server.wait_healthy(timeout_s=900)
        yield str(model), stock, asyncep
    finally:
        asyncep.stop()
        stock.stop()


def _worst(record: dict, got: list, want: list) -> float:
    worst = float(cosines(got, want).min())
    record["tiny"]["min_cosine"] = min(record["tiny"]["min_cosine"], worst)
    return worst


def test_tiny_fp8_embeddings_agree_with_stock_fp8(tiny_pair, record):
    model, stock, asyncep = tiny_pair
    body = {"model": model, "input": TEXTS + LONG_TEXTS}
    for path in ("/v1/embeddings", "/pooling"):
        worst = _worst(record, values(path, post(asyncep, path, body)), values(path, post(stock, path, body)))
        assert worst >= MIN_COSINE, f"{path}: cosine {worst:.6f} < {MIN_COSINE}"


def test_tiny_fp8_500_mixed_concurrent_requests_all_answered_and_agree(tiny_pair, record):
    model, stock, asyncep = tiny_pair
    requests = [(path, body) for path, body in mixed_requests(model, 500) if path != "/score"]
    got = asyncio.run(send_all(asyncep, requests, concurrency=128))
    want = asyncio.run(send_all(stock, requests, concurrency=128))
    alone = asyncio.run(send_all(stock, requests, concurrency=1))  # stock's spread across batchings
    failed = sum(status != 200 for status, _ in got)
    record["tiny"]["requests"] += len(requests)
    record["tiny"]["requests_failed"] += failed
    assert failed == 0, f"{failed} of {len(requests)} requests failed on the AsyncEP server"
    assert all(status == 200 for status, _ in want + alone), "the stock server failed requests"
    stock_self = min(float(cosines(values(path, single), values(path, reference)).min())
                     for (path, _), (_, reference), (_, single) in zip(requests, want, alone))
    record["tiny"]["stock_batching_min_cosine"] = stock_self
    floor = min(MIN_COSINE, 1 - 1.5 * (1 - stock_self))
    worst = [_worst(record, values(path, answer), values(path, reference))
             for (path, _), (_, answer), (_, reference) in zip(requests, got, want)]
    record["tiny"]["requests_past_bound"] = sum(w < floor for w in worst)
    assert min(worst) >= floor, f"cosine {min(worst):.6f} < {floor:.6f}"


def test_tiny_fp8_logs_clean_graphs_captured_fp8_streamed(tiny_pair, record):
    _, stock, asyncep = tiny_pair
    for label, server in (("stock", stock), ("asyncep", asyncep)):
        log = server.log_path.read_text(errors="replace")
        errors = [line for line in log.splitlines() if _ERROR_LINE.search(line)]
        assert not errors, f"{label} log has errors:\n" + "\n".join(errors[:20])
        record["tiny"][f"{label}_cudagraphs_captured"] = "Graph capturing finished" in log
        assert record["tiny"][f"{label}_cudagraphs_captured"], f"{label}: no CUDA graph captured"
    lines = gather_buffer_lines(asyncep.log_path.read_text(errors="replace"))
    record["tiny"]["gather_buffers"] = lines
    assert lines and all("(float8_e4m3fn + block scales)" in line for line in lines), lines
    assert not any("experts kernel experts_reference" in line for line in lines), lines  # the GPU kernel


def test_shapes_qwen3_235b_fp8_starts_and_answers_32k_token_requests(tmp_path, record):
    config_path = REPO / "common" / "model_configs" / f"{SHAPE_MODEL}.json"
    model_dir = write_dummy_checkpoint(config_path, tmp_path / SHAPE_MODEL)
    hf_config = json.loads(config_path.read_text())
    spec = MoEModelSpec.from_hf_config(hf_config)
    # Two ring slots, each one full layer of FP8 experts with their block scales.
    planned_gib = 2 * spec.expert_bytes_per_layer("fp8") / 2**30
    args = [*EMBED, "--dtype", "bfloat16", "--load-format", "dummy", "--max-model-len", "40960",
            "--max-num-batched-tokens", "32768"]
    run = serve_long_requests(model_dir, SHAPE_MODEL, SHAPE_LAYERS, args, tmp_path)
    if run.layers is None:
        record["shapes"][SHAPE_MODEL] = {"attempts": run.attempts, "answered_32k": False}
        pytest.fail(f"{SHAPE_MODEL} did not start with any of {SHAPE_LAYERS} layers:\n{run.log_tail}")
    ok = all(status == 200 for status, _ in run.answers)
    dims = [len(a["data"][0]["embedding"]) for status, a in run.answers if status == 200]
    finite = all(np.isfinite(a["data"][0]["embedding"]).all() for status, a in run.answers if status == 200)
    lines = gather_buffer_lines(run.log)
    logged_gib = [float(m.group(1)) for line in lines if (m := _GATHER_GIB.search(line))]
    record["shapes"][SHAPE_MODEL] = {
        "layers": run.layers, "attempts": run.attempts, "answered_32k": ok and finite, "embedding_dims": dims,
        "gather_buffers": lines, "gather_buffers_gib": logged_gib, "planned_gather_buffers_gib": planned_gib,
        "cudagraphs_captured": "Graph capturing finished" in run.log,
    }
    assert ok, f"{SHAPE_MODEL} ({run.layers} layers): {[s for s, _ in run.answers]}\n{run.log_tail}"
    assert dims == [hf_config["hidden_size"]] * 3 and finite
    assert logged_gib and all(abs(gib - planned_gib) <= 0.01 for gib in logged_gib), (logged_gib, planned_gib)
    assert all("(float8_e4m3fn + block scales)" in line for line in lines), lines
