"""Requests and helpers shared by the vLLM server tests (CPU: fp32; GPU: bf16, CUDA graphs).

The GPU tests measure each server against a float32 reference of the same checkpoint
(:class:`Fp32Reference`): random-weight models amplify bf16 rounding, so AsyncEP is held to
stock vLLM's own distance from that reference (:func:`judge`), not to stock's answers.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from vllm_zeroprefill.server import ServerStartError, VllmServer, asyncep_args
from zeroprefill import accuracy
from zeroprefill.ports import free_port
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
    """The numbers of a pooling endpoint's answer, in input order."""
    if path == "/v1/embeddings":
        return [d["embedding"] for d in answer["data"]]
    if path == "/score":
        return [d["score"] for d in answer["data"]]
    if path == "/classify":
        return [d["probs"] for d in answer["data"]]
    if path == "/rerank":
        return [r["relevance_score"] for r in sorted(answer["results"], key=lambda r: r["index"])]
    return [d["data"] for d in answer["data"]]


async def send_all(server: VllmServer, requests, concurrency: int) -> list[tuple[int, dict]]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:

        async def send(path, body):
            async with limit:
                response = await client.post(path, json=body)
                return response.status_code, response.json()

        return await asyncio.gather(*(send(path, body) for path, body in requests))


def endpoint_requests(model: str, task: str, texts: list[str]) -> list[tuple[str, dict]]:
    """Fixed texts on every pooling endpoint the task serves."""
    requests = [("/pooling", {"model": model, "input": texts}),
                ("/score", {"model": model, "text_1": "What do experts do in a MoE model?", "text_2": texts})]
    if task == "embed":
        return [*requests, ("/v1/embeddings", {"model": model, "input": texts})]
    return [*requests, ("/classify", {"model": model, "input": texts}),
            ("/rerank", {"model": model, "query": "Which city is the capital of France?", "documents": texts})]


def classify_mix(model: str, count: int) -> list[tuple[str, dict]]:
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


# -- GPU servers ---------------------------------------------------------------------------------


def gpu_server_env(tmp: Path, name: str) -> dict[str, str]:
    """One compile cache per server: servers that start together never write the same entry.

    No DeepGEMM warm-up: on a fresh machine vLLM 0.26 JIT-builds hundreds of DeepGEMM kernels
    for a block-FP8 model before it serves (451 for the tiny FP8 model; the first H100 run of the
    FP8 checks ran out of time there). These servers check answers, not speed: a kernel built at
    first use changes no result.
    """
    return {"VLLM_CACHE_ROOT": str(tmp / f"cache-{name}"), "VLLM_LOGGING_LEVEL": "INFO",
            "VLLM_DEEP_GEMM_WARMUP": "skip"}


def gpu_server_pair(model_dir: Path, args: list[str], tmp: Path, name: str,
                    asyncep_ranks: int) -> tuple[VllmServer, VllmServer]:
    """Stock vLLM (one GPU) and AsyncEP (``asyncep_ranks`` data-parallel ranks, one GPU each) on
    ``model_dir`` with ``args``, not started.

    Each server gets a DP coordination port of its own: servers started together must not
    share vLLM's default one.
    """
    stock = VllmServer(model_dir, args, tmp / f"{name}-stock.log", device="cuda", env=gpu_server_env(tmp, f"{name}-stock"))
    asyncep = VllmServer(model_dir, [*args, *asyncep_args(asyncep_ranks), "--data-parallel-rpc-port", str(free_port())],
                         tmp / f"{name}-asyncep.log", device="cuda", env=gpu_server_env(tmp, f"{name}-asyncep"))
    return stock, asyncep


