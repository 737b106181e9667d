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
from typing import Any

from zeroprefill.common.hardware import (
    SHIPPED_GPUS,
    HardwareProfile,
    HardwareProfileError,
    load_profile,
    shipped_profile,
)
from zeroprefill.common.model_spec import MoEModelSpec, ModelSpecError, read_hf_config, stored_weight_dtype
from zeroprefill.common.layouts import LAYOUT_TABLE, LAYOUTS
from zeroprefill.common.planner import Plan, make_plan
from zeroprefill.common.saturation import (
    DEFAULT_MEMORY_UTILIZATION,
    PLAN_DTYPES,
    PLAN_TRANSPORTS,
    Deployment,
    PlanError,
)

#: Width of one layout's column in the memory and step tables.
LAYOUT_COLUMN = 24


class _Given(argparse.Action):
    """Stores the option's value and records that it was given (``plan`` lists what it assumed)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.plan_flags_given = namespace.plan_flags_given | {self.dest}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(plan_flags_given=frozenset())
    parser.add_argument(
        "--model", required=True,
        help="model directory, config.json, or a shipped config name "
        f"({', '.join(shipped_model_names())})",
    )
    parser.add_argument("--gpus", type=int, default=4, action=_Given,
                        help="GPUs of one AsyncEP group inside one node (one rank each)")
    parser.add_argument("--gpu", default="h200", action=_Given,
                        help=f"GPU kind of the shipped hardware profile: {', '.join(SHIPPED_GPUS)}")
    parser.add_argument("--profile",
                        help="hardware profile JSON from `zeroprefill calibrate`, used instead of "
                        "the shipped --gpu profile when set")
    parser.add_argument("--dtype", default="bf16", action=_Given,
                        help=f"weight and compute format: {', '.join(PLAN_DTYPES)}")
    parser.add_argument("--nodes", type=int, default=1,
                        help="nodes to deploy on; above 1 the plan compares one AsyncEP group spanning "
                        "them with one group per node behind the router")
    parser.add_argument("--prefetch-depth", type=int, default=1,
                        help="AsyncEP prefetch depth d: d + 1 gather buffers of one MoE layer")
    parser.add_argument("--transport", default="auto", action=_Given,
                        help=f"AllGather transport: {', '.join(PLAN_TRANSPORTS)}; auto is what the "
                        "runtime picks on GPUs (copy_engine inside a node)")
    parser.add_argument("--context", default="512,4096,32768",
                        help="comma-separated prompt lengths in tokens to plan at")
    parser.add_argument("--memory-utilization", type=float, default=DEFAULT_MEMORY_UTILIZATION,
                        help="fraction of GPU memory a plan may use (as vLLM's --gpu-memory-utilization)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")


def shipped_model_names() -> list[str]:
    folder = resources.files("zeroprefill.common") / "model_configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_model(model: str) -> tuple[MoEModelSpec, str, str | None]:
    """A spec from a path, or from a shipped reference config by name; with the format the
    checkpoint stores its weights in where its config names one (:func:`stored_weight_dtype`)."""
    path = Path(model)
    if not path.exists() and model in shipped_model_names():
        resource = resources.files("zeroprefill.common") / "model_configs" / f"{model}.json"
        config, name = json.loads(resource.read_text()), model
    elif not path.exists():
        raise ModelSpecError(
            f"--model {model!r} is neither a path nor a shipped config "
            f"({', '.join(shipped_model_names())})"
        )
    else:
        config, name = read_hf_config(path), path.resolve().name if path.is_dir() else path.name
    return MoEModelSpec.from_hf_config(config), name, stored_weight_dtype(config)


def run(args: argparse.Namespace) -> int:
    try:
        contexts = _parse_contexts(args.context)
        spec, name, stored_dtype = load_model(args.model)
        if stored_dtype and "dtype" not in args.plan_flags_given:
            args.dtype = stored_dtype  # plan the checkpoint as it is stored
        profile: HardwareProfile = (
            load_profile(args.profile) if args.profile else shipped_profile(args.gpu, args.gpus)
        )
        deployment = Deployment(
            spec, profile, args.gpus, args.dtype, args.transport,
            prefetch_depth=args.prefetch_depth, memory_utilization=args.memory_utilization,
        )
        plan = make_plan(deployment, contexts, args.nodes, name)
    except (ModelSpecError, HardwareProfileError, PlanError) as exc:
        print(f"zeroprefill plan: error: {exc}", file=sys.stderr)
        return 2
    assumed = assumed_flags(args, plan)
    if args.json:
        print(json.dumps({**plan.to_dict(), "assumed": assumed}, indent=2))
    else:
        print(format_plan(plan, assumed))
    return 0


def assumed_flags(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """The deployment flags left out, with the values the plan assumed for them."""
    assumed: dict[str, Any] = {}
    given = args.plan_flags_given
    if "gpus" not in given:
        assumed["gpus"] = args.gpus
    if "gpu" not in given and not args.profile:
        assumed["gpu"] = args.gpu
    if "dtype" not in given:
        assumed["dtype"] = args.dtype
    if "transport" not in given:
        assumed["transport"] = plan.transport
    return assumed


def _parse_contexts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PlanError(f"--context {text!r} must be comma-separated integers, e.g. 512,4096") from None
    if not values or min(values) < 1:
        raise PlanError(f"--context {text!r} must list positive token counts, e.g. 512,4096")
    return values


def format_plan(plan: Plan, assumed: dict[str, Any] | None = None) -> str:
    """The plan as a readable report: what was assumed, gather and threshold, then one table
    per quantity."""
    lines = [
        f"{plan.model} on {plan.num_gpus} GPU(s), profile {plan.profile}, {plan.dtype}, "
        f"AllGather {plan.transport}, prefetch depth {plan.prefetch_depth}",
    ]
    if assumed:
        values = ", ".join(
            f"--transport auto ({value})" if flag == "transport" else f"--{flag} {value}"
            for flag, value in assumed.items()
        )
        lines.append(f"Assumed (not given): {values}")
    lines.append("")
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
    lines = [
        "Gather and saturation threshold (per GPU, one MoE transformer layer)",
        f"  layer experts W        {_bytes(plan.layer_expert_bytes):>10} "
        f"(shard {_bytes(plan.gather_message_bytes)} per rank)",
        f"  AllGather bus bw       {plan.gather_bus_gbps:>7.0f} GB/s",
        f"  gather time t_g        {_duration(plan.gather_time_s):>10} = W (N-1)/N / bus bw",
        f"  compute R / R_eff      {plan.compute_tflops:>7.0f} / {plan.effective_tflops:.0f} TFLOP/s "
        "(R_eff under the concurrent gather)",
        f"  threshold F*           {_flops(plan.threshold_flops):>10} per layer = t_g x R_eff",
        f"  streamed pass floor    {_duration(plan.light_load_pass_time_s):>10} = MoE layers x t_g "
        "(however few tokens it carries; below the switch point a pass moves tokens instead)",
        "",
    ]
    header = f"  {'context':>8} {'tokens/GPU':>11} {'fwd FLOP':>11} {'switch point':>13}"
    lines.append("Threshold in tokens (a stream of prompts of this length; fwd = all layers; below the switch "
                 "point, deduplicated EP's step is shorter, so those passes move tokens, not weights)")
    lines.append(header)
    for c in plan.contexts:
        switch = "-" if c.switch_point_tokens is None else str(c.switch_point_tokens)
        lines.append(
            f"  {c.context_tokens:>8} {c.threshold_tokens:>11} {_flops(c.forward_flops_at_threshold):>11} {switch:>13}"
        )
    lines.append("")
    return lines


def _table_lines(plan: Plan) -> list[str]:
    titles = "".join(f"{LAYOUT_TABLE[layout].title:>{LAYOUT_COLUMN}}" for layout in LAYOUTS)
    lines = [f"Memory per GPU at the threshold batch (budget {_budget(plan)})", f"  {'context':>8}{titles}"]
    for c in plan.contexts:
        cells = "".join(
            f"{f'{_bytes(m.total_bytes):>8} {_fits(m.fits)}':>{LAYOUT_COLUMN}}"
            for m in (c.memory[layout] for layout in LAYOUTS)
        )
        lines.append(f"  {c.context_tokens:>8}{cells}")
    worst = max(plan.contexts, key=lambda c: c.operating_tokens).memory["asyncep"]
    lines.append(
        f"  AsyncEP at {worst.tokens_per_gpu} tokens: dense {_bytes(worst.dense_weight_bytes)} + "
        f"experts {_bytes(worst.expert_weight_bytes)} + buffers {_bytes(worst.gather_buffer_bytes)} + "
        f"activations {_bytes(worst.activation_bytes)} + KV {_bytes(worst.kv_cache_bytes)}"
    )
    lines += ["", "KV-cache capacity per GPU at the threshold batch (tokens the rest of the budget holds)",
              f"  {'context':>8}{titles}"]
    for c in plan.contexts:
        cells = "".join(f"{_count(m.kv_capacity_tokens):>{LAYOUT_COLUMN}}" for m in (c.memory[layout] for layout in LAYOUTS))
        lines.append(f"  {c.context_tokens:>8}{cells}")
    lines += [
        "",
        "Predicted step at the threshold batch: step time | tokens/s per GPU | MFU",
        f"  {'context':>8}{titles}",
    ]
    for c in plan.contexts:
        cells = "".join(
            f"{f'{_duration(s.step_time_s):>8} | {_count(s.tokens_per_s):>5} | {s.mfu:>4.0%}':>{LAYOUT_COLUMN}}"
            for s in (c.steps[layout] for layout in LAYOUTS)
        )
        lines.append(f"  {c.context_tokens:>8}{cells}")
    lines += ["  (GEMM-rate bound: real kernels run slower; the EP layouts assume balanced routing and, with two-batch",
              "   overlap, a perfectly hidden exchange: their best case)"]
    if plan.suggestions:
        lines += ["", "AsyncEP does not fit; what would:"] + [f"  {s}" for s in plan.suggestions]
    if plan.multinode:
        m = plan.multinode
        lines += [
            "",
            f"Across {m.nodes} nodes: AsyncEP group spanning nodes vs one group per node (both NCCL)",
            f"  spanning: bus bw {m.spanning_bus_gbps:.0f} GB/s, t_g {_duration(m.spanning_gather_time_s)}, "
            f"threshold {_flops(m.spanning_threshold_flops)}/layer "
            f"({m.threshold_ratio:.2f}x in-node), fits: {'yes' if m.spanning_fits else 'no'}",
            f"  per node: threshold {_flops(m.in_node_threshold_flops)}/layer, "
            f"fits: {'yes' if m.in_node_fits else 'no'}",
        ]
    lines += ["", f"Recommendation: {plan.recommendation}"]
    lines += [f"Note: {n}" for n in plan.notes]
    return lines


def _budget(plan: Plan) -> str:
    budget = plan.contexts[0].memory["asyncep"].budget_bytes
    return f"{_bytes(budget)} = {plan.memory_utilization:.0%} of the GPU"


def _fits(fits: bool) -> str:
    return "ok" if fits else "NO"


def _three_digits(value: float) -> str:
    """``value`` (>= 0, below 1000 after scaling) to about three significant digits."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _scaled(value: float, units: tuple[tuple[str, float], ...]) -> str:
    """``value`` in the largest unit it reaches (the last one below all), three digits."""
    for unit, scale in units:
        if value >= scale:
            return f"{_three_digits(value / scale)}{unit}"
    unit, scale = units[-1]
    return f"{_three_digits(value / scale)}{unit}"


def _bytes(num_bytes: float) -> str:
    return _scaled(num_bytes, ((" GB", 1e9), (" MB", 1e6), (" kB", 1e3), (" B", 1.0)))


def _duration(seconds: float) -> str:
    return _scaled(seconds, ((" s", 1.0), (" ms", 1e-3), (" us", 1e-6)))


def _flops(flops: float) -> str:
    return _scaled(flops, ((" PFLOP", 1e15), (" TFLOP", 1e12), (" GFLOP", 1e9), (" MFLOP", 1e6), (" FLOP", 1.0)))


def _count(value: float) -> str:
    return _scaled(value, (("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)))
