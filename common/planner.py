"""Saturation threshold, memory plan and predicted step time of MoE prefill layouts.

Every answer is about a :class:`Deployment`: the model (``spec``, a ``MoEModelSpec``), the
hardware (``profile``, a ``HardwareProfile`` from :mod:`zeroprefill.common.hardware`), the
AsyncEP group (``num_gpus`` GPUs over ``nodes`` nodes), the weight format, the AllGather
transport, the prefetch depth and the share of GPU memory to plan for. Whoever knows the
deployment builds it once (``zeroprefill plan``, the router, the engine plugins) and passes it
down. API (all per GPU unless the name says otherwise):

- ``resolve_transport(transport, nodes)``: ``"auto"`` as the runtime resolves it on GPUs (the
  copy engine inside a node); a :class:`Deployment` resolves its transport with it.
- ``gather_time_s(deployment)``: time to AllGather one MoE layer's experts,
  ``t_g = shard_bytes * (N - 1) / bus_bw``.
- ``saturation_threshold_flops(deployment)``: true FLOPs of ONE transformer layer a GPU must
  run to hide one layer's gather, ``F* = t_g * R_eff``.
- ``saturation_threshold_tokens(deployment, context_tokens)``: the same threshold as a token
  batch of ``context_tokens``-long prompts.
- ``forward_flops_at_threshold(deployment, context_tokens)``: the whole forward's true FLOPs
  (all layers, no head) of that batch, in units of ``request_flops``.
- ``step_flops_budget(deployment, context_tokens, headroom)``: THE per-step, per-GPU
  true-FLOPs budget: the threshold forward times ``headroom``. The vLLM scheduler fills each
  step to it; at ``headroom=1`` it is the SGLang balancer's per-rank saturation threshold and,
  times the GPUs of a replica, the router's per-replica one.
- ``memory_plan(deployment, layout, tokens_per_gpu, context_tokens)`` -> :class:`MemoryPlan`;
  ``predict_step(deployment, layout, tokens_per_gpu, context_tokens, rank_imbalance)`` ->
  :class:`StepPrediction` (layouts: AsyncEP, deduplicated AllToAll-EP, EP with two-batch
  overlap, TP); ``make_plan(deployment, context_tokens, deploy_nodes)`` ->
  :class:`Plan` (what ``zeroprefill plan`` prints; ``.to_dict()``).

What overlaps what (AsyncEP, ``d`` = prefetch depth, ``d + 1`` gather buffers). The gather of
MoE layer ``l + 1`` runs on a side stream while the compute stream runs layer ``l``'s MoE and
layer ``l + 1``'s attention; gathers are serialised on the one communication stream. In steady
state one gather must therefore finish per layer of compute, so a layer takes
``max(t_g, t_c)`` whatever ``d`` is: a deeper prefetch absorbs layer-to-layer jitter and
costs memory, it does not move the threshold. ``t_c`` is the compute of ONE whole
transformer layer (attention projections + causal scores + router + experts + shared
experts), run at ``R_eff = R / (1 + s)`` while the gather is on the wire (``s`` the measured
GEMM slowdown) and at ``R`` after it finishes::

    t_layer = t_g + max(0, F_layer - t_g * R_eff) / R      (>= t_g; = t_g exactly at F*)

Threshold in tokens at context ``C``: a steady stream of ``C``-token prompts puts a token on
average at position ``(C + 1) / 2``, so a token costs ``2 * matmul_params_layer +
flops_per_query_key_pair * (C + 1) / 2`` per layer: long context means fewer tokens.

One rate per dtype (``profile.compute_tflops``: GEMM rate at MoE shapes) times every FLOP,
attention scores included; real kernels (token permutation, SiLU, flash attention) run below
it, so predicted step times are lower bounds and the threshold in tokens an upper bound
(slower compute hides the gather with fewer tokens). Gathering is bandwidth-only: the
measured interference beyond the GEMM slowdown (docs/design.md, measured anchors) is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from zeroprefill.common.cost_model import (
    attention_matmul_params,
    layer_flops_at_context,
    layer_matmul_params,
)
from zeroprefill.common.hardware import (GPU_TRANSPORTS, HardwareProfile, HardwareProfileError, shipped_gpu_for,
                                         shipped_profile)
from zeroprefill.common.model_spec import BYTES_PER_ELEMENT, FP8_WEIGHT_BLOCK, MoEModelSpec

#: Parallel layouts the planner compares.
LAYOUTS = ("asyncep", "alltoall_ep", "alltoall_ep_tbo", "tp")
LAYOUT_TITLES = {"asyncep": "AsyncEP", "alltoall_ep": "AllToAll-EP", "alltoall_ep_tbo": "EP two-batch overlap",
                 "tp": "TP"}
#: Layouts that run a rank's own experts on tokens sent to it (dispatch/combine, rank imbalance).
EP_LAYOUTS = ("alltoall_ep", "alltoall_ep_tbo")
#: How each layout is served on ``{n}`` GPUs (vLLM; SGLang's two-batch overlap in brackets).
LAYOUT_COMMANDS = {
    "asyncep": "vllm serve MODEL --data-parallel-size {n} --enable-expert-parallel --moe-backend asyncep",
    "alltoall_ep": "vllm serve MODEL --data-parallel-size {n} --enable-expert-parallel",
    "alltoall_ep_tbo": "vllm serve MODEL --data-parallel-size {n} --enable-expert-parallel --enable-dbo "
                       "(SGLang: --enable-two-batch-overlap)",
    "tp": "vllm serve MODEL --tensor-parallel-size {n}",
}
#: Weight formats the planner plans for (compute runs in the same format).
PLAN_DTYPES = ("bf16", "fp8")
#: The runtime's default transport (``make_transport("auto", ...)``); :func:`resolve_transport`.
AUTO_TRANSPORT = "auto"
#: Transports a deployment may name: ``auto`` or one the hardware profiles measure.
PLAN_TRANSPORTS = (AUTO_TRANSPORT, *GPU_TRANSPORTS)
#: Activations and KV cache stay bf16 whatever the weight format.
ACTIVATION_BYTES = 2
#: One routing slot of a dispatched row: the expert id (int32) and its weight (fp32).
ROUTING_SLOT_BYTES = 8
#: Resident activation tensors per token outside attention and experts: residual stream,
#: its normed copy, attention output, MoE output.
RESIDUAL_COPIES = 4
#: Fraction of GPU memory a plan may use (vLLM's ``gpu_memory_utilization`` default); the rest
#: is CUDA context, NCCL and cuBLAS workspaces and allocator slack.
DEFAULT_MEMORY_UTILIZATION = 0.9
#: Prompt length a threshold is computed at when the caller knows no typical one (the router's
#: ``--context-tokens``, the engine plugins' budgets). The threshold forward in FLOPs barely
#: depends on it: every MoE layer of it runs ``F*``.
DEFAULT_CONTEXT_TOKENS = 2048
#: A scheduler's step budget over the threshold forward: a step a little past saturation.
DEFAULT_STEP_HEADROOM = 1.1


class PlanError(ValueError):
    """A plan cannot be made from these inputs; the message names the bad value."""


def resolve_transport(transport: str, nodes: int = 1) -> str:
    """The AllGather transport a GPU deployment runs: ``"auto"`` resolved as the runtime does.

    ``make_transport("auto", ...)`` (:mod:`zeroprefill.common.transport`) takes the copy engine
    on CUDA when torch has symmetric memory, which every torch this package supports (>= 2.6)
    has. The copy engine reads peer memory inside one node, so a group spanning nodes gathers
    over NCCL. A named transport is returned unchanged.
    """
    if transport not in PLAN_TRANSPORTS:
        raise PlanError(
            f"unknown transport {transport!r} (--transport); choose one of {', '.join(PLAN_TRANSPORTS)}"
        )
    if transport != AUTO_TRANSPORT:
        return transport
    return "copy_engine" if nodes == 1 else "nccl"


@dataclass(frozen=True)
class Deployment:
    """One AsyncEP group and every knob the planner's answers depend on.

    ``num_gpus`` GPUs, one rank each, over ``nodes`` nodes (``num_gpus / nodes`` in each).
    ``transport`` may be ``"auto"``: it is resolved on construction
    (:func:`resolve_transport`), so ``deployment.transport`` is the one that gathers. Bad
    values raise :class:`PlanError` naming the ``zeroprefill plan`` flag to change.
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
        _check_dtype(self.dtype)
        _check_group(self.num_gpus, self.nodes)
        if self.prefetch_depth < 1:
            raise PlanError(f"--prefetch-depth must be >= 1, got {self.prefetch_depth}")
        if not 0.0 < self.memory_utilization <= 1.0:
            raise PlanError(f"--memory-utilization must be in (0, 1], got {self.memory_utilization}")
        transport = resolve_transport(self.transport, self.nodes)
        if self.nodes > 1 and transport == "copy_engine":
            raise PlanError(
                "the copy_engine transport reads peer GPU memory inside one node; use nccl across nodes"
            )
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


