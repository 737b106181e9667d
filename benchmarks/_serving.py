"""What the two serving benchmarks share (``vllm_serve.py``, ``sglang_gpu_check.py``).

- nvidia-smi: its answer to a GPU query (:func:`nvidia_smi`), every GPU's memory in use and in
  all (:func:`gpu_memory_mib`), and :class:`GpuMemoryPeak`, the sampler (an
  :class:`NvidiaSmiSampler`, as :class:`GpuTelemetry` is) that runs beside a
  server and keeps each GPU's peak; no CUDA context is created in the benchmark's process (it
  would take memory from the servers' budgets);
- :class:`GpuTelemetry`: what each GPU did during a timed window (SM clock against its maximum,
  power against its limit, temperature, utilization, the clock-event reasons: power capping,
  thermal or hardware slowdown), so that two machines' throughputs can be told apart from
  their clocks; :func:`telemetry_line` says it in one line, :func:`lowest_over_gpus` gives the
  numbers to put beside a throughput (the slowest GPU's clock, the least busy GPU's share);
- :class:`ProcessCpu`: the CPU each of a server's processes, and the load generator, used in a
  timed window, with its busiest thread's share (:func:`cpu_line`): a process held to one
  core's speed is the bottleneck there, not the GPU;
- the load generators' HTTP client: :func:`client_session`, :func:`closed_loop_clients`
  (clients that send their next request as soon as the last is answered) and
  :func:`open_loop_arrivals` (requests at Poisson arrival times, answered or not), and
  :func:`per_second`, a window's answers per second;
- :func:`write_json`: a results file rewritten whole after every measurement.

Imported as a sibling module (``benchmarks/`` on ``sys.path``, as when a script there runs).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

# -- nvidia-smi -------------------------------------------------------------------------------


def nvidia_smi(fields: str, *, units: bool = True, timeout_s: float = 10.0, check: bool = False) -> str:
    """nvidia-smi's CSV answer to ``--query-gpu=fields``: one line per GPU, no header (no units
    where ``units`` is False). Raises OSError without nvidia-smi, TimeoutExpired if it hangs,
    CalledProcessError if it exits non-zero and ``check`` (it does for a field it does not know)."""
    fmt = "csv,noheader" if units else "csv,noheader,nounits"
    return subprocess.run(["nvidia-smi", f"--query-gpu={fields}", f"--format={fmt}"],
                          capture_output=True, text=True, timeout=timeout_s, check=check).stdout


def gpu_memory_mib() -> tuple[list[int], list[int]]:
    """``memory.used`` and ``memory.total`` of every GPU in MiB (two empty lists where nvidia-smi
    is missing or fails)."""
    try:
        out = nvidia_smi("memory.used,memory.total", units=False)
        rows = [[int(x) for x in line.split(",")] for line in out.splitlines() if "," in line]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return [], []
    return [used for used, _ in rows], [total for _, total in rows]


def gpu_memory_used_mib() -> list[int]:
    """``memory.used`` of every GPU, in MiB (empty without nvidia-smi)."""
    return gpu_memory_mib()[0]


class NvidiaSmiSampler:
    """Calls :meth:`_sample` every ``interval_s`` in a daemon thread from entry to exit, where
    nvidia-smi exists (:attr:`found` says whether it did). Exit only stops the thread: a reader
    waits for the last sample with :meth:`_join`, so an event loop is not held up at exit."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.found = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self.found = shutil.which("nvidia-smi") is not None
        if self.found:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _join(self, timeout_s: float = 15.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            self._sample()
            if self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started))):
                return


