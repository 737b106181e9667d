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
  (``max_new_tokens`` 0, ``return_logprob``, ``logprob_start_len`` 0), |delta logprob| per prompt
  token; next-token scores from ``/v1/score`` (each prompt split into a query and one item, the
  labels the fp32 reference finds most likely next, ``apply_softmax``), |delta probability| per
  label; and embeddings from ``/v1/embeddings``, 1 - cosine per prompt; each side's errors are
  summarised (median, 90th and 99th percentiles, worst) and the summary keys report 1 - the worst.
  The plugin passes by ``zeroprefill.accuracy``'s rule: its median error at most twice stock's,
  its tail (the 99th percentile from 1,000 values up, else the worst) at most stock's plus
  ``--margin`` (``--score-margin``, ``--embedding-margin``); where stock cannot serve the endpoint,
  transformers in bf16 stands in for stock. Then ``--requests`` concurrent requests of
  varied lengths, mixed over the plugin's generating (``/generate``, ``/v1/score``) and embedding
  servers, none of which may fail.
- ``30b``: Qwen3-30B-A3B shapes (``common/model_configs/qwen3-30b-a3b.json`` with ``--layers-30b``
  layers, ``--load-format dummy``), stock then plugin, each alone on the GPU with CUDA graphs on:
  throughput of ``--prompt-tokens``-token prefill-only requests from ``--concurrency`` clients in
  a closed loop for ``--duration-s`` after ``--warmup-s``, the KV-cache size (SGLang's
  ``max_total_num_tokens``) and peak GPU memory (nvidia-smi), and what each GPU did during the
  measured seconds (``gpu_telemetry``: SM clock against its maximum, power against its limit,
  temperature, utilization, clock-event reasons; ``_serving.GpuTelemetry``).

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
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The script's parts, beside it: the servers (_sglang_servers), the accuracy checks
# (_sglang_accuracy), what it shares with vllm_serve.py (_serving). Names the tests reach (and
# replace) as sglang_gpu_check.<name> are imported here too.
from _serving import (GpuMemoryPeak, GpuTelemetry, closed_loop_clients, gpu_memory_used_mib,  # noqa: E402
                      per_second, telemetry_line, write_json)
from _sglang_accuracy import (COMPARISON_PROMPT_TOKENS, ENDPOINTS, SCORE_LABELS, comparison_prompts, compare_endpoint,  # noqa: E402, F401
                              absolute_errors, cosine, default_reference_device, embedding_errors, fp32_reference,
                              judge, mixed_requests, prompt_token, score_labels, score_reference, sglang_session)
from _sglang_servers import (ServerSpec, failure_reason, gpu_names, gpu_tag, log_facts, progress,  # noqa: E402, F401
                             start_all, stop_all)
from zeroprefill import accuracy  # noqa: E402
from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe, quantize_checkpoint_block_fp8, write_dummy_checkpoint  # noqa: E402

STOCK_LAUNCHER = "sglang.launch_server"
PLUGIN_LAUNCHER = "sglang_zeroprefill.launch_server"
QWEN3_30B_CONFIG = REPO / "common" / "model_configs" / "qwen3-30b-a3b.json"
SIMILARITY_METRIC = ("prompt log-probabilities: 1 - max |delta logprob| over all prompt tokens; embeddings: cosine; "
                     "/v1/score: 1 - max |delta probability| over the prompts' label tokens; "
                     "min_cosine_vs_fp32_* over the comparisons both stock and the plugin served")
