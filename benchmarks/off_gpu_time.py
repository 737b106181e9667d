"""Where a served step's time goes besides the GPU, for every profiled server in ``vllm_serve.py`` results.

For each run with a profile and vLLM's engine metrics (``vllm_serve.py --profile-context``), the
time per engine step served against the profile's GPU time per step (the time some kernel ran),
the difference (``off_gpu_ms_per_step``), the part of it the GPU waited for the host, and the
host op under which it waited longest (``fp8_served_bound.served_step``, which this applies to
bf16 and FP8 servers alike):

    python benchmarks/off_gpu_time.py benchmarks/results/vllm_serve-h100x1-persistent.json \
        benchmarks/results/vllm_serve-h100x1-persistent-repeat.json --out off_gpu_time.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fp8_served_bound import served_step


def off_gpu_rows(path: Path) -> list[dict]:
    """One row per profiled run of ``path`` whose closed loop recorded engine metrics."""
    rows = []
    for run in json.loads(path.read_text())["runs"]:
        served = served_step(run) if run.get("profile", {}).get("traces") else None
        if served is not None:
            rows.append({"file": path.name, "model": run["model"], "layout": run["layout"], **served})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="vllm_serve.py results JSONs")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        rows = [row for path in args.results for row in off_gpu_rows(path)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"off_gpu_time: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("off_gpu_time: error: no profiled run with engine metrics (vllm_serve.py --profile-context)",
              file=sys.stderr)
        return 2
    print(f"{'file':42s} {'layout':10s} {'step ms':>8s} {'GPU ms':>8s} {'off GPU':>8s} {'host wait':>9s}  largest")
    for row in rows:
        largest = row.get("host_bound_largest")
        host_wait = row.get("host_bound_ms_per_step")
        print(f"{row['file']:42s} {row['layout']:10s} {row['step_ms_served']:8.2f} {row['step_ms_gpu']:8.2f} "
              f"{row['off_gpu_ms_per_step']:8.2f} {'-' if host_wait is None else f'{host_wait:.2f}':>9s}  "
              + (f"{largest['op']} ({largest['ms_per_step']:.2f} ms)" if largest else "-"))
    if args.out:
        command = " ".join(["python benchmarks/off_gpu_time.py", *(argv if argv is not None else sys.argv[1:])])
        args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
