"""Requests and helpers shared by the vLLM server tests (CPU: fp32; GPU: bf16, CUDA graphs)."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path

import httpx

from vllm_zeroprefill.server import ServerStartError, VllmServer, asyncep_args, free_port
from zeroprefill.tiny_model import TinyMoEConfig

EMBED = ["--runner", "pooling", "--convert", "embed"]
# One logit per input: a cross-encoder, so /score and /rerank are served too.
CLASSIFY = ["--runner", "pooling", "--convert", "classify", "--hf-overrides", '{"num_labels": 1}']

@dataclass(frozen=True)
class ServerCase:
    """A generated checkpoint and the runner flags it is served with."""

    name: str
    model: TinyMoEConfig
    runner_args: tuple[str, ...]

    @property
    def task(self) -> str:
        return "classify" if "classify" in self.runner_args else "embed"


TEXTS = [
    "Mixture-of-experts models route every token to a few experts.",
    "Paris is the capital of France.",
    "a",
    "Rerank these documents by how well they answer the question. " * 6,
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
]


def add_classifier_head(model_dir, hidden_size: int) -> None:
    """A trained-looking ``score`` head: without one vLLM's classify conversion leaves it unset."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn((1, hidden_size), generator=generator) / hidden_size**0.5
    save_file({"score.weight": weight}, str(model_dir / "score.safetensors"))


def post(server: VllmServer, path: str, body: dict) -> dict:
    response = httpx.post(server.url + path, json=body, timeout=120)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:500]}"
    return response.json()


def mixed_requests(model: str, count: int, seed: int = 0) -> list[tuple[str, dict]]:
    """Embeddings of varied lengths (many sharing long prefixes), scores and pooling calls."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(TEXTS[:2] + TEXTS[3:4]).split()[: rng.randint(4, 40)]) for _ in range(6)]
    requests = []
    for i in range(count):
        words = " ".join(rng.choice(TEXTS).split()[: rng.randint(1, 12)])
        text = f"{rng.choice(prefixes)} {words} #{i}" if rng.random() < 0.5 else f"{words} #{i}"
        kind = rng.random()
        if kind < 0.7:
            requests.append(("/v1/embeddings", {"model": model, "input": text}))
        elif kind < 0.85:
            requests.append(("/score", {"model": model, "text_1": text, "text_2": [rng.choice(TEXTS), words]}))
        else:
            requests.append(("/pooling", {"model": model, "input": [text, words]}))
    return requests


def values(path: str, answer: dict) -> list:
    if path == "/v1/embeddings":
        return [d["embedding"] for d in answer["data"]]
    if path == "/score":
        return [d["score"] for d in answer["data"]]
    return [d["data"] for d in answer["data"]]


async def send_all(server: VllmServer, requests, concurrency: int) -> list[tuple[int, dict]]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:

        async def send(path, body):
            async with limit:
                response = await client.post(path, json=body)
                return response.status_code, response.json()

        return await asyncio.gather(*(send(path, body) for path, body in requests))




# -- GPU servers ---------------------------------------------------------------------------------


def gpu_server_env(tmp: Path, name: str) -> dict[str, str]:
    """One compile cache per server: servers that start together never write the same entry."""
    return {"VLLM_CACHE_ROOT": str(tmp / f"cache-{name}"), "VLLM_LOGGING_LEVEL": "INFO"}


def gpu_server_pair(model_dir: Path, args: list[str], tmp: Path, name: str) -> tuple[VllmServer, VllmServer]:
    """Stock vLLM (one GPU) and AsyncEP (DP=2) on ``model_dir`` with ``args``, not started.

    The AsyncEP server gets a DP coordination port of its own: servers started together must
    not share vLLM's default one.
    """
    stock = VllmServer(model_dir, args, tmp / f"{name}-stock.log", device="cuda", env=gpu_server_env(tmp, f"{name}-stock"))
    asyncep = VllmServer(model_dir, [*args, *asyncep_args(2), "--data-parallel-rpc-port", str(free_port())],
                         tmp / f"{name}-asyncep.log", device="cuda", env=gpu_server_env(tmp, f"{name}-asyncep"))
    return stock, asyncep


def cosines(got: list, want: list):
    """Per-row cosine similarity of two equally shaped nested lists (numpy array)."""
    import numpy as np

    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def gather_buffer_lines(log: str) -> list[str]:
    """AsyncEP's start-up lines (one per rank): layers, transport, gather buffers' memory."""
    return [line[line.index("AsyncEP: streaming"):] for line in log.splitlines() if "AsyncEP: streaming" in line]


@dataclass
class LongRequestRun:
    """What :func:`serve_long_requests` saw: the layer count that started (None: none did)."""

    layers: int | None
    attempts: list[dict]  # the layer counts that did not start, with their log tails
    answers: list[tuple[int, dict]]
    log: str
    log_tail: str


def serve_long_requests(model_dir: Path, name: str, layer_counts: list[int], extra_args: list[str], tmp: Path,
                        lengths: tuple[int, ...] = (32000, 32000, 128)) -> LongRequestRun:
    """Start AsyncEP (DP=2) on ``model_dir`` with the first of ``layer_counts`` that starts, send
    embedding requests of ``lengths`` random tokens at once, stop it; what happened."""
    import numpy as np

    attempts: list[dict] = []
    for layers in layer_counts:
        args = [*extra_args, "--hf-overrides", json.dumps({"num_hidden_layers": layers}), *asyncep_args(2)]
        server = VllmServer(model_dir, args, tmp / f"{name}-{layers}.log", device="cuda",
                            env=gpu_server_env(tmp, f"{name}-{layers}"))
        try:
            server.start().wait_healthy(timeout_s=900)
        except ServerStartError as exc:
            attempts.append({"layers": layers, "started": False, "log_tail": str(exc)[-1500:]})
            server.stop()
            continue
        generator = np.random.default_rng(0)
        requests = [("/v1/embeddings", {"model": str(model_dir), "input": generator.integers(3, 500, n).tolist()})
                    for n in lengths]
        try:
            answers = asyncio.run(send_all(server, requests, concurrency=len(requests)))
            log, tail = server.log_path.read_text(errors="replace"), server.log_tail(40)
        finally:
            server.stop()
        return LongRequestRun(layers, attempts, answers, log, tail)
    return LongRequestRun(None, attempts, [], "", attempts[-1]["log_tail"] if attempts else "")
