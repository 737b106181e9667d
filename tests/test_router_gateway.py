"""The router gateway against in-process fake backends: pass-through, 4xx, retries, health."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.router.app import RouterApp, RouterConfig
from zeroprefill.router.backends import BackendPool
from zeroprefill.router.fake_backend import FakeBackend
from zeroprefill.router.prompts import PromptTokenizer
from zeroprefill.tiny_model import generate_tiny_moe

MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return generate_tiny_moe(tmp_path_factory.mktemp("tiny-moe"))


def _config(model_dir: Path, bound_flops: float = math.inf, timeout_s: float = 30.0) -> RouterConfig:
    return RouterConfig(
        spec=MoEModelSpec.from_pretrained(model_dir),
        tokenizer=PromptTokenizer(model_dir),
        max_model_len=MAX_MODEL_LEN,
        bound_flops=bound_flops,
        block_size=16,
        request_timeout_s=timeout_s,
    )


class Harness:
    """Fake backends + a router on loopback ports, driven from one event loop."""

    def __init__(self, router: RouterApp, backends: list[FakeBackend], ports: list[int],
                 router_url: str, session: aiohttp.ClientSession) -> None:
        self.router, self.backends, self.ports = router, backends, ports
        self.url, self.session = router_url, session

    def backend_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    async def post(self, path: str, payload, base: str | None = None) -> tuple[int, bytes]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        async with self.session.post((base or self.url) + path, data=data,
                                     headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.read()

    async def get(self, path: str, base: str | None = None) -> tuple[int, bytes]:
        async with self.session.get((base or self.url) + path) as response:
            return response.status, await response.read()


def run_with_router(
    model_dir: Path,
    body: Callable[[Harness], Awaitable[None]],
    num_backends: int = 2,
    kind: str = "vllm",
    delay_s: float = 0.0,
    bound_flops: float = math.inf,
) -> None:
    async def main() -> None:
        backends = [FakeBackend("tiny", kind, delay_s) for _ in range(num_backends)]
        ports = [await b.start() for b in backends]
        pool = BackendPool([f"http://127.0.0.1:{p}" for p in ports], "auto",
                           health_interval_s=0.1, health_timeout_s=1.0)
        router = RouterApp(_config(model_dir, bound_flops), pool)
        port = await router.start()
        session = aiohttp.ClientSession()
        try:
            await body(Harness(router, backends, ports, f"http://127.0.0.1:{port}", session))
        finally:
            await session.close()
            await router.close()
            for b in backends:
                if b.server is not None and b.server.is_serving():
                    await b.kill()

    asyncio.run(asyncio.wait_for(main(), 90))


BODIES = {
    "/v1/embeddings": {"model": "tiny", "input": ["Rerank these documents.", "The quick brown fox."]},
    "/pooling": {"model": "tiny", "input": [1, 2, 3, 4, 5]},
    "/classify": {"model": "tiny", "input": "Classify the sentiment of this review."},
    "/score": {"model": "tiny", "queries": "What is the capital?", "documents": ["Paris.", "Lyon."]},
    "/v1/score": {"model": "tiny", "text_1": "What?", "text_2": "That."},
    "/rerank": {"model": "tiny", "query": "capital of France", "documents": ["Paris", "Berlin"]},
    "/v1/rerank": {"model": "tiny", "query": "capital", "documents": [{"text": "Paris"}]},
}


def test_pass_through_is_byte_identical(model_dir):
    async def body(h: Harness) -> None:
        for path, payload in BODIES.items():
            via_router = await h.post(path, payload)
            direct = await h.post(path, payload, base=h.backend_url(0))
            assert via_router == direct, path
            assert via_router[0] == 200
        assert await h.get("/v1/models") == await h.get("/v1/models", base=h.backend_url(1))
        status, health = await h.get("/health")
        assert status == 200 and json.loads(health)["healthy_backends"] == 2
        assert sum(b.requests_served for b in h.backends) == 2 * len(BODIES)

    run_with_router(model_dir, body)


def test_bad_requests_get_4xx_without_forwarding(model_dir):
    async def body(h: Harness) -> None:
        status, payload = await h.post("/v1/embeddings", b"{not json")
        assert status == 400 and b"not valid JSON" in payload
        status, payload = await h.post("/v1/embeddings", {"model": "nope", "input": "hi"})
        assert status == 404 and b"`nope` does not exist" in payload
        status, payload = await h.post("/v1/embeddings", {"model": "tiny", "input": [7] * (MAX_MODEL_LEN + 1)})
        assert status == 400 and b"over the model's maximum of 512" in payload
        status, payload = await h.post("/v1/embeddings", {"model": "tiny"})
        assert status == 400 and b"needs an 'input'" in payload
        status, payload = await h.post("/rerank", {"query": "q", "documents": []})
        assert status == 400 and b"must not be empty" in payload
        status, payload = await h.post("/score", {"queries": ["a", "b"], "documents": ["x", "y", "z"]})
        assert status == 400 and b"give one query" in payload
        assert sum(b.requests_served for b in h.backends) == 0
        # Truncation makes a long prompt acceptable, as the engine would.
        status, _ = await h.post("/v1/embeddings", {"input": [7] * 600, "truncate_prompt_tokens": 100})
        assert status == 200

    run_with_router(model_dir, body)


def test_backend_killed_mid_load_every_request_answered_then_recovers(model_dir):
    async def body(h: Harness) -> None:
        total, concurrency = 400, 32
        statuses: list[int] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)

        async def client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                status, _ = await h.post("/v1/embeddings", {"input": f"document number {i} " * (1 + i % 5)})
                statuses.append(status)

        async def killer() -> None:
            while len(statuses) < total // 4:
                await asyncio.sleep(0.005)
            await h.backends[0].kill()

        await asyncio.gather(killer(), *(client() for _ in range(concurrency)))
        assert statuses == [200] * total
        assert h.router.metrics.retries_total > 0
        unhealthy = f'zeroprefill_router_backend_healthy{{backend="{h.backend_url(0)}"}} 0'
        for _ in range(100):  # the health loop confirms a dead backend within a few probes
            _, metrics = await h.get("/metrics")
            if unhealthy in metrics.decode():
                break
            await asyncio.sleep(0.05)
        assert unhealthy in metrics.decode()
        assert h.router.policy.replicas[0].outstanding_flops == 0
        assert h.router.policy.replicas[1].outstanding_flops == 0
        # The replica comes back on the same port: the health loop restores it.
        await h.backends[0].start(port=h.ports[0])
        for _ in range(100):
            if h.router.pool.backends[0].healthy:
                break
            await asyncio.sleep(0.05)
        assert h.router.pool.backends[0].healthy
        served_before = h.backends[0].requests_served
        for i in range(20):
            assert (await h.post("/v1/embeddings", {"input": f"fresh {i}"}))[0] == 200
        assert h.backends[0].requests_served > served_before

    run_with_router(model_dir, body, delay_s=0.01)


def test_unhealthy_backend_is_drained_and_restored(model_dir):
    async def body(h: Harness) -> None:
        h.backends[0].healthy = False
        for _ in range(100):
            if not h.router.pool.backends[0].healthy:
                break
            await asyncio.sleep(0.05)
        assert not h.router.pool.backends[0].healthy
        served = h.backends[0].requests_served
        for i in range(10):
            assert (await h.post("/classify", {"input": f"text {i}"}))[0] == 200
        assert h.backends[0].requests_served == served  # drained
        h.backends[1].healthy = False
        for _ in range(100):
            if not h.router.pool.backends[1].healthy:
                break
            await asyncio.sleep(0.05)
        status, payload = await h.post("/classify", {"input": "nobody home"})
        assert status == 503 and b"no healthy backend" in payload
        assert (await h.get("/health"))[0] == 503
        h.backends[0].healthy = h.backends[1].healthy = True
        for _ in range(100):
            if all(b.healthy for b in h.router.pool.backends):
                break
            await asyncio.sleep(0.05)
        assert (await h.post("/classify", {"input": "back"}))[0] == 200

    run_with_router(model_dir, body)


def test_saturation_bound_queues_and_metrics_report_it(model_dir):
    async def body(h: Harness) -> None:
        shared = "Rerank these documents by how well they answer the question. " * 4
        payloads = [{"input": shared + f"document {i}"} for i in range(64)]
        results = await asyncio.gather(*(h.post("/v1/embeddings", p) for p in payloads))
        assert [s for s, _ in results] == [200] * 64
        assert h.router.policy.stats.queued_total > 0  # the 1-FLOP bound held requests back
        assert h.router.policy.queue_depth == 0
        text = (await h.get("/metrics"))[1].decode()
        for name in ("zeroprefill_router_queue_depth 0", "zeroprefill_router_queued{",
                     "zeroprefill_router_queued_flops{",
                     "zeroprefill_router_outstanding_flops{", "zeroprefill_router_bound_flops{", "zeroprefill_router_prefix_hit_rate ",
                     'zeroprefill_router_requests_total{endpoint="/v1/embeddings",status="200"} 64',
                     'zeroprefill_router_request_latency_seconds_bucket{le="+Inf"} 64',
                     "zeroprefill_router_queue_wait_seconds_count 64"):
            assert name in text, name
        hit_rate = float(text.split("\nzeroprefill_router_prefix_hit_rate ")[1].split()[0])
        assert hit_rate > 0.5  # the shared instruction prefix is predicted cached

    # 50 ms per answer: the 64 concurrent requests overlap even on a loaded machine.
    run_with_router(model_dir, body, delay_s=0.05, bound_flops=1.0)


def test_sglang_backends_get_their_paths(model_dir):
    async def body(h: Harness) -> None:
        await asyncio.sleep(0)
        assert h.router.pool.backends[0].kind == "sglang"
        status, _ = await h.post("/rerank", {"query": "q", "documents": ["a"]})
        assert status == 200
        assert h.backends[0].paths_seen == {"/v1/rerank": 1}
        status, payload = await h.post("/pooling", {"input": "x"})
        assert status == 400 and b"sglang backends have no /pooling" in payload

    run_with_router(model_dir, body, num_backends=1, kind="sglang")


def test_raw_http_pipelined_chunked_and_expect_continue(model_dir):
    """HTTP/1.1 details of the gateway's own server, over a raw socket."""

    async def body(h: Harness) -> None:
        port = int(h.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = json.dumps({"input": "pipelined"}).encode()
        plain = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        half = len(payload) // 2
        chunked = (b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, payload[:half], len(payload) - half, payload[half:]))
        writer.write(plain + chunked + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined
        statuses = []
        for _ in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            statuses.append((head.split(b" ")[1], await reader.readexactly(length)))
        assert [s for s, _ in statuses] == [b"200", b"200", b"200"]
        assert statuses[0][1] == (await h.post("/v1/embeddings", payload))[1]  # answered in order
        assert b"healthy_backends" in statuses[2][1]
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload))
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(payload)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        writer.close()

    run_with_router(model_dir, body)