# -- gather and threshold ------------------------------------------------------------------
def expert_bytes(spec: MoEModelSpec, dtype: str) -> int:
    """Bytes of one routed expert in ``dtype`` (FP8 includes its block scales)."""
    _check_dtype(dtype)
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


def saturation_threshold_flops(deployment: Deployment) -> float:
    """``F* = t_g * R_eff``: one transformer layer's true FLOPs per GPU that hide one gather."""
    if deployment.num_gpus == 1:
        return 0.0
    return gather_time_s(deployment) * effective_tflops(deployment) * 1e12


def saturation_threshold_tokens(deployment: Deployment, context_tokens: int) -> int:
    """Smallest per-GPU batch (tokens of ``context_tokens``-long prompts) reaching ``F*``."""
    spec = deployment.spec
    threshold = saturation_threshold_flops(deployment)
    layer = _representative_moe_layer(spec)
    per_token = layer_flops_at_context(spec, layer, 2, context_tokens).total / 2
    tokens = max(0, math.ceil(threshold / per_token) - 1)
    while layer_flops_at_context(spec, layer, tokens, context_tokens).total < threshold:
        tokens += 1
    return tokens


def forward_flops_at_threshold(deployment: Deployment, context_tokens: int) -> int:
    """True FLOPs of a whole forward (all layers, no head) of the threshold batch, per GPU."""
    tokens = saturation_threshold_tokens(deployment, context_tokens)
    return _forward_flops(deployment.spec, tokens, context_tokens)


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


