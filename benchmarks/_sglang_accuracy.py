"""``sglang_gpu_check.py``'s accuracy checks: served values against a float32 reference.

- the requests: prompt log-probabilities from ``/generate``, embeddings from ``/v1/embeddings``,
  next-token scores from ``/v1/score`` (:func:`prompt_token`: ids SGLang reports faithfully), and
  the mixed concurrent requests; :data:`ENDPOINTS` says how each is asked and measured;
- the errors (|delta logprob| per prompt token, 1 - cosine per embedding), their summary
  (median, 90th and 99th percentiles, worst) and :func:`judge`, the plugin against stock by
  ``zeroprefill.accuracy``'s rule (or, where stock cannot serve the endpoint, against
  transformers in bf16: what a correct bf16 implementation of the same model is off by);
- :func:`fp32_reference`: transformers in float32 (or bf16) on the same checkpoint (an FP8 one
  dequantised), and :func:`compare_endpoint`, one endpoint of one checkpoint, both sides.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _serving import client_session
from zeroprefill import accuracy
from _sglang_servers import Server

COMPARISON_PROMPT_TOKENS = (2, 7, 31, 128, 511, 1024, 1900)
SCORE_LABELS = 4  # label tokens per /v1/score request

# -- requests ---------------------------------------------------------------------------------


async def prompt_logprobs(session: Any, url: str, ids: Sequence[int]) -> list[float]:
    """``logprob(ids[i] | ids[:i])`` for ``i >= 1``, from ``/generate``."""
    body = {"input_ids": list(ids), "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True, "logprob_start_len": 0}
    async with session.post(f"{url}/generate", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"/generate answered {response.status}: {(await response.text())[:300]}")
        entries = (await response.json())["meta_info"]["input_token_logprobs"]
    if [entry[1] for entry in entries] != list(ids):
        raise RuntimeError(f"/generate returned log-probabilities for other tokens than the {len(ids)} sent")
    return [float(entry[0]) for entry in entries[1:]]


async def embedding(session: Any, url: str, ids: Sequence[int]) -> list[float]:
    async with session.post(f"{url}/v1/embeddings", json={"input": list(ids)}) as response:
        if response.status != 200:
            raise RuntimeError(f"/v1/embeddings answered {response.status}: {(await response.text())[:300]}")
        return (await response.json())["data"][0]["embedding"]


async def score(session: Any, url: str, request: tuple[Sequence[int], Sequence[int]]) -> list[float]:
    """``/v1/score`` of ``request`` = (ids, labels): the prompt split into a query and one item, the
    probabilities of ``labels`` as the next token, softmax-normalised over them (``apply_softmax``)."""
    ids, labels = request
    half = len(ids) // 2
    body = {"query": list(ids[:half]), "items": [list(ids[half:])], "label_token_ids": list(labels),
            "apply_softmax": True}
    async with session.post(f"{url}/v1/score", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"/v1/score answered {response.status}: {(await response.text())[:300]}")
        scores = (await response.json())["scores"]
    if len(scores) != 1 or len(scores[0]) != len(labels):
        raise RuntimeError(f"/v1/score returned {[len(s) for s in scores]} scores, not one list of {len(labels)}")
    return [float(x) for x in scores[0]]


def sglang_session(concurrency: int = 100) -> Any:
    """At most ``concurrency`` connections; 600 s per request."""
    return client_session(concurrency, timeout_s=600)


# -- comparison arithmetic --------------------------------------------------------------------


def absolute_errors(served: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> list[float]:
    """|served - reference| of every value (prompt token, label token) of every prompt."""
    return [abs(s - r) for got, want in zip(served, reference, strict=True) for s, r in zip(got, want, strict=True)]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def embedding_errors(served: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> list[float]:
    """1 - cosine of each served embedding with its reference."""
    return [1.0 - cosine(s, r) for s, r in zip(served, reference, strict=True)]


def judge(plugin: dict, stock: dict, margin: float, bf16_reference: dict | None = None,
          what: str = "error") -> dict:
    """Whether the plugin is as close to the reference as stock is, by ``zeroprefill.accuracy``'s
    rule (median within 2x stock's, tail within stock's + ``margin``).

    ``plugin`` / ``stock``: ``{"error_percentiles": accuracy.error_summary(...)}`` where measured,
    else ``{"served": False, ...}``. Where stock has none, ``bf16_reference`` (transformers in
    bf16) stands in for it: the plugin must then be as close as a plain bf16 implementation is.
    """
    if "error_percentiles" not in plugin:
        return {"plugin_passes": None, "why": f"the plugin did not serve it: {plugin.get('reason')}"}
    ours = plugin["error_percentiles"]
    for name, baseline in (("stock", stock), ("transformers bf16", bf16_reference or {})):
        if "error_percentiles" in baseline:
            theirs = baseline["error_percentiles"]
            problems = accuracy.compare(what, ours, theirs, margin, them=name)
            point, our_tail = accuracy.tail(ours)
            why = "; ".join(problems) or (
                f"median {ours['50%']:.3g} vs {name} {theirs['50%']:.3g}, {point} {our_tail:.4g} vs "
                f"{accuracy.tail(theirs)[1]:.4g} + margin {margin:g}")
            return {"plugin_passes": not problems, "why": f"{why} (worst {ours['max']:.4g} vs {theirs['max']:.4g})"}
    return {"plugin_passes": None, "why": "stock did not serve it and no bf16 reference was computed"}


# -- the float32 reference --------------------------------------------------------------------


def prompt_token(rng: random.Random, vocab_size: int) -> int:
    """A random prompt token id in ``[1, vocab_size - 1)``: SGLang reports ids ``>= vocab_size - 1``
    as 0 in ``input_token_logprobs`` (it clips them, for image-token hashes), so they are avoided."""
    return rng.randrange(1, vocab_size - 1)


def comparison_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[prompt_token(rng, vocab_size) for _ in range(n)] for n in COMPARISON_PROMPT_TOKENS]


def fp32_reference(model_dir: Path, prompts: Sequence[Sequence[int]], device: str,
                   dtype: str = "float32") -> dict[str, list[list[float]]]:
    """transformers in ``dtype`` (float32: the reference; bfloat16: a plain bf16 implementation to
    measure against it): prompt log-probabilities, last-token L2-normalised final hidden states, and
    the last position's log-probabilities over the vocabulary (for :func:`score_reference`)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = _float32_checkpoint(model_dir)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).to(device).eval()
    logprobs, embeddings, last_logprobs = [], [], []
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([list(ids)], device=device)
            hidden = model.model(input_ids=input_ids).last_hidden_state[0]  # [T, H], after the final norm
            log_softmax = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
            logprobs.append(log_softmax[:-1].gather(1, input_ids[0, 1:, None])[:, 0].tolist())
            embeddings.append(torch.nn.functional.normalize(hidden[-1].float(), dim=-1).tolist())
            last_logprobs.append(log_softmax[-1].tolist())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"logprobs": logprobs, "embeddings": embeddings, "last_logprobs": last_logprobs}


