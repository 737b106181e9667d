"""Real vLLM on GPUs: ``--moe-backend asyncep`` serves with CUDA graphs, as close to fp32 as stock.

How to run (one GPU or more, vLLM 0.26-0.34; docs/gpu.md)::

    ZEROPREFILL_GPU_CHECK_JSON=benchmarks/results/vllm_gpu_check-h100x1.json \\
        python -m pytest -m gpu tests/test_vllm_gpu.py -k tiny

With ``ZEROPREFILL_GPU_CHECK_JSON=FILE`` the measurements are merged into ``FILE`` after every
test (a run cut short keeps what it measured); ``-k tiny`` and ``-k shapes`` merge into the same file.

tiny (one GPU is enough): four generated checkpoints (Qwen3-MoE; Qwen2-MoE, which adds shared
experts) x (embed, classify), served in bf16 with vLLM's defaults (torch.compile, CUDA graphs).
For each, stock vLLM (DP=1) and AsyncEP (``--data-parallel-size N --enable-expert-parallel
--moe-backend asyncep``; N = 2 where two GPUs are visible, else 1, or
``ZEROPREFILL_GPU_CHECK_ASYNCEP_DP``) start side by side, all eight servers at once, each small
(``--gpu-memory-utilization 0.05``, 1 GiB of KV cache). Both servers answer the same requests —
fixed texts on every pooling endpoint, then 500 mixed concurrent requests — and each is compared
with the same checkpoint in transformers in float32 (:class:`tests.vllm_servers.Fp32Reference`,
computed on the GPU while the servers start). Random-weight models amplify bf16 rounding, so
comparing AsyncEP with stock directly would measure that noise; the verdict is relative to stock
instead (:func:`tests.vllm_servers.judge`), on errors to fp32 (1 - cosine for embeddings, the
absolute difference for scores and probabilities): AsyncEP's median error at most twice stock's
(the typical request; with 100 answers or more) and its worst error at most stock's worst plus
0.05 (the tail, where bf16 router ties send tokens to other experts on either server), stock's
own median error under 0.05 (else the reference is wrong). Both servers' distances are recorded
(minimum cosine, percentiles). Every request is answered, no log has an error, and both servers
captured CUDA graphs. The Qwen2 models have three layers: an odd count, so the ring's
last layer and first layer share a slot (the wrap-around case, where AsyncEP has two ranks).

The reference itself is checked on CPU (the one test here that runs without a GPU): stock vLLM
in float32 must give what it gives, to rounding, on every endpoint, for a Qwen3-MoE
cross-encoder and a Qwen2-MoE embedding model.

shapes (two GPUs): Qwen3-30B-A3B (48 layers) and Qwen3-235B-A22B reduced to the most layers
that fit two H200s with AsyncEP (``--load-format dummy``, the shipped configs): the server
starts, logs its gather buffers and answers 32K-token requests.
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
    CLASSIFY, EMBED, TEXTS, VERDICT_RULE, Fp32Reference, ServerCase, add_classifier_head, classify_mix,
    compare_with_fp32, endpoint_requests, fp32_summary, gather_buffer_lines, gpu_server_pair, judge,
    mixed_requests, send_all, serve_long_requests, stop_all,
)
from vllm_zeroprefill.server import VllmServer  # noqa: E402
from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe, write_dummy_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ASYNCEP_RANKS = int(os.environ.get("ZEROPREFILL_GPU_CHECK_ASYNCEP_DP", min(2, max(1, torch.cuda.device_count()))))
MIXED = 500
# Small enough that eight servers share one GPU while they start together.
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
    stock: VllmServer
    asyncep: VllmServer
    requests: dict[str, list[tuple[str, dict]]]  # "endpoints", "mixed_500"
    expected: dict[str, list[list]] = field(default_factory=dict)  # the fp32 reference's answers


@dataclass
class Record:
    """What the tests measured; merged into ZEROPREFILL_GPU_CHECK_JSON after every test."""

    tiny: dict[str, dict] = field(default_factory=dict)
    shapes: dict[str, dict] = field(default_factory=dict)


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
    data["command"] = "ZEROPREFILL_GPU_CHECK_JSON=<file> python -m pytest -m gpu tests/test_vllm_gpu.py"
    tiny = data["tiny"].values()
    comparisons = [case[kind] for case in tiny for kind in ("endpoints", "mixed_500") if kind in case]
    data["summary"] = {
        "vllm_version": vllm.__version__,
        "asyncep_data_parallel_size": sorted({c["asyncep_data_parallel_size"] for c in tiny}),
        "cudagraphs": bool(tiny) and all(c.get("cudagraphs_captured") for c in tiny),
        **fp32_summary(comparisons),
        "verdict": VERDICT_RULE,
        "requests_failed": sum(c.get("mixed_500", {}).get("requests_failed", {}).get("asyncep", 0) for c in tiny),
        "real_shapes_served": sorted(name for name, s in data["shapes"].items() if s.get("answered_32k")),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, record):
    tmp = tmp_path_factory.mktemp("vllm-gpu")
    started: dict[str, Pair] = {}
    servers: list[VllmServer] = []
    try:
        for case in TINY_CASES:
            model_dir = generate_tiny_moe(tmp / case.name, case.model)
            if case.task == "classify":
                add_classifier_head(model_dir, case.model.hidden_size)
            stock, asyncep = gpu_server_pair(model_dir, [*case.runner_args, *TINY_SERVER_ARGS], tmp, case.name,
                                             ASYNCEP_RANKS)
            servers += [stock.start(), asyncep.start()]
            model = str(model_dir)
            requests = {"endpoints": endpoint_requests(model, case.task, TEXTS + LONG_TEXTS),
                        "mixed_500": mixed_requests(model, MIXED) if case.task == "embed" else classify_mix(model, MIXED)}
            started[case.name] = Pair(case, stock, asyncep, requests)
            record.tiny[case.name] = {"asyncep_data_parallel_size": ASYNCEP_RANKS}
        for pair in started.values():  # while the servers compile
            reference = Fp32Reference(Path(pair.stock.model), pair.case.task, "cuda", tmp)
            pair.expected = {kind: reference.answers(requests) for kind, requests in pair.requests.items()}
            del reference
        torch.cuda.empty_cache()
        for server in servers:
            server.wait_healthy(timeout_s=900)
        yield started
    finally:
        stop_all(servers)


def _compare(pair: Pair, rec: dict, kind: str, concurrency: int) -> None:
    """Both servers answer ``pair.requests[kind]``; each is measured against fp32 and judged."""
    requests = pair.requests[kind]
    answers = {name: asyncio.run(send_all(server, requests, concurrency))
               for name, server in (("asyncep", pair.asyncep), ("stock", pair.stock))}
    failed = {name: sum(status != 200 for status, _ in got) for name, got in answers.items()}
    distances = compare_with_fp32(requests, answers, pair.expected[kind], pair.case.task)
    rec[kind] = {name: d.record() for name, d in distances.items()} | {"requests": len(requests),
                                                                        "requests_failed": failed}
    assert failed["asyncep"] == 0, f"{failed['asyncep']} of {len(requests)} requests failed on the AsyncEP server"
    assert failed["stock"] == 0, f"{failed['stock']} of {len(requests)} requests failed on the stock server"
    problems = judge(distances["asyncep"], distances["stock"])
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("name", [c.name for c in TINY_CASES])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_endpoints_as_close_to_fp32_as_stock(pairs, record, name):
    _compare(pairs[name], record.tiny[name], "endpoints", concurrency=1)


@pytest.mark.parametrize("name", [c.name for c in TINY_CASES])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_500_mixed_concurrent_requests_all_answered_as_close_to_fp32_as_stock(pairs, record, name):
    _compare(pairs[name], record.tiny[name], "mixed_500", concurrency=128)


_ERROR_LINE = re.compile(r"\bERROR\b|Traceback \(most recent call last\)")


@pytest.mark.parametrize("name", [c.name for c in TINY_CASES])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_logs_clean_and_cuda_graphs_captured(pairs, record, name):
    # After the requests above (test order): the logs hold the whole session.
    pair = pairs[name]
    rec = record.tiny[name]
    captured = {}
    for label, server in (("stock", pair.stock), ("asyncep", pair.asyncep)):
        log = server.log_path.read_text(errors="replace")
        errors = [line for line in log.splitlines() if _ERROR_LINE.search(line)]
        assert not errors, f"{label} log has errors:\n" + "\n".join(errors[:20])
        captured[label] = "Graph capturing finished" in log
        assert captured[label], f"{label} server captured no CUDA graph:\n{server.log_tail(30)}"
    rec["cudagraphs_captured"] = all(captured.values())
    rec["gather_buffers"] = gather_buffer_lines(pair.asyncep.log_path.read_text(errors="replace"))
    assert rec["gather_buffers"], "no AsyncEP start-up line in the AsyncEP server's log"


# -- real shapes --------------------------------------------------------------------------------

SHAPES = {
    # model config shipped in common/model_configs, layer counts to try (largest first)
    "qwen3-30b-a3b": [48],
    # 2 x H200, bf16, AsyncEP: per GPU 2.56 GB per layer (half the experts + attention) plus the
    # gather buffers; 40 layers left ~4 GB for activations, graphs and a 40K-token KV when each
    # buffer held a whole layer (now only the other rank's half).
    "qwen3-235b-a22b": [40, 36],
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
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