def step_flops_budget_on_gpus(
    spec: MoEModelSpec,
    device_name: str,
    num_ranks: int,
    context_tokens: int,
    headroom: float = DEFAULT_STEP_HEADROOM,
    dtype: str = "bf16",
) -> float | None:
    """:func:`step_flops_budget` of ``num_ranks`` GPUs called ``device_name`` in one node, with
    the runtime's transport and the served weights' ``dtype`` (``"fp8"`` for a block-FP8
    checkpoint): what an engine plugin uses by default.

    ``None`` where no budget applies: a GPU without a shipped profile, or one rank (nothing
    is gathered). Raises ``HardwareProfileError`` / ``PlanError`` where the deployment has no
    plan (e.g. a GPU count without a shipped profile): the caller says so.
    """
    gpu = shipped_gpu_for(device_name)
    if gpu is None or num_ranks == 1:
        return None
    deployment = Deployment.on_shipped_gpu(spec, gpu, num_ranks, dtype)
    return step_flops_budget(deployment, context_tokens, headroom=headroom)


# -- memory --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of one layout at one operating batch, and whether they fit."""

    layout: str
    num_gpus: int
    dtype: str
    tokens_per_gpu: int
    context_tokens: int
    dense_weight_bytes: int
    expert_weight_bytes: int
    gather_buffer_bytes: int
    activation_bytes: int
    kv_cache_bytes: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.dense_weight_bytes
            + self.expert_weight_bytes
            + self.gather_buffer_bytes
            + self.activation_bytes
            + self.kv_cache_bytes
        )

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