def _router_args(model_dir: Path, *argv: str) -> argparse.Namespace:
    from zeroprefill.router import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--backend", "http://127.0.0.1:9", "--model", str(model_dir), *argv])


def test_planner_gives_the_replica_threshold_and_compute_rate(model_dir):
    from zeroprefill.common.hardware import shipped_profile
    from zeroprefill.common.saturation import Deployment, step_flops_budget
    from zeroprefill.router.cli import _planner_replica_model

    spec = MoEModelSpec.from_pretrained("common/model_configs/qwen3-235b-a22b.json")
    saturation, rate = _planner_replica_model(spec, _router_args(model_dir, "--gpus", "4"))
    profile = shipped_profile("h200", 4)
    # The runtime's transport ("auto": the copy engine on GPUs), not NCCL, and 2048-token prompts.
    runtime = Deployment(spec, profile, 4, "bf16", "copy_engine")
    assert saturation == 4 * step_flops_budget(runtime, 2048, headroom=1.0)
    assert saturation != 4 * step_flops_budget(Deployment(spec, profile, 4, "bf16", "nccl"), 2048, headroom=1.0)
    assert rate == pytest.approx(4 * profile.effective_tflops("bf16", "copy_engine") * 1e12)
    nccl_saturation, nccl_rate = _planner_replica_model(spec, _router_args(model_dir, "--gpus", "4", "--transport", "nccl"))
    assert nccl_saturation == 4 * step_flops_budget(Deployment(spec, profile, 4, "bf16", "nccl"), 2048, headroom=1.0)
    assert nccl_rate == pytest.approx(4 * profile.effective_tflops("bf16", "nccl") * 1e12)


