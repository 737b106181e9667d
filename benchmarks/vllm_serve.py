"""AsyncEP against stock vLLM's layouts, through the real server, same GPUs, same requests.

The choice a user makes is ``vllm serve MODEL ...`` as it is, or with ``--moe-backend
asyncep``. For every (model, layout, ``--max-num-batched-tokens``) this script starts that
server (``--load-format dummy`` with the shipped config, the layer count reduced to N — the
same N for every layout — so per-layer figures scale to the full model), waits until it is
healthy (torch.compile and CUDA-graph capture happen then, outside all timing), warms it up
and measures prefill-only embedding requests of each context length:

- closed loop: ``--concurrency`` clients send back to back for ``--duration-s``: peak input
  tokens/s per GPU, requests/s, p50/p99 latency;
- open loop: Poisson arrivals for ``--duration-s`` at fractions (``--open-loop-fractions``) of
  the reference layout's closed-loop requests/s at that context (``--reference-layout``, run
  first), so every layout sees the same offered rates: achieved throughput and p50/p99 at
  equal offered load.

What each number counts (also written to the JSON, ``method``):

- Every timed window opens on a loaded server: its load (the closed loop's clients, the open
  loop's arrivals) starts ``--warmup-s`` before it, so the window measures the load's steady
  state, not the ramp from an idle server (``lead`` in each point: the requests sent in that
  lead-in, and how many of them were answered inside the window).
- Throughput counts the requests answered inside the window, those sent in the lead-in
  included; ``answers_by_second`` lists them per second of the window, to show that the rate
  was steady. A request sent in the window and answered after it is *late*: it is counted
  (``late``) and its latency is in the percentiles, which cover the requests sent in the
  window. Requests still unanswered ``--drain-s`` after the window are cut off
  (``unanswered``; the client disconnects, vLLM aborts them); their latency is known only to
  be at least the time they waited, so a percentile they can move is reported as that lower
  bound with ``p50_at_least`` / ``p99_at_least`` true.
- Warm-up, before each context's measurements (``warmup`` in each measurement): one request of
  every power-of-two length up to the context (one per data-parallel rank), then the context's
  requests at doubling concurrency up to the most the timed runs reach (the closed loop's
  clients, or a full ``--max-num-batched-tokens`` step per rank), then the closed loop's
  lead-in. vLLM logs every kernel JIT compilation or autotuning after its own start-up warm-up
  ("... during inference: ..."); the lines logged outside and inside the timed windows are
  recorded apart (``jit_events``: ``warmup``, ``measured``), so a compilation inside a
  measurement shows.
- Per GPU: divided by the layout's GPUs (data-parallel x tensor-parallel size). MFU counts the
  true FLOPs of the N-layer model (``zeroprefill.common.cost_model.request_flops``: linear
  layers, causal attention) against the GPU's dense datasheet peak for the checkpoint's format
  (H100/H200: 989 TFLOP/s bf16, 1979 TFLOP/s for block-FP8 checkpoints), from the shipped
  hardware profiles; ``--peak-tflops`` for other GPUs.
- Memory: vLLM's KV-cache capacity in tokens per engine ("KV cache size: N tokens"), its
  weights and KV-cache GiB per worker, from the server log; nvidia-smi's peak per GPU from
  start-up to the end of the run.
- GPU telemetry (``gpu_telemetry`` in the closed loop and in each open-loop point, one line of
  it in the progress log): what each GPU did in the timed window, warm-up and drain left out,
  from nvidia-smi every 0.5 s: per GPU index, ``samples``, ``sm_clock_mhz_median`` /
  ``sm_clock_mhz_min`` against ``max_sm_clock_mhz``, ``power_w_mean`` / ``power_w_max`` against
  ``power_limit_w`` (and ``enforced_power_limit_w``), ``temperature_c_max``,
  ``utilization_pct_mean``, ``memory_used_mib_max``, and ``clock_event_reasons``: each reason
  seen (``sw_power_cap``, ``hw_slowdown``, ``sw_thermal_slowdown``, ``gpu_idle``, ...) with the
  fraction of samples it was active in; ``{"unavailable": reason}`` without nvidia-smi. So a
  throughput that differs between two machines can be told apart from a clock or power limit
  that differs; the summary's comparisons put each side's median SM clock and busy share beside
  its throughput (``best_stock_sm_clock_mhz``, ``best_asyncep_sm_clock_mhz``,
  ``best_stock_gpu_busy_pct``, ``best_asyncep_gpu_busy_pct``).
- Engine metrics (``engine_metrics`` beside ``gpu_telemetry``, one line in the progress log):
  vLLM's own ``/metrics`` read at the window's start and end: the engine steps in the window,
  the tokens per step, the window's time per step on each engine (``step_ms``), and the queue
  (requests waiting, read every ``--metrics-interval-s``, 0.5 s; 0 reads it only at the load's
  start and the window's ends: a reading is an HTTP request the API server answers between
  the load's). Set against the profile's GPU time per
  step, ``step_ms`` says how much of a served step the GPU did not account for. Its
  ``timeline`` holds every reading from the load's start, lead-in included.
- CPU (``cpu`` beside them, one line in the progress log): per process of the server (the API
  server(s), the engine core, their workers) and the load generator, the cores it kept busy
  in the window and its busiest thread's share: a thread near 1.0 is held to one core's speed
  there. ``--api-servers N`` starts every layout with N API server processes; runs served with
  different settings are neither merged nor imported together.
- Step budget: stock vLLM fills each step to ``--max-num-batched-tokens``. AsyncEP runs under
  the plugin's prefill-only scheduler, whose default step budget is the planner's saturation
  budget in FLOPs (logged; recorded as ``step_budget``). Layouts with ``token_budget_steps``
  (``asyncep``, ``asyncep-copy-engine-token-budget``) set that FLOPs budget out of reach, so
  ``--max-num-batched-tokens`` is the only per-step limit, as for stock (``step_budget_policy``).

Requests carry fresh random token ids (no prefix-cache hits) and ask for base64 embeddings
(so the client parses little). With ``--profile-context C`` each server is also profiled at
that context: vLLM's torch profiler over a few engine steps of closed-loop load (started after
the load's ``--warmup-s`` lead-in, as a timed window opens), broken down
by ``trace_breakdown.py`` into GPU time per kernel category and exposed communication
(``profile`` in each run).

Two GPUs (``stock-dp2-ep``, ``asyncep-copy-engine``, ...)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python benchmarks/vllm_serve.py \\
        --models qwen3-235b-a22b:16 --contexts 512 4096 --out benchmarks/results/vllm_serve-h200x2.json

One GPU (``stock``: no parallelism flags; ``asyncep``: ``--data-parallel-size 1
--enable-expert-parallel --moe-backend asyncep``), e.g. Qwen3-30B-A3B in bf16, then its block-FP8
shapes (``qwen3-30b-a3b-fp8``) compared with the bf16 AsyncEP run of the first file
(``--import-runs``; ``benchmarks/vllm_gpu_1x.sh`` runs both)::

    python benchmarks/vllm_serve.py --models qwen3-30b-a3b --layouts stock asyncep --reference-layout stock \\
        --batched-tokens 32768 --contexts 2048 --out vllm_serve-h100x1.json

Stock vLLM ships no tuned MoE tiles for some expert-parallel shapes (it logs "Using
default MoE config"); ``--stock-moe-configs DIR`` gives the stock layouts the tables
``tune_vllm_moe.py`` writes, and each run records which table its kernel used
(``moe_kernel_configs``). For block FP8 at one rank on Hopper, vLLM picks its Triton MoE
backend on its own; ``stock-deepgemm`` (``--moe-backend deep_gemm``) and
``stock-flashinfer-cutlass`` force the others, and the one-GPU summary compares AsyncEP with the
fastest stock layout that ran (``best_stock_layout_fp8``, ``best_stock_layout_30b_2k``).

A layout whose server does not start, or dies, is recorded with its log tail; the rest run.
Each server's log is kept beside the JSON (``<out>-logs/``). The JSON is rewritten after every
measurement. ``--merge`` adds to an existing file (its runs, and anything else in it, such as a
GPU test's correctness record, are kept); ``--import-runs FILE`` copies another file's runs in
for comparison when they were measured on the same GPU with the same vLLM. SIGTERM stops the
running server before exiting, so ``timeout`` can bound a run.
"""

