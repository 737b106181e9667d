"""End to end: AsyncEP vLLM servers (DP=2 and DP=3) answer the pooling APIs exactly like stock vLLM.

For each model case, two servers run side by side on the same generated checkpoint (fp32):

- stock: one rank, vLLM's own CPU MoE kernel (stock vLLM cannot serve a MoE model with DP>1
  or EP on CPU at all);
- AsyncEP: ``--data-parallel-size N --enable-expert-parallel --moe-backend asyncep``: each rank
  stores 1/N of every layer's experts (read in place) and, per forward pass, either streams the
  others' shards over gloo and keeps its tokens local, or, below the switch point
  (``ZEROPREFILL_ASYNCEP_SWITCH_TOKENS``), sends its tokens to the ranks holding their experts.
  One case forces each mode; one sets the switch point between single short requests and
  concurrent batches, so its run of mixed requests crosses it (the server log shows both modes).

Every answer of the AsyncEP server must equal the stock one to fp32 tolerance. Servers start
once per case (module-scoped fixture), each pair concurrently; teardown kills both process
groups. Runtime on 2 cores: about 5 minutes for the module.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402

from tests.vllm_servers import (  # noqa: E402
    CLASSIFY, EMBED, TEXTS, Fp32Reference, ServerCase, add_classifier_head, classify_mix, compare_with_fp32,
    endpoint_requests, mixed_requests, post, send_all, values,
)
from vllm_zeroprefill.server import VllmServer, asyncep_args  # noqa: E402
from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe  # noqa: E402

pytestmark = pytest.mark.slow



STREAM_ONLY, TOKENS_ONLY = 0, 10**6
#: Between single short requests (a few tokens) and concurrent batches (hundreds per rank).
SWITCH_BETWEEN = 48
MOVES_TOKENS_LINE = "AsyncEP: first pass that moves tokens"
STREAMS_LINE = "AsyncEP: first pass that streams expert weights"


@dataclass(frozen=True)
class AsyncEPCase(ServerCase):
    ranks: int = 2
    switch_tokens: int = STREAM_ONLY


CASES = [
    AsyncEPCase("qwen3_moe-8x2-embed", TinyMoEConfig(), tuple(EMBED), ranks=2, switch_tokens=SWITCH_BETWEEN),
    AsyncEPCase("qwen3_moe-8x2-classify", TinyMoEConfig(), tuple(CLASSIFY), ranks=2, switch_tokens=STREAM_ONLY),
    # Shared experts, 9 experts (3 per rank), top-3, no renormalisation; tokens moved in every pass.
    AsyncEPCase("qwen2_moe-9x3-embed", TinyMoEConfig(architecture="qwen2_moe", num_experts=9, top_k=3),
                tuple(EMBED), ranks=3, switch_tokens=TOKENS_ONLY),
]

@dataclass
class ServerPair:
    case: AsyncEPCase
    model: str
    stock: VllmServer
    asyncep: VllmServer


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c.name}-dp{c.ranks}-switch{c.switch_tokens}")
def pair(request, tmp_path_factory):
    case: AsyncEPCase = request.param
    model_dir = generate_tiny_moe(tmp_path_factory.mktemp(case.name), case.model)
    if case.task == "classify":
        add_classifier_head(model_dir, case.model.hidden_size)
    logs = tmp_path_factory.mktemp(f"{case.name}-logs")
    stock = VllmServer(model_dir, case.runner_args, logs / "stock.log", num_ranks=1)
    asyncep = VllmServer(model_dir, [*case.runner_args, *asyncep_args(case.ranks)], logs / "asyncep.log",
                         num_ranks=case.ranks, env={"ZEROPREFILL_ASYNCEP_SWITCH_TOKENS": str(case.switch_tokens)})
    try:
        stock.start()
        asyncep.start()
        stock.wait_healthy()
        asyncep.wait_healthy()
        yield ServerPair(case, str(model_dir), stock, asyncep)
    finally:
        asyncep.stop()
        stock.stop()


def assert_close(got, want, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=what)


def test_embeddings_through_the_openai_client(pair):
    if pair.case.task != "embed":
        pytest.skip("embedding case only")

    def embed(server):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)
        return [d.embedding for d in client.embeddings.create(model=pair.model, input=TEXTS).data]

    assert_close(embed(pair.asyncep), embed(pair.stock), "/v1/embeddings (openai client)")


def test_embeddings_over_raw_http(pair):
    if pair.case.task != "embed":
        pytest.skip("embedding case only")
    body = {"model": pair.model, "input": TEXTS}
    got = [d["embedding"] for d in post(pair.asyncep, "/v1/embeddings", body)["data"]]
    want = [d["embedding"] for d in post(pair.stock, "/v1/embeddings", body)["data"]]
    assert_close(got, want, "/v1/embeddings")
    assert len(got) == len(TEXTS) and len(got[0]) == pair.case.model.hidden_size


def test_pooling(pair):
    body = {"model": pair.model, "input": TEXTS}
    got = [d["data"] for d in post(pair.asyncep, "/pooling", body)["data"]]
    want = [d["data"] for d in post(pair.stock, "/pooling", body)["data"]]
    assert_close(got, want, "/pooling")


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score(pair, path):
    body = {"model": pair.model, "text_1": "What do experts do in a MoE model?", "text_2": TEXTS}
    if pair.case.task == "classify":
        body["use_activation"] = False  # raw logits: a sigmoid near 0 or 1 would hide differences
    got = [d["score"] for d in post(pair.asyncep, path, body)["data"]]
    want = [d["score"] for d in post(pair.stock, path, body)["data"]]
    assert_close(got, want, path)


def test_classify_and_rerank(pair):
    if pair.case.task != "classify":
        pytest.skip("classification case only")
    body = {"model": pair.model, "input": TEXTS, "use_activation": False}
    got = [d["probs"] for d in post(pair.asyncep, "/classify", body)["data"]]
    want = [d["probs"] for d in post(pair.stock, "/classify", body)["data"]]
    assert_close(got, want, "/classify")

    body = {"model": pair.model, "query": "Which city is the capital of France?", "documents": TEXTS}
    got = post(pair.asyncep, "/rerank", body)["results"]
    want = post(pair.stock, "/rerank", body)["results"]
    assert [r["index"] for r in got] == [r["index"] for r in want]
    assert_close([r["relevance_score"] for r in got], [r["relevance_score"] for r in want], "/rerank")


def test_many_concurrentmixed_requests(pair):
    if pair.case.name != CASES[0].name:
        pytest.skip("run once, on the first case")
    requests = mixed_requests(pair.model, 240)
    # First a few one at a time (one DP rank idle, joining every gather with dummy batches),
    # then everything at once.
    got = [asyncio.run(send_all(pair.asyncep, requests[:8], concurrency=1))]
    got.append(asyncio.run(send_all(pair.asyncep, requests[8:], concurrency=64)))
    got = got[0] + got[1]
    want = asyncio.run(send_all(pair.stock, requests, concurrency=32))
    assert [status for status, _ in got] == [200] * len(requests)
    for (path, _), (_, answer), (_, reference) in zip(requests, got, want):
        assert_close(values(path, answer), values(path, reference), path)
    assert httpx.get(pair.asyncep.url + "/health", timeout=10).status_code == 200
    post(pair.asyncep, "/v1/embeddings", {"model": pair.model, "input": "still serving"})
    log = pair.asyncep.log_tail(100_000)
    assert MOVES_TOKENS_LINE in log and STREAMS_LINE in log, "the mixed requests did not cross the switch point"


def test_forced_mode_is_the_only_mode(pair):
    """After the module's requests, a server forced into one mode has logged that mode only."""
    if pair.case.switch_tokens not in (STREAM_ONLY, TOKENS_ONLY):
        pytest.skip("forced-mode cases only")
    post(pair.asyncep, "/pooling", {"model": pair.model, "input": TEXTS})
    log = pair.asyncep.log_tail(100_000)
    expected, absent = (STREAMS_LINE, MOVES_TOKENS_LINE) if pair.case.switch_tokens == STREAM_ONLY else \
        (MOVES_TOKENS_LINE, STREAMS_LINE)
    assert expected in log and absent not in log