def test_one_gpu_replicas_have_no_threshold_and_run_at_the_full_rate(model_dir):
    from zeroprefill.common.hardware import shipped_profile
    from zeroprefill.router.cli import _planner_replica_model

    spec = MoEModelSpec.from_pretrained("common/model_configs/qwen3-30b-a3b.json")
    saturation, rate = _planner_replica_model(spec, _router_args(model_dir, "--gpus", "1"))
    assert saturation == 0.0  # nothing is gathered: the router holds nothing back
    assert rate == shipped_profile("h200", 1).compute_tflops("bf16") * 1e12


def test_classify_with_and_without_v1_costs_the_same(model_dir):
    from zeroprefill.common.cost_model import lm_head_tokens
    from zeroprefill.router.prompts import ROUTED_PATHS

    app = RouterApp(_config(model_dir), BackendPool(["http://127.0.0.1:9"]))
    body = json.dumps({"input": "Classify the sentiment of this review."}).encode()
    classify, v1_classify = (app._parse(path, body, 0.0).prompts for path in ("/classify", "/v1/classify"))
    assert classify == v1_classify
    # Every routed endpoint is a pooling endpoint: no prompt pays for the LM head.
    heads = {path: app._parse(path, json.dumps(BODIES[path]).encode(), 0.0).prompts[0].head_tokens
             for path in ROUTED_PATHS if path in BODIES}
    assert heads == dict.fromkeys(heads, lm_head_tokens("pooling"))


@pytest.mark.parametrize("flag, value", [("--max-num-batched-tokens", "0"), ("--bound-factor", "-1"),
                                         ("--saturation-flops", "0")])
def test_cli_rejects_bad_numbers_in_one_line(model_dir, capsys, flag, value):
    from zeroprefill.router import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--backend", "http://127.0.0.1:9", "--model", str(model_dir), flag, value])
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zeroprefill router: {flag} must be > 0, got ") and err.count("\n") == 1


def test_every_router_option_has_help_and_the_formatter_names_its_default_once():
    from zeroprefill.router import cli

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    assert not [a.dest for a in options if "default" in a.help]  # the formatter adds it, once
    text = parser.format_help()
    for shown in ("(default: auto)", "(default: 2048)", "(default: 1.25)", "(default: h200)"):
        assert shown in text