def stop_all(servers: list[VllmServer]) -> None:
    """Stop servers side by side (each waits for its process group to exit)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(servers))) as pool:
        list(pool.map(VllmServer.stop, servers))


def cosines(got: list, want: list):
    """Per-row cosine similarity of two equally shaped nested lists (numpy array)."""
    import numpy as np

    a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- the float32 reference ----------------------------------------------------------------------


def dequantized_fp32_copy(model_dir: Path, out: Path) -> Path:
    """``model_dir`` with every block-FP8 weight dequantised (``weight * weight_scale_inv`` per
    128x128 block) to float32 and no ``quantization_config``: the function the stored weights define."""
    import shutil

    from safetensors.torch import load_file, save_file

    from zeroprefill.common.block_fp8 import FP8_DTYPE, dequantize_block_fp8

    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    tensors = load_file(str(out / "model.safetensors"))
    plain = {name: (dequantize_block_fp8(t, tensors[name + "_scale_inv"]) if t.dtype == FP8_DTYPE else t.float())
             for name, t in tensors.items() if not name.endswith("_scale_inv")}
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


class Fp32Reference:
    """The served checkpoint in transformers, float32, in this process: what vLLM's pooling
    runner computes, without its bf16 (or FP8) rounding.

    vLLM 0.26-0.34 pools a Qwen-MoE served with ``--runner pooling`` by its last token (its
    start-up log: "Resolved pooling config: pooling_type=LAST ..., use_activation=True"):

    - ``--convert embed``: the final norm's output at the last token, L2-normalised
      (``/v1/embeddings``; ``/pooling``, whose default task is ``embed``); ``/score`` is the
      cosine of the two embeddings;
    - ``--convert classify``, one label: ``sigmoid(score . h_last)`` (``/classify``,
      ``/pooling``); ``/score`` and ``/rerank`` encode the pair as
      ``tokenizer(text=query, text_pair=document)`` (vLLM's cross-encoder default).

    A block-FP8 checkpoint is dequantised first (:func:`dequantized_fp32_copy`). Matrix
    products run in full fp32 (no TF32); the experts run transformers' eager loop (its grouped
    GEMM is not an fp32 path on every release). Sequences go through in right-padded batches:
    under causal attention, padding after a sequence does not change its last token.
    """

    def __init__(self, model_dir: Path, task: str, device: str, scratch: Path, batch: int = 32) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from zeroprefill.tiny_model import no_transformers_progress_bars

        config = json.loads((Path(model_dir) / "config.json").read_text())
        if "quantization_config" in config:
            model_dir = dequantized_fp32_copy(Path(model_dir), scratch / f"{Path(model_dir).name}-fp32")
        self.task, self.device, self.batch = task, device, batch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        eager_experts = {"experts_implementation": "eager"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
        torch.backends.cuda.matmul.allow_tf32 = False
        with no_transformers_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **eager_experts)
        self.backbone = model.model.to(device).eval()
        self.score = None
        if task == "classify":
            from safetensors.torch import load_file

            self.score = load_file(str(Path(model_dir) / "score.safetensors"))["score.weight"].float().to(device)
        self._last: dict[tuple[int, ...], object] = {}

    def answers(self, requests: list[tuple[str, dict]]) -> list[list]:
        """What :func:`values` of each request's answer should be, computed in fp32."""
        plans = [self._plan(path, body) for path, body in requests]
        self._run([ids for plan in plans for ids in plan[1]])
        return [self._finish(kind, sequences) for kind, sequences in plans]

    def _ids(self, text: str, pair: str | None = None) -> tuple[int, ...]:
        return tuple(self.tokenizer(text=text, text_pair=pair)["input_ids"])

    def _plan(self, path: str, body: dict) -> tuple[str, list[tuple[int, ...]]]:
        """(how to turn last hidden states into the answer, the token sequences it needs)."""
        if path in ("/v1/embeddings", "/pooling", "/classify"):
            texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
            return ("each", [self._ids(t) for t in texts])
        query, documents = (body["text_1"], body["text_2"]) if path == "/score" else (body["query"], body["documents"])
        documents = [documents] if isinstance(documents, str) else documents
        if self.task == "embed":  # an embedding model scores by cosine
            return ("cosine", [self._ids(query), *(self._ids(d) for d in documents)])
        return ("each_scalar", [self._ids(query, d) for d in documents])

    def _run(self, sequences: list[tuple[int, ...]]) -> None:
        import torch

        todo = sorted(set(sequences) - set(self._last), key=len)
        for start in range(0, len(todo), self.batch):
            chunk = todo[start:start + self.batch]
            width = len(chunk[-1])
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            with torch.no_grad():
                hidden = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            for row, seq in enumerate(chunk):
                self._last[seq] = hidden[row, len(seq) - 1]

    def _pooled(self, seq: tuple[int, ...]):
        import torch

        h = self._last[seq]
        if self.task == "embed":
            return torch.nn.functional.normalize(h, dim=0)
        return torch.sigmoid(self.score @ h)  # [1]: the one label's probability

    def _finish(self, kind: str, sequences: list[tuple[int, ...]]) -> list:
        pooled = [self._pooled(seq) for seq in sequences]
        if kind == "each":
            return [p.tolist() for p in pooled]
        if kind == "each_scalar":
            return [float(p[0]) for p in pooled]
        return [float(pooled[0] @ p) for p in pooled[1:]]  # unit vectors: the dot is the cosine


def is_vector_answer(path: str, task: str) -> bool:
    """Answers compared by cosine (embeddings) rather than by absolute difference (scores, probabilities)."""
    return task == "embed" and path in ("/v1/embeddings", "/pooling")


