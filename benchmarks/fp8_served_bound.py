"""How much faster block-FP8 experts can make a served prefill step than bf16 ones (Amdahl).

An FP8 checkpoint speeds up only part of a step: the experts (by what ``moe_kernels.py``
measured for the layer alone) and the dense projections (FP8 GEMMs, but each behind an
activation quantiser bf16 does not run); attention, norms and the rest cost the same. From one
profiled FP8 server (``vllm_serve.py --profile-context``: GPU time per category and the top
kernels over a few engine steps), per layer:

    step     profile window / MoE layer calls (idle gaps included)
    moe      the experts' kernels, routing and permutation (category moe_experts)
    dense    DeepGEMM's dense FP8 GEMMs (category gemm: QKV and output projections)
    quant    the activation quantisers in front of them (category quant)
    rest     step - moe - dense - quant (attention, norms, ..., idle)

the same step in bf16 takes at most

    bf16  <=  r * moe + 2 * dense + rest

where ``r`` is the largest graph-replayed bf16-layer / FP8-layer time ratio
(``fp8_selected_vs_bf16``) the kernel benchmarks measured for this expert shape at >= 8K tokens
(the whole moe category is scaled by it, routing included), and 2 is the ratio of the dense
bf16 and FP8 peaks (bf16 GEMMs assumed at least as close to their peak as the FP8 ones). So
``bf16 / step`` bounds the served FP8-over-bf16 speed-up from above, and
``moe_speedup_needed`` says what ``r`` a target would take with the rest as measured.

The bound holds at one clock. Where the same file also holds a profiled bf16 run of the same
shape and layout (``vllm_gpu_1x.sh fp8`` serves bf16 AsyncEP in the same call), that run is
set beside it as measured: GPU time per layer (``gpu_step_fp8_vs_bf16_measured``), closed-loop
throughput (``served_fp8_vs_bf16_measured``) and each window's median SM clock. A bf16 server
that the GPU's power limit holds to a lower clock can take longer than the bound says. Where a
closed loop recorded vLLM's engine metrics, ``served_step`` sets its time per step against the
profile's GPU time per step (the time some kernel ran): the rest is spent off the GPU.

    python benchmarks/fp8_served_bound.py                      # the committed one-H100 profile
    python benchmarks/fp8_served_bound.py --profile P.json --kernels K1.json K2.json --target 1.4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trace_breakdown
from _serving import lowest_over_gpus

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_PROFILE = RESULTS / "vllm_fp8-h100x1.json"
DEFAULT_KERNELS = sorted(RESULTS.glob("moe_kernels-h100*.json"))
DENSE_BF16_OVER_FP8 = 2.0  # dense peaks: FP8 1979, bf16 989 TFLOP/s on H100 and H200
SUMMARY_MIN_TOKENS = 8192


def layer_parts(run: dict) -> dict[str, float]:
    """Milliseconds per layer of one profiled run (``vllm_serve.py`` JSON ``runs[i]``)."""
    trace = trace_breakdown.upgrade(run["profile"]["traces"][0])
    seconds = trace["seconds_by_category"]
    moe_kernels = [k for k in trace["top_kernels"] if trace_breakdown.categorize(k["name"], "kernel") == "moe_experts"]
    if not moe_kernels:
        raise ValueError(f"{run['model']} {run['layout']}: no MoE kernel among the profile's top kernels")
    calls = max(kernel["count"] for kernel in moe_kernels)  # one call per MoE layer of every profiled step
    parts = {name: seconds.get(category, 0.0) / calls * 1e3
             for name, category in (("moe", "moe_experts"), ("dense", "gemm"), ("quant", "quant"))}
    parts["step"] = trace["window_s"] / calls * 1e3
    parts["rest"] = parts["step"] - parts["moe"] - parts["dense"] - parts["quant"]
    parts["layer_calls"] = calls
    return parts


def closed_loop(run: dict) -> dict:
    """A profiled run's closed loop at the profiled context ({} where it has none)."""
    context = run["profile"].get("context")
    return next((entry["closed_loop"] for entry in run.get("measurements", []) if entry["context"] == context), {})


