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

- Throughput counts the requests answered inside the window. A request sent in the window and
  answered after it is *late*: it is counted (``late``) and its latency is in the
  percentiles. Requests still unanswered ``--drain-s`` after the window are cut off
  (``unanswered``; the client disconnects, vLLM aborts them); their latency is known only to
  be at least the time they waited, so a percentile they can move is reported as that lower
  bound with ``p50_at_least`` / ``p99_at_least`` true.
- Warm-up, before each context's measurements (``warmup`` in each measurement): one request of
  every power-of-two length up to the context (one per data-parallel rank), then the context's
  requests at doubling concurrency up to the most the timed runs reach (the closed loop's
  clients, or a full ``--max-num-batched-tokens`` step per rank), then ``--warmup-s`` of closed
  loop. vLLM logs every kernel JIT compilation or autotuning after its own start-up warm-up
  ("... during inference: ..."); the lines logged during the warm-up and during the timed
  windows are recorded apart (``jit_events``), so a compilation inside a measurement shows.
- Per GPU: divided by the layout's GPUs (data-parallel x tensor-parallel size). MFU counts the
  true FLOPs of the N-layer model (``zeroprefill.common.cost_model.request_flops``: linear
  layers, causal attention) against the GPU's dense datasheet peak for the checkpoint's format
  (H100/H200: 989 TFLOP/s bf16, 1979 TFLOP/s for block-FP8 checkpoints), from the shipped
  hardware profiles; ``--peak-tflops`` for other GPUs.
- Memory: vLLM's KV-cache capacity in tokens per engine ("KV cache size: N tokens"), its
  weights and KV-cache GiB per worker, from the server log; nvidia-smi's peak per GPU from
  start-up to the end of the run.
- Step budget: stock vLLM fills each step to ``--max-num-batched-tokens``. AsyncEP runs under
  the plugin's prefill-only scheduler, whose default step budget is the planner's saturation
  budget in FLOPs (logged; recorded as ``step_budget``). Layouts with ``token_budget_steps``
  (``asyncep``, ``asyncep-copy-engine-token-budget``) set that FLOPs budget out of reach, so
  ``--max-num-batched-tokens`` is the only per-step limit, as for stock (``step_budget_policy``).

Requests carry fresh random token ids (no prefix-cache hits) and ask for base64 embeddings
(so the client parses little). With ``--profile-context C`` each server is also profiled at
that context: vLLM's torch profiler over a few engine steps of closed-loop load, broken down
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
(``moe_kernel_configs``).

