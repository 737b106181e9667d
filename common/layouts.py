"""The parallel layouts the planner compares, and the predicted step time of each.

One class per kind of layout, one instance per name (:data:`LAYOUT_TABLE`)::

    name             class                  moves per MoE layer                       memory beyond the shard
    asyncep          AsyncEPLayout          the experts: gathered, under compute      d + 1 gather buffers
    alltoall_ep      ExpertParallelLayout   tokens: dispatch + combine, exposed       dispatch buffers
    alltoall_ep_tbo  ExpertParallelLayout   the same, under the other micro-batch     dispatch buffers
    tp               TensorParallelLayout   activations: two all-reduces              every weight split N ways

:func:`predict_step` prices a forward of ``T`` tokens per GPU of ``C``-token prompts on a
:class:`~zeroprefill.common.saturation.Deployment`; :func:`switch_point_tokens` finds the
per-GPU batch below which deduplicated EP beats AsyncEP.

One rate ``R`` per dtype (``profile.compute_tflops``: GEMM rate at MoE shapes) for every FLOP,
attention scores included; every layer also waits at least for its weights to stream from HBM.
Real kernels (token permutation, SiLU, flash attention) run below ``R``, so predicted step
times are lower bounds. Communication is bandwidth only: the measured interference beyond the
GEMM slowdown (docs/design.md, measured anchors) is not modelled. No LM head.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from zeroprefill.common.cost_model import LayerFlops, attention_matmul_params, layer_flops_at_context, layer_matmul_params
from zeroprefill.common.hardware import HardwareProfileError, shipped_gpu_for
from zeroprefill.common.model_spec import BYTES_PER_ELEMENT, ModelSpecError, MoEModelSpec
from zeroprefill.common.saturation import (Deployment, PlanError, effective_tflops, engine_deployment, expert_bytes,
                                           gather_time_s, shard_capacity)

#: Activations and KV cache stay bf16 whatever the weight format.
ACTIVATION_BYTES = 2
#: One routing slot of a dispatched row: the expert id (int32) and its weight (fp32).
ROUTING_SLOT_BYTES = 8


@dataclass(frozen=True)
class StepInputs:
    """One prediction's question: ``tokens_per_gpu`` tokens of ``context_tokens``-long prompts
    per GPU on ``deployment``; EP's rank imbalance and remote ranks per token (None: uniform)."""

    deployment: Deployment
    tokens_per_gpu: int
    context_tokens: int
    rank_imbalance: float = 1.0
    remote_ranks: float | None = None

    @property
    def rate(self) -> float:
        """``R`` in FLOP/s."""
        return self.deployment.profile.compute_tflops(self.deployment.dtype) * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.deployment.profile.hbm_gbps.value * 1e9

    def layer_flops(self, layer: int, tokens: int | None = None) -> LayerFlops:
        """One GPU's FLOPs of ``layer`` (``tokens`` per GPU, default the prediction's)."""
        tokens = self.tokens_per_gpu if tokens is None else tokens
        return layer_flops_at_context(self.deployment.spec, layer, tokens, self.context_tokens)


@dataclass(frozen=True)
class Layout(ABC):
    """One way to run the model on a group of ``N`` GPUs: how it is served, what it keeps in
    memory, and how long each layer of a step takes."""

    name: str
    title: str
    #: The command that serves it on ``{n}`` GPUs (vLLM; SGLang's flag in brackets where it differs).
    serve_command: str
    #: A rank runs its own experts on tokens sent to it: dispatch buffers, EP-rank imbalance.
    sends_tokens: ClassVar[bool] = False
    #: Every weight split ``N`` ways; every GPU runs the whole group's ``N * T`` tokens.
    splits_weights: ClassVar[bool] = False

    def gather_buffer_layers(self, deployment: Deployment) -> int:
        """Full MoE layers of gathered experts it holds per GPU (AsyncEP's ring)."""
        return 0

    @abstractmethod
    def layer_time_s(self, step: StepInputs, layer: int) -> float:
        """One layer's time in a step of ``step``'s batch."""


