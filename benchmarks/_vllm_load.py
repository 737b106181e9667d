"""``vllm_serve.py``'s load generation and what it reads from a server's log.

- the closed loop (``--concurrency`` clients) and the open loop (Poisson arrivals) against
  ``/v1/embeddings``, and what a window measured: answers inside it, late ones, ones cut off
  unanswered (:func:`window_point`; :func:`percentile` with cut-off requests as lower bounds),
  and for a timed window what the GPUs did during it (``gpu_telemetry``, :class:`GpuTelemetry`)
  and what the engine did, from vLLM's own metrics (``engine_metrics``, :class:`EngineMetrics`:
  its steps, the tokens they computed, the queue behind them), and the CPU each of the server's
  processes and the load generator used in it (``cpu``, :class:`ProcessCpu`);
- the warm-up before each context's measurements (:func:`warm_up`);
- the server log: the lines a run added (:class:`LogCursor`), kernel JIT events
  (:func:`jit_events`; :class:`JitEvents` tells those inside timed windows apart) and memory
  facts (:func:`server_memory`), in vLLM 0.26 to 0.34's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _serving import GpuTelemetry, ProcessCpu, client_session, closed_loop_clients, open_loop_arrivals, per_second

# What the server log says, in the wording of vLLM 0.26 to 0.34 (0.32+ appends ", Maximum
# concurrency ..." to the KV line; the CPU build says "CPU KV cache size").
KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")
KV_MEMORY_GIB = re.compile(r"Available KV cache memory: ([\d.]+) GiB")
WEIGHTS_GIB = re.compile(r"Model loading took ([\d.]+) GiB")
GRAPHS = re.compile(r"Graph capturing finished in (\d+) secs?, took ([\d.]+) GiB")
# vLLM's kernel JIT monitor (active after its start-up warm-up) and Triton's autotuning report.
JIT_EVENT = re.compile(r"during inference: |Triton autotuning for function")
# vLLM's Prometheus metrics (GET /metrics, 0.26 to 0.34): one observation of the iteration-tokens
# histogram per set of engine-step outputs the API server processes (its count: the steps; its
# sum: the tokens they computed), and the scheduler's queue, per engine label. (Its running
# count is taken after a step, when prefill-only requests have finished: 0, so it is not read.)
STEP_COUNT, STEP_TOKENS = "vllm:iteration_tokens_total_count", "vllm:iteration_tokens_total_sum"
WAITING = "vllm:num_requests_waiting"
METRIC_LINE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)")
ENGINE_LABEL = re.compile(r'engine="([^"]*)"')


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
                 gpus: int, lead_s: float = 0.0) -> dict:
    """What a window measured: throughput from every answer inside it, latency over every
    request sent in it (late answers included, cut-off ones as lower bounds).

    Requests sent in the ``lead_s`` before ``start`` (a lead-in of the same load) count only by
    their answers inside the window, so a window that opens on a loaded server measures its
    steady state. ``answers_by_second``: the answers in each second of the window, to see that
    the rate was steady; ``lead``: the lead-in's requests, how many were answered inside the
    window, and its own answers per second (the ramp the window was kept out of).
    """
    window_s = stop_at - start
    lead = [r for r in sent if r.at < start]
    sent = [r for r in sent if r.at >= start]
    carried_in = [r for r in lead if r.done is not None and r.ok and start <= r.done <= stop_at]
    in_window = [r for r in sent if r.done is not None and r.ok and r.done <= stop_at]
    late = [r for r in sent if r.done is not None and r.ok and r.done > stop_at]
    failed = [r for r in sent if r.done is not None and not r.ok]
    cut = [r for r in sent if r.done is None]
    latencies = [r.done - r.at for r in in_window + late]
    bounds = [cut_at - r.at for r in cut]
    p50, p50_bound = percentile(latencies, bounds, 50)
    p99, p99_bound = percentile(latencies, bounds, 99)
    answers = in_window + carried_in
    point = {
        "sent": len(sent), "requests": len(answers), "late": len(late), "unanswered": len(cut),
        "failed": len(failed), "window_s": round(window_s, 3), "drained_s": round(cut_at - stop_at, 3),
        "requests_per_s": len(answers) / window_s,
        "input_tokens_per_s_per_gpu": len(answers) * context / window_s / gpus,
        "p50_s": p50, "p50_at_least": p50_bound, "p99_s": p99, "p99_at_least": p99_bound,
        "answers_by_second": per_second([r.done for r in answers], start, stop_at),
    }
    if lead_s > 0:
        ramp = [r.done for r in lead if r.done is not None and r.ok and r.done < start]
        point["lead"] = {"s": lead_s, "sent": len(lead), "answered_in_window": len(carried_in),
                         "failed": sum(r.done is not None and not r.ok for r in lead),
                         "answers_by_second": per_second(ramp, start - lead_s, start)}
    return point


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """From Prometheus text, the metrics :class:`EngineMetrics` reads: per name, the value per
    engine label ("" where there is none), series that differ in other labels summed."""
    values: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match and match[1] in (STEP_COUNT, STEP_TOKENS, WAITING):
            engine = ENGINE_LABEL.search(match[2] or "")
            per_engine = values.setdefault(match[1], {})
            key = engine[1] if engine else ""
            per_engine[key] = per_engine.get(key, 0.0) + float(match[3])
    return values


class EngineMetrics:
    """What vLLM's engines did in and before a timed window, from the server's ``/metrics``:
    read when the load starts (:meth:`start`), when the window opens (:meth:`open`) and closes
    (:meth:`stop`), and every ``interval_s`` between (0: not between).

    :meth:`summary`: the engines, the engine steps reported in the window and the tokens they
    computed (``steps``, ``tokens_per_step``; ``tokens_per_s`` over all engines, the engine's own
    count beside the window's answers), the window's time per step on each engine
    (``step_ms``: a closed loop that keeps every engine busy is its step time), and the requests
    waiting after each step, read inside the window (summed over the engines; mean and fewest).
    Against a profile's GPU time per step, ``step_ms`` says how much of a served step is spent
    off the GPU; ``waiting_requests_min`` 0 says the load generator let the queue run dry.
    Rates are over the time between the readings that open and close the window.
    ``timeline``: per reading after the first, ``[seconds from the reading that opened the
    window (0 for it, negative in the lead-in), steps and tokens reported since the reading
    before, requests waiting (None where not reported)]``: whether the engines ran full steps,
    small ones or none while the load ramped up. Never stops a benchmark: where the server has
    no such metrics, ``{"unavailable": reason}``.
    """

    def __init__(self, session, url: str, interval_s: float = 0.5) -> None:
        self.session, self.url, self.interval_s = session, url, interval_s
        self.readings: list[tuple[float, dict[str, dict[str, float]]]] = []  # (when it was asked for, values)
        self.opened = self.closed = -1  # the window's first and last reading, by index
        self.error = ""
        self._sampler: asyncio.Task | None = None
        self._one_at_a_time = asyncio.Lock()  # readings in the order they were asked for

    async def _read(self) -> dict[str, dict[str, float]] | None:
        async with self._one_at_a_time:
            return await self._read_now()

    async def _read_now(self) -> dict[str, dict[str, float]] | None:
        import aiohttp

        asked = time.monotonic()
        try:
            async with self.session.get(self.url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status != 200:
                    self.error = f"GET /metrics answered {response.status}"
                    return None
                values = parse_metrics(await response.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self.error = f"GET /metrics failed: {type(exc).__name__}: {exc}"
            return None
        missing = [name for name in (STEP_COUNT, STEP_TOKENS) if name not in values]
        if missing:
            self.error = f"/metrics has no {' or '.join(missing)}"
            return None
        self.readings.append((asked, values))
        return values

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._read()

    async def start(self) -> None:
        if await self._read() is not None and self.interval_s > 0:
            self._sampler = asyncio.ensure_future(self._sample())

    async def open(self) -> None:
        if await self._read() is not None:
            self.opened = len(self.readings) - 1

    async def stop(self) -> None:
        if self.closed >= 0 or (self.opened < 0 and self._sampler is None):  # closed already, or never read
            return
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        if await self._read() is not None:
            self.closed = len(self.readings) - 1

    def summary(self) -> dict:
        if self.opened < 0 or self.closed < 0:
            return {"unavailable": self.error or "not read"}
        (opened_at, first), (closed_at, last) = self.readings[self.opened], self.readings[self.closed]
        span_s = closed_at - opened_at
        engines = sorted(last[STEP_COUNT])

        def total(values: dict[str, dict[str, float]], name: str) -> float | None:
            return sum(values[name].values()) if name in values else None

        steps = total(last, STEP_COUNT) - total(first, STEP_COUNT)
        tokens = total(last, STEP_TOKENS) - total(first, STEP_TOKENS)
        waiting = [total(values, WAITING) for _, values in self.readings[self.opened + 1:self.closed]
                   if WAITING in values]
        timeline = [[round(at - opened_at, 3), int(total(values, STEP_COUNT) - total(before, STEP_COUNT)),
                     int(total(values, STEP_TOKENS) - total(before, STEP_TOKENS)), total(values, WAITING)]
                    for (_, before), (at, values) in zip(self.readings, self.readings[1:])]
        return {
            "engines": len(engines), "steps": int(steps),
            "tokens_per_step": round(tokens / steps, 1) if steps else None,
            "tokens_per_s": round(tokens / span_s) if span_s > 0 else None,
            "step_ms": round(span_s * len(engines) / steps * 1e3, 2) if steps else None,
            "waiting_requests_mean": round(sum(waiting) / len(waiting), 1) if waiting else None,
            "waiting_requests_min": min(waiting) if waiting else None,
            "queue_readings": len(waiting),
            "timeline": timeline,
        }


def engine_line(summary: dict) -> str:
    """An :meth:`EngineMetrics.summary` in one line."""
    if "unavailable" in summary:
        return f"engine metrics unavailable: {summary['unavailable']}"
    if not summary["steps"]:
        return "engine: no step reported in the window"
    queue = (f"; waiting {summary['waiting_requests_mean']:g} on average (fewest {summary['waiting_requests_min']:g})"
             if summary["queue_readings"] else "")
    return (f"engine: {summary['steps']} steps of {summary['tokens_per_step']:,.0f} tokens "
            f"({summary['tokens_per_s']:,} tokens/s), one per {summary['step_ms']:.0f} ms per engine{queue}")


def _body(model: str, length: int, rng: random.Random) -> dict:
    return {"model": model, "input": [rng.randrange(3, 500) for _ in range(length)], "encoding_format": "base64"}


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
                 duration_s: float, drain_s: float, seed: int, gpus: int, lead_s: float = 0.0,
                 on_open: Callable[[], None] | None = None, on_close: Callable[[], None] | None = None,
                 gpu_telemetry: bool = False, engine_metrics: bool = False, metrics_interval_s: float = 0.5,
                 cpu_roots: list[int] | None = None) -> dict:
    """Closed loop (``concurrency`` clients) or open loop (Poisson at ``rate``): the load runs
    ``lead_s``, then a window of ``duration_s`` opens on it (``on_open`` called then, in a thread
    while the load goes on; ``on_close`` when it ends); then up to ``drain_s`` for the late
    answers; what is still unanswered then is cancelled. ``gpu_telemetry``: the point also says
    what the GPUs did in the window; ``engine_metrics``, what the engine did in it, with a
    timeline from the load's start, read every ``metrics_interval_s`` (0: only when the load
    starts and the window opens and closes; :class:`EngineMetrics`); ``cpu_roots``, how busy the
    processes under these pids, and the load generator, kept the CPUs in it (:class:`ProcessCpu`)."""
    rng = random.Random(seed)
    sent: list[Sent] = []
    telemetry = GpuTelemetry() if gpu_telemetry else None
    cpu = ProcessCpu(cpu_roots) if cpu_roots is not None else None
    async with client_session() as session:
        engine = EngineMetrics(session, url, metrics_interval_s) if engine_metrics else None

        async def one() -> None:
            record = Sent(time.monotonic())
            sent.append(record)
            await _post(session, url, _body(model, context, rng), record)

        if engine is not None:
            await engine.start()
        start = time.monotonic() + lead_s
        stop_at = start + duration_s
        if concurrency is not None:
            arrivals, tasks = None, closed_loop_clients(concurrency, stop_at, one)
        else:
            arrivals, tasks = open_loop_arrivals(rate, start - lead_s, stop_at, one, rng)
        try:
            await asyncio.sleep(max(0.0, start - time.monotonic()))  # the lead-in
            if on_open is not None:
                await asyncio.to_thread(on_open)
            with telemetry or contextlib.nullcontext():
                if engine is not None:
                    await engine.open()
                if cpu is not None:
                    await asyncio.to_thread(cpu.open)
                await asyncio.sleep(max(0.0, stop_at - time.monotonic()))  # the requests go on meanwhile
                if cpu is not None:
                    await asyncio.to_thread(cpu.close)
                if engine is not None:
                    await engine.stop()
            if on_close is not None:
                await asyncio.to_thread(on_close)
            if arrivals is not None:
                await arrivals
        except BaseException:  # nothing of this load outlives it
            if engine is not None:
                await engine.stop()
            unfinished = [*tasks, *([arrivals] if arrivals is not None else [])]
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            raise
        pending: set = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, stop_at + drain_s - time.monotonic()))
        cut_at = time.monotonic()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    point = window_point(sent, context, start=start, stop_at=stop_at, cut_at=cut_at, gpus=gpus, lead_s=lead_s)
    if engine is not None:
        point["engine_metrics"] = engine.summary()
    if cpu is not None:
        point["cpu"] = cpu.summary
    return point | {"gpu_telemetry": telemetry.summary} if telemetry else point


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
    async with client_session() as session:
        await asyncio.gather(*(_post(session, url, _body(model, n, rng), r) for n, r in zip(lengths, records)))
    return records


def warm_up(url: str, model: str, context: int, *, clients: int, batched_tokens: int, ranks: int) -> dict:
    """Every step size the timed runs at ``context`` can produce, before they start (module
    docstring); the closed loop's lead-in then carries the server into the timed window."""
    lengths = warmup_lengths(context)
    levels = warmup_concurrency(clients, batched_tokens, context, ranks)
    records = [r for n in lengths for r in asyncio.run(_burst(url, model, [n] * ranks, seed=n))]
    records += [r for k in levels for r in asyncio.run(_burst(url, model, [context] * k, seed=k))]
    return {"lengths": lengths, "copies_per_length": ranks, "concurrency": levels,
            "requests": len(records), "failed": sum(not r.ok for r in records)}


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


class JitEvents:
    """A server's kernel JIT events, told apart by whether a timed window was open: pass
    :meth:`outside` and :meth:`inside` to :func:`_drive` as ``on_open`` and ``on_close``. What
    the log gained before a window opened (warm-up, lead-in, the last window's drain) is
    ``warmup``; what it gained while one was open, ``measured``."""

    def __init__(self, log_path: Path) -> None:
        self.cursor = LogCursor(log_path)
        self.warmup: list[str] = []
        self.measured: list[str] = []

    def outside(self) -> None:
        self.warmup += jit_events(self.cursor.new_lines())

    def inside(self) -> None:
        self.measured += jit_events(self.cursor.new_lines())


def server_memory(log_text: str) -> dict:
    """Memory facts from a server log: KV-cache tokens per engine, GiB per worker."""
    graphs = GRAPHS.findall(log_text)
    return {
        "kv_cache_tokens": [int(n.replace(",", "")) for n in KV_TOKENS.findall(log_text)],
        "kv_cache_gib": [float(x) for x in KV_MEMORY_GIB.findall(log_text)],
        "weights_gib": [float(x) for x in WEIGHTS_GIB.findall(log_text)],
        "cuda_graphs_gib": [float(gib) for _, gib in graphs],
    }
