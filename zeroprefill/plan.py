"""``zeroprefill plan``: saturation threshold, memory and predicted throughput per layout.

Reads a model (directory, ``config.json`` or a shipped reference name such as
``qwen3-235b-a22b``) and a hardware profile (shipped ``--gpu h200 --gpus 4`` or ``--profile
FILE`` from ``zeroprefill calibrate``) and prints what :func:`zeroprefill.common.planner.make_plan`
computes, as a table or ``--json``. User mistakes exit with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from zeroprefill.common.hardware import (
    SHIPPED_GPUS,
    TRANSPORTS,
    HardwareProfile,
    HardwareProfileError,
    load_profile,
    shipped_profile,
)
from zeroprefill.common.model_spec import MoEModelSpec, ModelSpecError
from zeroprefill.common.planner import LAYOUT_TITLES, LAYOUTS, PLAN_DTYPES, Plan, PlanError, make_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="model directory, config.json, or a shipped config name "
        f"({', '.join(shipped_model_names())})",
    )
    parser.add_argument("--gpus", type=int, default=4, help="GPUs per AsyncEP group in one node")
    parser.add_argument("--gpu", default="h200", help=f"shipped profile: {', '.join(SHIPPED_GPUS)}")
    parser.add_argument("--profile", help="hardware profile JSON (overrides --gpu)")
    parser.add_argument("--dtype", default="bf16", help=f"weights and compute: {', '.join(PLAN_DTYPES)}")
    parser.add_argument("--nodes", type=int, default=1, help="nodes to deploy on (compares layouts)")
    parser.add_argument("--prefetch-depth", type=int, default=1, help="AsyncEP prefetch depth d")
    parser.add_argument("--transport", default="nccl", help=f"AllGather: {', '.join(TRANSPORTS)}")
    parser.add_argument(
        "--context", default="512,4096,32768", help="comma-separated prompt lengths in tokens"
    )
    parser.add_argument(
        "--memory-utilization", type=float, default=0.9, help="fraction of GPU memory to plan for"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def shipped_model_names() -> list[str]:
    folder = resources.files("zeroprefill.common") / "model_configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_model(model: str) -> tuple[MoEModelSpec, str]:
    """A spec from a path, or from a shipped reference config by name."""
    path = Path(model)
    if not path.exists() and model in shipped_model_names():
        resource = resources.files("zeroprefill.common") / "model_configs" / f"{model}.json"
        return MoEModelSpec.from_hf_config(json.loads(resource.read_text())), model
    if not path.exists():
        raise ModelSpecError(
            f"--model {model!r} is neither a path nor a shipped config "
            f"({', '.join(shipped_model_names())})"
        )
    return MoEModelSpec.from_pretrained(path), path.resolve().name if path.is_dir() else path.name


def run(args: argparse.Namespace) -> int:
    try:
        contexts = _parse_contexts(args.context)
        spec, name = load_model(args.model)
        profile: HardwareProfile = (
            load_profile(args.profile) if args.profile else shipped_profile(args.gpu, args.gpus)
        )
        plan = make_plan(
            spec, profile, args.gpus, args.dtype, contexts, args.prefetch_depth, args.transport,
            args.nodes, args.memory_utilization, name,
        )
    except (ModelSpecError, HardwareProfileError, PlanError) as exc:
        print(f"zeroprefill plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _parse_contexts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PlanError(f"--context {text!r} must be comma-separated integers, e.g. 512,4096") from None
    if not values or min(values) < 1:
        raise PlanError(f"--context {text!r} must list positive token counts, e.g. 512,4096")
    return values


def format_plan(plan: Plan) -> str:
    """The plan as a readable report: gather and threshold, then one table per quantity."""
    lines = [
        f"{plan.model} on {plan.num_gpus} GPU(s), profile {plan.profile}, {plan.dtype}, "
        f"AllGather {plan.transport}, prefetch depth {plan.prefetch_depth}",
        "",
    ]
    if plan.num_gpus == 1:
        lines += [
            "Single GPU: every expert stays resident, nothing is gathered (threshold 0);",
            "predictions below use one prompt per step.",
            "",
        ]
    else:
        lines += _threshold_lines(plan)
    lines += _table_lines(plan)
    return "\n".join(lines)


def _threshold_lines(plan: Plan) -> list[str]:
    gb = 1e9
    lines = [
        "Gather and saturation threshold (per GPU, one MoE transformer layer)",
        f"  layer experts W        {plan.layer_expert_bytes / gb:8.2f} GB "
        f"(shard {plan.gather_message_bytes / gb:.2f} GB per rank)",
        f"  AllGather bus bw       {plan.gather_bus_gbps:8.0f} GB/s",
        f"  gather time t_g        {plan.gather_time_s * 1e3:8.2f} ms = W (N-1)/N / bus bw",
        f"  compute R / R_eff      {plan.compute_tflops:8.0f} / {plan.effective_tflops:.0f} TFLOP/s "
        "(R_eff under the concurrent gather)",
        f"  threshold F*           {plan.threshold_flops / 1e12:8.2f} TFLOP per layer = t_g x R_eff",
        "",
    ]
    header = f"  {'context':>8} {'tokens/GPU':>11} {'fwd TFLOP':>10}"
    lines.append("Threshold in tokens (a stream of prompts of this length; fwd = all layers)")
    lines.append(header)
    for c in plan.contexts:
        lines.append(
            f"  {c.context_tokens:>8} {c.threshold_tokens:>11} {c.forward_flops_at_threshold / 1e12:>10.1f}"
        )
    lines.append("")
    return lines


def _table_lines(plan: Plan) -> list[str]:
    gb = 1e9
    titles = "".join(f"{LAYOUT_TITLES[layout]:>22}" for layout in LAYOUTS)
    lines = [f"Memory per GPU at the threshold batch (budget {_budget(plan)})", f"  {'context':>8}{titles}"]
    for c in plan.contexts:
        cells = "".join(
            f"{c.memory[l].total_bytes / gb:>15.1f} GB {'ok ' if c.memory[l].fits else 'NO '}"
            for l in LAYOUTS
        )
        lines.append(f"  {c.context_tokens:>8}{cells}")
    worst = max(plan.contexts, key=lambda c: c.operating_tokens).memory["asyncep"]
    lines.append(
        f"  AsyncEP at {worst.tokens_per_gpu} tokens: dense {worst.dense_weight_bytes / gb:.1f} + "
        f"experts {worst.expert_weight_bytes / gb:.1f} + buffers {worst.gather_buffer_bytes / gb:.1f} + "
        f"activations {worst.activation_bytes / gb:.1f} + KV {worst.kv_cache_bytes / gb:.1f} GB"
    )
    lines += ["", "Predicted step at the threshold batch: ms | tokens/s/GPU | MFU", f"  {'context':>8}{titles}"]
    for c in plan.contexts:
        cells = "".join(
            f"{s.step_time_s * 1e3:>8.0f} |{s.tokens_per_s:>7.0f} |{s.mfu:>4.0%}"
            for s in (c.steps[l] for l in LAYOUTS)
        )
        lines.append(f"  {c.context_tokens:>8}{cells}")
    lines.append("  (GEMM-rate bound: real kernels run slower; AllToAll-EP assumes perfect balance)")
    if plan.suggestions:
        lines += ["", "AsyncEP does not fit; what would:"] + [f"  {s}" for s in plan.suggestions]
    if plan.multinode:
        m = plan.multinode
        lines += [
            "",
            f"Across {m.nodes} nodes: AsyncEP group spanning nodes vs one group per node (both NCCL)",
            f"  spanning: bus bw {m.spanning_bus_gbps:.0f} GB/s, t_g {m.spanning_gather_time_s * 1e3:.2f} ms, "
            f"threshold {m.spanning_threshold_flops / 1e12:.2f} TFLOP/layer "
            f"({m.threshold_ratio:.2f}x in-node), fits: {'yes' if m.spanning_fits else 'no'}",
            f"  per node: threshold {m.in_node_threshold_flops / 1e12:.2f} TFLOP/layer, "
            f"fits: {'yes' if m.in_node_fits else 'no'}",
        ]
    lines += ["", f"Recommendation: {plan.recommendation}"]
    lines += [f"Note: {n}" for n in plan.notes]
    return lines


def _budget(plan: Plan) -> str:
    budget = plan.contexts[0].memory["asyncep"].budget_bytes
    return f"{budget / 1e9:.1f} GB = {plan.memory_utilization:.0%} of the GPU"
