"""Memory per GPU of a layout at an operating batch, and whether it fits.

::

    total = dense weights + experts + gather buffers + activations + KV cache  <=  budget

- dense weights: replicated (TP: split ``N`` ways). FP8 quantises the linear layers (1 B per
  weight + an fp32 scale per 128x128 block); embeddings, LM head, router and norms stay bf16;
- experts: ``ceil(E / N)`` per MoE layer (TP: every expert's FFN split ``N`` ways);
- gather buffers: AsyncEP's ``d + 1`` MoE layers of the *other* ranks' experts
  (``(N - 1) * ceil(E / N)`` slots each: a rank reads its own shard in place); over NCCL
  ``N * ceil(E / N)``, since its AllGather writes every rank's part; none on one GPU;
- activations: per token, residual copies, q/k/v and the MoE's permuted top-k copies (EP adds
  dispatch buffers; TP splits heads and expert FFN, and holds the group's ``N T`` tokens);
- KV cache: bf16, the batch's prompts whole (``ceil(T / C) * C`` tokens: a chunked prompt's
  earlier chunks stay);
- budget: ``memory_utilization`` of the profile's GPU memory.

What each layout holds is a trait of its class in :mod:`~zeroprefill.common.layouts`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from zeroprefill.common.cost_model import attention_matmul_params
from zeroprefill.common.layouts import ACTIVATION_BYTES, Layout, layout_named
from zeroprefill.common.model_spec import BYTES_PER_ELEMENT, FP8_WEIGHT_BLOCK, MoEModelSpec
from zeroprefill.common.saturation import Deployment, check_plan_dtype, expert_bytes, shard_capacity

#: Resident activation tensors per token outside attention and experts: residual stream,
#: its normed copy, attention output, MoE output.
RESIDUAL_COPIES = 4


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
    kv_bytes_per_token: int

    @property
    def kv_capacity_tokens(self) -> int:
        """KV-cache tokens the budget holds beside weights, buffers and activations (the figure
        an engine reports at start-up), 0 when those alone exceed it."""
        free = self.budget_bytes - (self.dense_weight_bytes + self.expert_weight_bytes + self.gather_buffer_bytes
                                    + self.activation_bytes)
        return max(free, 0) // self.kv_bytes_per_token

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
        return {**asdict(self), "total_bytes": self.total_bytes, "fits": self.fits,
                "kv_capacity_tokens": self.kv_capacity_tokens}


def memory_plan(deployment: Deployment, layout: str, tokens_per_gpu: int, context_tokens: int) -> MemoryPlan:
    """Memory per GPU of ``layout`` with ``tokens_per_gpu`` in flight per GPU (module docstring)."""
    held = layout_named(layout)
    spec, num_gpus, dtype = deployment.spec, deployment.num_gpus, deployment.dtype
    layer_expert_bytes = shard_capacity(spec, num_gpus) * expert_bytes(spec, dtype)
    dense = dense_weight_bytes(spec, dtype)
    experts = spec.num_moe_layers * layer_expert_bytes
    tokens = tokens_per_gpu
    if held.splits_weights:
        dense = -(-dense // num_gpus)
        experts = -(-spec.num_moe_layers * spec.expert_bytes_per_layer(dtype) // num_gpus)
        tokens = tokens_per_gpu * num_gpus
    kv_tokens = -(-tokens // context_tokens) * context_tokens if tokens else 0
    kv_per_token = kv_bytes_per_token(spec, held, num_gpus)
    return MemoryPlan(
        layout=layout,
        num_gpus=num_gpus,
        dtype=dtype,
        tokens_per_gpu=tokens_per_gpu,
        context_tokens=context_tokens,
        dense_weight_bytes=dense,
        expert_weight_bytes=experts,
        gather_buffer_bytes=held.gather_buffer_layers(deployment) * gathered_shards(deployment) * layer_expert_bytes,
        activation_bytes=tokens * activation_bytes_per_token(spec, held, num_gpus),
        kv_cache_bytes=kv_tokens * kv_per_token,
        budget_bytes=int(deployment.profile.gpu_memory_bytes.value * deployment.memory_utilization),
        kv_bytes_per_token=kv_per_token,
    )


def gathered_shards(deployment: Deployment) -> int:
    """Expert shards one gather buffer holds: the other ranks' (the copy engine pulls only those),
    or all ``N`` over NCCL (AllGather writes every rank's part, the local one unused)."""
    return deployment.num_gpus if deployment.transport == "nccl" else deployment.num_gpus - 1


def dense_weight_bytes(spec: MoEModelSpec, dtype: str) -> int:
    """Bytes of every non-expert weight. FP8 checkpoints quantise the linear layers
    (attention projections, shared experts, dense MLPs; fp32 scale per 128x128 block, rounded
    up per matrix as a whole) and keep embeddings, LM head, router and norms in bf16."""
    check_plan_dtype(dtype)
    if dtype != "fp8":
        return int(spec.dense_params * BYTES_PER_ELEMENT[dtype])
    linear = (
        spec.num_layers * attention_matmul_params(spec.attention, spec.hidden_size)
        + spec.num_moe_layers * spec.shared_expert_params_per_layer
        + spec.num_dense_layers * spec.dense_mlp_params
    )
    scales = 4 * -(-linear // (FP8_WEIGHT_BLOCK * FP8_WEIGHT_BLOCK))
    return linear + scales + (spec.dense_params - linear) * 2


def kv_bytes_per_token(spec: MoEModelSpec, layout: Layout, num_gpus: int) -> int:
    """bf16 KV cache of one token over all layers on one GPU (TP splits GQA kv heads)."""
    attention = spec.attention
    if attention.kind == "mla":  # compressed latent + rope key, replicated under TP
        per_layer = attention.kv_lora_rank + attention.qk_rope_head_dim
    else:
        heads = attention.num_kv_heads
        if layout.splits_weights:  # kv heads split; replicated when N > kv heads
            heads = -(-heads // num_gpus)
        per_layer = 2 * heads * attention.head_dim
    return per_layer * ACTIVATION_BYTES * spec.num_layers


def activation_bytes_per_token(spec: MoEModelSpec, layout: Layout, num_gpus: int) -> int:
    """Peak transient activations of one token in one layer (estimate, bf16).

    Residual stream copies, q/k/v, and the MoE's permuted top-k copies (input, output, gate-up
    ``2I`` and activated ``I``); EP adds dispatch send/receive buffers; TP splits the attention
    heads and the expert FFN over its ``N`` GPUs.
    """
    h, k, i = spec.hidden_size, spec.top_k, spec.expert_intermediate_size
    a = spec.attention
    qkv = a.num_heads * a.head_dim + a.num_heads * (a.head_dim + a.v_head_dim)
    if a.kind == "gqa":
        qkv = a.num_heads * a.head_dim + 2 * a.num_kv_heads * a.head_dim
    split = num_gpus if layout.splits_weights else 1
    moe = k * (2 * h + 3 * i // split)
    if layout.sends_tokens:
        moe += k * 2 * h
    return ACTIVATION_BYTES * (RESIDUAL_COPIES * h + qkv // split + moe)
