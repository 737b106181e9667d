"""The plan of a deployment: what ``zeroprefill plan`` prints, and the layout it recommends.

:func:`make_plan` puts together, for one AsyncEP group inside a node and several prompt
lengths, the gather and the saturation threshold (:mod:`~zeroprefill.common.saturation`),
memory per GPU (:mod:`~zeroprefill.common.memory_plan`) and the predicted step
(:mod:`~zeroprefill.common.layouts`) of every layout at the threshold batch; what would make
AsyncEP fit where it does not; with ``deploy_nodes > 1``, one group spanning the nodes against
one group per node behind the router; and the recommendation: the layout with the highest
predicted throughput among those that fit, with the command that serves it. The command line
(``zeroprefill/plan.py``) only parses flags and formats this :class:`Plan`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from zeroprefill.common.layouts import (LAYOUT_TABLE, LAYOUTS, ExpertParallelLayout, StepPrediction, predict_step,
                                        switch_point_tokens)
from zeroprefill.common.memory_plan import MemoryPlan, memory_plan
from zeroprefill.common.saturation import (Deployment, PlanError, effective_tflops, forward_flops_at_threshold,
                                           gather_bus_gbps, gather_message_bytes, gather_time_s,
                                           light_load_pass_time_s, saturation_threshold_flops,
                                           saturation_threshold_tokens)


@dataclass(frozen=True)
class ContextPlan:
    """Everything at one context length: threshold batch, memory and step per layout."""

    context_tokens: int
    threshold_tokens: int
    # below this per-GPU batch a pass moves tokens (deduplicated EP) instead of streaming weights
    switch_point_tokens: int | None
    operating_tokens: int  # per-GPU batch the predictions use: the threshold, >= 1 prompt
    forward_flops_at_threshold: int
    memory: dict[str, MemoryPlan]
    steps: dict[str, StepPrediction]

    def to_dict(self) -> dict[str, Any]:
        return {
            "context_tokens": self.context_tokens,
            "threshold_tokens": self.threshold_tokens,
            "switch_point_tokens": self.switch_point_tokens,
            "operating_tokens": self.operating_tokens,
            "forward_flops_at_threshold": self.forward_flops_at_threshold,
            "memory": {k: v.to_dict() for k, v in self.memory.items()},
            "steps": {k: v.to_dict() for k, v in self.steps.items()},
        }


@dataclass(frozen=True)
class MultiNodePlan:
    """AsyncEP spanning ``nodes`` nodes vs one AsyncEP group per node behind the router
    (thresholds of both over NCCL)."""

    nodes: int
    gpus_per_group_in_node: int
    spanning_bus_gbps: float
    spanning_gather_time_s: float
    spanning_threshold_flops: float
    spanning_fits: bool
    spanning_memory_bytes: int
    in_node_threshold_flops: float
    in_node_fits: bool
    recommendation: str

    @property
    def threshold_ratio(self) -> float:
        if not self.in_node_threshold_flops:
            return math.inf
        return self.spanning_threshold_flops / self.in_node_threshold_flops

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "threshold_ratio": self.threshold_ratio}


@dataclass(frozen=True)
class Plan:
    """What ``zeroprefill plan`` reports for one model x GPUs x dtype."""

    model: str
    profile: str
    num_gpus: int
    dtype: str
    transport: str
    prefetch_depth: int
    memory_utilization: float
    layer_expert_bytes: int
    gather_message_bytes: int
    gather_bus_gbps: float
    gather_time_s: float
    light_load_pass_time_s: float
    compute_tflops: float
    effective_tflops: float
    threshold_flops: float
    contexts: tuple[ContextPlan, ...]
    fits: dict[str, bool]
    suggestions: tuple[str, ...]
    recommendation: str
    multinode: MultiNodePlan | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "model", "profile", "num_gpus", "dtype", "transport", "prefetch_depth",
                "memory_utilization", "layer_expert_bytes", "gather_message_bytes",
                "gather_bus_gbps", "gather_time_s", "light_load_pass_time_s", "compute_tflops", "effective_tflops",
                "threshold_flops", "fits", "recommendation",
            )
        }
        out["contexts"] = [c.to_dict() for c in self.contexts]
        out["suggestions"] = list(self.suggestions)
        out["multinode"] = self.multinode.to_dict() if self.multinode else None
        out["notes"] = list(self.notes)
        return out


def make_plan(
    deployment: Deployment,
    context_tokens: tuple[int, ...] = (512, 4096, 32768),
    deploy_nodes: int = 1,
    model_name: str = "model",
) -> Plan:
    """Threshold, memory and step predictions of every layout for a group inside one node.

    With ``deploy_nodes > 1`` the plan adds :class:`MultiNodePlan`: one AsyncEP group spanning
    all ``deploy_nodes * num_gpus`` GPUs vs ``deploy_nodes`` in-node groups behind the router.
    """
    d = deployment
    profile = d.profile
    if d.nodes != 1:
        raise PlanError(
            f"make_plan plans a group inside one node, got one spanning {d.nodes} nodes; plan "
            f"--gpus {d.gpus_per_node} --nodes {d.nodes} to compare spanning with one group per node"
        )
    if d.num_gpus > profile.gpus_per_node:
        raise PlanError(
            f"--gpus {d.num_gpus} exceeds the {profile.gpus_per_node} GPUs of a node in profile "
            f"{profile.name!r}; use --gpus {profile.gpus_per_node} --nodes K for more"
        )
    if not context_tokens or min(context_tokens) < 1:
        raise PlanError(f"--context lengths must be positive, got {list(context_tokens)}")
    if deploy_nodes < 1:
        raise PlanError(f"--nodes must be >= 1, got {deploy_nodes}")
    contexts = tuple(_context_plan(d, c) for c in sorted(set(context_tokens)))
    fits = {layout: all(c.memory[layout].fits for c in contexts) for layout in LAYOUTS}
    worst = max(contexts, key=lambda c: c.operating_tokens)
    suggestions = () if fits["asyncep"] else _what_would_fit(d, worst)
    notes = []
    if d.num_gpus > 1 and profile.num_gpus != d.num_gpus:
        notes.append(
            f"profile {profile.name!r} was measured on {profile.num_gpus} GPU(s); its interconnect "
            f"numbers are used for {d.num_gpus}"
        )
    multinode = None
    if deploy_nodes > 1:
        multinode = _multinode_plan(d, deploy_nodes, worst, fits["asyncep"])
    return Plan(
        model=model_name,
        profile=profile.name,
        num_gpus=d.num_gpus,
        dtype=d.dtype,
        transport=d.transport,
        prefetch_depth=d.prefetch_depth,
        memory_utilization=d.memory_utilization,
        layer_expert_bytes=d.num_gpus * gather_message_bytes(d),
        gather_message_bytes=gather_message_bytes(d),
        gather_bus_gbps=gather_bus_gbps(d) if d.num_gpus > 1 else 0.0,
        gather_time_s=gather_time_s(d),
        light_load_pass_time_s=light_load_pass_time_s(d),
        compute_tflops=profile.compute_tflops(d.dtype),
        effective_tflops=effective_tflops(d),
        threshold_flops=saturation_threshold_flops(d),
        contexts=contexts,
        fits=fits,
        suggestions=suggestions,
        recommendation=multinode.recommendation if multinode else _single_node_recommendation(
            contexts, fits, deployment.num_gpus),
        multinode=multinode,
        notes=tuple(notes),
    )


def _context_plan(deployment: Deployment, context: int) -> ContextPlan:
    threshold_tokens = saturation_threshold_tokens(deployment, context)
    # Below one prompt nothing needs hiding (single GPU): run one prompt.
    operating = threshold_tokens if threshold_tokens else context
    return ContextPlan(
        context_tokens=context,
        threshold_tokens=threshold_tokens,
        switch_point_tokens=switch_point_tokens(deployment, context),
        operating_tokens=operating,
        forward_flops_at_threshold=forward_flops_at_threshold(deployment, context),
        memory={layout: memory_plan(deployment, layout, operating, context) for layout in LAYOUTS},
        steps={layout: predict_step(deployment, layout, operating, context) for layout in LAYOUTS},
    )


def _what_would_fit(deployment: Deployment, worst: ContextPlan) -> tuple[str, ...]:
    """Alternatives that fit AsyncEP at the same batch: FP8, more GPUs in the node."""
    options = []
    num_gpus, dtype = deployment.num_gpus, deployment.dtype
    gpus_per_node = deployment.profile.gpus_per_node
    candidates = [(num_gpus, "fp8")] if dtype != "fp8" else []
    n = num_gpus * 2
    while n <= gpus_per_node:
        candidates.append((n, dtype))
        n *= 2
    for n, dt in candidates:
        plan = memory_plan(
            replace(deployment, num_gpus=n, dtype=dt), "asyncep", worst.operating_tokens,
            worst.context_tokens,
        )
        if plan.fits:
            flag = f"--dtype {dt}" if n == num_gpus else f"--gpus {n}" + (f" --dtype {dt}" if dt != dtype else "")
            options.append(f"{flag}: {_gb(plan.total_bytes)} of {_gb(plan.budget_bytes)} per GPU")
    if not options:
        options.append(
            f"nothing in one node of {gpus_per_node} GPUs fits: use --nodes K (AsyncEP "
            f"spanning nodes) or a smaller model"
        )
    return tuple(options)


def _multinode_plan(
    deployment: Deployment, nodes: int, worst: ContextPlan, in_node_fits: bool
) -> MultiNodePlan:
    num_gpus, dtype = deployment.num_gpus, deployment.dtype
    total = num_gpus * nodes
    # Both over NCCL, like with like: the copy engine reaches peers inside a node only.
    in_node = replace(deployment, transport="nccl")
    spanning = replace(deployment, num_gpus=total, nodes=nodes, transport="nccl")
    in_node_threshold = saturation_threshold_flops(in_node)
    spanning_threshold = saturation_threshold_flops(spanning)
    span_memory = memory_plan(spanning, "asyncep", worst.operating_tokens, worst.context_tokens)
    ratio = spanning_threshold / in_node_threshold if in_node_threshold else math.inf
    if in_node_fits:
        recommendation = (
            f"deploy AsyncEP over {num_gpus} GPUs inside each node and {nodes} replicas behind the "
            f"zeroprefill router (prefix-aware, true-FLOPs): a group spanning {nodes} nodes needs "
            f"{ratio:.2f}x the per-GPU batch to hide its gather and buys only memory"
        )
    elif span_memory.fits:
        recommendation = (
            f"the model does not fit AsyncEP on {num_gpus} GPUs of one node in {dtype}: deploy one "
            f"AsyncEP group spanning {nodes} nodes ({ratio:.2f}x the in-node threshold), or vLLM "
            f"multi-node DP+EP; FP8 or a full node per group avoids crossing nodes"
        )
    else:
        recommendation = (
            f"the model does not fit AsyncEP on {total} GPUs in {dtype} "
            f"({_gb(span_memory.total_bytes)} of {_gb(span_memory.budget_bytes)} per GPU)"
        )
    return MultiNodePlan(
        nodes=nodes,
        gpus_per_group_in_node=num_gpus,
        spanning_bus_gbps=gather_bus_gbps(spanning),
        spanning_gather_time_s=gather_time_s(spanning),
        spanning_threshold_flops=spanning_threshold,
        spanning_fits=span_memory.fits,
        spanning_memory_bytes=span_memory.total_bytes,
        in_node_threshold_flops=in_node_threshold,
        in_node_fits=in_node_fits,
        recommendation=recommendation,
    )


def _single_node_recommendation(contexts: tuple[ContextPlan, ...], fits: dict[str, bool], num_gpus: int) -> str:
    """The layout to deploy and its command; where AsyncEP does not fit, the plan's suggestions
    say what would."""
    fitting = [layout for layout in LAYOUTS if fits[layout]]
    if not fitting:
        return "no layout fits; see the suggestions for what would"
    throughput = {
        layout: sum(c.steps[layout].tokens_per_s for c in contexts) / len(contexts)
        for layout in fitting
    }
    best = LAYOUT_TABLE[max(fitting, key=throughput.__getitem__)]
    text = f"{best.title} (highest predicted throughput among layouts that fit)"
    if isinstance(best, ExpertParallelLayout):
        text += "; a best case: balanced routing" + (", the exchange fully hidden" if best.overlapped else "")
    if best.name != "asyncep" and not fits["asyncep"]:
        text += "; AsyncEP does not fit: see the suggestions for what would"
    return f"{text}. Serve it with: {best.serve_command.format(n=num_gpus)}"


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.1f} GB"