def dense_weight_bytes(spec: MoEModelSpec, dtype: str) -> int:
    """Bytes of every non-expert weight. FP8 checkpoints quantise the linear layers
    (attention projections, shared experts, dense MLPs; fp32 scale per 128x128 block, rounded
    up per matrix as a whole) and keep embeddings, LM head, router and norms in bf16."""
    _check_dtype(dtype)
    if dtype != "fp8":
        return int(spec.dense_params * BYTES_PER_ELEMENT[dtype])
    linear = (
        spec.num_layers * attention_matmul_params(spec.attention, spec.hidden_size)
        + spec.num_moe_layers * spec.shared_expert_params_per_layer
        + spec.num_dense_layers * spec.dense_mlp_params
    )
    scales = 4 * -(-linear // (FP8_WEIGHT_BLOCK * FP8_WEIGHT_BLOCK))
    return linear + scales + (spec.dense_params - linear) * 2


def kv_bytes_per_token(spec: MoEModelSpec, layout: str = "asyncep", num_gpus: int = 1) -> int:
    """bf16 KV cache of one token over all layers on one GPU (TP splits GQA kv heads)."""
    attention = spec.attention
    if attention.kind == "mla":  # compressed latent + rope key, replicated under TP
        per_layer = attention.kv_lora_rank + attention.qk_rope_head_dim
    else:
        heads = attention.num_kv_heads
        if layout == "tp":  # kv heads split; replicated when N > kv heads
            heads = -(-heads // num_gpus)
        per_layer = 2 * heads * attention.head_dim
    return per_layer * ACTIVATION_BYTES * spec.num_layers


def activation_bytes_per_token(spec: MoEModelSpec, layout: str, num_gpus: int) -> int:
    """Peak transient activations of one token in one layer (estimate, bf16).

    Residual stream copies, q/k/v, and the MoE's permuted top-k copies (input, output, gate-up
    ``2I`` and activated ``I``); AllToAll-EP adds dispatch send/receive buffers; TP splits the
    attention heads and the expert FFN over its ``N`` GPUs.
    """
    h, k, i = spec.hidden_size, spec.top_k, spec.expert_intermediate_size
    a = spec.attention
    qkv = a.num_heads * a.head_dim + a.num_heads * (a.head_dim + a.v_head_dim)
    if a.kind == "gqa":
        qkv = a.num_heads * a.head_dim + 2 * a.num_kv_heads * a.head_dim
    split = num_gpus if layout == "tp" else 1
    moe = k * (2 * h + 3 * i // split)
    if layout in EP_LAYOUTS:
        moe += k * 2 * h
    return ACTIVATION_BYTES * (RESIDUAL_COPIES * h + qkv // split + moe)


def memory_plan(
    deployment: Deployment, layout: str, tokens_per_gpu: int, context_tokens: int
) -> MemoryPlan:
    """Memory per GPU of ``layout`` with ``tokens_per_gpu`` in flight per GPU.

    AsyncEP / AllToAll-EP: replicated dense weights + ``ceil(E/N)`` experts per layer. AsyncEP
    adds ``d + 1`` gather buffers of one full layer (``N * ceil(E/N)`` expert slots). TP: all
    weights split ``N`` ways; the group runs ``N * tokens_per_gpu`` tokens together. KV cache
    holds the batch's prompts whole: ``ceil(T / C) * C`` tokens (a long prompt is chunked, but
    its earlier chunks' keys stay).
    """
    _check_layout(layout)
    spec, num_gpus, dtype = deployment.spec, deployment.num_gpus, deployment.dtype
    layer_expert_bytes = shard_capacity(spec, num_gpus) * expert_bytes(spec, dtype)
    dense = dense_weight_bytes(spec, dtype)
    experts = spec.num_moe_layers * layer_expert_bytes
    buffers = 0
    tokens = tokens_per_gpu
    if layout == "asyncep" and num_gpus > 1:
        buffers = (deployment.prefetch_depth + 1) * num_gpus * layer_expert_bytes
    if layout == "tp":
        dense = -(-dense // num_gpus)
        experts = -(-spec.num_moe_layers * spec.expert_bytes_per_layer(dtype) // num_gpus)
        tokens = tokens_per_gpu * num_gpus
    kv_tokens = -(-tokens // context_tokens) * context_tokens if tokens else 0
    return MemoryPlan(
        layout=layout,
        num_gpus=num_gpus,
        dtype=dtype,
        tokens_per_gpu=tokens_per_gpu,
        context_tokens=context_tokens,
        dense_weight_bytes=dense,
        expert_weight_bytes=experts,
        gather_buffer_bytes=buffers,
        activation_bytes=tokens * activation_bytes_per_token(spec, layout, num_gpus),
        kv_cache_bytes=kv_tokens * kv_bytes_per_token(spec, layout, num_gpus),
        budget_bytes=int(deployment.profile.gpu_memory_bytes.value * deployment.memory_utilization),
    )


# -- step time -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPrediction:
    """Predicted forward step of one layout at a per-GPU batch (all numbers per GPU)."""

    layout: str
    tokens_per_gpu: int
    context_tokens: int
    flops_per_gpu: int
    step_time_s: float
    compute_time_s: float  # the same FLOPs at R with no communication
    tokens_per_s: float
    mfu: float

    @property
    def exposed_fraction(self) -> float:
        """Share of the step not explained by uncontended compute (communication, tax)."""
        return 1.0 - self.compute_time_s / self.step_time_s if self.step_time_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exposed_fraction": self.exposed_fraction}


def predict_step(
    deployment: Deployment, layout: str, tokens_per_gpu: int, context_tokens: int,
    rank_imbalance: float = 1.0, remote_ranks: float | None = None,
) -> StepPrediction:
    """Forward time of ``layout`` with ``tokens_per_gpu`` tokens of ``C``-token prompts per GPU.

    AsyncEP: each MoE layer ``t_g + max(0, F - t_g R_eff) / R`` (module docstring).

    AllToAll-EP, deduplicated as DeepEP's normal mode sends (a token goes once to each remote
    rank that holds one of its experts, with its routing slots; the expert side sums its share
    and sends one row back): ``F / R`` plus dispatch and combine
    (:func:`alltoall_exchange_time_s`), not overlapped. ``remote_ranks``: the other ranks a
    token goes to, where the caller knows its routing's locality (default
    :func:`remote_ranks_per_token`, uniform routing).

    EP with two-batch overlap (SGLang's TBO: two micro-batches, each one's dispatch/combine
    under the other's compute): the AsyncEP formula with the exchange ``t_x`` in place of
    ``t_g``, ``t_x + max(0, F - t_x R_nccl) / R``, ``R_nccl`` the GEMM rate under an NCCL
    collective. Ideal overlap, the layout's best case: half-size GEMMs are taken to run at
    ``R`` and the host's wait for the counts is free.

    In both EP layouts the routed experts' FLOPs are multiplied by ``rank_imbalance``, the
    max/mean EP-rank load (:func:`zeroprefill.common.routing_skew.expected_rank_imbalance`;
    1.0 = balanced routing, EP's best case); AsyncEP and TP split tokens, not experts, and
    ignore it.

    TP: the group runs ``N * T`` tokens, ``F / N / R`` per GPU plus two AllReduces per layer of
    the ``N * T * hidden`` bf16 activations at ``2 (N - 1) / N`` bytes over the AllGather bus
    bandwidth (ring AllReduce = ReduceScatter + AllGather).

    Every layer also waits at least for its weights to stream from HBM. No LM head.
    """
    _check_layout(layout)
    if rank_imbalance < 1.0:
        raise PlanError(f"rank_imbalance is max/mean rank load, at least 1.0; got {rank_imbalance}")
    spec, profile, dtype = deployment.spec, deployment.profile, deployment.dtype
    rate = profile.compute_tflops(dtype) * 1e12
    hbm = profile.hbm_gbps.value * 1e9
    n, t = deployment.num_gpus, tokens_per_gpu
    t_g = gather_time_s(deployment) if layout == "asyncep" else 0.0
    r_eff = effective_tflops(deployment) * 1e12 if t_g else rate
    attention_bytes = attention_matmul_params(spec.attention, spec.hidden_size) * _weight_bytes(dtype)
    exchange_s = alltoall_exchange_time_s(deployment, t, remote_ranks) if layout in EP_LAYOUTS else 0.0
    flops_total = 0
    step = 0.0
    for layer in range(spec.num_layers):
        layer_flops = layer_flops_at_context(spec, layer, t, context_tokens)
        flops = layer_flops.total
        flops_total += flops
        moe = layer in spec.moe_layer_indices
        if layout == "tp":
            group_flops = layer_flops_at_context(spec, layer, n * t, context_tokens).total
            weights = (_layer_weight_bytes(spec, layer, dtype, all_experts=True)) / n
            compute = max(group_flops / n / rate, weights / hbm)
            if n > 1:
                reduce_bytes = n * t * spec.hidden_size * ACTIVATION_BYTES
                bus = profile.gather("nccl").bus_gbps(reduce_bytes / n) * 1e9
                compute += 2 * 2 * (n - 1) / n * reduce_bytes / bus
            step += compute
            continue
        if not moe:
            step += max(flops / rate, _layer_weight_bytes(spec, layer, dtype, True) / hbm)
            continue
        # AsyncEP reads every gathered expert; AllToAll-EP reads its resident shard.
        experts_read = n * shard_capacity(spec, n) if layout == "asyncep" else shard_capacity(spec, n)
        floor = (attention_bytes + experts_read * expert_bytes(spec, dtype)) / hbm
        if layout == "asyncep" and t_g:
            layer_time = t_g + max(0.0, flops - t_g * r_eff) / rate
        elif layout in EP_LAYOUTS:
            ep_flops = flops + (rank_imbalance - 1.0) * layer_flops.routed_experts
            if layout == "alltoall_ep_tbo" and exchange_s:
                # As AsyncEP's gather: compute runs at R_eff while the exchange is on the wire.
                r_nccl = rate / (1 + profile.gather("nccl").gemm_slowdown.value)
                layer_time = exchange_s + max(0.0, ep_flops - exchange_s * r_nccl) / rate
            else:
                layer_time = ep_flops / rate + exchange_s
        else:
            layer_time = flops / rate
        step += max(layer_time, floor)
    compute_time = flops_total / rate
    return StepPrediction(
        layout=layout,
        tokens_per_gpu=t,
        context_tokens=context_tokens,
        flops_per_gpu=flops_total,
        step_time_s=step,
        compute_time_s=compute_time,
        tokens_per_s=t / step if step else 0.0,
        mfu=flops_total / step / (profile.peak(dtype) * 1e12) if step else 0.0,
    )


def remote_ranks_per_token(num_experts: int, top_k: int, num_ranks: int) -> float:
    """Expected number of *other* ranks holding at least one of a token's ``top_k`` experts.

    Uniform routing over ``E`` experts in ``N`` equal shards: a given rank holds none of the
    ``k`` experts with probability ``C(E - E/N, k) / C(E, k)``; each of the ``N - 1`` other
    ranks is hit with the complement. Under top-8 of 128 experts that is 0.99 of 1 other rank at
    N = 2 and 4.7 of 7 at N = 8, against 4 and 7 (token, expert) pairs a per-pair dispatch sends.
    """
    if num_ranks <= 1:
        return 0.0
    per_rank = num_experts // num_ranks
    miss = math.comb(num_experts - per_rank, top_k) / math.comb(num_experts, top_k)
    return (num_ranks - 1) * (1.0 - miss)


def alltoall_exchange_time_s(deployment: Deployment, tokens_per_gpu: int, remote_ranks: float | None = None) -> float:
    """Dispatch + combine of one MoE layer for ``tokens_per_gpu`` tokens, deduplicated.

    Each token goes to ``remote_ranks`` other ranks (default :func:`remote_ranks_per_token`,
    uniform routing). Dispatch rows carry the token (bf16) and its ``k`` routing slots (int32
    expert id and fp32 weight each), combine rows the expert side's summed output (bf16); both
    at the profile's AllToAll bus bandwidth (``t = bytes to other ranks / bus_bw``).
    """
    spec, n = deployment.spec, deployment.num_gpus
    if n <= 1:
        return 0.0
    if deployment.profile.alltoall_bus_gbps is None:
        raise HardwareProfileError(
            f"profile {deployment.profile.name!r} has no AllToAll bandwidth; use a multi-GPU profile"
        )
    if remote_ranks is None:
        remote_ranks = remote_ranks_per_token(spec.num_experts, spec.top_k, n)
    rows = tokens_per_gpu * remote_ranks
    dispatch_row = spec.hidden_size * ACTIVATION_BYTES + spec.top_k * ROUTING_SLOT_BYTES
    combine_row = spec.hidden_size * ACTIVATION_BYTES
    return rows * (dispatch_row + combine_row) / (deployment.profile.alltoall_bus_gbps.value * 1e9)


# -- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContextPlan:
    """Everything at one context length: threshold batch, memory and step per layout."""

    context_tokens: int
    threshold_tokens: int
    operating_tokens: int  # per-GPU batch the predictions use: the threshold, >= 1 prompt
    forward_flops_at_threshold: int
    memory: dict[str, MemoryPlan]
    steps: dict[str, StepPrediction]

    def to_dict(self) -> dict[str, Any]:
        return {
            "context_tokens": self.context_tokens,
            "threshold_tokens": self.threshold_tokens,
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
        operating_tokens=operating,
        forward_flops_at_threshold=_forward_flops(deployment.spec, threshold_tokens, context),
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
    best = max(fitting, key=throughput.__getitem__)
    text = f"{LAYOUT_TITLES[best]} (highest predicted throughput among layouts that fit)"
    if best in EP_LAYOUTS:
        text += "; a best case: balanced routing" + (", the exchange fully hidden" if best == "alltoall_ep_tbo" else "")
    if best != "asyncep" and not fits["asyncep"]:
        text += "; AsyncEP does not fit: see the suggestions for what would"
    return f"{text}. Serve it with: {LAYOUT_COMMANDS[best].format(n=num_gpus)}"


# -- helpers -------------------------------------------------------------------------------
def _forward_flops(spec: MoEModelSpec, tokens: int, context_tokens: int) -> int:
    return sum(
        layer_flops_at_context(spec, layer, tokens, context_tokens).total
        for layer in range(spec.num_layers)
    )


def _representative_moe_layer(spec: MoEModelSpec) -> int:
    """A steady-state MoE layer (all MoE layers of the families we read are identical)."""
    return spec.moe_layer_indices[0]


def _weight_bytes(dtype: str) -> float:
    return BYTES_PER_ELEMENT[dtype]


def _layer_weight_bytes(spec: MoEModelSpec, layer: int, dtype: str, all_experts: bool) -> float:
    """Bytes of one layer's matmul weights (all experts or the top-k a token touches)."""
    params = layer_matmul_params(spec, layer)
    if all_experts and layer in spec.moe_layer_indices:
        params += (spec.num_experts - spec.top_k) * spec.expert_params
    return params * _weight_bytes(dtype)


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.1f} GB"


def _check_dtype(dtype: str) -> None:
    if dtype not in PLAN_DTYPES:
        raise PlanError(f"unknown dtype {dtype!r}; choose one of {', '.join(PLAN_DTYPES)}")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise PlanError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _check_group(num_gpus: int, nodes: int) -> None:
    if num_gpus < 1 or nodes < 1 or num_gpus % nodes:
        raise PlanError(
            f"an AsyncEP group of {num_gpus} GPUs cannot span {nodes} nodes evenly: GPUs (--gpus) "
            "and nodes (--nodes) must be positive, the GPUs a multiple of the nodes"
        )