A layout whose server does not start, or dies, is recorded with its log tail; the rest run.
Each server's log is kept beside the JSON (``<out>-logs/``). The JSON is rewritten after every
measurement. ``--merge`` adds to an existing file (its runs, and anything else in it, such as a
GPU test's correctness record, are kept); ``--import-runs FILE`` copies another file's runs in
for comparison when they were measured on the same GPU with the same vLLM. SIGTERM stops the
running server before exiting, so ``timeout`` can bound a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trace_breakdown import breakdown_dir  # noqa: E402
from vllm_zeroprefill.server import ServerStartError, VllmServer, asyncep_args  # noqa: E402
from zeroprefill.common.cost_model import request_flops  # noqa: E402
from zeroprefill.common.hardware import shipped_gpu_for, shipped_profile  # noqa: E402
from zeroprefill.common.model_spec import MoEModelSpec, stored_weight_dtype  # noqa: E402
from zeroprefill.ports import free_port  # noqa: E402
from zeroprefill.tiny_model import write_dummy_checkpoint  # noqa: E402

TRANSPORT_ENV = "ZEROPREFILL_ASYNCEP_TRANSPORT"
BUDGET_ENV = "ZEROPREFILL_STEP_FLOPS_BUDGET"
#: A FLOPs step budget no step reaches: vLLM's token budget is then the only per-step limit.
UNREACHABLE_FLOPS_BUDGET = 1e30

# What the server log says, in the wording of vLLM 0.26 to 0.33 (0.32+ appends ", Maximum
# concurrency ..." to the KV line; the CPU build says "CPU KV cache size").
KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
KV_MEMORY_GIB = re.compile(r"Available KV cache memory: ([\d.]+) GiB")
WEIGHTS_GIB = re.compile(r"Model loading took ([\d.]+) GiB")
GRAPHS = re.compile(r"Graph capturing finished in (\d+) secs?, took ([\d.]+) GiB")
# vLLM's kernel JIT monitor (active after its start-up warm-up) and Triton's autotuning report.
JIT_EVENT = re.compile(r"during inference: |Triton autotuning for function")


@dataclass(frozen=True)
class Layout:
    name: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    token_budget_steps: bool = False  # AsyncEP steps limited by --max-num-batched-tokens alone, as stock's

    @property
    def is_asyncep(self) -> bool:
        return self.name.startswith("asyncep")

    @property
    def data_parallel_size(self) -> int:
        return self._size("--data-parallel-size")

    @property
    def gpus(self) -> int:
        return self.data_parallel_size * self._size("--tensor-parallel-size")

    def _size(self, flag: str) -> int:
        return int(self.args[self.args.index(flag) + 1]) if flag in self.args else 1

    def step_budget_policy(self, batched_tokens: int) -> str:
        if not self.is_asyncep:
            return f"vLLM's scheduler: --max-num-batched-tokens {batched_tokens} per step"
        if self.token_budget_steps:
            return (f"prefill-only scheduler, FLOPs budget {UNREACHABLE_FLOPS_BUDGET:.0e} (out of reach): "
                    f"--max-num-batched-tokens {batched_tokens} per step, as stock")
        return "prefill-only scheduler, the plugin's default FLOPs budget (step_budget: its log line)"


# Stock DP=2 + EP runs vLLM's default all-to-all (all-gather / reduce-scatter). The image has
# no DeepEP or pplx, and vLLM 0.26 maps "--all2all-backend naive" to that same default, so no
# other all-to-all backend can be compared here.
LAYOUTS = {
    layout.name: layout
    for layout in [
        # One GPU. AsyncEP at DP=1 stores every expert and gathers nothing from another rank.
        Layout("stock", ()),
        Layout("asyncep", tuple(asyncep_args(1)), token_budget_steps=True),
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

    @property
    def config(self) -> dict:
        return json.loads((REPO / "common" / "model_configs" / f"{self.name}.json").read_text())

    @property
    def dtype(self) -> str:
        """The weights' format as the planner names it: ``"fp8"`` for block FP8, else ``"bf16"``."""
        return stored_weight_dtype(self.config) or "bf16"


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
    config = model.config
    config["num_hidden_layers"] = model.layers
    return MoEModelSpec.from_hf_config(config)


# -- the machine ------------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """Names of the GPUs this process may use: nvidia-smi's, in ``CUDA_VISIBLE_DEVICES``' order
    where that lists indices. No CUDA context is created here (it would take memory from the
    servers' budgets)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    names = dict(line.split(", ", 1) for line in out.splitlines() if ", " in line)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(names.values())
    wanted = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if all(entry.isdigit() for entry in wanted):
        return [names[entry] for entry in wanted if entry in names]
    return list(names.values())[: len(wanted)]  # UUIDs: as many as listed


def datasheet_peak(gpu_name: str, dtype: str) -> tuple[float, str] | None:
    """Dense peak TFLOP/s of one GPU for ``dtype`` ("bf16", "fp8") and where it comes from, from
    the shipped hardware profiles; None for a GPU without one."""
    gpu = shipped_gpu_for(gpu_name)
    if gpu is None:
        return None
    quantity = shipped_profile(gpu, 1).peak_tflops[dtype]
    return quantity.value, f"{gpu} {dtype}, {quantity.source}"


# -- load generation --------------------------------------------------------------------------


@dataclass
class Sent:
    """One request: when it left, when its answer arrived (None: cut off unanswered), whether it was a 200."""

    at: float
    done: float | None = None
    ok: bool = False


def percentile(observed: list[float], at_least: list[float], q: float) -> tuple[float | None, bool]:
    """The q-th percentile (nearest rank) of all latencies, ``at_least`` holding lower bounds
    of the latencies of requests cut off unanswered.

    Returns ``(value, is_lower_bound)``: exact where the cut-off requests cannot move it (every
    order of their true latencies gives the same value), else its lower bound (each cut-off
    request at its bound) with ``True``.
    """
    count = len(observed) + len(at_least)
    if not count:
        return None, False
    rank = min(count - 1, int(round(q / 100 * (count - 1))))
    low = sorted(observed + at_least)[rank]
    ordered = sorted(observed)
    high = ordered[rank] if rank < len(ordered) else math.inf  # every cut-off request slower than all
    return low, low != high


def window_point(sent: list[Sent], context: int, *, start: float, stop_at: float, cut_at: float,
                 gpus: int) -> dict:
    """What a window measured: throughput from the answers inside it; latency over every
    request sent in it (late answers included, cut-off ones as lower bounds)."""
    window_s = stop_at - start
    in_window = [r for r in sent if r.done is not None and r.ok and r.done <= stop_at]
    late = [r for r in sent if r.done is not None and r.ok and r.done > stop_at]
    failed = [r for r in sent if r.done is not None and not r.ok]
    cut = [r for r in sent if r.done is None]
    latencies = [r.done - r.at for r in in_window + late]
    bounds = [cut_at - r.at for r in cut]
    p50, p50_bound = percentile(latencies, bounds, 50)
    p99, p99_bound = percentile(latencies, bounds, 99)
    return {
        "sent": len(sent), "requests": len(in_window), "late": len(late), "unanswered": len(cut),
        "failed": len(failed), "window_s": round(window_s, 3), "drained_s": round(cut_at - stop_at, 3),
        "requests_per_s": len(in_window) / window_s,
        "input_tokens_per_s_per_gpu": len(in_window) * context / window_s / gpus,
        "p50_s": p50, "p50_at_least": p50_bound, "p99_s": p99, "p99_at_least": p99_bound,
    }


def _body(model: str, length: int, rng: random.Random) -> dict:
    return {"model": model, "input": [rng.randrange(3, 500) for _ in range(length)], "encoding_format": "base64"}


def _session():
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None))


async def _post(session, url: str, body: dict, record: Sent) -> None:
    """Send one request and fill in ``record``; a cancellation leaves ``record.done`` None."""
    import aiohttp

    try:
        async with session.post(url + "/v1/embeddings", json=body) as response:
            await response.read()
            record.ok = response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        record.ok = False
    record.done = time.monotonic()


async def _drive(url: str, model: str, context: int, *, concurrency: int | None, rate: float | None,
                 duration_s: float, drain_s: float, seed: int, gpus: int) -> dict:
    """Closed loop (``concurrency`` clients) or open loop (Poisson at ``rate``) for ``duration_s``,
    then up to ``drain_s`` for the late answers; what is still unanswered then is cancelled."""
    rng = random.Random(seed)
    sent: list[Sent] = []
    async with _session() as session:

        async def one() -> None:
            record = Sent(time.monotonic())
            sent.append(record)
            await _post(session, url, _body(model, context, rng), record)

        start = time.monotonic()
        stop_at = start + duration_s
        if concurrency is not None:
            async def client() -> None:
                while time.monotonic() < stop_at:
                    await one()

            tasks = [asyncio.ensure_future(client()) for _ in range(concurrency)]
        else:
            tasks = []
            next_at = start
            while next_at < stop_at:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                tasks.append(asyncio.ensure_future(one()))
                next_at += rng.expovariate(rate)
        pending: set = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, stop_at + drain_s - time.monotonic()))
        cut_at = time.monotonic()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return window_point(sent, context, start=start, stop_at=stop_at, cut_at=cut_at, gpus=gpus)


