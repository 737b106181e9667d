"""Real vLLM on two GPUs: ``--moe-backend asyncep`` serves with CUDA graphs and agrees with stock.

How to run (a machine with 2 GPUs and vLLM 0.26-0.33; docs/gpu.md)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python -m pytest -m gpu tests/test_vllm_gpu.py

With ``ZEROPREFILL_GPU_CHECK_JSON=FILE`` the measurements are also merged into ``FILE``
(``benchmarks/results/vllm_gpu_check-h200x2.json``); ``-k tiny`` and ``-k shapes`` run the
two parts separately and merge into the same file.

tiny: four generated checkpoints (Qwen3-MoE; Qwen2-MoE, which adds shared experts) x (embed,
classify), served in bf16 with vLLM's defaults (torch.compile, CUDA graphs). For each, stock
vLLM (one GPU) and AsyncEP (``--data-parallel-size 2 --enable-expert-parallel --moe-backend
asyncep``) start side by side; ``/v1/embeddings``, ``/score``, ``/rerank``, ``/classify`` and
500 mixed concurrent requests must agree (cosine >= 0.999, scores within 1e-2: bf16), every
request answered, no error in any log, and CUDA graphs captured on the AsyncEP server. The
Qwen2 models have three layers: an odd count, so the ring's last layer and first layer share
a slot (the wrap-around case).

shapes: Qwen3-30B-A3B (48 layers) and Qwen3-235B-A22B reduced to the most layers that fit
two H200s with AsyncEP (``--load-format dummy``, the shipped configs): the server starts,
logs its gather buffers and answers 32K-token requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from tests.vllm_servers import (  # noqa: E402
    CLASSIFY, EMBED, TEXTS, ServerCase, add_classifier_head, cosines, gather_buffer_lines, gpu_server_pair,
    mixed_requests, post, send_all, serve_long_requests, values,
)
from vllm_zeroprefill.server import VllmServer  # noqa: E402
from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe, write_dummy_checkpoint  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu, pytest.mark.slow]
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MIN_COSINE, MAX_SCORE_DIFF = 0.999, 1e-2
# Small enough that eight servers share two GPUs while they start together.
TINY_SERVER_ARGS = ["--dtype", "bfloat16", "--max-model-len", "2048", "--gpu-memory-utilization", "0.05",
                    "--kv-cache-memory-bytes", str(1 << 30)]
LONG_TEXTS = [" ".join(TEXTS) * 3, "expert " * 400]  # under --max-model-len 2048


def _tiny(architecture: str, layers: int) -> TinyMoEConfig:
    return TinyMoEConfig(architecture=architecture, num_experts=16, top_k=4, num_layers=layers, hidden_size=256,
                         expert_intermediate_size=128, num_attention_heads=4, num_kv_heads=2, head_dim=64,
                         max_position_embeddings=2048, shared_expert_intermediate_size=256)


TINY_CASES = [
    ServerCase(f"{arch}-{task}", _tiny(arch, layers), tuple(args))
    for arch, layers in (("qwen3_moe", 4), ("qwen2_moe", 3))
    for task, args in (("embed", EMBED), ("classify", CLASSIFY))
]


@dataclass
class Pair:
    case: ServerCase
    model: str
    stock: VllmServer
    asyncep: VllmServer


@dataclass
class Record:
    """What the tests measured; merged into ZEROPREFILL_GPU_CHECK_JSON at the end."""

    tiny: dict[str, dict] = field(default_factory=dict)
    shapes: dict[str, dict] = field(default_factory=dict)

    def case(self, name: str) -> dict:
        return self.tiny.setdefault(name, {"min_cosine": 1.0, "max_score_diff": 0.0, "requests": 0,
                                           "requests_failed": 0})


@pytest.fixture(scope="module")
def record():
    return Record()


@pytest.fixture(autouse=True)
def _save_after_each_test(record):
    # After every test, not at the end: a run cut short keeps what it measured.
    yield
    path = os.environ.get("ZEROPREFILL_GPU_CHECK_JSON")
    if path:
        _merge_json(Path(path), record)


def _merge_json(path: Path, rec: Record) -> None:
    import vllm

    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("tiny", {}).update(rec.tiny)
    data.setdefault("shapes", {}).update(rec.shapes)
    data["vllm_version"] = vllm.__version__
    data["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    data["command"] = ("ZEROPREFILL_GPU_CHECK_JSON=<file> NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
                       "python -m pytest -m gpu tests/test_vllm_gpu.py")
    tiny = data["tiny"].values()
    data["summary"] = {
        "vllm_version": vllm.__version__,
        "cudagraphs": bool(tiny) and all(c.get("cudagraphs_captured") for c in tiny),
        "min_cosine": min((c["min_cosine"] for c in tiny), default=None),
        "max_score_diff": max((c["max_score_diff"] for c in tiny), default=None),
        "requests_failed": sum(c["requests_failed"] for c in tiny),
        "real_shapes_served": sorted(name for name, s in data["shapes"].items() if s.get("answered_32k")),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-gpu")
    started: dict[str, Pair] = {}
    servers: list[VllmServer] = []
    try:
        for case in TINY_CASES:
            model_dir = generate_tiny_moe(tmp / case.name, case.model)
            if case.task == "classify":
                add_classifier_head(model_dir, case.model.hidden_size)
            stock, asyncep = gpu_server_pair(model_dir, [*case.runner_args, *TINY_SERVER_ARGS], tmp, case.name)
            servers += [stock.start(), asyncep.start()]
            started[case.name] = Pair(case, str(model_dir), stock, asyncep)
        for server in servers:
            server.wait_healthy(timeout_s=900)
        yield started
    finally:
        for server in servers:
            server.stop()


def _compare(rec: dict, what: str, got: list, want: list, vectors: bool) -> None:
    worst = _deviation(rec, got, want, vectors)
    if vectors:
        assert worst >= MIN_COSINE, f"{what}: cosine {worst:.6f} < {MIN_COSINE}"
    else:
        assert worst <= MAX_SCORE_DIFF, f"{what}: score difference {worst:.4g} > {MAX_SCORE_DIFF}"


@pytest.mark.parametrize("name", [c.name for c in TINY_CASES])
def test_tiny_pooling_endpoints_agree(pairs, record, name):
    pair = pairs[name]
    rec = record.case(name)
    texts = TEXTS + LONG_TEXTS
    body = {"model": pair.model, "input": texts}
    got = [d["data"] for d in post(pair.asyncep, "/pooling", body)["data"]]
    want = [d["data"] for d in post(pair.stock, "/pooling", body)["data"]]
    _compare(rec, "/pooling", got, want, vectors=pair.case.task == "embed")
    score = {"model": pair.model, "text_1": "What do experts do in a MoE model?", "text_2": texts}
    got = [d["score"] for d in post(pair.asyncep, "/score", score)["data"]]
    want = [d["score"] for d in post(pair.stock, "/score", score)["data"]]
    _compare(rec, "/score", got, want, vectors=False)
    if pair.case.task == "embed":
        got = values("/v1/embeddings", post(pair.asyncep, "/v1/embeddings", body))
        want = values("/v1/embeddings", post(pair.stock, "/v1/embeddings", body))
        _compare(rec, "/v1/embeddings", got, want, vectors=True)
        return
    got = [d["probs"] for d in post(pair.asyncep, "/classify", body)["data"]]
    want = [d["probs"] for d in post(pair.stock, "/classify", body)["data"]]
    _compare(rec, "/classify", got, want, vectors=False)
    rerank = {"model": pair.model, "query": "Which city is the capital of France?", "documents": texts}
    got = sorted(post(pair.asyncep, "/rerank", rerank)["results"], key=lambda r: r["index"])
    want = sorted(post(pair.stock, "/rerank", rerank)["results"], key=lambda r: r["index"])
    _compare(rec, "/rerank", [r["relevance_score"] for r in got], [r["relevance_score"] for r in want], vectors=False)


def _classify_mix(model: str, count: int) -> list[tuple[str, dict]]:
    """/classify, /score and /rerank calls of varied lengths for a cross-encoder."""
    requests = []
    for i, (_, body) in enumerate(mixed_requests(model, count)):
        text = body.get("input") if isinstance(body.get("input"), str) else body.get("text_1", TEXTS[i % 5])
        kind = i % 3
        if kind == 0:
            requests.append(("/classify", {"model": model, "input": [text]}))
        elif kind == 1:
            requests.append(("/score", {"model": model, "text_1": text, "text_2": [TEXTS[i % 5]]}))
        else:
            requests.append(("/rerank", {"model": model, "query": text, "documents": TEXTS[:3]}))
    return requests


def _answer_values(path: str, answer: dict) -> list:
    if path == "/classify":
        return [d["probs"] for d in answer["data"]]
    if path == "/rerank":
        return [r["relevance_score"] for r in sorted(answer["results"], key=lambda r: r["index"])]
    return values(path, answer)


@pytest.mark.parametrize("name", [c.name for c in TINY_CASES])
def test_tiny_500_mixed_concurrent_requests_all_answered_and_agree(pairs, record, name):
    pair = pairs[name]
    rec = record.case(name)
    count = 500
    requests = (mixed_requests(pair.model, count) if pair.case.task == "embed"
                else _classify_mix(pair.model, count))
    got = asyncio.run(send_all(pair.asyncep, requests, concurrency=128))
    want = asyncio.run(send_all(pair.stock, requests, concurrency=128))
    # Stock against itself, one request at a time: how far vLLM's bf16 answers move with the
    # batch a request lands in (a concurrent answer shares its batch with others).
    alone = asyncio.run(send_all(pair.stock, requests, concurrency=1))
    failed = sum(status != 200 for status, _ in got)
    rec["requests"] += count
    rec["requests_failed"] += failed
    assert failed == 0, f"{failed} of {count} requests failed on the AsyncEP server"
    stock_self = {"min_cosine": 1.0, "max_score_diff": 0.0}
    deviations = []
    for (path, _), (_, answer), (status, reference), (_, single) in zip(requests, got, want, alone):
        assert status == 200, f"stock server failed {path}: {reference}"
        vectors = path in ("/v1/embeddings", "/pooling")
        ref = _answer_values(path, reference)
        _deviation(stock_self, _answer_values(path, single), ref, vectors)
        deviations.append((path, _answer_values(path, answer), ref, vectors))
    rec["stock_batching_min_cosine"] = stock_self["min_cosine"]
    rec["stock_batching_max_score_diff"] = stock_self["max_score_diff"]
    # AsyncEP may differ from stock by the bf16 bounds, or by as much as stock differs from itself.
    cosine_floor = min(MIN_COSINE, 1 - 1.5 * (1 - stock_self["min_cosine"]))
    score_ceiling = max(MAX_SCORE_DIFF, 1.5 * stock_self["max_score_diff"])
    # Every request's deviation first, so the record says how many strayed, not only the worst.
    worst_per_request = [(path, _deviation(rec, got_values, ref, vectors), vectors)
                         for path, got_values, ref, vectors in deviations]
    rec["requests_past_bound"] = sum(
        worst < cosine_floor if vectors else worst > score_ceiling for _, worst, vectors in worst_per_request)
    cosines = sorted(worst for _, worst, vectors in worst_per_request if vectors)
    if cosines:
        rec["cosine_percentiles"] = {q: cosines[min(len(cosines) - 1, int(q / 100 * len(cosines)))] for q in (0, 1, 5, 50)}
    for path, worst, vectors in worst_per_request:
        if vectors:
            assert worst >= cosine_floor, f"{path}: cosine {worst:.6f} < {cosine_floor:.6f}"
        else:
            assert worst <= score_ceiling, f"{path}: score difference {worst:.4g} > {score_ceiling:.4g}"


def _deviation(rec: dict, got: list, want: list, vectors: bool) -> float:
    """Record and return the worst cosine (vectors) or largest difference (scores)."""
    if vectors:
        worst = float(cosines(got, want).min())
        rec["min_cosine"] = min(rec["min_cosine"], worst)
        return worst
    worst = float(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max())
    rec["max_score_diff"] = max(rec["max_score_diff"], worst)
    return worst


_ERROR_LINE = re.compile(r"\bERROR\b|Traceback \(most recent call last\)")


@pytest.mark.parametrize("name", [c.name for c in TINY_CASES])
def test_tiny_logs_clean_and_cuda_graphs_captured(pairs, record, name):
    # After the requests above (test order): the logs hold the whole session.
    pair = pairs[name]
    rec = record.case(name)
    for label, server in (("stock", pair.stock), ("asyncep", pair.asyncep)):
        log = server.log_path.read_text(errors="replace")
        errors = [line for line in log.splitlines() if _ERROR_LINE.search(line)]
        assert not errors, f"{label} log has errors:\n" + "\n".join(errors[:20])
        captured = "Graph capturing finished" in log
        rec[f"{label}_cudagraphs_captured"] = captured
        assert captured, f"{label} server captured no CUDA graph:\n{server.log_tail(30)}"
    asyncep_log = pair.asyncep.log_path.read_text(errors="replace")
    assert "AsyncEP: streaming" in asyncep_log
    rec["cudagraphs_captured"] = True
    rec["gather_buffers"] = gather_buffer_lines(asyncep_log)


# -- real shapes --------------------------------------------------------------------------------

SHAPES = {
    # model config shipped in common/model_configs, layer counts to try (largest first)
    "qwen3-30b-a3b": [48],
    # 2 x H200, bf16, AsyncEP: per GPU 2.56 GB per layer (half the experts + attention) and two
    # 4.83 GB gather buffers; 40 layers leave ~4 GB for activations, graphs and a 40K-token KV.
    "qwen3-235b-a22b": [40, 36],
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes_start_and_answer_32k_token_requests(tmp_path, record, name):
    model_dir = write_dummy_checkpoint(REPO / "common" / "model_configs" / f"{name}.json", tmp_path / name)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    args = [*EMBED, "--dtype", "bfloat16", "--load-format", "dummy", "--max-model-len", "40960",
            "--max-num-batched-tokens", "32768"]
    run = serve_long_requests(model_dir, name, SHAPES[name], args, tmp_path)
    if run.layers is None:
        record.shapes[name] = {"attempts": run.attempts, "answered_32k": False}
        pytest.fail(f"{name} did not start with any of {SHAPES[name]} layers:\n{run.log_tail}")
    ok = all(status == 200 for status, _ in run.answers)
    dims = [len(a["data"][0]["embedding"]) for status, a in run.answers if status == 200]
    finite = all(np.isfinite(a["data"][0]["embedding"]).all() for status, a in run.answers if status == 200)
    record.shapes[name] = {"layers": run.layers, "attempts": run.attempts, "answered_32k": ok and finite,
                           "embedding_dims": dims, "gather_buffers": gather_buffer_lines(run.log),
                           "cudagraphs_captured": "Graph capturing finished" in run.log}
    assert ok, f"{name} ({run.layers} layers): {[s for s, _ in run.answers]}\n{run.log_tail}"
    assert dims == [hidden] * 3 and finite
    assert record.shapes[name]["gather_buffers"], "no AsyncEP start-up line in the log"
