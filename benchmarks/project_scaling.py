"""Projected step time of AsyncEP and the fair baselines on 2, 4 and 8 GPUs of one host.

A model, not a measurement: every number comes from ``zeroprefill.common.layouts.predict_step``
on the shipped hardware profiles (``common/profiles/<gpu>x<N>.json``, each number marked
measured, estimated or extrapolated) and the routing-skew model
(``zeroprefill.common.routing_skew``). Per GPU count, weight format, context and tokens per
GPU it predicts the whole forward (all layers, no head) of:

- ``asyncep``: expert weights gathered layer by layer over the copy engine, hidden above the
  saturation threshold;
- ``alltoall_ep``: expert parallelism with deduplicated dispatch and expert-side combine
  (DeepEP normal-mode semantics), not overlapped;
- ``alltoall_ep_tbo``: the same with two-batch overlap, ideal (the exchange hidden under the
  other micro-batch's compute, at the NCCL GEMM slowdown);
- ``tp``: tensor parallelism over the N GPUs.

EP layouts run at the EP-rank imbalance the skew model gives for the chosen expert max/mean
(``--skews``; 1.0 = balanced routing, EP's best case): the fewer experts a rank owns, the less
their loads average out. Memory: each point says whether the layout fits the GPU at that
batch (``memory_plan``). ``speedup`` = AsyncEP tokens/s over the best other layout that fits,
where AsyncEP itself fits (``null`` otherwise).

    python benchmarks/project_scaling.py     # table + benchmarks/results/project_scaling-h200.json/.png

The plot shows the longest context asked for (4096 by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.layouts import LAYOUTS, predict_step
from zeroprefill.common.memory_plan import memory_plan
from zeroprefill.common.saturation import Deployment, saturation_threshold_tokens
from zeroprefill.common.routing_skew import expected_rank_imbalance

CONFIGS = Path(__file__).resolve().parent.parent / "common" / "model_configs"
RESULTS = Path(__file__).resolve().parent / "results"


def project(model: str, gpu: str, gpu_counts: list[int], dtypes: list[str], contexts: list[int],
            tokens: list[int], skews: list[float]) -> list[dict]:
    spec = MoEModelSpec.from_pretrained(CONFIGS / f"{model}.json")
    points = []
    for n in gpu_counts:
        for skew in skews:
            imbalance = expected_rank_imbalance(spec.num_experts, spec.top_k, n, skew)
            for dtype in dtypes:
                deployment = Deployment.on_shipped_gpu(spec, gpu, n, dtype)
                for context in contexts:
                    threshold = saturation_threshold_tokens(deployment, context)
                    for t in tokens:
                        layouts = {}
                        for layout in LAYOUTS:
                            step = predict_step(deployment, layout, t, context, rank_imbalance=imbalance)
                            layouts[layout] = {
                                "step_s": step.step_time_s, "tokens_per_s_per_gpu": step.tokens_per_s,
                                "mfu": step.mfu, "fits": memory_plan(deployment, layout, t, context).fits}
                        others = {k: v for k, v in layouts.items() if k != "asyncep" and v["fits"]}
                        if not layouts["asyncep"]["fits"]:
                            others = {}  # no speedup for a layout that cannot run this batch
                        best = max(others, key=lambda k: others[k]["tokens_per_s_per_gpu"]) if others else None
                        points.append({
                            "gpus": n, "dtype": dtype, "context": context, "tokens_per_gpu": t,
                            "expert_max_over_mean": skew, "ep_rank_imbalance": round(imbalance, 4),
                            "threshold_tokens": threshold, "layouts": layouts, "best_baseline": best,
                            "speedup": (layouts["asyncep"]["tokens_per_s_per_gpu"]
                                        / others[best]["tokens_per_s_per_gpu"]) if best else None,
                        })
    return points


def print_table(points: list[dict]) -> None:
    header = (f"{'N':>2} {'skew':>4} {'rank imb':>8} {'dtype':>5} {'ctx':>6} {'T/GPU':>6} {'F* T':>6}  "
              + " ".join(f"{layout:>16}" for layout in LAYOUTS) + f"  {'speedup':>7} vs")
    print("tokens/s per GPU (MFU); '!' = does not fit in memory at this batch")
    print(header)
    for p in points:
        cells = " ".join(
            f"{p['layouts'][layout]['tokens_per_s_per_gpu'] / 1e3:>8.1f}k ({p['layouts'][layout]['mfu']:>3.0%})"
            f"{' ' if p['layouts'][layout]['fits'] else '!'}" for layout in LAYOUTS)
        speedup = f"{p['speedup']:>6.2f}x {p['best_baseline']}" if p["speedup"] else "      -"
        print(f"{p['gpus']:>2} {p['expert_max_over_mean']:>4} {p['ep_rank_imbalance']:>8.3f} {p['dtype']:>5} "
              f"{p['context']:>6} {p['tokens_per_gpu']:>6} {p['threshold_tokens']:>6}  {cells}  {speedup}")


def plot(points: list[dict], path: Path, context: int) -> None:
    """AsyncEP over the best fitting baseline against tokens per GPU at ``context``: one panel
    per weight format, one colour per GPU count, solid balanced routing, dashed skewed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({p["dtype"] for p in points})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
    colours = dict(zip(sorted({p["gpus"] for p in points}), ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, dtype in zip(axes[0], dtypes):
        series: dict[tuple[int, float], list[tuple[int, float]]] = {}
        for p in points:
            if p["dtype"] == dtype and p["context"] == context and p["speedup"]:
                series.setdefault((p["gpus"], p["expert_max_over_mean"]), []).append(
                    (p["tokens_per_gpu"], p["speedup"]))
        for (gpus, skew), xy in sorted(series.items()):
            xs, ys = zip(*sorted(xy))
            ax.plot(xs, ys, marker="o", color=colours[gpus], linestyle="-" if skew == 1.0 else "--",
                    label=f"{gpus} GPUs, expert max/mean {skew}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per GPU per step")
        ax.set_ylabel("AsyncEP / best fitting baseline")
        ax.set_title(f"Qwen3-235B, {dtype}, {context}-token prompts\n(model, not measured; AsyncEP must fit)",
                     fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-235b-a22b")
    parser.add_argument("--gpu", default="h200")
    parser.add_argument("--gpus", default="2,4,8", help="GPU counts (shipped profiles)")
    parser.add_argument("--dtypes", default="bf16,fp8")
    parser.add_argument("--contexts", default="512,4096")
    parser.add_argument("--tokens", default="8192,12288,16384,24576,32768", help="tokens per GPU")
    parser.add_argument("--skews", default="1.0,1.5", help="expert max/mean load of the skew model")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/project_scaling-<gpu>.json)")
    args = parser.parse_args()

    def numbers(option: str, kind: type) -> list:
        text = getattr(args, option)
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--{option} {text!r} is not a comma-separated list of {kind.__name__} values") from None

    try:  # a bad value (unknown model, GPU count without a profile, skew < 1, ...) is one line
        settings = (numbers("gpus", int), args.dtypes.split(","), numbers("contexts", int), numbers("tokens", int),
                    numbers("skews", float))
        print("computing EP-rank imbalance of the skew model (a few seconds per GPU count)...", flush=True)
        points = project(args.model, args.gpu, *settings)
    except ValueError as exc:
        parser.error(str(exc))
    print_table(points)
    out = Path(args.out) if args.out else RESULTS / f"project_scaling-{args.gpu}.json"
    large = [p for p in points if p["tokens_per_gpu"] >= 16384 and p["speedup"]]
    summary = {
        "kind": "model prediction (planner + shipped profiles), not a measurement",
        "projected_speedup_by_gpus": {
            str(n): {"min_16k_plus": min(p["speedup"] for p in large if p["gpus"] == n),
                     "max_16k_plus": max(p["speedup"] for p in large if p["gpus"] == n)}
            for n in sorted({p["gpus"] for p in large})},
    }
    if "8" in summary["projected_speedup_by_gpus"]:
        summary["projected_speedup_8gpu"] = summary["projected_speedup_by_gpus"]["8"]
    command = "python benchmarks/project_scaling.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "command": command, "points": points}, indent=1) + "\n")
    plot(points, out.with_suffix(".png"), context=max(int(c) for c in args.contexts.split(",")))
    print(f"\nsummary: {json.dumps(summary)}\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
