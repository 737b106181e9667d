"""``sglang_gpu_check.py``'s servers: SGLang server processes, their logs, the GPUs' names.

- :class:`ServerSpec` / :class:`Server`: one ``python -m <launcher>`` process with its log file
  (stock servers run with ``SGLANG_PLUGINS=none``); :func:`start_all` starts several together
  and records each one's start or the reason it failed; :func:`stop_all` stops them;
- the log: why a server failed (:func:`failure_reason`, :func:`log_tail`), its KV capacity and
  CUDA graphs (:func:`log_facts`);
- :func:`gpu_names` and :func:`gpu_tag` (the result file's name); the progress line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _serving import nvidia_smi
from zeroprefill.ports import free_port

#: Lines after which an SGLang server is dead even if its process lingers (it waits for core dumps).
FATAL_LOG_MARKERS = ("Received sigquit from a child process", "hit an exception")
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
        self.port = free_port()
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
        # ``python -m`` would put the working directory first on sys.path, where this checkout's
        # ``kernels/`` shadows the ``kernels`` package transformers imports once it is installed
        # (stock SGLang's FP8 start-up died of it, run from the repository root, 2026-12-06).
        env["PYTHONSAFEPATH"] = "1"
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


# -- the machine ------------------------------------------------------------------------------


def gpu_names() -> list[str]:
    """Every GPU's name from nvidia-smi (no CUDA context in this process)."""
    out = nvidia_smi("name", timeout_s=30).strip()
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
