"""SGLang on one GPU: the plugin against stock SGLang and a float32 reference, then Qwen3-30B-A3B speed.

    python benchmarks/sglang_gpu_check.py --parts tiny    # about 5 minutes on one H100 or H200
    python benchmarks/sglang_gpu_check.py --parts 30b     # about 7 minutes (48 layers)

Parts:

- ``tiny``: generated Qwen3-MoE checkpoints (:mod:`zeroprefill.tiny_model`), bf16 and block FP8
  in Qwen3-*-FP8's format, served together on the GPU (small ``--mem-fraction-static``) by stock
  ``python -m sglang.launch_server`` and by ``python -m sglang_zeroprefill.launch_server
  --moe-a2a-backend asyncep``, generating and with ``--is-embedding``. Every endpoint a server
  serves is compared with transformers running the same checkpoint in float32 on the GPU, all
  in this process (the FP8 checkpoint dequantised): prompt log-probabilities from ``/generate``
  (``max_new_tokens`` 0, ``return_logprob``, ``logprob_start_len`` 0) as 1 - max |delta logprob|,
  embeddings from ``/v1/embeddings`` as the cosine. The plugin passes where its distance to the
  reference is within stock's plus ``--margin``, or, where stock cannot serve the endpoint, where
  its cosine reaches ``--embedding-min-cosine``. Then ``--requests`` concurrent requests of
  varied lengths, mixed over the plugin's generating and embedding servers, none of which may fail.
- ``30b``: Qwen3-30B-A3B shapes (``common/model_configs/qwen3-30b-a3b.json`` with ``--layers-30b``
  layers, ``--load-format dummy``), stock then plugin, each alone on the GPU with CUDA graphs on:
  throughput of ``--prompt-tokens``-token prefill-only requests from ``--concurrency`` clients in
  a closed loop for ``--duration-s`` after ``--warmup-s``, the KV-cache size (SGLang's
  ``max_total_num_tokens``) and peak GPU memory (nvidia-smi).

Every server's CUDA graphs are read from its log: prefill and decode capture, and how many
prefill batches ran in a graph. A server that fails to start is recorded with the reason its log
gives and its log tail, and the rest runs. The JSON, ``sglang_gpu_check-<gpu>x<GPUs>.json`` in
``--results-dir`` (default ``benchmarks/results``), is rewritten after every measurement; a part
already in it is kept unless run again. Server logs are kept beside it, in ``<name>-logs/``.

Needs this checkout installed (``pip install -e .``) beside SGLang; no network. Stock servers run
with ``SGLANG_PLUGINS=none`` so that the installed plugin stays out of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe, quantize_checkpoint_block_fp8, write_dummy_checkpoint  # noqa: E402

STOCK_LAUNCHER = "sglang.launch_server"
PLUGIN_LAUNCHER = "sglang_zeroprefill.launch_server"
QWEN3_30B_CONFIG = REPO / "common" / "model_configs" / "qwen3-30b-a3b.json"
SIMILARITY_METRIC = "prompt log-probabilities: 1 - max |delta logprob| over all prompt tokens; embeddings: cosine"
#: Lines after which an SGLang server is dead even if its process lingers (it waits for core dumps).
FATAL_LOG_MARKERS = ("Received sigquit from a child process", "hit an exception")
#: The tiny checkpoints: FP8 needs the expert width and the k/v width in whole 128-blocks.
TINY_MODEL = TinyMoEConfig(num_experts=8, top_k=2, num_layers=4, hidden_size=256, expert_intermediate_size=128,
                           num_attention_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048)
COMPARISON_PROMPT_TOKENS = (2, 7, 31, 128, 511, 1024, 1900)
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _START:6.1f}s] {message}", flush=True)


# -- servers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """One SGLang server: which launcher, which checkpoint, which flags."""

    name: str
    launcher: str
    model_dir: Path
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    is_plugin: bool = False
    is_embedding: bool = False


class ServerStartError(RuntimeError):
    def __init__(self, reason: str, log_tail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.log_tail = log_tail


class Server:
    """A server process with its log file; ``start`` returns at once, ``wait_ready`` blocks."""

    def __init__(self, spec: ServerSpec, logs_dir: Path) -> None:
        self.spec = spec
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs_dir / f"{spec.name}.log"
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after_s: float | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.spec.launcher, "--model-path", str(self.spec.model_dir),
                "--host", "127.0.0.1", "--port", str(self.port), *self.spec.args]

    def start(self) -> None:
        env = {**os.environ, **dict(self.spec.env)}
        if not self.spec.is_plugin:
            env["SGLANG_PLUGINS"] = "none"  # a name no plugin has: stock SGLang, installed plugin or not
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.started_at = time.monotonic()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float) -> None:
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        deadline = self.started_at + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"exited with code {self.process.returncode} during start-up")
            if any(marker in self.log_text() for marker in FATAL_LOG_MARKERS):
                self._fail("a server process failed during start-up")
            try:
                with direct.open(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        self.ready_after_s = round(time.monotonic() - self.started_at, 1)
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self._fail(f"not healthy within {timeout_s:.0f} s")

    def _fail(self, what: str) -> None:
        text = self.log_text()
        self.stop()
        raise ServerStartError(f"{what}: {failure_reason(text) or 'the log names no error'}", log_tail(text))

    def stop(self) -> None:
        stop_all([self])


def stop_all(servers: Sequence[Server], grace_s: float = 20.0) -> None:
    """SIGTERM to every server's process group, then SIGKILL to whatever is left of them."""
    running = [server.process for server in servers if server.process is not None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in running:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def failure_reason(text: str) -> str | None:
    """The line of a server log that says why it failed: our one-line errors first, then the last exception."""
    lines = text.splitlines()
    for line in lines:
        if "AsyncEPConfigError:" in line:
            return line.split("AsyncEPConfigError:", 1)[1].strip()
        if line.startswith("sglang_zeroprefill: "):
            return line.removeprefix("sglang_zeroprefill: ").strip()
    exceptions = [line.strip() for line in lines if re.match(r"^\s*[\w.]*(Error|Exception)\b.*:", line)]
    return exceptions[-1] if exceptions else None


def log_facts(text: str) -> dict[str, Any]:
    """What an SGLang log says about KV capacity and CUDA graphs."""
    kv = re.findall(r"max_total_num_tokens=(\d+)", text)
    prefill_batches = [line for line in text.splitlines() if "Prefill batch" in line]
    return {
        "max_total_num_tokens": int(kv[-1]) if kv else None,
        "cuda_graphs": {
            "prefill_captured": bool(re.search(r"Capture \w+ prefill CUDA graph end", text, re.IGNORECASE)),
            "decode_captured": bool(re.search(r"Capture \w+ decode .*? end\.", text, re.IGNORECASE)),
            "prefill_batches": len(prefill_batches),
            "prefill_batches_in_graph": sum("cuda graph: True" in line for line in prefill_batches),
        },
        "asyncep_active": "ZeRO-Prefill AsyncEP" in text,
    }


def start_all(specs: Sequence[ServerSpec], logs_dir: Path, timeout_s: float) -> tuple[dict[str, Server], dict[str, dict]]:
    """Start ``specs`` together; returns the healthy servers and every server's record."""
    servers = {spec.name: Server(spec, logs_dir) for spec in specs}
    records: dict[str, dict] = {}
    for server in servers.values():
        server.start()
        progress(f"starting {server.spec.name}: {' '.join(server.command()[1:])}")

    def wait(server: Server) -> None:
        try:
            server.wait_ready(timeout_s)
            records[server.spec.name] = {"served": True, "ready_after_s": server.ready_after_s}
            progress(f"{server.spec.name} ready after {server.ready_after_s} s")
        except ServerStartError as exc:
            records[server.spec.name] = {"served": False, "reason": exc.reason, "log_tail": exc.log_tail}
            progress(f"{server.spec.name} did not start: {exc.reason}")

    threads = [threading.Thread(target=wait, args=(server,)) for server in servers.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, record in records.items():
        record.update(command=" ".join(servers[name].command()[1:]), env=dict(servers[name].spec.env),
                      log=str(servers[name].log_path))
    return {name: s for name, s in servers.items() if records[name]["served"]}, records


class GpuMemoryPeak:
    """Peak ``memory.used`` of each GPU by nvidia-smi, sampled in a thread (empty without nvidia-smi)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_mib: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuMemoryPeak:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            used = gpu_memory_used_mib()
            self.peak_mib = [max(pair) for pair in zip(self.peak_mib, used)] if self.peak_mib else used
            self._stop.wait(self.interval_s)


def gpu_memory_used_mib() -> list[int]:
    """``memory.used`` of every GPU, in MiB (empty without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return [int(line) for line in out.split()]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []


def gpu_names() -> list[str]:
    """Every GPU's name from nvidia-smi (no CUDA context in this process)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    if not out:
        raise SystemExit("sglang_gpu_check: nvidia-smi names no GPU; run this on a GPU machine")
    return out.splitlines()


def gpu_tag(name: str) -> str:
    """``"h100"`` / ``"h200"`` / the name's model word, for the result file's name."""
    for tag in ("h100", "h200"):
        if tag in name.lower():
            return tag
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w != "nvidia"]
    return words[0] if words else "gpu"


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


def _session(concurrency: int = 100) -> Any:
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                 timeout=aiohttp.ClientTimeout(total=600))


# -- comparison arithmetic --------------------------------------------------------------------


def logprob_distance(served: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> float:
    """max |served - reference| over every prompt token of every prompt."""
    return max(abs(s - r) for got, want in zip(served, reference, strict=True)
               for s, r in zip(got, want, strict=True))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def embedding_distance(served: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> float:
    """1 - the smallest cosine between a served embedding and its reference."""
    return 1.0 - min(cosine(s, r) for s, r in zip(served, reference, strict=True))


def judge(plugin: dict, stock: dict, margin: float, min_similarity: float | None = None) -> dict:
    """Whether the plugin's distance to the reference is within stock's plus ``margin``.

    ``plugin`` / ``stock``: ``{"distance": d}`` where measured, else ``{"served": False, ...}``.
    Where stock has no distance, ``min_similarity`` (1 - distance) bounds the plugin's instead.
    """
    if "distance" not in plugin:
        return {"plugin_passes": None, "why": f"the plugin did not serve it: {plugin.get('reason')}"}
    if "distance" in stock:
        bound = stock["distance"] + margin
        return {"plugin_passes": plugin["distance"] <= bound,
                "why": f"plugin distance {plugin['distance']:.4g} vs stock {stock['distance']:.4g} + margin {margin}"}
    if min_similarity is None:
        return {"plugin_passes": None, "why": "stock did not serve it and no absolute bound applies"}
    return {"plugin_passes": 1.0 - plugin["distance"] >= min_similarity,
            "why": f"stock did not serve it; plugin similarity {1.0 - plugin['distance']:.6f} vs floor {min_similarity}"}


# -- the float32 reference --------------------------------------------------------------------


def prompt_token(rng: random.Random, vocab_size: int) -> int:
    """A random prompt token id in ``[1, vocab_size - 1)``: SGLang reports ids ``>= vocab_size - 1``
    as 0 in ``input_token_logprobs`` (it clips them, for image-token hashes), so they are avoided."""
    return rng.randrange(1, vocab_size - 1)


def comparison_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[prompt_token(rng, vocab_size) for _ in range(n)] for n in COMPARISON_PROMPT_TOKENS]


def fp32_reference(model_dir: Path, prompts: Sequence[Sequence[int]], device: str) -> dict[str, list[list[float]]]:
    """transformers in float32: prompt log-probabilities and last-token L2-normalised final hidden states."""
    import torch
    from transformers import AutoModelForCausalLM

    source = _float32_checkpoint(model_dir)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    logprobs, embeddings = [], []
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([list(ids)], device=device)
            hidden = model.model(input_ids=input_ids).last_hidden_state[0]  # [T, H], after the final norm
            log_softmax = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
            logprobs.append(log_softmax[:-1].gather(1, input_ids[0, 1:, None])[:, 0].tolist())
            embeddings.append(torch.nn.functional.normalize(hidden[-1], dim=-1).tolist())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"logprobs": logprobs, "embeddings": embeddings}


def _default_reference_device() -> str:
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


# -- results ----------------------------------------------------------------------------------


@dataclass
class Results:
    """The result file: parts measured now replace the same parts of an earlier run."""

    path: Path
    gpu: str
    gpu_count: int = 1
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
        self.data.update(script="benchmarks/sglang_gpu_check.py", gpu=self.gpu, gpu_count=self.gpu_count,
                         similarity_metric=SIMILARITY_METRIC, versions=_versions())
        self.data.setdefault("parts", {})

    def new_part(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        part = self.data["parts"][name] = {"settings": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        return part

    def save(self) -> None:
        self.data["summary"] = summarize(self.data["parts"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n")
        temporary.replace(self.path)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in ("sglang", "torch", "transformers", "zeroprefill"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def summarize(parts: dict[str, Any]) -> dict[str, Any]:
    """The summary keys, from whatever parts are present."""
    tiny, big = parts.get("tiny", {}), parts.get("30b", {})
    similarity: dict[str, list[float]] = {"plugin": [], "stock": []}
    verdicts = []
    for comparison in tiny.get("comparisons", {}).values():
        for side in similarity:
            if "similarity" in comparison.get(side, {}):
                similarity[side].append(comparison[side]["similarity"])
        verdicts.append(comparison.get("plugin_passes"))
    layouts = big.get("servers", {})
    throughput = {side: layouts.get(side, {}).get("tokens_per_s") for side in ("stock", "plugin")}
    servers = {**tiny.get("servers", {}), **{f"30b-{k}": v for k, v in layouts.items()}}
    return {
        "min_cosine_vs_fp32_plugin": min(similarity["plugin"], default=None),
        "min_cosine_vs_fp32_stock": min(similarity["stock"], default=None),
        "similarity_metric": SIMILARITY_METRIC,
        "plugin_passes": None if not verdicts else all(v is not False for v in verdicts),
        "requests_failed": tiny.get("mixed_requests", {}).get("failed"),
        "plugin_vs_stock_30b_2k": (round(throughput["plugin"] / throughput["stock"], 4)
                                   if throughput["plugin"] and throughput["stock"] else None),
        "tokens_per_s_per_gpu_30b": {name: record.get("tokens_per_s_per_gpu") for name, record in layouts.items()},
        "cudagraphs": {name: record["cuda_graphs"] for name, record in servers.items() if "cuda_graphs" in record},
        "servers_failed": sorted(name for name, record in servers.items() if not record.get("served", True)),
    }


# -- part: tiny -------------------------------------------------------------------------------


def prepare_tiny_models(work_dir: Path) -> dict[str, Path]:
    """The bf16 and block-FP8 checkpoints (generated once; the same seed and shapes)."""
    models = {"bf16": work_dir / "tiny-qwen3-moe", "fp8": work_dir / "tiny-qwen3-moe-fp8"}
    for fmt, path in models.items():
        if not (path / "config.json").is_file():
            progress(f"generating the tiny {fmt} Qwen3-MoE in {path}")
            generate_tiny_moe(path, TINY_MODEL)
            if fmt == "fp8":
                quantize_checkpoint_block_fp8(path)
    return models


def tiny_server_specs(models: dict[str, Path], args: argparse.Namespace) -> list[ServerSpec]:
    common = ("--dtype", "bfloat16", "--mem-fraction-static", str(args.tiny_mem_fraction),
              "--context-length", str(TINY_MODEL.max_position_embeddings), "--sampling-backend", "pytorch")
    asyncep = ("--moe-a2a-backend", "asyncep")
    no_deepgemm = (("SGLANG_ENABLE_JIT_DEEPGEMM", "0"),)  # Triton FP8 GEMMs: no minutes of JIT at start-up
    return [
        ServerSpec("stock-bf16", args.stock_launcher, models["bf16"], common),
        ServerSpec("plugin-bf16", args.plugin_launcher, models["bf16"],
                   (*common, *asyncep, "--load-balance-method", "zeroprefill"), is_plugin=True),
        ServerSpec("stock-bf16-embedding", args.stock_launcher, models["bf16"], (*common, "--is-embedding"),
                   is_embedding=True),
        ServerSpec("plugin-bf16-embedding", args.plugin_launcher, models["bf16"], (*common, "--is-embedding", *asyncep),
                   is_plugin=True, is_embedding=True),
        ServerSpec("stock-fp8", args.stock_launcher, models["fp8"], common, no_deepgemm),
        ServerSpec("plugin-fp8", args.plugin_launcher, models["fp8"], (*common, *asyncep), no_deepgemm, is_plugin=True),
    ]


async def _served(server: Server, ids_list: Sequence[Sequence[int]]) -> dict:
    ask = embedding if server.spec.is_embedding else prompt_logprobs
    async with _session() as session:
        return {"values": [await ask(session, server.url, ids) for ids in ids_list]}


def compare_endpoint(servers: dict[str, Server], records: dict[str, dict], names: dict[str, str],
                     prompts: Sequence[Sequence[int]], reference: Sequence[Sequence[float]], embeddings: bool) -> dict:
    """One endpoint of one checkpoint: stock's and the plugin's distance to the reference."""
    distance = embedding_distance if embeddings else logprob_distance
    result: dict[str, Any] = {"metric": "cosine" if embeddings else "1 - max |delta logprob|"}
    values = {}
    for side, name in names.items():
        if name not in servers:
            result[side] = {"served": False, "server": name, "reason": records[name]["reason"]}
            continue
        try:
            values[side] = asyncio.run(_served(servers[name], prompts))["values"]
        except Exception as exc:  # a served endpoint that fails is a result, not a crash
            result[side] = {"served": False, "server": name, "reason": f"{type(exc).__name__}: {exc}"}
            continue
        d = distance(values[side], reference)
        result[side] = {"served": True, "server": name, "distance": d, "similarity": 1.0 - d}
    if len(values) == 2:
        result["plugin_vs_stock_distance"] = distance(values["plugin"], values["stock"])
    return result


async def mixed_requests(generate_url: str, embedding_url: str, count: int, vocab_size: int, hidden_size: int,
                         max_tokens: int, seed: int = 1) -> dict:
    """``count`` requests at once, each to one of the two endpoints at random, of random length."""
    rng = random.Random(seed)
    jobs = [(rng.random() < 0.5, [prompt_token(rng, vocab_size) for _ in range(rng.randint(1, max_tokens))])
            for _ in range(count)]
    errors: list[str] = []

    async def one(session: Any, is_embedding: bool, ids: list[int]) -> None:
        try:
            if is_embedding:
                vector = await embedding(session, embedding_url, ids)
                if len(vector) != hidden_size or not all(math.isfinite(x) for x in vector):
                    raise RuntimeError(f"an embedding of {len(vector)} values, not {hidden_size} finite ones")
            else:
                values = await prompt_logprobs(session, generate_url, ids)
                if not all(math.isfinite(x) for x in values):
                    raise RuntimeError("a non-finite log-probability")
        except Exception as exc:
            errors.append(f"{'/v1/embeddings' if is_embedding else '/generate'} ({len(ids)} tokens): "
                          f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    async with _session(concurrency=count) as session:
        await asyncio.gather(*(one(session, is_embedding, ids) for is_embedding, ids in jobs))
    return {"sent": count, "failed": len(errors), "to_embeddings": sum(e for e, _ in jobs),
            "prompt_tokens": sum(len(ids) for _, ids in jobs), "seconds": round(time.monotonic() - started, 2),
            "errors": errors[:10]}


def run_tiny(args: argparse.Namespace, results: Results) -> None:
    part = results.new_part("tiny", {"model": vars(TINY_MODEL), "margin": args.margin, "requests": args.requests,
                                     "embedding_min_cosine": args.embedding_min_cosine,
                                     "mem_fraction_static": args.tiny_mem_fraction})
    models = prepare_tiny_models(args.work_dir)
    prompts = comparison_prompts(TINY_MODEL.vocab_size)
    device = args.reference_device or _default_reference_device()
    progress(f"float32 reference with transformers on {device}: {len(prompts)} prompts of {COMPARISON_PROMPT_TOKENS} tokens")
    references = {fmt: fp32_reference(path, prompts, device) for fmt, path in models.items()}
    part["prompt_tokens"] = list(COMPARISON_PROMPT_TOKENS)
    results.save()

    servers, records = start_all(tiny_server_specs(models, args), args.logs_dir, args.start_timeout_s)
    part["servers"] = records
    results.save()
    try:
        part["comparisons"] = comparisons = {}
        for fmt, reference in references.items():
            for endpoint, embeddings in (("logprobs", False), ("embeddings", True)):
                suffix = "-embedding" if embeddings else ""
                names = {"stock": f"stock-{fmt}{suffix}", "plugin": f"plugin-{fmt}{suffix}"}
                if not any(name in records for name in names.values()):
                    continue
                result = compare_endpoint(servers, records, names, prompts, reference[endpoint], embeddings)
                min_similarity = args.embedding_min_cosine if embeddings else None
                result.update(judge(result["plugin"], result["stock"], args.margin if not embeddings
                                    else args.embedding_margin, min_similarity))
                comparisons[f"{fmt}/{endpoint}"] = result
                progress(f"{fmt}/{endpoint}: {result['why']} -> plugin passes: {result['plugin_passes']}")
                results.save()
        generating, embedding_server = servers.get("plugin-bf16"), servers.get("plugin-bf16-embedding")
        if generating and embedding_server:
            progress(f"{args.requests} mixed concurrent requests to plugin-bf16 and plugin-bf16-embedding")
            part["mixed_requests"] = asyncio.run(mixed_requests(
                generating.url, embedding_server.url, args.requests, TINY_MODEL.vocab_size, TINY_MODEL.hidden_size,
                TINY_MODEL.max_position_embeddings - 16))
            progress(f"mixed requests: {part['mixed_requests']['failed']} of {args.requests} failed")
        else:
            part["mixed_requests"] = {"sent": 0, "failed": None, "why": "a plugin bf16 server did not start"}
    finally:
        stop_all(list(servers.values()))
        for name, server in servers.items():
            records[name].update(log_facts(server.log_text()))
        results.save()


# -- part: 30b --------------------------------------------------------------------------------


def prepare_30b_model(work_dir: Path, layers: int) -> Path:
    """A ``--load-format dummy`` directory: the shipped config with ``layers`` layers, and a tokenizer."""
    config = json.loads(QWEN3_30B_CONFIG.read_text())
    if not 1 <= layers <= config["num_hidden_layers"]:
        raise SystemExit(f"sglang_gpu_check: --layers-30b must be 1 to {config['num_hidden_layers']}, got {layers}")
    out = work_dir / f"qwen3-30b-a3b-{layers}l-dummy"
    if not (out / "config.json").is_file():
        write_dummy_checkpoint(QWEN3_30B_CONFIG, out)
        (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
    return out


async def closed_loop(url: str, concurrency: int, prompt_tokens: int, vocab_size: int, duration_s: float,
                      warmup_s: float, seed: int = 2) -> dict:
    """``concurrency`` clients sending prefill-only requests back to back; the requests that
    complete in the ``duration_s`` after ``warmup_s`` are the measurement."""
    rng = random.Random(seed)
    latencies: list[float] = []  # of the requests completed in the measured window
    errors: list[str] = []
    measure_from = time.monotonic() + warmup_s
    stop_at = measure_from + duration_s

    async def client(session: Any) -> None:
        while time.monotonic() < stop_at:
            body = {"input_ids": [prompt_token(rng, vocab_size) for _ in range(prompt_tokens)],
                    "sampling_params": {"max_new_tokens": 0}}
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/generate", json=body) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"/generate answered {response.status}")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            done = time.monotonic()
            if measure_from <= done <= stop_at:
                latencies.append(done - sent)

    async with _session(concurrency) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count, "failed": len(errors), "errors": errors[:5],
        "tokens_per_s": round(count * prompt_tokens / duration_s, 1),
        "requests_per_s": round(count / duration_s, 2),
        "p50_latency_s": round(latencies[count // 2], 3) if count else None,
        "p99_latency_s": round(latencies[min(count - 1, int(count * 0.99))], 3) if count else None,
    }


@dataclass(frozen=True)
class Layout:
    """A way to serve Qwen3-30B-A3B: the launcher and the flags that choose the layout."""

    gpus: int
    is_plugin: bool
    args: tuple[str, ...] = ()

    @property
    def launcher_kind(self) -> str:
        return "plugin" if self.is_plugin else "stock"


_DP2_ATTENTION = ("--dp-size", "2", "--enable-dp-attention", "--tp-size", "2", "--ep-size", "2")  # every release's spelling
LAYOUTS = {
    "stock": Layout(1, False),
    "plugin": Layout(1, True, ("--moe-a2a-backend", "asyncep")),
    # Two GPUs: AsyncEP against SGLang's expert parallelism (tokens gathered over DP attention,
    # or its DeepEP all-to-all where DeepEP is installed) and its two weight-moving features.
    "plugin-asyncep2": Layout(2, True, (*_DP2_ATTENTION, "--moe-a2a-backend", "asyncep")),
    "stock-dp2-ep2": Layout(2, False, _DP2_ATTENTION),
    "stock-deepep2": Layout(2, False, (*_DP2_ATTENTION, "--moe-a2a-backend", "deepep")),
    "stock-tp2-ep2": Layout(2, False, ("--tp-size", "2", "--ep-size", "2")),
    # Two replicas; every layer's weights sharded over them and prefetched (SGLang's offloader).
    "stock-offload-sharded-gpu2": Layout(2, False, ("--dp-size", "2", "--offload-mode", "sharded_gpu",
                                                    "--offload-group-size", "1", "--offload-num-in-group", "1",
                                                    "--offload-prefetch-step", "1")),
    # SGLang's own weight prefetch instead of the token all-to-all (written for gpt-oss).
    "stock-dwdp2": Layout(2, False, ("--tp-size", "2", "--dwdp-size", "2")),
}


def run_30b(args: argparse.Namespace, results: Results) -> None:
    """Each layout in ``args.layouts``; layouts measured by an earlier call stay in the part."""
    earlier = results.data["parts"].get("30b", {}).get("servers", {})
    settings = {"model": f"qwen3-30b-a3b, {args.layers_30b} of 48 layers, dummy weights, bf16",
                "prompt_tokens": args.prompt_tokens, "concurrency": args.concurrency, "duration_s": args.duration_s,
                "warmup_s": args.warmup_s, "mem_fraction_static": args.mem_fraction_30b,
                "requests": "/generate, max_new_tokens 0, random token ids"}
    part = results.new_part("30b", {"requests": settings["requests"]})
    part["servers"] = {name: record for name, record in earlier.items() if name not in args.layouts}
    model = prepare_30b_model(args.work_dir, args.layers_30b)
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    common = ("--load-format", "dummy", "--dtype", "bfloat16", "--skip-tokenizer-init", "--sampling-backend", "pytorch",
              "--mem-fraction-static", str(args.mem_fraction_30b))
    for name in args.layouts:  # one at a time: each needs most of every GPU it uses
        layout = LAYOUTS[name]
        launcher = args.plugin_launcher if layout.is_plugin else args.stock_launcher
        spec = ServerSpec(name, launcher, model, (*common, *layout.args), is_plugin=layout.is_plugin)
        baseline_mib = gpu_memory_used_mib()
        with GpuMemoryPeak() as memory:
            servers, records = start_all([spec], args.logs_dir, args.start_timeout_s)
            record = part["servers"][name] = {"gpus": layout.gpus, "settings": settings, **records[name]}
            server = servers.get(name)
            try:
                if server is not None:
                    progress(f"{name}: {args.concurrency} clients x {args.prompt_tokens} tokens for "
                             f"{args.duration_s} s after {args.warmup_s} s")
                    record.update(asyncio.run(closed_loop(server.url, args.concurrency, args.prompt_tokens, vocab_size,
                                                          args.duration_s, args.warmup_s)))
                    record["tokens_per_s_per_gpu"] = round(record["tokens_per_s"] / layout.gpus, 1)
                    progress(f"{name}: {record['tokens_per_s']} tokens/s ({record['tokens_per_s_per_gpu']} per GPU), "
                             f"{record['failed']} failed")
            finally:
                if server is not None:
                    server.stop()
                    record.update(log_facts(server.log_text()))
        record.update(gpu_memory_baseline_mib=baseline_mib, gpu_memory_peak_mib=memory.peak_mib)
        results.save()


# -- command line -----------------------------------------------------------------------------


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("tiny", "30b"), default=["tiny", "30b"])
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results",
                        help="where sglang_gpu_check-<gpu>x<GPUs>.json and its server logs go")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".work" / "sglang_gpu_check",
                        help="where the checkpoints are generated (kept for the next run)")
    parser.add_argument("--start-timeout-s", type=_positive(float), default=420.0)
    tiny = parser.add_argument_group("tiny")
    tiny.add_argument("--requests", type=_positive(int), default=500)
    tiny.add_argument("--margin", type=_positive(float), default=0.05,
                      help="log-probability distance the plugin may exceed stock's by")
    tiny.add_argument("--embedding-margin", type=_positive(float), default=1e-3,
                      help="1 - cosine the plugin may exceed stock's by")
    tiny.add_argument("--embedding-min-cosine", type=_fraction, default=0.99,
                      help="the plugin's floor where stock serves no embeddings")
    tiny.add_argument("--tiny-mem-fraction", type=_fraction, default=0.06)
    tiny.add_argument("--reference-device", default=None, help="default: cuda if torch sees a GPU, else cpu")
    big = parser.add_argument_group("30b")
    big.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=["stock", "plugin"],
                     help="how to serve it, one after another (the *2 layouts need two GPUs)")
    big.add_argument("--layers-30b", type=_positive(int), default=48)
    big.add_argument("--prompt-tokens", type=_positive(int), default=2048)
    big.add_argument("--concurrency", type=_positive(int), default=64)
    big.add_argument("--duration-s", type=_positive(float), default=20.0)
    big.add_argument("--warmup-s", type=_positive(float), default=5.0)
    big.add_argument("--mem-fraction-30b", type=_fraction, default=0.85)
    launchers = parser.add_argument_group("launchers (tests pass stand-ins)")
    launchers.add_argument("--stock-launcher", default=STOCK_LAUNCHER)
    launchers.add_argument("--plugin-launcher", default=PLUGIN_LAUNCHER)
    args = parser.parse_args(argv)
    args.parts = list(dict.fromkeys(args.parts))
    args.layouts = list(dict.fromkeys(args.layouts))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = gpu_names()
    name = names[0]
    needed = max([LAYOUTS[layout].gpus for layout in args.layouts if "30b" in args.parts] + [1])
    if needed > len(names):
        raise SystemExit(f"sglang_gpu_check: the layouts asked for need {needed} GPUs, nvidia-smi names {len(names)}")
    args.out = args.results_dir / f"sglang_gpu_check-{gpu_tag(name)}x{needed}.json"
    args.logs_dir = args.out.with_name(args.out.stem + "-logs")
    results = Results(args.out, name, needed)
    progress(f"{name}: parts {', '.join(args.parts)} -> {args.out}")
    for part in args.parts:
        (run_tiny if part == "tiny" else run_30b)(args, results)
    summary = results.data["summary"]
    progress("summary: " + json.dumps({k: v for k, v in summary.items() if k != "cudagraphs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