class GpuMemoryPeak(NvidiaSmiSampler):
    """Peak ``memory.used`` of each GPU (MiB, ``peak_mib``) from entry to exit, sampled by
    nvidia-smi every ``interval_s`` in a thread, and each GPU's ``memory.total`` (``total_mib``).
    Both stay empty without nvidia-smi; a failed reading is skipped."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(interval_s)
        self.peak_mib: list[int] = []
        self.total_mib: list[int] = []

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._join()

    def _sample(self) -> None:
        used, total = gpu_memory_mib()
        if used:
            self.total_mib = total
            self.peak_mib = [max(pair) for pair in zip(self.peak_mib, used)] if self.peak_mib else used


# -- GPU telemetry ----------------------------------------------------------------------------

#: What :class:`GpuTelemetry` reads of each GPU, after ``index`` (nvidia-smi's names, no units).
TELEMETRY_FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "enforced.power.limit",
                    "temperature.gpu", "utilization.gpu", "memory.used")
#: The active clock-event reasons, as newer drivers name the field, then as older ones do.
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
#: NVML's clock-event reason bits (``nvmlClocksEventReason*``); another bit is named by its value.
CLOCK_EVENT_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                       0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                       0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake", 0x100: "display_clock_setting"}


def cuda_visible_indices() -> set[str] | None:
    """The GPU indices ``CUDA_VISIBLE_DEVICES`` lists, where it lists integers; None (every GPU)
    where it is unset or names GPUs otherwise (UUIDs)."""
    listed = [item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    return {str(int(item)) for item in listed} if all(item.isdigit() for item in listed) else None


def _number(text: str) -> float | None:
    """A reading as a number; None for nvidia-smi's "[N/A]" or "[Not Supported]"."""
    try:
        return float(text)
    except ValueError:
        return None


def _mask(text: str) -> int | None:
    """A clock-event reason mask ("0x0000000000000004") as an integer; None if unreadable."""
    try:
        return int(text, 16)
    except ValueError:
        return None


def _gpu_summary(readings: list[dict[str, str]], reason_field: str | None) -> dict[str, Any]:
    """One GPU's samples (field -> text), summarised: the keys of :attr:`GpuTelemetry.summary`."""
    def values(field: str) -> list[float]:
        return [value for reading in readings if (value := _number(reading[field])) is not None]

    def mean(field: str) -> float | None:
        found = values(field)
        return round(statistics.fmean(found), 1) if found else None

    clocks = values("clocks.sm")
    masks = [] if reason_field is None else [m for r in readings if (m := _mask(r[reason_field])) is not None]
    seen = [1 << bit for bit in range(max(masks, default=0).bit_length()) if any(m >> bit & 1 for m in masks)]
    active = {CLOCK_EVENT_REASONS.get(bit, hex(bit)): round(sum(bool(m & bit) for m in masks) / len(masks), 3)
              for bit in seen}
    return {
        "samples": len(readings),
        "sm_clock_mhz_median": statistics.median(clocks) if clocks else None,
        "sm_clock_mhz_min": min(clocks, default=None),
        "max_sm_clock_mhz": max(values("clocks.max.sm"), default=None),
        "power_w_mean": mean("power.draw"),
        "power_w_max": max(values("power.draw"), default=None),
        "power_limit_w": min(values("power.limit"), default=None),
        "enforced_power_limit_w": min(values("enforced.power.limit"), default=None),
        "temperature_c_max": max(values("temperature.gpu"), default=None),
        "utilization_pct_mean": mean("utilization.gpu"),
        "memory_used_mib_max": max(values("memory.used"), default=None),
        # each reason seen: the fraction of the samples (with a readable mask) it was active in
        "clock_event_reasons": active if masks else None,
    }