def warmup_lengths(context: int) -> list[int]:
    """Every power-of-two request length below ``context``, then ``context``."""
    return [*(1 << i for i in range(context.bit_length()) if 1 << i < context), context]


def warmup_concurrency(clients: int, batched_tokens: int, context: int, ranks: int) -> list[int]:
    """Requests in flight at once, doubling from one per rank to the most a timed run reaches:
    the closed loop's clients, or (an open loop's queue) a full token budget on every rank."""
    top = max(clients, ranks * -(-batched_tokens // context))
    levels = []
    level = ranks
    while level < top:
        levels.append(level)
        level *= 2
    return [*levels, top]


async def _burst(url: str, model: str, lengths: list[int], seed: int) -> list[Sent]:
    """Requests of ``lengths`` tokens sent at once; returns when all are answered."""
    rng = random.Random(seed)
    records = [Sent(time.monotonic()) for _ in lengths]
    async with _session() as session:
        await asyncio.gather(*(_post(session, url, _body(model, n, rng), r) for n, r in zip(lengths, records)))
    return records


def warm_up(url: str, model: str, context: int, *, clients: int, batched_tokens: int, ranks: int,
            warmup_s: float, drain_s: float, gpus: int) -> dict:
    """Every step size the timed runs at ``context`` can produce, before they start (module docstring)."""
    lengths = warmup_lengths(context)
    levels = warmup_concurrency(clients, batched_tokens, context, ranks)
    records = [r for n in lengths for r in asyncio.run(_burst(url, model, [n] * ranks, seed=n))]
    records += [r for k in levels for r in asyncio.run(_burst(url, model, [context] * k, seed=k))]
    done = {"lengths": lengths, "copies_per_length": ranks, "concurrency": levels,
            "requests": len(records), "failed": sum(not r.ok for r in records), "closed_loop_s": warmup_s}
    if warmup_s > 0:
        closed = asyncio.run(_drive(url, model, context, concurrency=clients, rate=None, duration_s=warmup_s,
                                    drain_s=drain_s, seed=1, gpus=gpus))
        done["requests"] += closed["sent"]
        done["failed"] += closed["failed"]
    return done


class LogCursor:
    """The lines a growing log file gained since the cursor last looked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()


def jit_events(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if JIT_EVENT.search(line)]


def server_memory(log_text: str) -> dict:
    """Memory facts from a server log: KV-cache tokens per engine, GiB per worker."""
    graphs = GRAPHS.findall(log_text)
    return {
        "kv_cache_tokens": [int(n.replace(",", "")) for n in KV_TOKENS.findall(log_text)],
        "kv_cache_gib": [float(x) for x in KV_MEMORY_GIB.findall(log_text)],
        "weights_gib": [float(x) for x in WEIGHTS_GIB.findall(log_text)],
        "cuda_graphs_gib": [float(gib) for _, gib in graphs],
    }


class MemorySampler:
    """Peak GPU memory in use (MiB per GPU) while running, from nvidia-smi."""

    def __init__(self) -> None:
        self.peak_mib: list[int] = []
        self.total_mib: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            rows = [[int(x) for x in line.split(",")] for line in out.splitlines() if "," in line]
            used, self.total_mib = [u for u, _ in rows], [t for _, t in rows]
            self.peak_mib = [max(a, b) for a, b in zip(self.peak_mib, used)] if self.peak_mib else used

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# -- one server -------------------------------------------------------------------------------


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
    """Profile a few steps under closed-loop load; the traces' breakdown (traces then deleted)."""
    try:
        httpx.post(server.url + "/start_profile", timeout=120).raise_for_status()
        asyncio.run(_drive(server.url, model, context, concurrency=clients, rate=None, duration_s=args.profile_s,
                           drain_s=args.drain_s, seed=4, gpus=gpus))
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


def _latency(point: dict, key: str) -> str:
    value = point.get(f"{key}_s")
    if value is None:
        return "-"
    return f"{'>=' if point.get(f'{key}_at_least') else ''}{value:.3f} s"


def _point_line(point: dict) -> str:
    return (f"{point['input_tokens_per_s_per_gpu']:,.0f} tok/s/GPU, p50 {_latency(point, 'p50')}, "
            f"p99 {_latency(point, 'p99')}, late {point['late']}, unanswered {point['unanswered']}, "
            f"failed {point['failed']}")


def run_server(args, model: ModelChoice, layout: Layout, batched_tokens: int, work: Path, log,
               runs: list[dict], gpu_names: list[str], peaks: dict[str, tuple[float, str]]) -> dict:
    directory = model_dir(work, model)
    server_args = ["--runner", "pooling", "--convert", "embed", "--dtype", "bfloat16", "--load-format", "dummy",
                   "--hf-overrides", json.dumps({"num_hidden_layers": model.layers}),
                   "--max-model-len", str(max(args.contexts) + 64), "--max-num-batched-tokens", str(batched_tokens),
                   *layout.args]
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
                    "server_args": server_args, "env": env}
    if layout.gpus > len(gpu_names):
        log(f"  {name}: needs {layout.gpus} GPUs, {len(gpu_names)} visible")
        return result | {"started": False, "error": f"needs {layout.gpus} GPUs, {len(gpu_names)} visible"}
    server = VllmServer(directory, server_args, log_path, device="cuda", env=env)
    measurements: list[dict] = []
    with MemorySampler() as memory:
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
                cursor = LogCursor(server.log_path)
                warmup = warm_up(server.url, str(directory), context, clients=clients, batched_tokens=batched_tokens,
                                 ranks=layout.data_parallel_size, warmup_s=args.warmup_s, drain_s=args.drain_s,
                                 gpus=layout.gpus)
                warmup_jit = jit_events(cursor.new_lines())
                closed = asyncio.run(_drive(server.url, str(directory), context, concurrency=clients, rate=None,
                                            duration_s=args.duration_s, drain_s=args.drain_s, seed=2, gpus=layout.gpus))
                flops_per_token = request_flops(spec, context, 0, head_tokens=0) / context
                closed["mfu"] = closed["input_tokens_per_s_per_gpu"] * flops_per_token / (peak_tflops * 1e12)
                entry = {"context": context, "concurrency": clients, "warmup": warmup, "closed_loop": closed,
                         "open_loop": []}
                log(f"  {name} ctx {context}: warm-up {warmup['requests']} requests ({len(warmup_jit)} JIT events); "
                    f"closed loop {_point_line(closed)}")
                own_peak = closed["requests_per_s"] if layout.name == args.reference_layout else None
                for rate in open_loop_rates(args, runs, model, context, own_peak):
                    point = asyncio.run(_drive(server.url, str(directory), context, concurrency=None, rate=rate,
                                               duration_s=args.duration_s, drain_s=args.drain_s, seed=3,
                                               gpus=layout.gpus))
                    entry["open_loop"].append({"offered_requests_per_s": rate} | point)
                    log(f"    open loop {rate} req/s: {_point_line(point)}")
                entry["jit_events"] = {"warmup": warmup_jit, "measured": jit_events(cursor.new_lines())}
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


def open_loop_p99(runs: list[dict], model: str, context: int) -> dict[str, dict[str, dict]]:
    """p99 latency per offered rate (requests/s), per layout: equal load, side by side
    (``p99_at_least``: a lower bound, where requests cut off unanswered decide it)."""
    table: dict[str, dict[str, dict]] = {}
    for run in runs:
        if run["model"] != model:
            continue
        for entry in run.get("measurements", []):
            if entry["context"] != context:
                continue
            for point in entry["open_loop"]:
                label = f"{run['layout']}@{run['max_num_batched_tokens']}"
                table.setdefault(str(point["offered_requests_per_s"]), {})[label] = {
                    "p99_s": point["p99_s"], "p99_at_least": point.get("p99_at_least", False)}
    return table


def _same_layers_ratio(runs: list[dict], ours: tuple[str, str], theirs: tuple[str, str],
                       value: Callable[[str, str], float | None]) -> float | None:
    """``value(model_key, layout)`` of ``ours`` over ``theirs`` ((config name, layout) each), at
    the largest layer count both were measured with."""
    layer_counts = sorted({int(r["model"].rsplit(":", 1)[1]) for r in runs}, reverse=True)
    for layers in layer_counts:
        a, b = value(f"{ours[0]}:{layers}", ours[1]), value(f"{theirs[0]}:{layers}", theirs[1])
        if a and b:
            return round(a / b, 3)
    return None


def _kv_tokens(runs: list[dict], model: str, layout: str) -> int | None:
    """KV-cache tokens per engine (the smallest engine's) of the layout's first started run."""
    counts = [min(r["kv_cache_tokens"]) for r in runs
              if r["model"] == model and r["layout"] == layout and r.get("started") and r.get("kv_cache_tokens")]
    return counts[0] if counts else None


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
    # Two GPUs: AsyncEP's best layout against stock's best.
    for short, model_prefix, context in (("235b_512", "qwen3-235b-a22b", 512), ("235b_4k", "qwen3-235b-a22b", 4096),
                                          ("30b_4k", "qwen3-30b-a3b", 4096)):
        found = summary["comparisons"].get(f"{model_prefix}_{context}")
        summary[f"asyncep_vs_best_stock_{short}"] = found["asyncep_vs_best_stock"] if found else None
        summary[f"best_stock_layout_{short}"] = found["best_stock_layout"] if found else None
    # One GPU: closed-loop input tokens/s per GPU at 2,048 tokens per request, and KV capacity.
    def throughput(model: str, layout: str) -> float | None:
        return best_by_layout(runs, model, 2048).get(layout, {}).get("input_tokens_per_s_per_gpu")

    def kv_tokens(model: str, layout: str) -> int | None:
        return _kv_tokens(runs, model, layout)

    bf16, fp8 = "qwen3-30b-a3b", "qwen3-30b-a3b-fp8"
    for key, ours, theirs, value in (
        ("asyncep_vs_stock_30b_2k", (bf16, "asyncep"), (bf16, "stock"), throughput),
        ("kv_tokens_asyncep_vs_stock", (bf16, "asyncep"), (bf16, "stock"), kv_tokens),
        ("asyncep_fp8_vs_stock_fp8", (fp8, "asyncep"), (fp8, "stock"), throughput),
        ("asyncep_fp8_vs_asyncep_bf16", (fp8, "asyncep"), (bf16, "asyncep"), throughput),
        ("kv_tokens_asyncep_fp8_vs_stock_fp8", (fp8, "asyncep"), (fp8, "stock"), kv_tokens),
    ):
        summary[key] = _same_layers_ratio(runs, ours, theirs, value)
    entries = [entry for run in runs for entry in run.get("measurements", [])]
    points = [point for entry in entries for point in (entry["closed_loop"], *entry["open_loop"])]
    summary["late_requests"] = sum(point.get("late", 0) for point in points)
    summary["unanswered_requests"] = sum(point.get("unanswered", 0) for point in points)
    summary["jit_events_during_measurement"] = sum(len(e.get("jit_events", {}).get("measured", [])) for e in entries)
    return summary


def print_table(runs: list[dict]) -> None:
    print(f"{'model':<22}{'layout':<34}{'tokens':>8}{'ctx':>7}{'tok/s/GPU':>12}{'req/s':>9}{'p50 s':>9}{'p99 s':>9}"
          f"{'late':>6}{'MFU':>7}  KV tokens")
    for run in runs:
        if not run.get("started"):
            print(f"{run['model']:<22}{run['layout']:<34}{run['max_num_batched_tokens']:>8}  did not start")
            continue
        for entry in run.get("measurements", []):
            c = entry["closed_loop"]
            p50, p99 = (("" if not c.get(f"{k}_at_least") else ">=") + (f"{c[f'{k}_s']:.2f}" if c[f"{k}_s"] is not None else "-")
                        for k in ("p50", "p99"))
            mfu = f"{c['mfu']:.1%}" if c.get("mfu") is not None else "-"
            late = c.get("late", 0) + c.get("unanswered", 0)
            kv = ",".join(f"{n:,}" for n in run.get("kv_cache_tokens", [])) or "-"
            print(f"{run['model']:<22}{run['layout']:<34}{run['max_num_batched_tokens']:>8}{entry['context']:>7}"
                  f"{c['input_tokens_per_s_per_gpu']:>12,.0f}{c['requests_per_s']:>9.1f}{p50:>9}{p99:>9}{late:>6}{mfu:>7}  {kv}")


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
                    p99 = [math.nan if p["p99_s"] is None else p["p99_s"] for _, p in points]
                    latency.plot(offered, p99, "s--", color=color, alpha=0.6)
            ax.set_xlabel("offered requests/s (last point: closed loop)")
            ax.set_ylabel("achieved K tokens/s per GPU (solid)")
            latency.set_ylabel("p99 latency, s (dashed; a lower bound where marked in the JSON)")
            ax.set_title(f"{context} tokens per request", fontsize=9)
            ax.grid(alpha=0.3)
        for ax in row[1 + len(contexts):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


METHOD = {
    "timing": "after start-up (compile, CUDA-graph capture) and the warm-up; throughput counts the answers inside "
              "the window of --duration-s",
    "late": "late: sent in the window, answered after it (latency counted); unanswered: still open --drain-s after "
            "the window, cut off (the client disconnects); a percentile they can move is their lower bound "
            "(p50_at_least / p99_at_least true)",
    "warmup": "per context: one request of every power-of-two length up to the context (one per DP rank), the "
              "context at doubling concurrency up to the timed runs' largest, then --warmup-s of closed loop; "
              "jit_events: vLLM's kernel-JIT warnings logged during the warm-up and during the timed windows",
    "per_gpu": "divided by the layout's GPUs (data-parallel x tensor-parallel size)",
    "mfu": "true FLOPs of the served layers (linear + causal attention) over the GPU's dense datasheet peak for the "
           "checkpoint's format (peak_tflops, peak_source per run)",
    "memory": "kv_cache_tokens per engine and kv_cache_gib / weights_gib per worker from the server log; "
              "gpu_memory_peak_mib from nvidia-smi, start-up to end",
    "step_budget": "step_budget_policy per run: stock fills --max-num-batched-tokens; token_budget_steps layouts set "
                   f"AsyncEP's FLOPs budget to {UNREACHABLE_FLOPS_BUDGET:.0e} (never reached), so the token budget "
                   "is the only per-step limit on both sides",
}


def import_runs(paths: list[Path], runs: list[dict], gpu: str | None, vllm_version: str) -> list[dict]:
    """Add the runs of other results files measured on this GPU with this vLLM (marked
    ``imported_from``); what was imported or skipped, and why."""
    record = []
    for path in paths:
        if not path.exists():
            record.append({"file": str(path), "skipped": "no such file"})
            continue
        data = json.loads(path.read_text())
        theirs = (data.get("gpu"), data.get("summary", {}).get("vllm_version"))
        if theirs != (gpu, vllm_version):
            record.append({"file": str(path), "skipped": f"measured on {theirs[0]} with vLLM {theirs[1]}, "
                                                         f"this run is {gpu} with vLLM {vllm_version}"})
            continue
        have = {(r["model"], r["layout"], r["max_num_batched_tokens"]) for r in runs}
        new = [r | {"imported_from": str(path)} for r in data.get("runs", [])
               if (r["model"], r["layout"], r["max_num_batched_tokens"]) not in have]
        runs.extend(new)
        record.append({"file": str(path), "runs": [f"{r['model']} {r['layout']}" for r in new]})
    return record


def peaks_for(gpu_name: str, override: float | None) -> dict[str, tuple[float, str]]:
    """Peak TFLOP/s per weight format (and its source) for MFU: ``--peak-tflops``, else the datasheet's."""
    if override is not None:
        return {dtype: (override, "--peak-tflops") for dtype in ("bf16", "fp8")}
    found = {dtype: datasheet_peak(gpu_name, dtype) for dtype in ("bf16", "fp8")}
    return {dtype: peak for dtype, peak in found.items() if peak is not None}


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
    parser.add_argument("--warmup-s", type=float, default=8.0, help="closed-loop seconds at the end of the warm-up")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak per GPU for MFU (default: the shipped H100/H200 datasheet figure for the "
                             "checkpoint's format)")
    parser.add_argument("--stock-moe-configs", type=Path, default=None,
                        help="a VLLM_TUNED_CONFIG_FOLDER for the stock layouts (benchmarks/tune_vllm_moe.py)")
    parser.add_argument("--profile-context", type=int, default=None,
                        help="also profile each server at this context (one of --contexts)")
    parser.add_argument("--profile-s", type=float, default=4.0, help="seconds of load while profiling")
    parser.add_argument("--keep-traces", action="store_true", help="keep the raw traces beside the logs")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vllm_serve-h200x2.json")
    parser.add_argument("--merge", action="store_true", help="add to the runs (and keep the rest) of --out")
    parser.add_argument("--import-runs", nargs="+", type=Path, default=[], metavar="FILE",
                        help="also compare with these results files' runs (same GPU and vLLM only)")
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

    gpu_names = visible_gpus()
    if not gpu_names:
        parser.error("no GPU visible (nvidia-smi lists none)")
    peaks = peaks_for(gpu_names[0], args.peak_tflops)
    missing = sorted({m.dtype for m in args.models} - set(peaks))
    if missing:
        parser.error(f"no datasheet peak for {gpu_names[0]} in {missing}: pass --peak-tflops")

    import vllm

    earlier: dict = {}
    if args.merge and args.out.exists():
        earlier = json.loads(args.out.read_text())
        if earlier.get("runs") and earlier.get("gpu") not in (None, gpu_names[0]):
            parser.error(f"--merge: {args.out} holds runs measured on {earlier['gpu']}, this machine has "
                         f"{gpu_names[0]}: write to another --out")
    runs: list[dict] = earlier.get("runs", [])
    commands = [*earlier.get("commands", []),
                " ".join(["python", "benchmarks/vllm_serve.py", *(argv if argv is not None else sys.argv[1:])])]
    imports = [*earlier.get("imports", []), *import_runs(args.import_runs, runs, gpu_names[0], vllm.__version__)]
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

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