from __future__ import annotations

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The script's parts, beside it: the layouts and models (_vllm_layouts), the load and the server
# log (_vllm_load), the report (_vllm_report), what it shares with sglang_gpu_check.py (_serving).
# Names the tests reach as vllm_serve.<name> are imported here too.
from _serving import GpuMemoryPeak, ProcessCpu, cpu_line, telemetry_line, write_json  # noqa: E402, F401
from _vllm_layouts import (BUDGET_ENV, LAYOUTS, TRANSPORT_ENV, UNREACHABLE_FLOPS_BUDGET, Layout,  # noqa: E402, F401
                           ModelChoice, datasheet_peak, model_dir, model_spec, parse_model, peaks_for, visible_gpus)
from _vllm_load import (JitEvents, LogCursor, _drive, engine_line, jit_events, percentile, server_memory, warm_up,  # noqa: E402, F401
                        warmup_concurrency, warmup_lengths)
from _vllm_report import (METHOD, WINDOW, best_by_layout, frontend, import_runs, incomparable,  # noqa: E402, F401
                          plot, print_table, summarize, tiny_record, window_of, windows_opened)
from trace_breakdown import breakdown_dir  # noqa: E402
from vllm_zeroprefill.request_validation import replaces_vllms_union  # noqa: E402
from vllm_zeroprefill.server import ServerStartError, VllmServer  # noqa: E402
from zeroprefill.common.cost_model import request_flops  # noqa: E402
from zeroprefill.ports import free_port  # noqa: E402