class GpuTelemetry(NvidiaSmiSampler):
    """What each GPU did from entry to exit, read by nvidia-smi every ``interval_s`` in a thread.

    :attr:`summary`, after exit: per GPU index (a string, as JSON keys are), the samples taken,
    the SM clock's median and minimum against ``clocks.max.sm``, mean and peak power against
    the power limit (``power.limit``, and ``enforced.power.limit``), the peak temperature and
    memory used, mean utilization, and each clock-event reason seen with the fraction of samples
    it was active in (``clocks_event_reasons.active``, ``clocks_throttle_reasons.active`` on older
    drivers: the first sample finds which one the driver accepts; None if neither). Only the GPUs
    ``CUDA_VISIBLE_DEVICES`` lists by index are read. Without nvidia-smi, or without a reading,
    the summary is ``{"unavailable": reason}``: telemetry never stops a benchmark. Exit returns at
    once (a load generator's event loop is not held up); the sample under way then is the last.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(interval_s)
        self.samples: list[dict[str, dict[str, str]]] = []  # per sample: GPU index -> field -> text
        self.error = "no sample in the window"
        self._visible = cuda_visible_indices()
        self._reason_fields: tuple[str | None, ...] = (*REASON_FIELDS, None)  # narrowed to one by a reading

    @property
    def summary(self) -> dict[str, Any]:
        """Per GPU index, the window's figures (class docstring); ``{"unavailable": reason}`` without any."""
        self._join(timeout_s=10)
        samples = list(self.samples)
        if not samples:
            return {"unavailable": self.error if self.found else "nvidia-smi not found"}
        indices = sorted({index for sample in samples for index in sample}, key=int)
        reason_field = self._reason_fields[0]
        return {index: _gpu_summary([s[index] for s in samples if index in s], reason_field) for index in indices}

    def _sample(self) -> None:
        """One reading of every GPU, kept where it read; the reasons' field tried in order until one answers."""
        for reason_field in self._reason_fields:
            fields = ["index", *TELEMETRY_FIELDS, *([reason_field] if reason_field else [])]
            try:
                out = nvidia_smi(",".join(fields), units=False, timeout_s=5, check=True)
                rows = [[value.strip() for value in line.split(",")] for line in out.splitlines() if line.strip()]
                if not rows or any(len(row) != len(fields) for row in rows):
                    raise ValueError(f"nvidia-smi answered {out.strip()[:200]!r}")
            except subprocess.CalledProcessError as exc:
                said = (exc.stdout or exc.stderr or "").strip()[:200]
                self.error = f"nvidia-smi exited with {exc.returncode}: {said}"
            except subprocess.TimeoutExpired:
                self.error = "nvidia-smi did not answer in 5 s"
            except (OSError, ValueError) as exc:
                self.error = str(exc)
            else:
                self._reason_fields = (reason_field,)
                sample = {row[0]: dict(zip(fields[1:], row[1:])) for row in rows
                          if self._visible is None or row[0] in self._visible}
                if sample:
                    self.samples.append(sample)
                else:
                    self.error = f"nvidia-smi lists none of CUDA_VISIBLE_DEVICES {sorted(self._visible or ())}"
                return
            if self._stop.is_set():
                return


def telemetry_line(summary: dict[str, Any]) -> str:
    """A :attr:`GpuTelemetry.summary` in one line: per GPU, the mean share of time it ran a kernel
    (where reported), the median SM clock over its maximum, mean power over its limit, and the
    clock-event reasons seen other than ``gpu_idle``."""
    if "unavailable" in summary:
        return f"GPU telemetry unavailable: {summary['unavailable']}"

    def whole(value: float | None) -> str:
        return "?" if value is None else f"{value:.0f}"

    parts = []
    for index, gpu in summary.items():
        reasons = [f"{name} {fraction:.0%}" for name, fraction in (gpu["clock_event_reasons"] or {}).items()
                   if name != "gpu_idle"]
        busy = gpu.get("utilization_pct_mean")
        parts.append(f"GPU{index} " + (f"busy {whole(busy)}%, " if busy is not None else "")
                     + f"SM {whole(gpu['sm_clock_mhz_median'])}/{whole(gpu['max_sm_clock_mhz'])} MHz, "
                     f"{whole(gpu['power_w_mean'])}/{whole(gpu['power_limit_w'])} W"
                     + (f", {', '.join(reasons)}" if reasons else ""))
    return "; ".join(parts)


def lowest_over_gpus(summary: dict[str, Any] | None, field: str) -> float | None:
    """The lowest ``field`` (``sm_clock_mhz_median``, ``utilization_pct_mean``, ...) over the GPUs
    of a :attr:`GpuTelemetry.summary` (None without one, or where no GPU reported it)."""
    values = [gpu.get(field) for index, gpu in (summary or {}).items() if index != "unavailable"]
    return min((value for value in values if value is not None), default=None)


# -- CPU time per process --------------------------------------------------------------------

#: A process below this many cores busy in a window is counted, not listed.
CPU_LISTED_CORES = 0.05