@dataclass(frozen=True)
class DataParallelAttentionLayout(Layout):
    """Attention data-parallel (every GPU its own tokens), experts sharded 1/N per GPU: a dense
    layer runs at ``R``, a MoE layer as :meth:`moe_layer_time_s` says; each at least its
    weights' HBM read."""

    def experts_read_per_layer(self, deployment: Deployment) -> int:
        """Experts one MoE layer reads from HBM per GPU (its resident shard)."""
        return shard_capacity(deployment.spec, deployment.num_gpus)

    def layer_time_s(self, step: StepInputs, layer: int) -> float:
        d = step.deployment
        spec = d.spec
        flops = step.layer_flops(layer)
        if layer not in spec.moe_layer_indices:
            weights = layer_weight_bytes(spec, layer, d.dtype, all_experts=True)
            return max(flops.total / step.rate, weights / step.hbm_bytes_per_s)
        attention = attention_matmul_params(spec.attention, spec.hidden_size) * BYTES_PER_ELEMENT[d.dtype]
        experts = self.experts_read_per_layer(d) * expert_bytes(spec, d.dtype)
        return max(self.moe_layer_time_s(step, flops), (attention + experts) / step.hbm_bytes_per_s)

    @abstractmethod
    def moe_layer_time_s(self, step: StepInputs, flops: LayerFlops) -> float:
        """One MoE layer's time from its FLOPs and its communication (no HBM floor)."""


@dataclass(frozen=True)
class AsyncEPLayout(DataParallelAttentionLayout):
    """Every layer's experts gathered on a side stream while the previous layer computes:
    ``t_g + max(0, F - t_g R_eff) / R`` (docs/cost_model.md); ``F / R`` on one GPU. Reads every
    gathered expert; holds ``d + 1`` gather buffers."""

    def gather_buffer_layers(self, deployment: Deployment) -> int:
        return deployment.prefetch_depth + 1 if deployment.num_gpus > 1 else 0

    def experts_read_per_layer(self, deployment: Deployment) -> int:
        return deployment.num_gpus * shard_capacity(deployment.spec, deployment.num_gpus)

    def moe_layer_time_s(self, step: StepInputs, flops: LayerFlops) -> float:
        t_g = gather_time_s(step.deployment)
        if not t_g:
            return flops.total / step.rate
        return t_g + max(0.0, flops.total - t_g * effective_tflops(step.deployment) * 1e12) / step.rate


@dataclass(frozen=True)
class ExpertParallelLayout(DataParallelAttentionLayout):
    """Tokens dispatched to their experts' ranks, deduplicated as DeepEP's normal mode sends:
    a token goes once to each remote rank holding one of its experts, with its routing slots;
    the expert side sums its share and sends one row back (:func:`alltoall_exchange_time_s`).

    Not ``overlapped``: ``F / R + t_x``. With two-batch overlap (SGLang's TBO: each
    micro-batch's exchange under the other's compute) priced as AsyncEP's gather, ``t_x +
    max(0, F - t_x R_nccl) / R``, ``R_nccl`` the GEMM rate under an NCCL collective: ideal
    overlap, its best case (half-size GEMMs at ``R``, the host's wait for the counts free). The
    routed experts' FLOPs are multiplied by the EP-rank imbalance: a rank runs the tokens of its
    own ``E / N`` experts and the layer waits for the busiest.
    """

    overlapped: bool = False
    sends_tokens: ClassVar[bool] = True

    def moe_layer_time_s(self, step: StepInputs, flops: LayerFlops) -> float:
        d = step.deployment
        ep_flops = flops.total + (step.rank_imbalance - 1.0) * flops.routed_experts
        exchange_s = alltoall_exchange_time_s(d, step.tokens_per_gpu, step.remote_ranks)
        if self.overlapped and exchange_s:
            rate_under_exchange = step.rate / (1 + d.profile.gather("nccl").gemm_slowdown.value)
            return exchange_s + max(0.0, ep_flops - exchange_s * rate_under_exchange) / step.rate
        return ep_flops / step.rate + exchange_s