def score_labels(last_logprobs: Sequence[float], count: int = SCORE_LABELS) -> list[int]:
    """The ``count`` most likely next tokens by the reference, among the ids SGLang reports
    faithfully: labels whose probabilities are far from zero, so that the scores say something."""
    usable = [i for i in range(len(last_logprobs)) if 1 <= i < len(last_logprobs) - 1]
    return sorted(usable, key=lambda i: last_logprobs[i], reverse=True)[:count]


def score_reference(last_logprobs: Sequence[float], labels: Sequence[int]) -> list[float]:
    """What ``/v1/score`` with ``apply_softmax`` answers for ``labels``: their softmax."""
    picked = [last_logprobs[i] for i in labels]
    top = max(picked)
    weights = [math.exp(x - top) for x in picked]
    return [w / sum(weights) for w in weights]


def default_reference_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _float32_checkpoint(model_dir: Path) -> Path:
    """``model_dir`` itself, or for a block-FP8 checkpoint a dequantised float32 copy beside it."""
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" not in config:
        return model_dir
    import torch
    from safetensors.torch import load_file, save_file

    from zeroprefill.common.block_fp8 import dequantize_block_fp8

    out = model_dir.with_name(model_dir.name + "-dequantized-fp32")
    out.mkdir(exist_ok=True)
    block = config["quantization_config"]["weight_block_size"][0]
    tensors = load_file(str(model_dir / "model.safetensors"))
    dequantized = {
        name: (dequantize_block_fp8(t, tensors[name + "_scale_inv"], block) if name + "_scale_inv" in tensors
               else t.to(torch.float32))
        for name, t in tensors.items() if not name.endswith("_scale_inv")
    }
    save_file(dequantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))
    for extra in model_dir.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            shutil.copy(extra, out / extra.name)
    return out


