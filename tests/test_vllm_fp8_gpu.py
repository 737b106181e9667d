"""Real vLLM on GPUs: ``--moe-backend asyncep`` serves block-FP8 checkpoints, as close to fp32 as stock.

How to run (one GPU or more, vLLM 0.26-0.34; docs/gpu.md)::

    ZEROPREFILL_FP8_CHECK_JSON=benchmarks/results/vllm_fp8-h100x1.json \\
        python -m pytest -m gpu tests/test_vllm_fp8_gpu.py -k tiny

``-k tiny`` and ``-k shapes`` run the two parts separately and merge into the same file, which
``benchmarks/vllm_serve.py --merge`` may share (each keeps the other's keys).

tiny (one GPU is enough): a generated Qwen3-MoE checkpoint in block FP8 as Qwen3-*-FP8 ship it
(every decoder projection e4m3 with 128x128 ``weight_scale_inv``, router included; 128 experts,
top-8, as Qwen3-235B routes), served with vLLM's defaults (bf16 activations, torch.compile, CUDA
graphs) by stock vLLM (DP=1, its own FP8 MoE path) and by AsyncEP (DP=2 where two GPUs are
visible, else 1, or ``ZEROPREFILL_GPU_CHECK_ASYNCEP_DP``), which runs the FP8 experts with their
scales through ``zeroprefill.kernels``. Both quantise activations per 1x128 group, each with its
own kernels. Each server's answers — fixed texts, then 500 mixed concurrent requests — are
compared with the checkpoint's weights dequantised to float32 in transformers
(:class:`tests.vllm_servers.Fp32Reference`), and judged as the bf16 test judges
(:func:`tests.vllm_servers.judge`: AsyncEP's median error to fp32 at most twice stock's, its worst
at most stock's worst plus 0.05). Every request answered, logs clean, graphs captured on both
servers, and the AsyncEP log names the FP8 experts.

shapes (two H200s): ``common/model_configs/qwen3-235b-a22b-fp8.json`` (Qwen3-235B-A22B-FP8's
shapes and quantization config) with ``--load-format dummy``, reduced with ``--hf-overrides
'{"num_hidden_layers": N}'`` to the most layers of those tried that start: AsyncEP starts,
answers 32K-token requests, and its gather buffers are the planner's FP8 figure
(``zeroprefill.common.memory_plan``: FP8 experts with their block scales).
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
    EMBED, TEXTS, VERDICT_RULE, Fp32Reference, compare_with_fp32, fp32_summary, gather_buffer_lines, gpu_server_pair,
    judge, mixed_requests, send_all, serve_long_requests, stop_all,
)
from zeroprefill.common.hardware import shipped_gpu_for  # noqa: E402
from zeroprefill.common.memory_plan import memory_plan  # noqa: E402
from zeroprefill.common.model_spec import MoEModelSpec  # noqa: E402
from zeroprefill.common.saturation import Deployment  # noqa: E402
from zeroprefill.tiny_model import (  # noqa: E402
    TinyMoEConfig, generate_tiny_moe, quantize_checkpoint_block_fp8, write_dummy_checkpoint,
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
ASYNCEP_RANKS = int(os.environ.get("ZEROPREFILL_GPU_CHECK_ASYNCEP_DP", min(2, torch.cuda.device_count())))
TINY = TinyMoEConfig(num_experts=128, top_k=8, num_layers=4, hidden_size=256, expert_intermediate_size=128,
                     num_attention_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048)
TINY_SERVER_ARGS = [*EMBED, "--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.05",
                    "--kv-cache-memory-bytes", str(1 << 30)]
LONG_TEXTS = [" ".join(TEXTS) * 3, "expert " * 400]  # under --max-model-len 2048
# Layer counts to try, largest first. Per GPU at FP8: 1.13 GiB of experts per layer (half of
# 128) and gather buffers for the other rank's half; 80 layers hold about what 40 bf16 layers did.
SHAPE_LAYERS = [80, 72]
SHAPE_MODEL = "qwen3-235b-a22b-fp8"
_ERROR_LINE = re.compile(r"\bERROR\b|Traceback \(most recent call last\)")
_GATHER_GIB = re.compile(r"gather buffers = ([0-9.]+) GiB")


@pytest.fixture(scope="module")
def record():
    return {"tiny": {"asyncep_data_parallel_size": ASYNCEP_RANKS}, "shapes": {}}


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
    data["command"] = "ZEROPREFILL_FP8_CHECK_JSON=<file> python -m pytest -m gpu tests/test_vllm_fp8_gpu.py"
    tiny = data["tiny"]
    summary = data.setdefault("summary", {})
    summary.update(vllm_version=vllm.__version__,
                   **fp32_summary([tiny[kind] for kind in ("endpoints", "mixed_500") if kind in tiny]),
                   fp32_verdict=VERDICT_RULE,
                   requests_failed=tiny.get("mixed_500", {}).get("requests_failed", {}).get("asyncep"),
                   real_shapes_served=sorted(name for name, s in data["shapes"].items() if s.get("answered_32k")))
    path.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Stock vLLM and AsyncEP on the same block-FP8 checkpoint, and the fp32 reference's answers."""
    tmp = tmp_path_factory.mktemp("vllm-fp8-gpu")
    model = quantize_checkpoint_block_fp8(generate_tiny_moe(tmp / "tiny-qwen3-moe-fp8", TINY))
    stock, asyncep = gpu_server_pair(model, TINY_SERVER_ARGS, tmp, "tiny-fp8", ASYNCEP_RANKS)
    requests = {"endpoints": [(path, {"model": str(model), "input": TEXTS + LONG_TEXTS})
                              for path in ("/v1/embeddings", "/pooling")],
                "mixed_500": mixed_requests(str(model), 500)}
    try:
        stock.start()
        asyncep.start()
        reference = Fp32Reference(model, "embed", "cuda", tmp)  # while the servers compile
        expected = {kind: reference.answers(r) for kind, r in requests.items()}
        del reference
        torch.cuda.empty_cache()
        for server in (stock, asyncep):
            server.wait_healthy(timeout_s=900)
        yield stock, asyncep, requests, expected
    finally:
        stop_all([stock, asyncep])


