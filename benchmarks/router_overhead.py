"""Router overhead on loopback: ours vs vllm-router vs sglang-router in front of a fake engine.

    .venv/bin/python benchmarks/router_overhead.py [--rust-venv .work/router-venvs/rust-routers]

A zero-latency fake backend (``zeroprefill.router.fake_backend``: canned embedding answers
in microseconds) stands in for the engine, so the latency a client sees through a router is
the router's. For each target — the backend directly, ``zeroprefill router``, ``vllm-router``
and ``sglang-router`` (round-robin policy for the Rust routers; from PyPI, installed into a
separate venv: ``python -m venv V && V/bin/pip install vllm-router sglang-router``) — `wrk`
(``apt-get install wrk``) sends ``POST /v1/embeddings``:

- latency: one connection, closed loop, ``--latency-s`` seconds -> p50 / p99;
- throughput: ``--connections`` connections, ``--throughput-s`` seconds -> requests/s.

Added latency = router p50 (p99) - direct p50 (p99). Everything shares this machine's cores
(wrk, router, backend), identically for every router. Results: table on stdout and
``benchmarks/results/router_overhead.json`` (``summary``: ``added_latency_p50_ms``, ``rps``,
``rps_vllm_router``, ``rps_sglang_router``; a router that cannot run gets null and a reason).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from zeroprefill.ports import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BODY = json.dumps({"model": "fake-model", "input": "Rerank these documents by how well they answer the question."})


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> str | None:
    """None once a POST through ``url`` answers 200; else why not."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with code {process.returncode}"
        request = urllib.request.Request(url + "/v1/embeddings", data=BODY.encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return None
                last = f"HTTP {response.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    return f"not ready after {timeout_s:.0f} s ({last})"


def _wrk(url: str, connections: int, seconds: float, script: Path) -> dict:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(int(seconds), 1)}s", "--latency", "-s", str(script), url + "/v1/embeddings"],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout
    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms("50"), "p99_ms": ms("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1).strip() if socket_errors else None,
    }


def _measure(url: str, args: argparse.Namespace, script: Path) -> dict:
    _wrk(url, 8, 1, script)  # warm connections and code paths
    latency = _wrk(url, 1, args.latency_s, script)
    throughput = _wrk(url, args.connections, args.throughput_s, script)
    return {"latency_run": latency, "throughput_run": throughput,
            "p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"], "rps": throughput["rps"]}


def _version(python: Path, distribution: str) -> str | None:
    out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version('{distribution}'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rust-venv", type=Path, default=REPO / ".work" / "router-venvs" / "rust-routers",
                        help="venv holding vllm-router and sglang-router")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--latency-s", type=int, default=5)
    parser.add_argument("--throughput-s", type=int, default=8)
    parser.add_argument("--json", type=Path, default=RESULTS / "router_overhead.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("router_overhead: wrk not found; install it (apt-get install wrk)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    script = work / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    from zeroprefill.tiny_model import generate_tiny_moe

    model_dir = generate_tiny_moe(work / "tiny-moe")
    python = Path(sys.executable)
    backend_port = free_port()
    backend_url = f"http://127.0.0.1:{backend_port}"
    rust_python = args.rust_venv / "bin" / "python"
    targets: dict[str, list[str] | str] = {"direct": []}
    port = free_port()
    targets["zeroprefill"] = [str(python), "-m", "zeroprefill.cli", "router", "--backend", backend_url,
                              "--model", str(model_dir), "--served-model-name", "fake-model",
                              "--port", str(port)]
    if (args.rust_venv / "bin" / "vllm-router").exists():
        targets["vllm_router"] = [str(args.rust_venv / "bin" / "vllm-router"), "--worker-urls", backend_url,
                                  "--policy", "round_robin", "--log-level", "error",
                                  "--prometheus-port", str(free_port()), "--port", str(free_port())]
    else:
        targets["vllm_router"] = f"not installed in {args.rust_venv}"
    if (args.rust_venv / "bin" / "sglang-router").exists():
        targets["sglang_router"] = [str(rust_python), "-m", "sglang_router.launch_router", "--worker-urls",
                                    backend_url, "--policy", "round_robin", "--log-level", "error",
                                    "--prometheus-port", str(free_port()), "--port", str(free_port())]
    else:
        targets["sglang_router"] = f"not installed in {args.rust_venv}"

    backend = _start([str(python), "-m", "zeroprefill.router.fake_backend", "--port", str(backend_port)],
                     work / "backend.log")
    results: dict[str, dict] = {}
    try:
        reason = _wait_ready(backend_url, backend)
        if reason is not None:
            print(f"router_overhead: fake backend failed: {reason}", file=sys.stderr)
            return 1
        for name, cmd in targets.items():
            if isinstance(cmd, str):
                results[name] = {"rps": None, "p50_ms": None, "p99_ms": None, "reason": cmd}
                continue
            if name == "direct":
                results[name] = _measure(backend_url, args, script)
                continue
            url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
            process = _start(cmd, work / f"{name}.log")
            try:
                reason = _wait_ready(url, process)
                if reason is None:
                    results[name] = _measure(url, args, script)
                else:
                    log_tail = (work / f"{name}.log").read_text()[-400:]
                    results[name] = {"rps": None, "p50_ms": None, "p99_ms": None,
                                     "reason": f"{reason}; log tail: {log_tail}"}
            finally:
                _stop(process)
    finally:
        _stop(backend)

    direct = results["direct"]
    for name, entry in results.items():
        if name != "direct" and entry.get("p50_ms") is not None:
            entry["added_p50_ms"] = entry["p50_ms"] - direct["p50_ms"]
            entry["added_p99_ms"] = entry["p99_ms"] - direct["p99_ms"]
    print(f"{'target':<15} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}")
    for name, entry in results.items():
        if entry.get("rps") is None:
            print(f"{name:<15} unavailable: {entry['reason'][:100]}")
            continue
        print(f"{name:<15} {entry['rps']:>9.0f} {entry['p50_ms']:>8.3f} {entry['p99_ms']:>8.3f} "
              f"{entry.get('added_p50_ms', 0.0):>8.3f} {entry.get('added_p99_ms', 0.0):>8.3f}")
    ours = results["zeroprefill"]
    summary = {
        "added_latency_p50_ms": ours.get("added_p50_ms"),
        "added_latency_p99_ms": ours.get("added_p99_ms"),
        "rps": ours.get("rps"),
        "rps_direct": direct["rps"],
        "rps_vllm_router": results["vllm_router"].get("rps"),
        "rps_sglang_router": results["sglang_router"].get("rps"),
    }
    payload = {
        "summary": summary,
        "config": {"connections": args.connections, "latency_s": args.latency_s, "throughput_s": args.throughput_s,
                   "cpus": os.cpu_count(), "endpoint": "/v1/embeddings", "body_bytes": len(BODY),
                   "rust_router_policy": "round_robin",
                   "vllm_router_version": _version(rust_python, "vllm-router") if rust_python.exists() else None,
                   "sglang_router_version": _version(rust_python, "sglang-router") if rust_python.exists() else None},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    for key, value in summary.items():
        print(f"{key}: {value}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