@dataclass
class Fp32Distance:
    """How far one server's answers lie from the fp32 reference: a cosine per vector, an
    absolute difference per score or probability."""

    cosines: list[float] = field(default_factory=list)
    score_diffs: list[float] = field(default_factory=list)

    def add(self, got: list, want: list, vector: bool) -> None:
        import numpy as np

        if vector:
            self.cosines += cosines(got, want).tolist()
        else:
            got_, want_ = np.asarray(got, dtype=np.float64).ravel(), np.asarray(want, dtype=np.float64).ravel()
            assert got_.shape == want_.shape, f"{got_.shape} != {want_.shape}"
            self.score_diffs += np.abs(got_ - want_).tolist()

    @property
    def min_cosine(self) -> float | None:
        return min(self.cosines, default=None)

    @property
    def max_score_diff(self) -> float | None:
        return max(self.score_diffs, default=None)

    def record(self) -> dict:
        import numpy as np

        def quantiles(values: list[float], qs: tuple[float, ...]) -> dict[str, float]:
            return {f"{q:g}%": float(np.percentile(values, q)) for q in qs} if values else {}

        return {"vectors": len(self.cosines), "min_cosine": self.min_cosine,
                "cosine_percentiles": quantiles(self.cosines, (0.1, 1, 50)),
                "scores": len(self.score_diffs), "max_score_diff": self.max_score_diff,
                "score_diff_percentiles": quantiles(self.score_diffs, (50, 99, 99.9))}


def compare_with_fp32(requests: list[tuple[str, dict]], answers: dict[str, list[tuple[int, dict]]],
                      expected: list[list], task: str) -> dict[str, Fp32Distance]:
    """Each server's (``answers``: name -> (status, body) per request) distance from the
    fp32 ``expected`` values; only answered requests count (the callers assert none failed)."""
    distances = {name: Fp32Distance() for name in answers}
    for index, (path, _) in enumerate(requests):
        for name, server_answers in answers.items():
            status, answer = server_answers[index]
            if status == 200:
                distances[name].add(values(path, answer), expected[index], is_vector_answer(path, task))
    return distances


#: The verdict on AsyncEP, relative to stock vLLM, both measured against the fp32 reference as
#: errors (1 - cosine for vectors, absolute difference for scores and probabilities): the rule of
#: ``zeroprefill.accuracy`` (median within 2x stock's, tail within stock's + TAIL_MARGIN).
TAIL_MARGIN = 0.05
#: Stock's median error above this: the reference is not what vLLM computes (pooling,
#: tokenisation), and no verdict on AsyncEP can be drawn from it.
REFERENCE_MAX_MEDIAN_ERROR = 0.05
VERDICT_RULE = {**accuracy.RULE, "tail_margin": TAIL_MARGIN, "reference_max_median_error": REFERENCE_MAX_MEDIAN_ERROR}


def judge(asyncep: Fp32Distance, stock: Fp32Distance) -> list[str]:
    """What is wrong, if anything: stock far from the reference (then the reference is wrong),
    or AsyncEP further from it than stock by more than :data:`VERDICT_RULE` allows."""
    problems = []
    if stock.cosines:
        problems += _judge_errors("cosine error", [1 - c for c in asyncep.cosines], [1 - c for c in stock.cosines])
    if stock.score_diffs:
        problems += _judge_errors("score difference", asyncep.score_diffs, stock.score_diffs)
    return problems


def _judge_errors(what: str, ours: list[float], theirs: list[float]) -> list[str]:
    their = accuracy.error_summary(theirs)
    if their["50%"] > REFERENCE_MAX_MEDIAN_ERROR:
        return [f"stock's median {what} to fp32 is {their['50%']:.3g} > {REFERENCE_MAX_MEDIAN_ERROR}: the "
                "reference is not what vLLM computes"]
    return accuracy.compare(f"{what} to fp32", accuracy.error_summary(ours), their, TAIL_MARGIN, us="AsyncEP")


def fp32_summary(comparisons: list[dict[str, dict]]) -> dict:
    """Each server's worst distance to fp32 over ``comparisons`` (each: server name ->
    :meth:`Fp32Distance.record`): ``min_cosine_vs_fp32_<server>``, ``max_score_diff_vs_fp32_<server>``."""
    summary = {}
    for server in ("asyncep", "stock"):
        records = [c[server] for c in comparisons if server in c]
        summary[f"min_cosine_vs_fp32_{server}"] = min(
            (r["min_cosine"] for r in records if r["min_cosine"] is not None), default=None)
        summary[f"max_score_diff_vs_fp32_{server}"] = max(
            (r["max_score_diff"] for r in records if r["max_score_diff"] is not None), default=None)
    return summary


def gather_buffer_lines(log: str) -> list[str]:
    """AsyncEP's start-up lines (one per rank): layers, experts stored, transport, gather buffers' memory."""
    return [line[line.index("AsyncEP: "):] for line in log.splitlines() if "AsyncEP: " in line and "gather buffers" in line]


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
