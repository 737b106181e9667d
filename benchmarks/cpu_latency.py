"""Single-request latency of the CPU demo server (vLLM, DP=2, AsyncEP) by switch point.

The demo's server (``zeroprefill demo``: a generated tiny Qwen3-MoE, fp32, two CPU ranks over
gloo) answers one ``/v1/embeddings`` request at a time, so every forward pass is light: a few
tokens on one rank and a dummy batch on the other. For each switch point given, one server
starts with ``ZEROPREFILL_ASYNCEP_SWITCH_TOKENS`` set to it and answers the same requests:

- ``0``: every pass streams expert weights (what AsyncEP did before passes could move tokens);
- above the requests' token counts: every pass moves the tokens to the resident experts.

Warm-up requests run first (outside the timing); then ``--requests`` short texts, sequentially.
Prints a table and writes JSON (p50, p90, p95, p99, mean, all latencies, and how many took
over 500 ms: vLLM's idle data-parallel engines answer an occasional lone request about a second
late whatever the mode, which sets p99 at this request count)::

    python benchmarks/cpu_latency.py --out benchmarks/results/cpu_latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from vllm_zeroprefill.server import ServerStartError, VllmServer, asyncep_args
from zeroprefill.tiny_model import TinyMoEConfig, generate_tiny_moe

TEXTS = ["Paris is the capital of France.", "What do experts do?", "a", "Mixture-of-experts routing, briefly."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(model_dir: Path, switch_tokens: int, requests: int, warmup: int, log: Path) -> dict:
    args = ["--runner", "pooling", "--convert", "embed", *asyncep_args(2)]
    env = {"ZEROPREFILL_ASYNCEP_SWITCH_TOKENS": str(switch_tokens)}
    with VllmServer(model_dir, args, log, num_ranks=2, env=env) as server:
        server.wait_healthy(timeout_s=600)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            latencies = []
            for i in range(warmup + requests):
                body = {"model": str(model_dir), "input": f"{TEXTS[i % len(TEXTS)]} #{i}"}
                started = time.perf_counter()
                response = client.post("/v1/embeddings", json=body)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                if i >= warmup:
                    latencies.append(elapsed)
    return {
        "switch_tokens": switch_tokens,
        "requests": requests,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p90_ms": 1e3 * percentile(latencies, 0.9),
        "p95_ms": 1e3 * percentile(latencies, 0.95),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
        "mean_ms": 1e3 * statistics.fmean(latencies),
        # vLLM's idle DP engines sometimes answer a lone request about a second late, in either mode
        "over_500ms": sum(x > 0.5 for x in latencies),
        "latencies_ms": [round(1e3 * x, 3) for x in latencies],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch-tokens", type=int, nargs="+", default=[0, 4096],
                        help="switch points to compare (0: always stream weights)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_latency.json"))
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.switch_tokens) or args.requests < 1 or args.warmup < 0:
        parser.error("switch points must be >= 0, --requests >= 1, --warmup >= 0")

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = generate_tiny_moe(Path(tmp) / "model", TinyMoEConfig())
        for switch in args.switch_tokens:
            print(f"{time.strftime('%H:%M:%S')} switch point {switch}: starting the DP=2 server", flush=True)
            try:
                runs.append(measure(model_dir, switch, args.requests, args.warmup, Path(tmp) / f"server-{switch}.log"))
            except ServerStartError as exc:
                print(f"cpu_latency: the server with switch point {switch} did not start: {exc}", file=sys.stderr)
                return 1
    print(f"\n{'switch point':>12} {'p50 ms':>8} {'p90 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'> 500 ms':>8}")
    for run in runs:
        print(f"{run['switch_tokens']:>12} {run['p50_ms']:>8.1f} {run['p90_ms']:>8.1f} {run['p95_ms']:>8.1f} "
              f"{run['p99_ms']:>8.1f} {run['mean_ms']:>8.1f} {run['over_500ms']:>8}")
    result = {
        "meta": {"what": "sequential single /v1/embeddings requests, tiny Qwen3-MoE, vLLM CPU, DP=2 AsyncEP over gloo",
                 "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                 "command": " ".join(["python", "benchmarks/cpu_latency.py", *(argv if argv is not None else sys.argv[1:])])},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