# -- one server -------------------------------------------------------------------------------


def discriminated_requests(env: Mapping[str, str]) -> bool:
    """Whether a server started with ``env`` (over this process's environment) validates
    ``/v1/embeddings`` bodies with the plugin's discriminated union
    (:mod:`vllm_zeroprefill.request_validation`: where this vLLM needs it, unless turned off)."""
    return replaces_vllms_union({**os.environ, **env})


def concurrency_for(context: int, batched_tokens: int, requested: int | None, gpus: int) -> int:
    """Enough clients to keep every GPU's steps full with a queue behind them."""
    if requested is not None:
        return requested
    return max(4, min(512, 3 * gpus * batched_tokens // context))


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


def profile_server(server, model: str, context: int, clients: int, args, trace_dir: Path, log, gpus: int) -> dict:
    """Profile a few steps under closed-loop load, started once the load has run its lead-in
    (``--warmup-s``), as a timed window is; the traces' breakdown (traces then deleted)."""

    def start_profile() -> None:
        httpx.post(server.url + "/start_profile", timeout=120).raise_for_status()

    try:
        asyncio.run(_drive(server.url, model, context, concurrency=clients, rate=None, duration_s=args.profile_s,
                           drain_s=args.drain_s, seed=4, gpus=gpus, lead_s=args.warmup_s, on_open=start_profile))
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
        host = trace["host"]
        largest = host["host_bound_by_op"][0]["op"] if host["host_bound_by_op"] else "-"
        log(f"    profile {trace['trace'][:40]}: {shares}; exposed communication "
            f"{trace['exposed_communication_fraction']:.1%}; GPU waiting for the host "
            f"{host['host_bound_s'] / PROFILED_STEPS * 1e3:.1f} ms a step, most under {largest}")
    return {"context": context, "steps": PROFILED_STEPS, "traces": traces} | ({} if traces else {"error": "no trace"})


def _latency(point: dict, key: str) -> str:
    value = point.get(f"{key}_s")
    if value is None:
        return "-"
    return f"{'>=' if point.get(f'{key}_at_least') else ''}{value:.3f} s"


def _point_line(point: dict) -> str:
    return (f"{point['input_tokens_per_s_per_gpu']:,.0f} tok/s/GPU, p50 {_latency(point, 'p50')}, "
            f"p99 {_latency(point, 'p99')}, late {point['late']}, unanswered {point['unanswered']}, "
            f"failed {point['failed']}")


def _answers_line(point: dict) -> str:
    """The answers per second of a window's lead-in and of the window: a steady load keeps them level."""
    lead = point.get("lead", {}).get("answers_by_second")
    return ("answers per second: " + (f"lead-in {' '.join(map(str, lead))} | " if lead else "")
            + f"window {' '.join(map(str, point['answers_by_second']))}")


def run_server(args, model: ModelChoice, layout: Layout, batched_tokens: int, work: Path, log,
               runs: list[dict], gpu_names: list[str], peaks: dict[str, tuple[float, str]]) -> dict:
    directory = model_dir(work, model)
    server_args = ["--runner", "pooling", "--convert", "embed", "--dtype", "bfloat16", "--load-format", "dummy",
                   "--hf-overrides", json.dumps({"num_hidden_layers": model.layers}),
                   "--max-model-len", str(max(args.contexts) + 64), "--max-num-batched-tokens", str(batched_tokens),
                   *layout.args]
    if args.api_servers is not None:
        server_args += ["--api-server-count", str(args.api_servers)]
    if layout.data_parallel_size > 1:
        server_args += ["--data-parallel-rpc-port", str(free_port())]
    name = f"{model.key}-{layout.name}-{batched_tokens}"
    spec = model_spec(model)
    env = dict(layout.env)
    if args.stock_moe_configs is not None and not layout.is_asyncep:
        env["VLLM_TUNED_CONFIG_FOLDER"] = str(args.stock_moe_configs.resolve())
    if layout.token_budget_steps:
        env[BUDGET_ENV] = f"{UNREACHABLE_FLOPS_BUDGET:.0e}"
    log_path = args.out.parent / f"{args.out.stem}-logs" / f"{name}.log".replace(":", "_")
    trace_dir = (log_path.parent / f"{log_path.stem}-traces").resolve()
    if args.profile_context is not None:
        server_args += ["--profiler-config", json.dumps(profiler_config(trace_dir))]
    peak_tflops, peak_source = peaks[model.dtype]
    result: dict = {"model": model.key, "layout": layout.name, "max_num_batched_tokens": batched_tokens,
                    "gpus": layout.gpus, "dtype": model.dtype, "peak_tflops": peak_tflops, "peak_source": peak_source,
                    "step_budget_policy": layout.step_budget_policy(batched_tokens),
                    "server_args": server_args, "env": env, "window": windows_opened(args.warmup_s),
                    "api_servers": args.api_servers, "discriminated_requests": discriminated_requests(env),
                    "metrics_interval_s": args.metrics_interval_s}
    refusal = layout.refuses(model.dtype)
    if refusal:
        log(f"  {name}: {refusal}")
        return result | {"started": False, "error": refusal}
    if layout.gpus > len(gpu_names):
        log(f"  {name}: needs {layout.gpus} GPUs, {len(gpu_names)} visible")
        return result | {"started": False, "error": f"needs {layout.gpus} GPUs, {len(gpu_names)} visible"}
    server = VllmServer(directory, server_args, log_path, device="cuda", env=env)
    measurements: list[dict] = []
    with GpuMemoryPeak(interval_s=1.0) as memory:
        started = time.monotonic()
        try:
            server.start().wait_healthy(timeout_s=args.start_timeout_s,
                                        progress=lambda s: log(f"  starting {name}: {s:.0f} s") if int(s) % 30 == 0 else None)
        except ServerStartError as exc:
            server.stop()
            log(f"  {name}: did not start")
            return result | {"started": False, "error": str(exc)[-3000:]}
        result["start_s"] = round(time.monotonic() - started, 1)
        result |= server_memory(server.log_path.read_text(errors="replace"))
        kv = ", ".join(f"{n:,}" for n in result["kv_cache_tokens"]) or "?"
        log(f"  {name}: started in {result['start_s']:.0f} s; KV cache {kv} tokens per engine")
        try:
            for context in args.contexts:
                clients = concurrency_for(context, batched_tokens, args.concurrency, layout.gpus)
                jit = JitEvents(server.log_path)
                warmup = warm_up(server.url, str(directory), context, clients=clients, batched_tokens=batched_tokens,
                                 ranks=layout.data_parallel_size)
                timed = {"duration_s": args.duration_s, "drain_s": args.drain_s, "lead_s": args.warmup_s,
                         "gpus": layout.gpus, "on_open": jit.outside, "on_close": jit.inside,
                         "gpu_telemetry": True, "engine_metrics": True, "metrics_interval_s": args.metrics_interval_s,
                         "cpu_roots": [server.process.pid] if getattr(server, "process", None) is not None else []}
                closed = asyncio.run(_drive(server.url, str(directory), context, concurrency=clients, rate=None,
                                            seed=2, **timed))
                flops_per_token = request_flops(spec, context, 0, head_tokens=0) / context
                closed["mfu"] = closed["input_tokens_per_s_per_gpu"] * flops_per_token / (peak_tflops * 1e12)
                entry = {"context": context, "concurrency": clients, "warmup": warmup, "closed_loop": closed,
                         "open_loop": []}
                log(f"  {name} ctx {context}: warm-up {warmup['requests']} requests, then {args.warmup_s:g} s of "
                    f"the closed loop ({len(jit.warmup)} JIT events); closed loop {_point_line(closed)}")
                log(f"    {_answers_line(closed)}")
                log(f"    {telemetry_line(closed['gpu_telemetry'])}")
                log(f"    {engine_line(closed['engine_metrics'])}")
                log(f"    {cpu_line(closed['cpu'])}")
                own_peak = closed["requests_per_s"] if layout.name == args.reference_layout else None
                for rate in open_loop_rates(args, runs, model, context, own_peak):
                    point = asyncio.run(_drive(server.url, str(directory), context, concurrency=None, rate=rate,
                                               seed=3, **timed))
                    entry["open_loop"].append({"offered_requests_per_s": rate} | point)
                    log(f"    open loop {rate} req/s: {_point_line(point)}")
                    log(f"      {_answers_line(point)}")
                    log(f"      {telemetry_line(point['gpu_telemetry'])}")
                    log(f"      {engine_line(point['engine_metrics'])}")
                    log(f"      {cpu_line(point['cpu'])}")
                jit.outside()  # the last window's drain
                entry["jit_events"] = {"warmup": jit.warmup, "measured": jit.measured}
                if entry["jit_events"]["measured"]:
                    log(f"    JIT during measurement: {entry['jit_events']['measured'][:3]}")
                if context == args.profile_context:
                    result["profile"] = profile_server(server, str(directory), context, clients, args, trace_dir, log,
                                                       layout.gpus)
                measurements.append(entry)
                if server.process is None or server.process.poll() is not None:
                    raise ServerStartError(f"server exited during the run:\n{server.log_tail()}")
        except ServerStartError as exc:
            result["error"] = str(exc)[-3000:]
        finally:
            log_text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
            server.stop()
    result["gpu_memory_peak_mib"] = memory.peak_mib
    result["gpu_memory_total_mib"] = memory.total_mib
    # AsyncEP's own lines: start-up (experts stored, transport, gather buffers), kernels, modes.
    result["asyncep_log"] = [line[line.index("AsyncEP: "):] for line in log_text.splitlines() if "AsyncEP: " in line]
    result["cudagraphs_captured"] = "Graph capturing finished" in log_text
    # Which tile table vLLM's MoE kernel found (or that it fell back to its default tile).
    result["moe_kernel_configs"] = sorted({line.split("] ", 1)[-1] for line in log_text.splitlines()
                                           if "MoE config" in line or "for MoE layer" in line})
    result["step_budget"] = [line[line.index("zeroprefill: step budget"):] for line in log_text.splitlines()
                             if "zeroprefill: step budget" in line][:1]
    return result | {"started": True, "measurements": measurements}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", type=parse_model, default=[parse_model("qwen3-235b-a22b:16")],
                        help="shipped config name, ':N' keeps its first N layers")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS),
                        default=[name for name, layout in LAYOUTS.items() if layout.gpus == 2 and not name.endswith("-eager")])
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
    parser.add_argument("--drain-s", type=float, default=30.0,
                        help="seconds after a window to wait for late answers before cutting them off")
    parser.add_argument("--warmup-s", type=float, default=8.0,
                        help="seconds each timed window's load runs before the window opens (its lead-in)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak per GPU for MFU (default: the shipped H100/H200 datasheet figure for the "
                             "checkpoint's format)")
    parser.add_argument("--stock-moe-configs", type=Path, default=None,
                        help="a VLLM_TUNED_CONFIG_FOLDER for the stock layouts (benchmarks/tune_vllm_moe.py)")
    parser.add_argument("--api-servers", type=int, default=None,
                        help="vLLM API server processes (--api-server-count) for every layout (default: vLLM's own: "
                             "one per data-parallel rank)")
    parser.add_argument("--metrics-interval-s", type=float, default=0.5,
                        help="seconds between readings of the server's /metrics while a window's load runs (0: "
                             "only when it starts and the window opens and closes)")
    parser.add_argument("--profile-context", type=int, default=None,
                        help="also profile each server at this context (one of --contexts)")
    parser.add_argument("--profile-s", type=float, default=4.0, help="seconds of load while profiling")
    parser.add_argument("--keep-traces", action="store_true", help="keep the raw traces beside the logs")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_serve-h200x2.json")
    parser.add_argument("--merge", action="store_true", help="add to the runs (and keep the rest) of --out")
    parser.add_argument("--tiny-record", type=Path,
                        help="start --out from this results file's tiny correctness record (the GPU tests' "
                             "'tiny' and its summary keys), not its runs")
    parser.add_argument("--import-runs", nargs="+", type=Path, default=[], metavar="FILE",
                        help="also compare with these results files' runs (same GPU and vLLM only)")
    parser.add_argument("--replot", action="store_true", help="only redraw the table and plot of --out")
    args = parser.parse_args(argv)
    for flag, least in (("duration_s", "more than"), ("profile_s", "more than"), ("warmup_s", "at least"),
                        ("drain_s", "at least"), ("metrics_interval_s", "at least")):
        value = getattr(args, flag)
        if value < 0 or (value == 0 and least == "more than"):
            parser.error(f"--{flag.replace('_', '-')} {value:g}: seconds, {least} 0")
    if args.api_servers is not None and args.api_servers < 1:
        parser.error(f"--api-servers {args.api_servers}: at least 1")
    if args.profile_context is not None and args.profile_context not in args.contexts:
        parser.error(f"--profile-context {args.profile_context} is not one of --contexts {args.contexts}")

    if args.replot:
        if not args.out.exists():
            parser.error(f"--replot: no results at {args.out}")
        runs = json.loads(args.out.read_text())["runs"]
        print_table(runs)
        plot(runs, args.out.with_suffix(".png"))
        return 0

    gpu_names = visible_gpus()
    if not gpu_names:
        parser.error("no GPU visible (nvidia-smi lists none)")
    peaks = peaks_for(gpu_names[0], args.peak_tflops)
    missing = sorted({m.dtype for m in args.models} - set(peaks))
    if missing:
        parser.error(f"no datasheet peak for {gpu_names[0]} in {missing}: pass --peak-tflops")

    import vllm

    earlier: dict = {}
    window = windows_opened(args.warmup_s)
    served_with = frontend(args.api_servers, discriminated_requests(os.environ))
    if args.tiny_record is not None:
        if args.merge and args.out.exists():
            parser.error("--tiny-record starts a new --out: leave out --merge, or merge into a file that holds it")
        try:
            earlier = tiny_record(json.loads(args.tiny_record.read_text()), str(args.tiny_record))
        except (OSError, ValueError) as exc:
            parser.error(f"--tiny-record: {exc}")
    elif args.merge and args.out.exists():
        earlier = json.loads(args.out.read_text())
        if earlier.get("runs") and earlier.get("gpu") not in (None, gpu_names[0]):
            parser.error(f"--merge: {args.out} holds runs measured on {earlier['gpu']}, this machine has "
                         f"{gpu_names[0]}: write to another --out")
        why_not = incomparable(earlier.get("runs", []), window, served_with)
        if why_not:
            parser.error(f"--merge: the runs in {args.out} are not compared with this one's ({why_not}): "
                         "write to another --out")
    runs: list[dict] = earlier.get("runs", [])
    commands = [*earlier.get("commands", []),
                " ".join(["python", "benchmarks/vllm_serve.py", *(argv if argv is not None else sys.argv[1:])])]
    imports = [*earlier.get("imports", []),
               *import_runs(args.import_runs, runs, gpu_names[0], vllm.__version__, window, served_with)]
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {message}", flush=True)

    for entry in imports[len(earlier.get("imports", [])):]:
        log(f"--import-runs {entry['file']}: {entry.get('runs') or 'skipped: ' + entry['skipped']}")
    if args.open_loop_fractions and args.reference_layout not in {*args.layouts, *(r["layout"] for r in runs)}:
        log(f"no open loop: its rates are fractions of --reference-layout {args.reference_layout}'s peak, which is "
            "neither in --layouts nor among the runs already in --out")

    def save() -> None:
        result = earlier | {
            "commands": commands, "gpu": gpu_names[0], "gpus_visible": len(gpu_names),
            "peak_tflops": {dtype: value for dtype, (value, _) in peaks.items()},
            "method": METHOD, "imports": imports,
            "summary": earlier.get("summary", {}) | summarize(runs, vllm.__version__), "runs": runs,
        }
        write_json(args.out, result)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layouts = sorted(args.layouts, key=lambda name: name != args.reference_layout)  # reference first
        plan = [(m, LAYOUTS[name], b) for m in args.models for name in layouts for b in args.batched_tokens]
        for index, (model, layout, batched) in enumerate(plan, 1):
            log(f"({index}/{len(plan)}) {model.key} {layout.name} --max-num-batched-tokens {batched}")
            runs[:] = [r for r in runs if (r["model"], r["layout"], r["max_num_batched_tokens"]) != (model.key, layout.name, batched)]
            runs.append(run_server(args, model, layout, batched, work, log, runs, gpu_names, peaks))
            save()
    save()
    print_table(runs)
    summary = summarize(runs, vllm.__version__)
    print(json.dumps({k: v for k, v in summary.items() if k != "comparisons"}, indent=2))
    plot(runs, args.out.with_suffix(".png"))
    return 0


def _exit_on_sigterm(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not interrupt the clean-up
    raise SystemExit(128 + signum)  # unwinds through run_server's finally: the server is stopped


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    raise SystemExit(main())