# -- one endpoint, and mixed requests ---------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One endpoint the tiny part compares: which servers serve it, how one request is asked,
    how its answers are measured against the reference."""

    name: str
    server_suffix: str  # "-embedding": the servers started with --is-embedding
    ask: Callable[[Any, str, Any], Awaitable[list[float]]]
    errors: Callable[[Sequence[Sequence[float]], Sequence[Sequence[float]]], list[float]]
    metric: str  # what the similarity (1 - the worst error) is
    errors_text: str  # what one error is


ENDPOINTS = (
    Endpoint("logprobs", "", prompt_logprobs, absolute_errors, "1 - max |delta logprob|",
             "|delta logprob| per prompt token"),
    Endpoint("embeddings", "-embedding", embedding, embedding_errors, "cosine", "1 - cosine per prompt"),
    Endpoint("score", "", score, absolute_errors,
             "1 - max |delta probability|",
             f"|delta probability| per prompt and label (/v1/score, softmax over the reference's {SCORE_LABELS} "
             "most likely next tokens)"),
)


async def _served(endpoint: Endpoint, server: Server, requests: Sequence[Any]) -> list[list[float]]:
    async with sglang_session() as session:
        return [await endpoint.ask(session, server.url, request) for request in requests]


def compare_endpoint(servers: dict[str, Server], records: dict[str, dict], names: dict[str, str], endpoint: Endpoint,
                     requests: Sequence[Any], reference: Sequence[Sequence[float]]) -> dict:
    """One endpoint of one checkpoint: stock's and the plugin's errors against the reference."""
    result: dict[str, Any] = {"metric": endpoint.metric, "errors": endpoint.errors_text}
    values = {}
    for side, name in names.items():
        if name not in servers:
            result[side] = {"served": False, "server": name, "reason": records[name]["reason"]}
            continue
        try:
            values[side] = asyncio.run(_served(endpoint, servers[name], requests))
        except Exception as exc:  # a served endpoint that fails is a result, not a crash
            result[side] = {"served": False, "server": name, "reason": f"{type(exc).__name__}: {exc}"}
            continue
        spread = accuracy.error_summary(endpoint.errors(values[side], reference))
        result[side] = {"served": True, "server": name, "distance": spread["max"], "similarity": 1.0 - spread["max"],
                        "error_percentiles": spread}
    if len(values) == 2:
        spread = accuracy.error_summary(endpoint.errors(values["plugin"], values["stock"]))
        result["plugin_vs_stock_distance"] = spread["max"]
        result["plugin_vs_stock_error_percentiles"] = spread
    return result


async def mixed_requests(generate_url: str, embedding_url: str, count: int, vocab_size: int, hidden_size: int,
                         max_tokens: int, seed: int = 1) -> dict:
    """``count`` requests at once, of random lengths, each at random one of: prompt
    log-probabilities or a ``/v1/score`` (of :data:`SCORE_LABELS` random labels) from the
    generating server, an embedding from the embedding server."""
    rng = random.Random(seed)
    kinds = ("/generate", "/v1/score", "/v1/embeddings")
    jobs = [(rng.choice(kinds), [prompt_token(rng, vocab_size) for _ in range(rng.randint(2, max_tokens))])
            for _ in range(count)]
    labels = [prompt_token(rng, vocab_size) for _ in range(SCORE_LABELS)]
    errors: list[str] = []

    async def one(session: Any, kind: str, ids: list[int]) -> None:
        try:
            if kind == "/v1/embeddings":
                vector = await embedding(session, embedding_url, ids)
                if len(vector) != hidden_size or not all(math.isfinite(x) for x in vector):
                    raise RuntimeError(f"an embedding of {len(vector)} values, not {hidden_size} finite ones")
            elif kind == "/v1/score":
                scores = await score(session, generate_url, (ids, labels))
                if not all(math.isfinite(x) for x in scores) or abs(sum(scores) - 1) > 1e-3:
                    raise RuntimeError(f"scores {scores} are not a distribution over the labels")
            else:
                values = await prompt_logprobs(session, generate_url, ids)
                if not all(math.isfinite(x) for x in values):
                    raise RuntimeError("a non-finite log-probability")
        except Exception as exc:
            errors.append(f"{kind} ({len(ids)} tokens): {type(exc).__name__}: {exc}")

    started = time.monotonic()
    async with sglang_session(concurrency=count) as session:
        await asyncio.gather(*(one(session, kind, ids) for kind, ids in jobs))
    return {"sent": count, "failed": len(errors), **{f"to {kind}": sum(k == kind for k, _ in jobs) for kind in kinds},
            "prompt_tokens": sum(len(ids) for _, ids in jobs), "seconds": round(time.monotonic() - started, 2),
            "errors": errors[:10]}