#: The tiny checkpoints: FP8 needs the expert width and the k/v width in whole 128-blocks.
TINY_MODEL = TinyMoEConfig(num_experts=8, top_k=2, num_layers=4, hidden_size=256, expert_intermediate_size=128,
                           num_attention_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048)


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
        write_json(self.path, self.data)


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
    by_comparison: dict[str, dict[str, float]] = {}
    verdicts = []
    for name, comparison in tiny.get("comparisons", {}).items():
        sides = {side: comparison[side]["similarity"] for side in similarity if "similarity" in comparison.get(side, {})}
        if "transformers_bf16" in comparison:
            sides["transformers_bf16"] = 1.0 - comparison["transformers_bf16"]["distance"]
        by_comparison[name] = sides
        if "plugin" in sides and "stock" in sides:  # the min keys compare like with like
            for side in similarity:
                similarity[side].append(sides[side])
        verdicts.append(comparison.get("plugin_passes"))
    layouts = big.get("servers", {})
    throughput = {side: layouts.get(side, {}).get("tokens_per_s") for side in ("stock", "plugin")}
    servers = {**tiny.get("servers", {}), **{f"30b-{k}": v for k, v in layouts.items()}}
    return {
        "min_cosine_vs_fp32_plugin": min(similarity["plugin"], default=None),
        "min_cosine_vs_fp32_stock": min(similarity["stock"], default=None),
        "similarity_metric": SIMILARITY_METRIC,
        "similarity_by_comparison": by_comparison,
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
    """The bf16 and block-FP8 checkpoints (generated once; the same seed and shapes).

    The FP8 one quantizes the routed experts only: SGLang builds Qwen3-MoE's router unquantized
    and would load a quantized one's e4m3 values without their scales (stock was 3.77 nats off
    fp32 that way on an H100), which no experts kernel could be judged against.
    """
    models = {"bf16": work_dir / "tiny-qwen3-moe", "fp8": work_dir / "tiny-qwen3-moe-fp8-experts"}
    for fmt, path in models.items():
        if not (path / "config.json").is_file():
            progress(f"generating the tiny {fmt} Qwen3-MoE in {path}")
            generate_tiny_moe(path, TINY_MODEL)
            if fmt == "fp8":
                quantize_checkpoint_block_fp8(path, experts_only=True)
    return models


def tiny_server_specs(models: dict[str, Path], args: argparse.Namespace) -> list[ServerSpec]:
    common = ("--dtype", "bfloat16", "--mem-fraction-static", str(args.tiny_mem_fraction),
              "--max-total-tokens", str(args.tiny_max_total_tokens),
              "--context-length", str(TINY_MODEL.max_position_embeddings), "--sampling-backend", "pytorch")
    asyncep = ("--moe-a2a-backend", "asyncep")
    # Triton FP8 GEMMs on both sides: no minutes of DeepGEMM JIT at start-up (SGLang's and ours)
    no_deepgemm = (("SGLANG_ENABLE_JIT_DEEPGEMM", "0"), ("ZEROPREFILL_EXPERTS_KERNEL", "triton"))
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


def endpoint_requests(prompts: Sequence[Sequence[int]], reference: dict[str, list]) -> dict[str, list]:
    """Each endpoint's requests for ``prompts``: the prompts themselves, and for ``/v1/score`` each
    prompt with the labels its checkpoint's fp32 reference finds most likely next."""
    return {"logprobs": list(prompts), "embeddings": list(prompts),
            "score": [(ids, score_labels(last)) for ids, last in zip(prompts, reference["last_logprobs"], strict=True)]}


def endpoint_references(reference: dict[str, list], requests: dict[str, list]) -> dict[str, list]:
    """What each endpoint should answer to ``requests`` by ``reference`` (a :func:`fp32_reference`)."""
    return {"logprobs": reference["logprobs"], "embeddings": reference["embeddings"],
            "score": [score_reference(last, labels)
                      for last, (_, labels) in zip(reference["last_logprobs"], requests["score"], strict=True)]}


def run_tiny(args: argparse.Namespace, results: Results) -> None:
    part = results.new_part("tiny", {"model": vars(TINY_MODEL), "margin": args.margin, "requests": args.requests,
                                     "embedding_margin": args.embedding_margin, "score_margin": args.score_margin,
                                     "mem_fraction_static": args.tiny_mem_fraction,
                                     "max_total_tokens": args.tiny_max_total_tokens})
    models = prepare_tiny_models(args.work_dir)
    prompts = comparison_prompts(TINY_MODEL.vocab_size)
    device = args.reference_device or default_reference_device()
    progress(f"float32 reference with transformers on {device}: {len(prompts)} prompts of {COMPARISON_PROMPT_TOKENS} tokens")
    references = {fmt: fp32_reference(path, prompts, device) for fmt, path in models.items()}
    progress("the same in bf16 (what a plain bf16 implementation is off by, where stock serves nothing)")
    bf16_values = fp32_reference(models["bf16"], prompts, device, dtype="bfloat16")
    requests = {fmt: endpoint_requests(prompts, reference) for fmt, reference in references.items()}
    expected = {fmt: endpoint_references(references[fmt], requests[fmt]) for fmt in references}
    bf16_answers = endpoint_references(bf16_values, requests["bf16"])  # transformers in bf16, on the bf16 checkpoint
    bf16_references = {}
    for endpoint in ENDPOINTS:
        spread = accuracy.error_summary(endpoint.errors(bf16_answers[endpoint.name], expected["bf16"][endpoint.name]))
        bf16_references[f"bf16/{endpoint.name}"] = {"distance": spread["max"], "error_percentiles": spread}
    part["prompt_tokens"] = list(COMPARISON_PROMPT_TOKENS)
    part["score_labels"] = {fmt: [labels for _, labels in requests[fmt]["score"]] for fmt in requests}
    results.save()

    servers, records = start_all(tiny_server_specs(models, args), args.logs_dir, args.start_timeout_s)
    part["servers"] = records
    results.save()
    margins = {"logprobs": args.margin, "embeddings": args.embedding_margin, "score": args.score_margin}
    try:
        part["comparisons"] = comparisons = {}
        for fmt in references:
            for endpoint in ENDPOINTS:
                names = {side: f"{side}-{fmt}{endpoint.server_suffix}" for side in ("stock", "plugin")}
                if not any(name in records for name in names.values()):
                    continue
                result = compare_endpoint(servers, records, names, endpoint, requests[fmt][endpoint.name],
                                          expected[fmt][endpoint.name])
                if f"{fmt}/{endpoint.name}" in bf16_references:
                    result["transformers_bf16"] = bf16_references[f"{fmt}/{endpoint.name}"]
                result.update(judge(result["plugin"], result["stock"], margins[endpoint.name],
                                    result.get("transformers_bf16"), result["errors"]))
                comparisons[f"{fmt}/{endpoint.name}"] = result
                progress(f"{fmt}/{endpoint.name}: {result['why']} -> plugin passes: {result['plugin_passes']}")
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
    complete in the ``duration_s`` after ``warmup_s`` are the measurement (``answers_by_second``:
    per second of it, level where the load was steady), and what the GPUs did in those seconds
    (``gpu_telemetry``)."""
    rng = random.Random(seed)
    latencies: list[float] = []  # of the requests completed in the measured window
    answered_at: list[float] = []  # when they completed
    errors: list[str] = []
    measure_from = time.monotonic() + warmup_s
    stop_at = measure_from + duration_s

    async with sglang_session(concurrency) as session:

        async def one() -> None:
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
                return
            done = time.monotonic()
            if measure_from <= done <= stop_at:
                latencies.append(done - sent)
                answered_at.append(done)

        clients = closed_loop_clients(concurrency, stop_at, one)
        await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
        with GpuTelemetry() as telemetry:  # the measured window only
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        await asyncio.gather(*clients)
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count, "failed": len(errors), "errors": errors[:5],
        "tokens_per_s": round(count * prompt_tokens / duration_s, 1),
        "requests_per_s": round(count / duration_s, 2),
        "p50_latency_s": round(latencies[count // 2], 3) if count else None,
        "p99_latency_s": round(latencies[min(count - 1, int(count * 0.99))], 3) if count else None,
        "answers_by_second": per_second(answered_at, measure_from, stop_at),
        "gpu_telemetry": telemetry.summary,
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
                    progress(f"{name}: {telemetry_line(record['gpu_telemetry'])}")
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
                      help="nats the plugin's tail |delta logprob| may exceed stock's by")
    tiny.add_argument("--score-margin", type=_positive(float), default=0.05,
                      help="probability the plugin's tail |delta| on /v1/score may exceed stock's by")
    tiny.add_argument("--embedding-margin", type=_positive(float), default=1e-3,
                      help="1 - cosine the plugin may exceed stock's by")
    tiny.add_argument("--tiny-max-total-tokens", type=_positive(int), default=65536,
                      help="each tiny server's KV pool (small: six servers size theirs at once, and one "
                           "that measures free memory while another allocates a pool fails its start)")
    tiny.add_argument("--tiny-mem-fraction", type=_fraction, default=0.09)  # 0.06 left block-FP8 stock no KV room on an H100 (2026-12-06)
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