def served_step(run: dict) -> dict | None:
    """Where the run's closed loop recorded vLLM's engine metrics (``vllm_serve.py``, from
    2026-12-07): its time per engine step served (``step_ms_served``) against the GPU time per
    step of the profile (``step_ms_gpu``: the time some kernel ran, over the profiled steps), and
    the difference, the time a served step spends off the GPU; also the profile's window per
    step (``step_ms_profiled``, idle gaps included). Where the profile says where its idle time
    went (``trace_breakdown``'s ``host``, from 2026-12-07): the part the GPU waited for the host,
    per step (``host_bound_ms_per_step``), and the host op that took most of it
    (``host_bound_largest``: the op and its ms per step). None without engine metrics."""
    engine = closed_loop(run).get("engine_metrics") or {}
    if not engine.get("step_ms"):
        return None
    trace, steps = run["profile"]["traces"][0], run["profile"]["steps"]
    gpu = trace["busy_s"] / steps * 1e3
    served = {"step_ms_served": engine["step_ms"], "step_ms_gpu": round(gpu, 2),
              "step_ms_profiled": round(trace["window_s"] / steps * 1e3, 2),
              "off_gpu_ms_per_step": round(engine["step_ms"] - gpu, 2), "tokens_per_step": engine["tokens_per_step"]}
    host = trace.get("host")
    if host:
        served["host_bound_ms_per_step"] = round(host["host_bound_s"] / steps * 1e3, 2)
        if host["host_bound_by_op"]:
            largest = host["host_bound_by_op"][0]
            served["host_bound_largest"] = {"op": largest["op"], "ms_per_step": round(largest["seconds"] / steps * 1e3, 2)}
    return served


def measured_against_bf16(fp8: dict, bf16: dict) -> dict:
    """A profiled FP8 run against a profiled bf16 run of the same shape and layout: GPU time per
    layer (each profile's window over its layer calls), closed-loop input tokens/s at the
    profiled context, and the median SM clock of each closed loop's slowest GPU (None where not
    recorded)."""
    def sm_clock(run: dict) -> float | None:
        return lowest_over_gpus(closed_loop(run).get("gpu_telemetry"), "sm_clock_mhz_median")

    fp8_step, bf16_step = layer_parts(fp8)["step"], layer_parts(bf16)["step"]
    throughput = {name: closed_loop(run)["input_tokens_per_s_per_gpu"] for name, run in (("fp8", fp8), ("bf16", bf16))}
    return {"bf16_model": bf16["model"], "bf16_step_ms_measured": round(bf16_step, 3),
            "gpu_step_fp8_vs_bf16_measured": round(bf16_step / fp8_step, 3),
            "served_fp8_vs_bf16_measured": round(throughput["fp8"] / throughput["bf16"], 3),
            "input_tokens_per_s_per_gpu": {name: round(value) for name, value in throughput.items()},
            "sm_clock_mhz": {"fp8": sm_clock(fp8), "bf16": sm_clock(bf16)}}


def kernel_ratio(kernel_files: list[Path], shape: str) -> tuple[float, str]:
    """The largest ``fp8_selected_vs_bf16`` at >= 8K tokens for ``shape``, and where it was measured."""
    best: tuple[float, str] | None = None
    for path in kernel_files:
        for point in json.loads(path.read_text())["points"]:
            ratio = point.get("fp8_selected_vs_bf16")
            if point["shape"] == shape and point["tokens"] >= SUMMARY_MIN_TOKENS and ratio is not None:
                if best is None or ratio > best[0]:
                    best = (ratio, f"{path.name}, {point['tokens']} tokens")
    if best is None:
        raise ValueError(f"no fp8_selected_vs_bf16 at >= {SUMMARY_MIN_TOKENS} tokens for {shape} in "
                         f"{', '.join(p.name for p in kernel_files)}")
    return best