@dataclass(frozen=True)
class TensorParallelLayout(Layout):
    """Every weight split ``N`` ways: the group runs ``N T`` tokens, ``F / N / R`` per GPU (at
    least its weight share's HBM read) plus two ring AllReduces per layer of the ``N T`` bf16
    activations, ``2 (N - 1) / N`` of their bytes at the AllGather bus bandwidth."""

    splits_weights: ClassVar[bool] = True

    def layer_time_s(self, step: StepInputs, layer: int) -> float:
        d = step.deployment
        n, spec = d.num_gpus, d.spec
        group_flops = step.layer_flops(layer, n * step.tokens_per_gpu).total
        weights = layer_weight_bytes(spec, layer, d.dtype, all_experts=True) / n
        time_s = max(group_flops / n / step.rate, weights / step.hbm_bytes_per_s)
        if n > 1:
            reduce_bytes = n * step.tokens_per_gpu * spec.hidden_size * ACTIVATION_BYTES
            bus = d.profile.gather("nccl").bus_gbps(reduce_bytes / n) * 1e9
            time_s += 2 * 2 * (n - 1) / n * reduce_bytes / bus
        return time_s


#: Every layout the planner compares, by name, in the order tables list them.
LAYOUT_TABLE: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        AsyncEPLayout("asyncep", "AsyncEP",
                      "vllm serve MODEL --data-parallel-size {n} --enable-expert-parallel --moe-backend asyncep"),
        ExpertParallelLayout("alltoall_ep", "AllToAll-EP",
                             "vllm serve MODEL --data-parallel-size {n} --enable-expert-parallel"),
        ExpertParallelLayout("alltoall_ep_tbo", "EP two-batch overlap",
                             "vllm serve MODEL --data-parallel-size {n} --enable-expert-parallel --enable-dbo "
                             "(SGLang: --enable-two-batch-overlap)", overlapped=True),
        TensorParallelLayout("tp", "TP", "vllm serve MODEL --tensor-parallel-size {n}"),
    )
}
#: Their names.
LAYOUTS = tuple(LAYOUT_TABLE)


def layout_named(name: str) -> Layout:
    """The layout called ``name``; :class:`PlanError` naming the choices otherwise."""
    if name not in LAYOUT_TABLE:
        raise PlanError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUT_TABLE[name]


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
    """Forward time of ``layout`` with ``tokens_per_gpu`` tokens of ``context_tokens``-long
    prompts per GPU: the sum of its layers' times (the layout classes say how each is priced).

    ``rank_imbalance``: max/mean EP-rank load (:func:`zeroprefill.common.routing_skew.
    expected_rank_imbalance`; 1.0 = balanced routing, EP's best case), seen by the EP layouts
    only (AsyncEP and TP split tokens, not experts). ``remote_ranks``: the other ranks EP sends
    a token to, where the caller knows its routing's locality (default
    :func:`remote_ranks_per_token`, uniform routing).
    """
    priced = layout_named(layout)
    if rank_imbalance < 1.0:
        raise PlanError(f"rank_imbalance is max/mean rank load, at least 1.0; got {rank_imbalance}")
    step = StepInputs(deployment, tokens_per_gpu, context_tokens, rank_imbalance, remote_ranks)
    spec = deployment.spec
    flops_total = sum(step.layer_flops(layer).total for layer in range(spec.num_layers))
    step_time = sum(priced.layer_time_s(step, layer) for layer in range(spec.num_layers))
    peak = deployment.profile.peak(deployment.dtype) * 1e12
    return StepPrediction(
        layout=layout,
        tokens_per_gpu=tokens_per_gpu,
        context_tokens=context_tokens,
        flops_per_gpu=flops_total,
        step_time_s=step_time,
        compute_time_s=flops_total / step.rate,
        tokens_per_s=tokens_per_gpu / step_time if step_time else 0.0,
        mfu=flops_total / step_time / peak if step_time else 0.0,
    )