def test_bad_input_gets_4xx_and_the_server_keeps_serving(pair):
    if pair.case.name != CASES[0].name:
        pytest.skip("run once, on the first case")
    url = pair.asyncep.url
    too_long = {"model": pair.model, "input": "expert " * 2000}
    empty = {"model": pair.model, "input": ""}
    wrong_model = {"model": "no-such-model", "input": "hello"}
    for name, send in [
        ("over-long prompt", lambda: httpx.post(url + "/v1/embeddings", json=too_long, timeout=60)),
        ("empty input", lambda: httpx.post(url + "/v1/embeddings", json=empty, timeout=60)),
        ("wrong model name", lambda: httpx.post(url + "/v1/embeddings", json=wrong_model, timeout=60)),
        ("malformed JSON", lambda: httpx.post(
            url + "/v1/embeddings", content=b'{"model": "x", "input": ', headers={"content-type": "application/json"},
            timeout=60)),
        ("score without text_2", lambda: httpx.post(url + "/score", json={"model": pair.model, "text_1": "q"}, timeout=60)),
    ]:
        response = send()
        assert 400 <= response.status_code < 500, f"{name}: {response.status_code} {response.text[:300]}"
        body = response.json()
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("detail")
        assert message, f"{name}: no error message in {json.dumps(body)[:300]}"
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    got = post(pair.asyncep, "/v1/embeddings", {"model": pair.model, "input": TEXTS[:2]})
    want = post(pair.stock, "/v1/embeddings", {"model": pair.model, "input": TEXTS[:2]})
    assert_close(values("/v1/embeddings", got), values("/v1/embeddings", want), "after bad input")