class ProcessCpu:
    """How busy a server's processes and the load generator kept the CPUs in a timed window:
    per process, CPU seconds per second of window (``busy_cores``) and those of its busiest
    thread (``busiest_thread_cores``). A thread near 1.0 runs as fast as one core lets it: an
    HTTP frontend's event loop or an engine's step loop that bounds a throughput shows here,
    where the GPU's idle time alone cannot say which side starved it.

    :meth:`open` and :meth:`close` read the kernel's counters (psutil) for every process under
    ``roots`` (descendants included) and for this process (``load generator``); the summary
    covers the processes alive at both readings, the busiest first, those under
    :data:`CPU_LISTED_CORES` only counted unless they are one of ``roots``.
    ``{"unavailable": reason}`` without psutil."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self._opened: tuple[float, dict] | None = None
        self.summary: dict[str, Any] = {}

    def _read(self) -> tuple[float, dict]:
        import psutil

        processes = [psutil.Process()]
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                processes += [root, *root.children(recursive=True)]
            except psutil.Error:  # gone already
                continue
        readings = {}
        for process in processes:
            try:
                with process.oneshot():
                    spent = process.cpu_times()
                    threads = {thread.id: thread.user_time + thread.system_time for thread in process.threads()}
                    key = (process.pid, process.create_time())
                    name = "load generator" if process.pid == os.getpid() else process.name()
                    readings[key] = (name, spent.user + spent.system, threads)
            except psutil.Error:
                continue
        return time.monotonic(), readings

    def open(self) -> None:
        try:
            self._opened = self._read()
        except ImportError:
            self.summary = {"unavailable": "psutil is not installed"}

    def close(self) -> None:
        if self._opened is None:
            return
        (opened_at, before), (closed_at, after) = self._opened, self._read()
        span_s = max(closed_at - opened_at, 1e-9)
        listed, quiet = [], 0
        for key, (name, cpu_s, threads) in after.items():
            if key not in before:
                continue
            _, cpu_before, threads_before = before[key]
            busy = (cpu_s - cpu_before) / span_s
            if busy < CPU_LISTED_CORES and key[0] not in self.roots:
                quiet += 1
                continue
            busiest = max((spent - threads_before.get(tid, 0.0) for tid, spent in threads.items()), default=0.0)
            listed.append({"process": name, "pid": key[0], "busy_cores": round(busy, 3),
                           "busiest_thread_cores": round(busiest / span_s, 3)})
        self.summary = {"window_s": round(span_s, 3),
                        "processes": sorted(listed, key=lambda entry: -entry["busy_cores"]),
                        "quiet_processes": quiet}


def cpu_line(summary: dict[str, Any]) -> str:
    """A :attr:`ProcessCpu.summary` in one line."""
    if "unavailable" in summary:
        return f"CPU per process unavailable: {summary['unavailable']}"
    busy = ", ".join(f"{entry['process']} {entry['busy_cores']:.2f} ({entry['busiest_thread_cores']:.2f})"
                     for entry in summary.get("processes", []))
    return f"CPU cores busy (busiest thread): {busy or 'none'}; {summary.get('quiet_processes', 0)} processes quiet"


# -- load generation --------------------------------------------------------------------------


def client_session(limit: int = 0, timeout_s: float | None = None) -> Any:
    """An aiohttp session for a load generator: at most ``limit`` connections at once (0: no
    limit), ``timeout_s`` per request (None: none)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


def closed_loop_clients(concurrency: int, stop_at: float, one: Callable[[], Awaitable[None]]) -> list[asyncio.Task]:
    """``concurrency`` clients, each sending its next request (``await one()``) as soon as its
    last one is answered, until ``time.monotonic()`` passes ``stop_at``. Returns their tasks: the
    caller waits for them, or cuts them off."""

    async def client() -> None:
        while time.monotonic() < stop_at:
            await one()

    return [asyncio.ensure_future(client()) for _ in range(concurrency)]


def open_loop_arrivals(rate: float, start: float, stop_at: float, one: Callable[[], Awaitable[None]],
                       rng: random.Random) -> tuple[asyncio.Task, list[asyncio.Task]]:
    """Poisson arrivals at ``rate`` per second from ``start`` until ``stop_at`` (``time.monotonic()``),
    each a task running ``one()``. Returns the task that makes them, and the list it fills with
    theirs: once the first is done the second is whole."""
    requests: list[asyncio.Task] = []

    async def arrive() -> None:
        next_at = start
        while next_at < stop_at:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            requests.append(asyncio.ensure_future(one()))
            next_at += rng.expovariate(rate)

    return asyncio.ensure_future(arrive()), requests


def per_second(times: list[float], begin: float, end: float) -> list[int]:
    """How many of ``times`` (``time.monotonic()``, none before ``begin``) fall in each whole
    second from ``begin`` to ``end`` (the last second may be short; times past ``end`` count in
    it): a window's answers per second, level where its load was steady."""
    seconds = max(1, math.ceil(end - begin - 1e-9))
    counts = [0] * seconds
    for at in times:
        counts[min(seconds - 1, int(at - begin))] += 1
    return counts


# -- results ----------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON at ``path`` (its folder made), written beside it first and then
    moved over it, so that a run cut off while writing leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