def _compare(tiny_pair, record: dict, kind: str, concurrency: int) -> None:
    stock, asyncep, requests, expected = tiny_pair
    answers = {name: asyncio.run(send_all(server, requests[kind], concurrency))
               for name, server in (("asyncep", asyncep), ("stock", stock))}
    failed = {name: sum(status != 200 for status, _ in got) for name, got in answers.items()}
    distances = compare_with_fp32(requests[kind], answers, expected[kind], "embed")
    record["tiny"][kind] = {name: d.record() for name, d in distances.items()} | {
        "requests": len(requests[kind]), "requests_failed": failed}
    assert failed["asyncep"] == 0, f"{failed['asyncep']} of {len(requests[kind])} requests failed on the AsyncEP server"
    assert failed["stock"] == 0, f"{failed['stock']} of {len(requests[kind])} requests failed on the stock server"
    problems = judge(distances["asyncep"], distances["stock"])
    assert not problems, "; ".join(problems)


def test_tiny_fp8_embeddings_as_close_to_fp32_as_stock_fp8(tiny_pair, record):
    _compare(tiny_pair, record, "endpoints", concurrency=1)


def test_tiny_fp8_500_mixed_concurrent_requests_all_answered_as_close_to_fp32_as_stock(tiny_pair, record):
    _compare(tiny_pair, record, "mixed_500", concurrency=128)


def test_tiny_fp8_logs_clean_graphs_captured_fp8_served(tiny_pair, record):
    stock, asyncep, _, _ = tiny_pair
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.multigpu
def test_shapes_qwen3_235b_fp8_starts_and_answers_32k_token_requests(tmp_path, record):
    config_path = REPO / "common" / "model_configs" / f"{SHAPE_MODEL}.json"
    model_dir = write_dummy_checkpoint(config_path, tmp_path / SHAPE_MODEL)
    hf_config = json.loads(config_path.read_text())
    spec = MoEModelSpec.from_hf_config(hf_config)
    # The planner's gather buffers for this deployment: FP8 experts with their block scales.
    deployment = Deployment.on_shipped_gpu(spec, shipped_gpu_for(torch.cuda.get_device_name(0)) or "h200", 2, "fp8")
    planned_gib = memory_plan(deployment, "asyncep", 0, 2048).gather_buffer_bytes / 2**30
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
