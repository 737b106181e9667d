"""The saturation threshold and the step budget: the work per step that hides one layer's gather.

Every answer is about a :class:`Deployment`: the model (``spec``), the hardware (``profile``, a
:class:`~zeroprefill.common.hardware.HardwareProfile`), the AsyncEP group (``num_gpus`` GPUs
over ``nodes`` nodes), the weight format, the transport (resolved by
:func:`~zeroprefill.common.transport_choice.resolve_transport`, as the runtime resolves it),
the prefetch depth and the share of GPU memory to plan for. Per GPU, one MoE layer::

    t_g   = shard_bytes * (N - 1) / bus_bw          gather_time_s: one layer's AllGather
    R_eff = R / (1 + s)                             effective_tflops: GEMM rate under the gather
    F*    = t_g * R_eff                             saturation_threshold_flops

``F*`` is the true FLOPs of ONE whole transformer layer (attention with its causal scores,
router, experts, shared experts) that takes as long as the gather: below it the layer waits on
the wire, above it the gather is hidden. Gathers are serialised on one stream, so a deeper
prefetch absorbs jitter but does not move ``F*``. In tokens (:func:`saturation_threshold_tokens`):
a steady stream of ``C``-token prompts puts a token at position ``(C + 1) / 2`` on average, so
long context reaches ``F*`` with fewer tokens.

The step budget (:func:`step_flops_budget`) is the whole forward at the threshold times a
headroom. Its consumers, per rank:

- the vLLM prefill-only scheduler fills each step to it at :data:`DEFAULT_STEP_HEADROOM`;
- the SGLang balancer uses it at headroom 1 as its saturation threshold; the router, times the
  GPUs of a replica, as its per-replica one.

The engines get it from :func:`step_flops_budget_on_gpus` (the transport AsyncEP runs with,
the checkpoint's weight format); a user's number replaces it through the one setting,
``ZEROPREFILL_STEP_FLOPS_BUDGET`` (:func:`configured_step_flops_budget`).

Cheap to import (no torch): the engine plugins and the router import this module, not the
memory plan or the step predictions (:mod:`~zeroprefill.common.memory_plan`,
:mod:`~zeroprefill.common.layouts`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from zeroprefill.common.cost_model import layer_flops_at_context
from zeroprefill.common.hardware import HardwareProfile, shipped_gpu_for, shipped_profile
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.transport_choice import AUTO_TRANSPORT, GPU_TRANSPORTS, resolve_transport

#: Weight formats the planner plans for (compute runs in the same format).
PLAN_DTYPES = ("bf16", "fp8")
#: Transports a GPU deployment may name: ``auto`` or one the hardware profiles measure.
PLAN_TRANSPORTS = (AUTO_TRANSPORT, *GPU_TRANSPORTS)
#: Fraction of GPU memory a plan may use (vLLM's ``gpu_memory_utilization`` default); the rest
#: is CUDA context, NCCL and cuBLAS workspaces and allocator slack.
DEFAULT_MEMORY_UTILIZATION = 0.9
#: Prompt length a threshold is computed at when the caller knows no typical one (the router's
#: ``--context-tokens``, the engine plugins' budgets). The threshold forward in FLOPs barely
#: depends on it: every MoE layer of it runs ``F*``.
DEFAULT_CONTEXT_TOKENS = 2048
#: The vLLM scheduler's step budget over the threshold forward: a step a little past saturation.
DEFAULT_STEP_HEADROOM = 1.1
#: The one user setting of the per-rank step budget, in FLOPs (both engine plugins).
STEP_FLOPS_BUDGET_ENV = "ZEROPREFILL_STEP_FLOPS_BUDGET"
#: The SGLang balancer's former name for the same number: read where the setting is unset,
#: with a warning (deprecated).
DEPRECATED_SATURATION_FLOPS_ENV = "ZEROPREFILL_SATURATION_FLOPS"


class PlanError(ValueError):
    """A plan cannot be made from these inputs; the message names the bad value."""


@dataclass(frozen=True)
class Deployment:
    """One AsyncEP group and every knob the planner's answers depend on.

    ``num_gpus`` GPUs, one rank each, over ``nodes`` nodes (``num_gpus / nodes`` in each).
    ``transport`` may be ``"auto"``: it is resolved on construction (:func:`~zeroprefill.common.
    transport_choice.resolve_transport` on CUDA), so ``deployment.transport`` is the one that
    gathers. Bad values raise :class:`PlanError` naming the ``zeroprefill plan`` flag to change.
    """

    spec: MoEModelSpec
    profile: HardwareProfile
    num_gpus: int
    dtype: str = "bf16"
    transport: str = AUTO_TRANSPORT
    nodes: int = 1
    prefetch_depth: int = 1
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION

    def __post_init__(self) -> None:
        check_plan_dtype(self.dtype)
        _check_group(self.num_gpus, self.nodes)
        if self.prefetch_depth < 1:
            raise PlanError(f"--prefetch-depth must be >= 1, got {self.prefetch_depth}")
        if not 0.0 < self.memory_utilization <= 1.0:
            raise PlanError(f"--memory-utilization must be in (0, 1], got {self.memory_utilization}")
        if self.transport not in PLAN_TRANSPORTS:
            raise PlanError(
                f"unknown transport {self.transport!r} (--transport); choose one of {', '.join(PLAN_TRANSPORTS)}"
            )
        try:
            transport = resolve_transport(self.transport, nodes=self.nodes)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        object.__setattr__(self, "transport", transport)

    @classmethod
    def on_shipped_gpu(
        cls,
        spec: MoEModelSpec,
        gpu: str,
        num_gpus: int,
        dtype: str = "bf16",
        transport: str = AUTO_TRANSPORT,
        nodes: int = 1,
    ) -> Deployment:
        """A group of ``num_gpus`` ``gpu`` GPUs (``"h200"``, ...) on the shipped profile of
        ``num_gpus / nodes`` of them (raises ``HardwareProfileError`` where none is shipped)."""
        _check_group(num_gpus, nodes)
        return cls(spec, shipped_profile(gpu, num_gpus // nodes), num_gpus, dtype, transport, nodes)

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.nodes


# -- gather --------------------------------------------------------------------------------
def expert_bytes(spec: MoEModelSpec, dtype: str) -> int:
    """Bytes of one routed expert in ``dtype`` (FP8 includes its block scales)."""
    check_plan_dtype(dtype)
    return spec.expert_bytes_per_layer(dtype) // spec.num_experts


def shard_capacity(spec: MoEModelSpec, num_gpus: int) -> int:
    """Experts per rank's shard, ``ceil(E / N)`` (as ``ExpertShardLayout.capacity``)."""
    return -(-spec.num_experts // num_gpus)


def gather_message_bytes(deployment: Deployment) -> int:
    """Bytes each rank contributes to one layer's AllGather: its padded expert shard."""
    spec = deployment.spec
    return shard_capacity(spec, deployment.num_gpus) * expert_bytes(spec, deployment.dtype)


def gather_bus_gbps(deployment: Deployment) -> float:
    """AllGather bus bandwidth of one layer's gather over the deployment's GPUs and nodes.

    Across nodes a ring AllGather sends, per step, one shard out of each node, spread over the
    node's NICs, so its bus bandwidth is capped by the network bandwidth of the node's share
    of GPUs: ``min(intra-node bus bw, internode_gbps_per_node * gpus_in_node / gpus_per_node)``.
    """
    profile = deployment.profile
    intra = profile.gather(deployment.transport).bus_gbps(gather_message_bytes(deployment))
    if deployment.nodes == 1:
        return intra
    share = min(1.0, deployment.gpus_per_node / profile.gpus_per_node)
    return min(intra, profile.internode_gbps_per_node.value * share)


def gather_time_s(deployment: Deployment) -> float:
    """``t_g = shard_bytes * (N - 1) / bus_bw``: one MoE layer's expert AllGather (0 for N=1)."""
    n = deployment.num_gpus
    if n == 1:
        return 0.0
    return gather_message_bytes(deployment) * (n - 1) / (gather_bus_gbps(deployment) * 1e9)


def light_load_pass_time_s(deployment: Deployment) -> float:
    """AsyncEP's shortest forward pass: ``num_moe_layers * t_g``, however few tokens it carries.

    Every pass streams every MoE layer's remote experts; below the saturation threshold the
    gathers, not the compute, set the pass time (AllToAll-EP, which moves activations, has no
    such floor). 0 on one GPU.
    """
    return deployment.spec.num_moe_layers * gather_time_s(deployment)


def effective_tflops(deployment: Deployment) -> float:
    """``R_eff``: the GEMM rate while the deployment's gather runs; ``R`` on one GPU (no gather)."""
    dtype = deployment.dtype
    if deployment.num_gpus == 1:
        return deployment.profile.compute_tflops(dtype)
    return deployment.profile.effective_tflops(dtype, deployment.transport)


# -- threshold and budget ------------------------------------------------------------------
def saturation_threshold_flops(deployment: Deployment) -> float:
    """``F* = t_g * R_eff``: one transformer layer's true FLOPs per GPU that hide one gather."""
    if deployment.num_gpus == 1:
        return 0.0
    return gather_time_s(deployment) * effective_tflops(deployment) * 1e12


def saturation_threshold_tokens(deployment: Deployment, context_tokens: int) -> int:
    """Smallest per-GPU batch (tokens of ``context_tokens``-long prompts) reaching ``F*``."""
    spec = deployment.spec
    threshold = saturation_threshold_flops(deployment)
    layer = spec.moe_layer_indices[0]  # a steady-state MoE layer: all of a model's are alike
    per_token = layer_flops_at_context(spec, layer, 2, context_tokens).total / 2
    tokens = max(0, math.ceil(threshold / per_token) - 1)
    while layer_flops_at_context(spec, layer, tokens, context_tokens).total < threshold:
        tokens += 1
    return tokens


def forward_flops(spec: MoEModelSpec, tokens: int, context_tokens: int) -> int:
    """True FLOPs of a whole forward (all layers, no head) of ``tokens`` tokens per GPU."""
    return sum(
        layer_flops_at_context(spec, layer, tokens, context_tokens).total for layer in range(spec.num_layers)
    )


def forward_flops_at_threshold(deployment: Deployment, context_tokens: int) -> int:
    """True FLOPs of a whole forward (all layers, no head) of the threshold batch, per GPU."""
    tokens = saturation_threshold_tokens(deployment, context_tokens)
    return forward_flops(deployment.spec, tokens, context_tokens)


def step_flops_budget(
    deployment: Deployment, context_tokens: int, headroom: float = DEFAULT_STEP_HEADROOM
) -> float:
    """Per-step, per-GPU true-FLOPs budget: the threshold forward times ``headroom`` (>= 1).

    0 on one GPU (nothing is gathered, nothing to hide). The one budget every consumer uses:
    the vLLM scheduler (default headroom), the SGLang balancer per rank and the router per
    replica (``num_gpus`` times it), both at ``headroom=1``: the saturation threshold itself.
    """
    if headroom < 1.0:
        raise PlanError(f"headroom must be >= 1.0 (below it the gather is exposed), got {headroom}")
    return forward_flops_at_threshold(deployment, context_tokens) * headroom


def replica_saturation_flops(deployment: Deployment, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> float:
    """A replica's saturation threshold, in FLOPs of work across its GPUs: ``num_gpus`` times
    :func:`step_flops_budget` at headroom 1 (0 on one GPU). The router holds each replica's
    outstanding work near it; the simulator's replicas are priced with it."""
    return deployment.num_gpus * step_flops_budget(deployment, context_tokens, headroom=1.0)


def replica_flops_per_s(deployment: Deployment) -> float:
    """A replica's compute rate under its gathers: ``num_gpus * R_eff`` (``R`` on one GPU)."""
    return deployment.num_gpus * effective_tflops(deployment) * 1e12


def engine_deployment(
    spec: MoEModelSpec, device_name: str, num_ranks: int, dtype: str = "bf16", transport: str | None = None,
) -> Deployment | None:
    """The deployment an engine plugin plans for: ``num_ranks`` GPUs called ``device_name`` (as
    NVML names them) in one node, in ``dtype`` (the checkpoint's weight format: ``"fp8"`` for
    block FP8), with the transport AsyncEP gathers with: ``transport`` (a setting, ``auto`` or a
    name), by default the process's own, ``AsyncEPConfig.from_env().transport``, resolved as the
    runtime resolves it.

    ``None`` where no plan applies: a GPU without a shipped profile, or one rank (nothing is
    gathered). Raises ``HardwareProfileError`` / ``PlanError`` where the deployment has no plan
    (e.g. a GPU count without a shipped profile): the caller says so.
    """
    gpu = shipped_gpu_for(device_name)
    if gpu is None or num_ranks == 1:
        return None
    if transport is None:
        from zeroprefill.common.asyncep_model import AsyncEPConfig  # torch: only when an engine asks

        transport = AsyncEPConfig.from_env().transport
    return Deployment.on_shipped_gpu(spec, gpu, num_ranks, dtype, transport)


def step_flops_budget_on_gpus(
    spec: MoEModelSpec,
    device_name: str,
    num_ranks: int,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    headroom: float = DEFAULT_STEP_HEADROOM,
    dtype: str = "bf16",
    transport: str | None = None,
) -> float | None:
    """The step budget of an engine's AsyncEP deployment (:func:`engine_deployment`): what both
    engine plugins plan with; ``None`` where no plan applies."""
    deployment = engine_deployment(spec, device_name, num_ranks, dtype, transport)
    return None if deployment is None else step_flops_budget(deployment, context_tokens, headroom=headroom)


# -- the setting ---------------------------------------------------------------------------
def parse_step_flops_budget(value: object, source: str) -> float:
    """``value`` as a per-rank step budget in FLOPs; a one-line ``ValueError`` naming ``source``
    (where the value was set) unless it is a positive number."""
    try:
        budget = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"step_flops_budget must be a number of FLOPs, got {value!r} ({source})") from None
    if not budget > 0:  # NaN too
        raise ValueError(f"step_flops_budget must be positive, got {value!r} ({source})")
    return budget


def configured_step_flops_budget(environ: Mapping[str, str] = os.environ) -> float | None:
    """The per-rank step budget the environment sets, validated; ``None`` if unset.

    ``ZEROPREFILL_STEP_FLOPS_BUDGET``; where it is unset, ``ZEROPREFILL_SATURATION_FLOPS`` (the
    SGLang balancer's former name for the same number) is read in its place, with a
    ``FutureWarning``: it will be dropped.
    """
    if environ.get(STEP_FLOPS_BUDGET_ENV):
        return parse_step_flops_budget(environ[STEP_FLOPS_BUDGET_ENV], STEP_FLOPS_BUDGET_ENV)
    if environ.get(DEPRECATED_SATURATION_FLOPS_ENV):
        warnings.warn(f"{DEPRECATED_SATURATION_FLOPS_ENV} is deprecated: set {STEP_FLOPS_BUDGET_ENV} instead",
                      FutureWarning, stacklevel=2)
        return parse_step_flops_budget(environ[DEPRECATED_SATURATION_FLOPS_ENV], DEPRECATED_SATURATION_FLOPS_ENV)
    return None


# -- checks --------------------------------------------------------------------------------
def check_plan_dtype(dtype: str) -> None:
    """Raise :class:`PlanError` unless ``dtype`` is a format the planner plans for."""
    if dtype not in PLAN_DTYPES:
        raise PlanError(f"unknown dtype {dtype!r}; choose one of {', '.join(PLAN_DTYPES)}")


def _check_group(num_gpus: int, nodes: int) -> None:
    if num_gpus < 1 or nodes < 1 or num_gpus % nodes:
        raise PlanError(
            f"an AsyncEP group of {num_gpus} GPUs cannot span {nodes} nodes evenly: GPUs (--gpus) "
            "and nodes (--nodes) must be positive, the GPUs a multiple of the nodes"
        )