def bound(parts: dict[str, float], moe_ratio: float, target: float) -> dict[str, float]:
    bf16_step = moe_ratio * parts["moe"] + DENSE_BF16_OVER_FP8 * parts["dense"] + parts["rest"]
    needed = (target * parts["step"] - DENSE_BF16_OVER_FP8 * parts["dense"] - parts["rest"]) / parts["moe"]
    return {"bf16_step_ms_at_most": round(bf16_step, 3), "served_fp8_vs_bf16_at_most": round(bf16_step / parts["step"], 3),
            "moe_speedup_needed": round(needed, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE,
                        help="vllm_serve.py JSON of a profiled FP8 server (default: the committed one-H100 one, "
                             f"benchmarks/results/{DEFAULT_PROFILE.name})")
    parser.add_argument("--kernels", type=Path, nargs="+", default=DEFAULT_KERNELS,
                        help="moe_kernels.py JSONs measured on the same GPU model (default: the committed "
                             "benchmarks/results/moe_kernels-h100*.json)")
    parser.add_argument("--target", type=float, default=1.4, help="served FP8/bf16 speed-up asked for")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    try:
        profiled = {(run["model"], run["layout"]): run
                    for run in json.loads(args.profile.read_text())["runs"] if run.get("profile")}
        fp8_runs = [run for (model, _), run in profiled.items() if model.split(":")[0].endswith("-fp8")]
        if not fp8_runs:
            raise ValueError(f"{args.profile} holds no profiled FP8 run (vllm_serve.py --profile-context)")
        results = []
        for run in fp8_runs:
            name, _, layers = run["model"].partition(":")
            shape = name.removesuffix("-fp8")
            parts = layer_parts(run)
            ratio, where = kernel_ratio(args.kernels, shape)
            result = {"model": run["model"], "layout": run["layout"], "ms_per_layer": {
                k: round(v, 3) for k, v in parts.items() if k != "layer_calls"}, "layer_calls": parts["layer_calls"],
                "moe_ratio": ratio, "moe_ratio_from": where, "target": args.target, **bound(parts, ratio, args.target)}
            served = served_step(run)
            if served is not None:
                result["served_step"] = served
            bf16 = profiled.get((f"{shape}:{layers}", run["layout"]))
            if bf16 is not None:
                result["measured"] = measured_against_bf16(run, bf16)
            results.append(result)
    except (OSError, ValueError, KeyError) as exc:
        print(f"fp8_served_bound: error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        ms = result["ms_per_layer"]
        print(f"{result['model']} {result['layout']} ({result['layer_calls']} MoE layer calls profiled), ms per layer: "
              + ", ".join(f"{name} {value:.3f}" for name, value in ms.items()))
        print(f"  bf16 step <= {result['moe_ratio']:.3f} x moe + {DENSE_BF16_OVER_FP8:g} x dense + rest = "
              f"{result['bf16_step_ms_at_most']:.3f} ms  ->  served FP8/bf16 <= {result['served_fp8_vs_bf16_at_most']:.3f}"
              f"  (MoE ratio from {result['moe_ratio_from']}; {args.target}x would need the experts "
              f"{result['moe_speedup_needed']:.2f}x faster in FP8)")
        if "served_step" in result:
            served = result["served_step"]
            print(f"  served: {served['step_ms_served']:.1f} ms per step of {served['tokens_per_step']:,.0f} tokens "
                  f"against {served['step_ms_gpu']:.1f} ms of GPU time: {served['off_gpu_ms_per_step']:.1f} ms off the GPU")
            if "host_bound_ms_per_step" in served:
                largest = served.get("host_bound_largest")
                print(f"  profiled steps: the GPU waited {served['host_bound_ms_per_step']:.1f} ms a step for the host"
                      + (f", most under {largest['op']} ({largest['ms_per_step']:.1f} ms)" if largest else ""))
        if "measured" in result:
            measured = result["measured"]
            clock = {k: "?" if v is None else f"{v:,.0f}" for k, v in measured["sm_clock_mhz"].items()}
            print(f"  measured beside it, {measured['bf16_model']} {result['layout']}: "
                  f"{measured['bf16_step_ms_measured']:.3f} ms per layer at {clock['bf16']} MHz against "
                  f"{ms['step']:.3f} at {clock['fp8']} MHz  ->  GPU FP8/bf16 "
                  f"{measured['gpu_step_fp8_vs_bf16_measured']:.3f}, served {measured['served_fp8_vs_bf16_measured']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"command": "python benchmarks/fp8_served_bound.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "profile": args.profile.name,
            "kernels": [p.name for p in args.kernels], "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