def switch_point_tokens(
    deployment: Deployment, context_tokens: int, rank_imbalance: float = 1.0, remote_ranks: float | None = None,
) -> int | None:
    """The per-GPU batch below which deduplicated EP (``alltoall_ep``) predicts a shorter step
    than AsyncEP: the smallest ``T >= 1`` with ``EP(T) >= AsyncEP(T)``; ``None`` when EP never
    wins (one GPU, or slower already at one token).

    Below AsyncEP's threshold a pass costs its gathers whatever it carries while EP's exchange
    and compute grow with the batch; above it both compute at ``R`` and EP's exchange keeps
    growing. So EP's lead only shrinks as ``T`` grows: the first ``T`` where it is gone is found
    by doubling, then bisection.
    """

    def ep_wins(tokens: int) -> bool:
        ep = predict_step(deployment, "alltoall_ep", tokens, context_tokens, rank_imbalance, remote_ranks)
        return ep.step_time_s < predict_step(deployment, "asyncep", tokens, context_tokens).step_time_s

    if not ep_wins(1):
        return None
    low, high = 1, 2  # ep_wins(low); the answer is in (low, high] once not ep_wins(high)
    while ep_wins(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ep_wins(middle) else (low, middle)
    return high


def switch_point_on_gpus(
    spec: MoEModelSpec, device_name: str, num_ranks: int, context_tokens: int, dtype: str = "bf16",
    transport: str | None = None,
) -> int | None:
    """:func:`switch_point_tokens` of an engine's AsyncEP deployment (:func:`~zeroprefill.common.
    saturation.engine_deployment`, the one the step budget is planned for). ``None`` where EP
    never wins or no plan applies (no shipped profile for the GPU, one rank).
    """
    deployment = engine_deployment(spec, device_name, num_ranks, dtype, transport)
    return None if deployment is None else switch_point_tokens(deployment, context_tokens)


def planned_switch_point(
    model: Callable[[], tuple[MoEModelSpec, int, str]], device_name: str | None, num_ranks: int,
    transport: str | None = None,
) -> tuple[int, str]:
    """The switch point an engine serves with when the user sets none, and why, in words: the
    planner's (:func:`switch_point_on_gpus`), or 0 (always stream) where it has none: one rank,
    no GPU (``device_name`` None) or no shipped profile, no plan for the group, or EP that never
    wins. ``model()`` gives the model's spec, the prompt length to plan for and the experts'
    format (``"bf16"`` / ``"fp8"``); it is read only where a plan applies. Both engine plugins
    take their default from here."""
    if num_ranks == 1:
        return 0, "one rank"
    if device_name is None or shipped_gpu_for(device_name) is None:
        return 0, f"no shipped hardware profile for {device_name or 'this device'}"
    try:
        spec, context_tokens, dtype = model()
        tokens = switch_point_on_gpus(spec, device_name, num_ranks, context_tokens, dtype, transport)
    except (HardwareProfileError, ModelSpecError, PlanError) as exc:
        return 0, f"no plan: {exc}"
    if tokens is None:
        return 0, "planner: streaming weights wins at every batch"
    return tokens, f"planner, {context_tokens}-token prompts"


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


def layer_weight_bytes(spec: MoEModelSpec, layer: int, dtype: str, all_experts: bool) -> float:
    """Bytes of one layer's matmul weights (all experts, or the top-k a token touches)."""
    params = layer_matmul_params(spec, layer)
    if all_experts and layer in spec.moe_layer_indices:
        params += (spec.num_experts - spec.top_k) * spec.expert_params
    return params * BYTES_PER_ELEMENT[dtype]
