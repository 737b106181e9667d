"""What the two serving benchmarks share (``vllm_serve.py``, ``sglang_gpu_check.py``).

- nvidia-smi: its answer to a GPU query (:func:`nvidia_smi`), every GPU's memory in use and in
  all (:func:`gpu_memory_mib`), and :class:`GpuMemoryPeak`, the sampler that runs beside a
  server and keeps each GPU's peak; no CUDA context is created in the benchmark's process (it
  would take memory from the servers' budgets);
- the load generators' HTTP client: :func:`client_session` and :func:`closed_loop_clients`
  (clients that send their next request as soon as the last is answered);
- :func:`write_json`: a results file rewritten whole after every measurement.

Imported as a sibling module (``benchmarks/`` on ``sys.path``, as when a script there runs).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# -- nvidia-smi -------------------------------------------------------------------------------


def nvidia_smi(fields: str, *, units: bool = True, timeout_s: float = 10.0) -> str:
    """nvidia-smi's CSV answer to ``--query-gpu=fields``: one line per GPU, no header (no units
    where ``units`` is False). Raises OSError without nvidia-smi, TimeoutExpired if it hangs."""
    fmt = "csv,noheader" if units else "csv,noheader,nounits"
    return subprocess.run(["nvidia-smi", f"--query-gpu={fields}", f"--format={fmt}"],
                          capture_output=True, text=True, timeout=timeout_s).stdout


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


class GpuMemoryPeak:
    """Peak ``memory.used`` of each GPU (MiB, ``peak_mib``) from entry to exit, sampled by
    nvidia-smi every ``interval_s`` in a thread, and each GPU's ``memory.total`` (``total_mib``).
    Both stay empty without nvidia-smi; a failed reading is skipped."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_mib: list[int] = []
        self.total_mib: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuMemoryPeak:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while True:
            used, total = gpu_memory_mib()
            if used:
                self.total_mib = total
                self.peak_mib = [max(pair) for pair in zip(self.peak_mib, used)] if self.peak_mib else used
            if self._stop.wait(self.interval_s):
                return


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


# -- results ----------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON at ``path`` (its folder made), written beside it first and then
    moved over it, so that a run cut off while writing leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
