"""AsyncEP against stock vLLM's layouts, through the real server, same GPUs, same requests.

The choice a user makes is ``vllm serve MODEL ...`` as it is, or with ``--moe-backend
asyncep``. For every (model, layout, ``--max-num-batched-tokens``) this script starts that
server (``--load-format dummy`` with the shipped config, the layer count reduced to N — the
same N for every layout — so per-layer figures scale to the full model), waits until it is
healthy (torch.compile and CUDA-graph capture happen then, outside all timing), sends a
warm-up burst, and measures prefill-only embedding requests of each context length:

- closed loop: ``--concurrency`` clients send back to back for ``--duration-s``: peak input
  tokens/s per GPU, requests/s, p50/p99 latency;
- open loop: Poisson arrivals for ``--duration-s`` at fractions (``--open-loop-fractions``) of
  the reference layout's closed-loop requests/s at that context (``--reference-layout``, run
  first), so every layout sees the same offered rates: achieved throughput and p50/p99 at
  equal offered load.

Requests carry fresh random token ids (no prefix-cache hits) and ask for base64 embeddings
(so the client parses little). With ``--profile-context C`` each server is also profiled at
that context: vLLM's torch profiler over a few engine steps of closed-loop load, broken down
by ``trace_breakdown.py`` into GPU time per kernel category and exposed communication
(``profile`` in each run). AsyncEP runs under its own prefill-only scheduler, whose
default step budget is the planner's saturation budget (logged; recorded as ``step_budget``);
``asyncep-copy-engine-token-budget`` gives it ``--max-num-batched-tokens``' worth of FLOPs per
step instead, as the stock layouts fill. MFU counts the true FLOPs of the N-layer model
(``zeroprefill.common.cost_model.request_flops``: linear layers, causal attention) against
989 TFLOP/s bf16 per GPU. GPU memory is nvidia-smi's peak during the run.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python benchmarks/vllm_serve.py \\
        --models qwen3-235b-a22b:16 --contexts 512 4096 --out benchmarks/results/vllm_serve-h200x2.json

Stock vLLM ships no tuned MoE tiles for some expert-parallel shapes (it logs "Using
default MoE config"); ``--stock-moe-configs DIR`` gives the stock layouts the tables
``tune_vllm_moe.py`` writes, and each run records which table its kernel used
(``moe_kernel_configs``).

A layout whose server does not start, or dies, is recorded with its log tail; the rest run.
Each server's log is kept beside the JSON (``<out>-logs/``).
The JSON is rewritten after every measurement, and ``--merge`` adds to an existing file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trace_breakdown import breakdown_dir  # noqa: E402
from vllm_zeroprefill.server import ServerStartError, VllmServer, asyncep_args, free_port  # noqa: E402
from zeroprefill.common.cost_model import matmul_params_per_token, request_flops  # noqa: E402
from zeroprefill.common.model_spec import MoEModelSpec  # noqa: E402
from zeroprefill.tiny_model import write_dummy_checkpoint  # noqa: E402

PEAK_BF16_TFLOPS = 989.0
NUM_GPUS = 2
TRANSPORT_ENV = "ZEROPREFILL_ASYNCEP_TRANSPORT"
BUDGET_ENV = "ZEROPREFILL_STEP_FLOPS_BUDGET"


@dataclass(frozen=True)
class Layout:
    name: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    token_budget_steps: bool = False  # AsyncEP steps filled to --max-num-batched-tokens, not the planner's budget

    @property
    def is_asyncep(self) -> bool:
        return self.name.startswith("asyncep")


# Stock DP=2 + EP runs vLLM's default all-to-all (all-gather / reduce-scatter). The image has
# no DeepEP or pplx, and vLLM 0.26 maps "--all2all-backend naive" to that same default, so no
# other all-to-all backend can be compared here.
LAYOUTS = {
    layout.name: layout
    for layout in [
        Layout("stock-dp2-ep", ("--data-parallel-size", "2", "--enable-expert-parallel")),
        # vLLM's dual-batch overlap (its two-batch overlap: two micro-batches, one's exchange
        # under the other's compute; steps above --dbo-prefill-token-threshold, 512 tokens).
        # It yields inside the modular MoE kernels' dispatch/combine; whether the default
        # all-gather/reduce-scatter backend overlaps anything is what the run shows.
        Layout("stock-dp2-ep-dbo", ("--data-parallel-size", "2", "--enable-expert-parallel", "--enable-dbo")),
        Layout("stock-tp2", ("--tensor-parallel-size", "2")),
        Layout("stock-tp2-ep", ("--tensor-parallel-size", "2", "--enable-expert-parallel")),
        # TP=2 fuses all-reduce with RMSNorm through FlashInfer, whose "auto" backend picks
        # MNNVL; with NVLink multicast off (shared hosts) stock TP=2 crashed in CUDA-graph
        # profiling on 2 x H200. TRT-LLM's backend is vLLM's single-node alternative.
        Layout("stock-tp2-trtllm-ar", ("--tensor-parallel-size", "2"), (("VLLM_FLASHINFER_ALLREDUCE_BACKEND", "trtllm"),)),
        Layout("asyncep-copy-engine", tuple(asyncep_args(2)), ((TRANSPORT_ENV, "copy_engine"),)),
        Layout("asyncep-copy-engine-token-budget", tuple(asyncep_args(2)), ((TRANSPORT_ENV, "copy_engine"),),
               token_budget_steps=True),
        Layout("asyncep-nccl", tuple(asyncep_args(2)), ((TRANSPORT_ENV, "nccl"),)),
        # CUDA graphs against none, for the batches graphs are captured for (<= 512 tokens).
        Layout("asyncep-copy-engine-eager", (*asyncep_args(2), "--enforce-eager"), ((TRANSPORT_ENV, "copy_engine"),)),
    ]
}


@dataclass(frozen=True)
class ModelChoice:
    name: str  # a config in common/model_configs
    layers: int

    @property
    def key(self) -> str:
        return f"{self.name}:{self.layers}"


def parse_model(text: str) -> ModelChoice:
    name, _, layers = text.partition(":")
    config = REPO / "common" / "model_configs" / f"{name}.json"
    if not config.exists():
        shipped = sorted(p.stem for p in config.parent.glob("*.json"))
        raise argparse.ArgumentTypeError(f"no shipped config {name!r}; choose one of {shipped}")
    full = json.loads(config.read_text())["num_hidden_layers"]
    count = int(layers) if layers else full
    if not 1 <= count <= full:
        raise argparse.ArgumentTypeError(f"{name} has {full} layers; asked for {count}")
    return ModelChoice(name, count)


def model_dir(work: Path, model: ModelChoice) -> Path:
    """The shipped config plus a generated tokenizer (requests send token ids below 500)."""
    out = work / model.name
    if not (out / "config.json").exists():
        write_dummy_checkpoint(REPO / "common" / "model_configs" / f"{model.name}.json", out)
    return out


def model_spec(model: ModelChoice) -> MoEModelSpec:
    config = json.loads((REPO / "common" / "model_configs" / f"{model.name}.json").read_text())
    config["num_hidden_layers"] = model.layers
    return MoEModelSpec.from_hf_config(config)


# -- load generation --------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _drive(url: str, model: str, context: int, *, concurrency: int | None, rate: float | None,
                 duration_s: float, seed: int) -> dict:
    """Closed loop (``concurrency`` clients) or open loop (Poisson at ``rate``) for ``duration_s``."""
    import aiohttp

    rng = random.Random(seed)
    latencies: list[float] = []
    failures = 0
    tokens_done = 0
    start = time.monotonic()
    stop_at = start + duration_s

    def body() -> dict:
        return {"model": model, "input": [rng.randrange(3, 500) for _ in range(context)], "encoding_format": "base64"}

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            nonlocal failures, tokens_done
            sent = time.monotonic()
            try:
                async with session.post(url + "/v1/embeddings", json=body()) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            done = time.monotonic()
            if not ok:
                failures += 1
            elif done <= stop_at:
                latencies.append(done - sent)
                tokens_done += context

        if concurrency is not None:
            async def client() -> None:
                while time.monotonic() < stop_at:
                    await one()

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            pending = []
            next_at = start
            while next_at < stop_at:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                pending.append(asyncio.ensure_future(one()))
                next_at += rng.expovariate(rate)
            await asyncio.gather(*pending)
    elapsed = duration_s
    return {
        "requests": len(latencies),
        "failed": failures,
        "requests_per_s": len(latencies) / elapsed,
        "input_tokens_per_s_per_gpu": tokens_done / elapsed / NUM_GPUS,
        "p50_s": _percentile(latencies, 50),
        "p99_s": _percentile(latencies, 99),
    }


class MemorySampler:
    """Peak GPU memory in use (MiB per GPU) while running, from nvidia-smi."""

    def __init__(self) -> None:
        self.peak_mib: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            used = [int(x) for x in out.split()]
            self.peak_mib = [max(a, b) for a, b in zip(self.peak_mib, used)] if self.peak_mib else used

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# -- one server -------------------------------------------------------------------------------


def concurrency_for(context: int, batched_tokens: int, requested: int | None) -> int:
    """Enough clients to keep both GPUs' steps full with a queue behind them."""
    if requested is not None:
        return requested
    return max(4, min(512, 3 * NUM_GPUS * batched_tokens // context))


def open_loop_rates(args, runs: list[dict], model: ModelChoice, context: int, own_peak: float | None) -> list[float]:
    """``--open-loop-fractions`` of the reference layout's best closed-loop requests/s here.

    ``own_peak``: this run's closed-loop requests/s if it is the reference layout's (used when
    no earlier run of the reference exists).
    """
    reference = best_by_layout(runs, model.key, context).get(args.reference_layout, {}).get("requests_per_s")
    peak = reference or own_peak
    return [round(f * peak, 2) for f in args.open_loop_fractions] if peak else []


PROFILED_STEPS = 6


def profiler_config(trace_dir: Path) -> dict:
    """vLLM's torch profiler over a few engine steps, GPU timeline only (small traces)."""
    return {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
            "torch_profiler_dump_cuda_time_total": False, "ignore_frontend": True, "delay_iterations": 2,
            "max_iterations": PROFILED_STEPS}


def profile_server(server, model: str, context: int, clients: int, args, trace_dir: Path, log) -> dict:
    """Profile a few steps under closed-loop load; the traces' breakdown (traces then deleted)."""
    try:
        httpx.post(server.url + "/start_profile", timeout=120).raise_for_status()
        asyncio.run(_drive(server.url, model, context, concurrency=clients, rate=None, duration_s=args.profile_s,
                           seed=4))
        httpx.post(server.url + "/stop_profile", timeout=600).raise_for_status()
    except httpx.HTTPError as exc:
        return {"context": context, "error": f"{type(exc).__name__}: {exc}"}
    deadline = time.monotonic() + 120  # workers may still be writing their traces
    traces: list[dict] = []
    while time.monotonic() < deadline and not traces:
        time.sleep(2)
        try:
            traces = breakdown_dir(trace_dir) if trace_dir.exists() else []
        except (OSError, EOFError, ValueError):  # a trace still being written
            traces = []
    if not args.keep_traces and trace_dir.exists():
        for path in trace_dir.rglob("*"):
            if path.is_file():
                path.unlink()
    for trace in traces:
        shares = ", ".join(f"{k} {v / trace['window_s']:.0%}" for k, v in list(trace["seconds_by_category"].items())[:5])
        log(f"    profile {trace['trace'][:40]}: {shares}; exposed communication "
            f"{trace['exposed_communication_fraction']:.1%}")
    return {"context": context, "steps": PROFILED_STEPS, "traces": traces} | ({} if traces else {"error": "no trace"})


def run_server(args, model: ModelChoice, layout: Layout, batched_tokens: int, work: Path, log,
               runs: list[dict]) -> dict:
    directory = model_dir(work, model)
    server_args = ["--runner", "pooling", "--convert", "embed", "--dtype", "bfloat16", "--load-format", "dummy",
                   "--hf-overrides", json.dumps({"num_hidden_layers": model.layers}),
                   "--max-model-len", str(max(args.contexts) + 64), "--max-num-batched-tokens", str(batched_tokens),
                   *layout.args]
    if "--data-parallel-size" in layout.args:
        server_args += ["--data-parallel-rpc-port", str(free_port())]
    name = f"{model.key}-{layout.name}-{batched_tokens}"
    spec = model_spec(model)
    env = dict(layout.env)
    if args.stock_moe_configs is not None and not layout.is_asyncep:
        env["VLLM_TUNED_CONFIG_FOLDER"] = str(args.stock_moe_configs.resolve())
    if layout.token_budget_steps:
        env[BUDGET_ENV] = f"{2 * batched_tokens * matmul_params_per_token(spec):.6g}"
    log_path = args.out.parent / f"{args.out.stem}-logs" / f"{name}.log".replace(":", "_")
    trace_dir = (log_path.parent / f"{log_path.stem}-traces").resolve()
    if args.profile_context is not None:
        server_args += ["--profiler-config", json.dumps(profiler_config(trace_dir))]
    server = VllmServer(directory, server_args, log_path, device="cuda", env=env)
    result: dict = {"model": model.key, "layout": layout.name, "max_num_batched_tokens": batched_tokens,
                    "server_args": server_args, "env": env}
    started = time.monotonic()
    try:
        server.start().wait_healthy(timeout_s=args.start_timeout_s,
                                    progress=lambda s: log(f"  starting {name}: {s:.0f} s") if int(s) % 30 == 0 else None)
    except ServerStartError as exc:
        server.stop()
        log(f"  {name}: did not start")
        return result | {"started": False, "error": str(exc)[-3000:]}
    result["start_s"] = round(time.monotonic() - started, 1)
    measurements = []
    try:
        with MemorySampler() as memory:
            for context in args.contexts:
                clients = concurrency_for(context, batched_tokens, args.concurrency)
                asyncio.run(_drive(server.url, str(directory), context, concurrency=clients, rate=None,
                                   duration_s=args.warmup_s, seed=1))
                closed = asyncio.run(_drive(server.url, str(directory), context, concurrency=clients, rate=None,
                                            duration_s=args.duration_s, seed=2))
                flops_per_token = request_flops(spec, context, 0, head_tokens=0) / context
                closed["mfu"] = closed["input_tokens_per_s_per_gpu"] * flops_per_token / (PEAK_BF16_TFLOPS * 1e12)
                entry = {"context": context, "concurrency": clients, "closed_loop": closed, "open_loop": []}
                log(f"  {name} ctx {context}: {closed['input_tokens_per_s_per_gpu']:,.0f} tok/s/GPU, "
                    f"p50 {_seconds(closed['p50_s'])}, p99 {_seconds(closed['p99_s'])}, failed {closed['failed']}")
                own_peak = closed["requests_per_s"] if layout.name == args.reference_layout else None
                for rate in open_loop_rates(args, runs, model, context, own_peak):
                    point = asyncio.run(_drive(server.url, str(directory), context, concurrency=None, rate=rate,
                                               duration_s=args.duration_s, seed=3))
                    entry["open_loop"].append({"offered_requests_per_s": rate} | point)
                    log(f"    open loop {rate} req/s: p50 {_seconds(point['p50_s'])}, p99 {_seconds(point['p99_s'])}, "
                        f"failed {point['failed']}")
                if context == args.profile_context:
                    result["profile"] = profile_server(server, str(directory), context, clients, args, trace_dir, log)
                measurements.append(entry)
                if server.process is None or server.process.poll() is not None:
                    raise ServerStartError(f"server exited during the run:\n{server.log_tail()}")
        result["gpu_memory_peak_mib"] = memory.peak_mib
    except ServerStartError as exc:
        result["error"] = str(exc)[-3000:]
    finally:
        log_text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
        server.stop()
    result["asyncep_log"] = [line[line.index("AsyncEP:"):] for line in log_text.splitlines() if "AsyncEP: streaming" in line]
    result["cudagraphs_captured"] = "Graph capturing finished" in log_text
    # Which tile table vLLM's MoE kernel found (or that it fell back to its default tile).
    result["moe_kernel_configs"] = sorted({line.split("] ", 1)[-1] for line in log_text.splitlines()
                                           if "MoE config" in line or "for MoE layer" in line})
    result["step_budget"] = [line[line.index("zeroprefill: step budget"):] for line in log_text.splitlines()
                             if "zeroprefill: step budget" in line][:1]
    return result | {"started": True, "measurements": measurements}


# -- report -----------------------------------------------------------------------------------


def best_by_layout(runs: list[dict], model: str, context: int) -> dict[str, dict]:
    """Each layout's best closed-loop point over its token-budget sweep."""
    best: dict[str, dict] = {}
    for run in runs:
        if run["model"] != model or not run.get("started"):
            continue
        for entry in run.get("measurements", []):
            if entry["context"] != context or entry["closed_loop"]["failed"] or not entry["closed_loop"]["requests"]:
                continue  # a point with failures, or nothing answered in its window, is no peak
            point = entry["closed_loop"] | {"max_num_batched_tokens": run["max_num_batched_tokens"]}
            if run["layout"] not in best or point["input_tokens_per_s_per_gpu"] > best[run["layout"]]["input_tokens_per_s_per_gpu"]:
                best[run["layout"]] = point
    return best


def open_loop_p99(runs: list[dict], model: str, context: int) -> dict[str, dict[str, float | None]]:
    """p99 latency per offered rate (requests/s), per layout: equal load, side by side."""
    table: dict[str, dict[str, float | None]] = {}
    for run in runs:
        if run["model"] != model:
            continue
        for entry in run.get("measurements", []):
            if entry["context"] != context:
                continue
            for point in entry["open_loop"]:
                label = f"{run['layout']}@{run['max_num_batched_tokens']}"
                table.setdefault(str(point["offered_requests_per_s"]), {})[label] = point["p99_s"]
    return table


def summarize(runs: list[dict], vllm_version: str) -> dict:
    summary: dict = {"vllm_version": vllm_version, "comparisons": {}}
    for model in sorted({r["model"] for r in runs}):
        contexts = sorted({e["context"] for r in runs if r["model"] == model for e in r.get("measurements", [])})
        for context in contexts:
            best = best_by_layout(runs, model, context)
            stock = {k: v for k, v in best.items() if not LAYOUTS[k].is_asyncep}
            ours = {k: v for k, v in best.items() if LAYOUTS[k].is_asyncep}
            if not stock or not ours:
                continue
            best_stock = max(stock, key=lambda k: stock[k]["input_tokens_per_s_per_gpu"])
            best_ours = max(ours, key=lambda k: ours[k]["input_tokens_per_s_per_gpu"])
            ratio = ours[best_ours]["input_tokens_per_s_per_gpu"] / stock[best_stock]["input_tokens_per_s_per_gpu"]
            key = f"{model.split(':')[0]}_{context}"
            summary["comparisons"][key] = {
                "best_stock_layout": best_stock, "best_asyncep_layout": best_ours,
                "asyncep_vs_best_stock": round(ratio, 3),
                "best_stock": stock[best_stock], "best_asyncep": ours[best_ours],
                "p99_s_at_offered_requests_per_s": open_loop_p99(runs, model, context),
            }
    for short, model_prefix, context in (("235b_512", "qwen3-235b-a22b", 512), ("235b_4k", "qwen3-235b-a22b", 4096),
                                          ("30b_4k", "qwen3-30b-a3b", 4096)):
        found = summary["comparisons"].get(f"{model_prefix}_{context}")
        summary[f"asyncep_vs_best_stock_{short}"] = found["asyncep_vs_best_stock"] if found else None
        summary[f"best_stock_layout_{short}"] = found["best_stock_layout"] if found else None
    return summary


def print_table(runs: list[dict]) -> None:
    print(f"{'model':<22}{'layout':<34}{'tokens':>8}{'ctx':>7}{'tok/s/GPU':>12}{'req/s':>9}{'p50 s':>8}{'p99 s':>8}{'MFU':>7}")
    for run in runs:
        if not run.get("started"):
            print(f"{run['model']:<22}{run['layout']:<34}{run['max_num_batched_tokens']:>8}  did not start")
            continue
        for entry in run.get("measurements", []):
            c = entry["closed_loop"]
            p50 = f"{c['p50_s']:.2f}" if c["p50_s"] is not None else "-"
            p99 = f"{c['p99_s']:.2f}" if c["p99_s"] is not None else "-"
            print(f"{run['model']:<22}{run['layout']:<34}{run['max_num_batched_tokens']:>8}{entry['context']:>7}"
                  f"{c['input_tokens_per_s_per_gpu']:>12,.0f}{c['requests_per_s']:>9.1f}{p50:>8}{p99:>8}{c['mfu']:>7.1%}")


def plot(runs: list[dict], path: Path) -> None:
    """Per model: peak throughput per context (bars), then per context throughput and p99
    against offered load (open-loop points, and the closed loop at the rate it reached)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs})
    contexts_of = {m: sorted({e["context"] for r in runs if r["model"] == m for e in r.get("measurements", [])})
                   for m in models}
    columns = 1 + max((len(c) for c in contexts_of.values()), default=0)
    fig, axes = plt.subplots(len(models), columns, figsize=(5.2 * columns, 4.2 * len(models)), squeeze=False)
    layouts = sorted({r["layout"] for r in runs if r.get("started")})
    colors = {layout: f"C{i}" for i, layout in enumerate(layouts)}
    for row, model in zip(axes, models):
        contexts = contexts_of[model]
        ax = row[0]
        width = 0.8 / max(1, len(layouts))
        for i, layout in enumerate(layouts):
            values = [best_by_layout(runs, model, c).get(layout, {}).get("input_tokens_per_s_per_gpu", 0) / 1e3
                      for c in contexts]
            ax.bar([x + i * width for x in range(len(contexts))], values, width, label=layout, color=colors[layout])
        ax.set_xticks([x + width * (len(layouts) - 1) / 2 for x in range(len(contexts))], [str(c) for c in contexts])
        ax.set_xlabel("tokens per request")
        ax.set_ylabel("peak input K tokens/s per GPU")
        ax.set_title(f"{model} layers: peak (best --max-num-batched-tokens)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        for ax, context in zip(row[1:], contexts):
            latency = ax.twinx()
            for run in runs:
                if run["model"] != model or not run.get("started"):
                    continue
                for entry in run.get("measurements", []):
                    if entry["context"] != context:
                        continue
                    closed = entry["closed_loop"]
                    points = sorted([(p["offered_requests_per_s"], p) for p in entry["open_loop"]]
                                    + [(closed["requests_per_s"], closed)], key=lambda item: item[0])
                    offered = [x for x, _ in points]
                    color = colors[run["layout"]]
                    ax.plot(offered, [p["input_tokens_per_s_per_gpu"] / 1e3 for _, p in points], "o-", color=color,
                            label=f"{run['layout']}@{run['max_num_batched_tokens']}")
                    latency.plot(offered, [p["p99_s"] for _, p in points], "s--", color=color, alpha=0.6)
            ax.set_xlabel("offered requests/s (last point: closed loop)")
            ax.set_ylabel("achieved K tokens/s per GPU (solid)")
            latency.set_ylabel("p99 latency, s (dashed)")
            ax.set_title(f"{context} tokens per request", fontsize=9)
            ax.grid(alpha=0.3)
        for ax in row[1 + len(contexts):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", type=parse_model, default=[parse_model("qwen3-235b-a22b:16")],
                        help="shipped config name, ':N' keeps its first N layers")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS),
                        default=[name for name in LAYOUTS if not name.endswith("-eager")])
    parser.add_argument("--batched-tokens", nargs="+", type=int, default=[8192, 16384, 32768, 65536],
                        help="--max-num-batched-tokens values; each layout keeps its best")
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 4096, 32768], help="tokens per request")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed-loop clients (default: 3 x GPUs x batched tokens / context)")
    parser.add_argument("--reference-layout", choices=list(LAYOUTS), default="stock-dp2-ep",
                        help="run first; open-loop rates are fractions of its closed-loop requests/s")
    parser.add_argument("--open-loop-fractions", nargs="*", type=float, default=[0.5, 0.8],
                        help="offered rates as fractions of the reference layout's peak requests/s")
    parser.add_argument("--duration-s", type=float, default=30.0, help="timed seconds per measurement")
    parser.add_argument("--stock-moe-configs", type=Path, default=None,
                        help="a VLLM_TUNED_CONFIG_FOLDER for the stock layouts (benchmarks/tune_vllm_moe.py)")
    parser.add_argument("--profile-context", type=int, default=None,
                        help="also profile each server at this context (one of --contexts)")
    parser.add_argument("--profile-s", type=float, default=4.0, help="seconds of load while profiling")
    parser.add_argument("--keep-traces", action="store_true", help="keep the raw traces beside the logs")
    parser.add_argument("--warmup-s", type=float, default=8.0, help="untimed load before each measurement")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_serve-h200x2.json")
    parser.add_argument("--merge", action="store_true", help="add to the runs already in --out")
    parser.add_argument("--replot", action="store_true", help="only redraw the table and plot of --out")
    args = parser.parse_args(argv)
    if args.profile_context is not None and args.profile_context not in args.contexts:
        parser.error(f"--profile-context {args.profile_context} is not one of --contexts {args.contexts}")

    if args.replot:
        if not args.out.exists():
            parser.error(f"--replot: no results at {args.out}")
        runs = json.loads(args.out.read_text())["runs"]
        print_table(runs)
        plot(runs, args.out.with_suffix(".png"))
        return 0

    import vllm

    runs: list[dict] = []
    commands = [" ".join(["python", "benchmarks/vllm_serve.py", *(argv if argv is not None else sys.argv[1:])])]
    if args.merge and args.out.exists():
        earlier = json.loads(args.out.read_text())
        runs, commands = earlier["runs"], [*earlier.get("commands", []), *commands]
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layouts = sorted(args.layouts, key=lambda name: name != args.reference_layout)  # reference first
        plan = [(m, LAYOUTS[name], b) for m in args.models for name in layouts for b in args.batched_tokens]
        for index, (model, layout, batched) in enumerate(plan, 1):
            log(f"({index}/{len(plan)}) {model.key} {layout.name} --max-num-batched-tokens {batched}")
            runs = [r for r in runs if (r["model"], r["layout"], r["max_num_batched_tokens"]) != (model.key, layout.name, batched)]
            runs.append(run_server(args, model, layout, batched, work, log, runs))
            result = {"commands": commands, "gpus": NUM_GPUS, "peak_bf16_tflops": PEAK_BF16_TFLOPS,
                      "timing": "after start-up (compile, CUDA-graph capture) and a warm-up burst",
                      "summary": summarize(runs, vllm.__version__), "runs": runs}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(runs)
    print(json.dumps(summarize(runs, vllm.__version__), indent=2)[:3000])
    plot(runs, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    raise SystemExit(main())