def test_the_api_server_validates_embeddings_with_the_discriminated_union(pair):
    """The plugin's seam 4 is live in the API server: a bad body is judged by the one request
    model its shape names (vLLM's union names each of its five members in the error)."""
    if pair.case.name != CASES[0].name:
        pytest.skip("run once, on the first case")
    for server in (pair.stock, pair.asyncep):
        response = httpx.post(server.url + "/v1/embeddings", json={"model": pair.model, "input": [1, "x"]}, timeout=60)
        assert response.status_code == 400, response.text[:300]
        message = response.json()["error"]["message"]
        # The member's tag in each error's location (a dotted string or a tuple, by vLLM release),
        # no member's class name: vLLM's union names every member it tried.
        assert "'completion'" in message or "body.completion." in message, message[:500]
        assert "EmbeddingCompletionRequest" not in message and "ChatInputRequest" not in message, message[:500]
        log = server.log_path.read_text(errors="replace")
        assert log.count("bodies are validated by the one request model their shape allows") == 1


def test_stock_vllm_computes_what_the_fp32_reference_computes(pair, tmp_path):
    """The float32 reference the GPU checks judge both servers by (``Fp32Reference``) is what vLLM
    computes: stock vLLM in float32 on CPU against it on every endpoint the task serves (the
    cross-encoder's classify, pair scores and rerank; the Qwen2-MoE's embeddings, /pooling and
    cosine /score, its shared experts included)."""
    if pair.case.name == CASES[0].name:
        pytest.skip("the classify and Qwen2-MoE cases cover both tasks")
    stock = pair.stock
    mixed = mixed_requests(pair.model, 40) if pair.case.task == "embed" else classify_mix(pair.model, 40)
    requests = [*endpoint_requests(pair.model, pair.case.task, TEXTS), *mixed]  # CPU servers hold 256 tokens
    expected = Fp32Reference(Path(pair.model), pair.case.task, "cpu", tmp_path).answers(requests)
    answers = asyncio.run(send_all(stock, requests, concurrency=8))
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:2]
    distance = compare_with_fp32(requests, {"stock": answers}, expected, pair.case.task)["stock"]
    assert distance.cosines or pair.case.task == "classify"
    assert min(distance.cosines, default=1.0) > 1 - 1e-6, pair.case.name
    assert max(distance.score_diffs) < 1e-5, pair.case.name


def test_missing_expert_parallel_fails_at_start_up(tmp_path):
    model_dir = generate_tiny_moe(tmp_path / "model", TinyMoEConfig())
    args = [*EMBED, "--data-parallel-size", "2", "--moe-backend", "asyncep"]
    server = VllmServer(model_dir, args, tmp_path / "server.log", num_ranks=2).start()
    try:
        code = server.wait_exit(timeout_s=180)
        assert code is not None and code != 0, "server started without --enable-expert-parallel"
        assert "add --enable-expert-parallel" in server.log_tail(80)
    finally:
        server.stop()
