"""Predicted saturation threshold vs the knee measured by the end-to-end benchmark.

The planner predicts, from model shapes and a hardware profile alone, the per-GPU batch
above which one layer's expert-weight gather is hidden behind that layer's compute
(``zeroprefill.common.saturation.saturation_threshold_tokens``). The end-to-end benchmark
measures, per tokens-per-GPU point, AsyncEP's exposed communication
``(asyncep - dp) / asyncep`` against the same layers with every expert resident. The
*measured knee* is where exposed communication falls to ``--exposed`` (5%) for good: the
crossing between the last point above it and the first of the points that all stay below,
interpolated in log(tokens). Per (model, dtype, transport, prefetch depth, context)::

    relative_error = |predicted - measured| / measured

Run the sweep first (2 GPUs of one host; a fine token grid, balanced routing, two contexts)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python benchmarks/e2e_prefill.py --gpus 2 \\
        --models qwen3-235b-a22b --dtypes bf16 --routing balanced --contexts 512,4096 \\
        --layouts dp,asyncep-copy_engine-d1,asyncep-nccl-d1 \\
        --tokens 2048,4096,6144,8192,12288,16384,24576,32768 --out e2e-knee.json
    python benchmarks/threshold_validation.py e2e-knee.json --profile calibrated.json \\
        --out benchmarks/results/threshold_validation-h200x2.json

``--profile`` takes the JSON ``zeroprefill calibrate`` wrote on the same machine (default:
the shipped profile for the GPU and GPU count the sweep ran on). The summary's ``timing``
repeats how the sweep timed its passes (``"back-to-back"``); ``null`` marks a sweep written
before that field, whose passes were timed one by one after a barrier, so AsyncEP's
prefetch across the untimed gap flattered its exposed communication (issue 18).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from zeroprefill.common.hardware import load_profile, shipped_profile
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.saturation import Deployment, saturation_threshold_tokens

CONFIGS = Path(__file__).resolve().parent.parent / "common" / "model_configs"


def measured_knee(points: list[tuple[int, float]], exposed_target: float) -> float | None:
    """Tokens where exposed communication crosses ``exposed_target`` for good, or ``None``.

    ``points``: (tokens_per_gpu, exposed fraction), any order. ``None`` when even the largest
    point is above the target; the smallest point's tokens when every point is below it (the
    knee is at or below the sweep's start: an upper bound).
    """
    points = sorted(points)
    if not points or points[-1][1] >= exposed_target:
        return None
    first_below = len(points) - 1
    while first_below > 0 and points[first_below - 1][1] < exposed_target:
        first_below -= 1
    if first_below == 0:
        return float(points[0][0])
    (t0, e0), (t1, e1) = points[first_below - 1], points[first_below]
    fraction = (e0 - exposed_target) / (e0 - e1)
    return math.exp(math.log(t0) + fraction * (math.log(t1) - math.log(t0)))


def validate(e2e: dict, profile_arg: str | None, exposed_target: float) -> dict:
    meta = e2e["meta"]
    num_gpus = int(meta["world_size"])
    if meta.get("device") == "cpu":
        raise SystemExit("this sweep ran on CPU (gloo): the threshold is a GPU quantity; run it on GPUs")
    if num_gpus < 2:
        raise SystemExit(
            f"the sweep ran on {num_gpus} GPU: nothing was gathered over a link, so there is no knee "
            "to measure; run benchmarks/e2e_prefill.py with --gpus 2 or more"
        )
    gpu = "h100" if "H100" in meta["gpu"] else "h200"
    profile = load_profile(profile_arg) if profile_arg else shipped_profile(gpu, num_gpus)
    series: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for p in e2e["points"]:
        if p["family"] != "asyncep" or p["routing"] != "balanced" or p["exposed_comm"] is None:
            continue
        key = (p["model"], p["dtype"], p["transport"], p["prefetch_depth"], p["context"])
        series[key].append((p["tokens_per_gpu"], p["exposed_comm"]))
    if not series:
        raise SystemExit("no balanced-routing AsyncEP points with exposed communication in this file")
    rows = []
    for (model, dtype, transport, depth, context), pts in sorted(series.items()):
        config = CONFIGS / f"{model}.json"
        if not config.is_file():
            raise SystemExit(f"no shipped config for model {model!r} in common/model_configs/")
        spec = MoEModelSpec.from_pretrained(config)
        predicted = saturation_threshold_tokens(Deployment(spec, profile, num_gpus, dtype, transport), context)
        knee = measured_knee(pts, exposed_target)
        error = abs(predicted - knee) / knee if knee else None
        rows.append({
            "model": model, "dtype": dtype, "transport": transport, "prefetch_depth": depth,
            "context": context, "predicted_tokens_per_gpu": predicted,
            "measured_knee_tokens_per_gpu": knee, "relative_error": error,
            "knee_is_upper_bound": knee is not None and knee == min(t for t, _ in pts),
            "points": [{"tokens_per_gpu": t, "exposed_comm": e} for t, e in sorted(pts)],
        })
    errors = [r["relative_error"] for r in rows if r["relative_error"] is not None]
    return {
        "summary": {
            "max_relative_error": max(errors) if errors else None,
            "target": 0.10,
            "exposed_target": exposed_target,
            "gpus": num_gpus,
            "gpu": meta["gpu"],
            "timing": meta.get("timing"),
            "profile": profile.name,
            "series_without_knee": sum(r["measured_knee_tokens_per_gpu"] is None for r in rows),
        },
        "rows": rows,
        "source": e2e.get("command"),
    }


def print_table(result: dict) -> None:
    print(f"{'model':>16} {'dtype':>5} {'transport':>11} {'d':>2} {'context':>7} "
          f"{'predicted':>10} {'measured':>10} {'error':>7}")
    for r in result["rows"]:
        knee = r["measured_knee_tokens_per_gpu"]
        knee_text = "-" if knee is None else f"{'<=' if r['knee_is_upper_bound'] else ''}{knee:.0f}"
        error = "-" if r["relative_error"] is None else f"{100 * r['relative_error']:.1f}%"
        print(f"{r['model']:>16} {r['dtype']:>5} {r['transport']:>11} {r['prefetch_depth']:>2} "
              f"{r['context']:>7} {r['predicted_tokens_per_gpu']:>10} {knee_text:>10} {error:>7}")
    s = result["summary"]
    print(f"max relative error: {s['max_relative_error']} (target 10%), profile {s['profile']}, "
          f"sweep timing: {s['timing'] or 'not recorded (passes timed one by one)'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("e2e_json", type=Path, help="output of benchmarks/e2e_prefill.py")
    parser.add_argument("--profile", help="hardware profile JSON or shipped name (default: shipped for the GPUs)")
    parser.add_argument("--exposed", type=float, default=0.05, help="exposed-communication level of the knee")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.e2e_json.is_file():
        parser.error(f"{args.e2e_json} does not exist")
    result = validate(json.loads(args.e2e_json.read_text()), args.profile, args.exposed)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
