"""Fused MoE routing: softmax -> top-k -> optional renormalisation, one Triton kernel.

    router_logits [T, E] --(softmax over E, fp32)--> probs --(top-k)--> (weights, ids) [T, K]
                                                         `-- renormalise: weights /= sum_k weights

This is Qwen3's router (``norm_topk_prob=True`` renormalises, Mixtral does too; Qwen2-MoE does
not). Each program owns ``BLOCK_T`` tokens and the whole expert row (E <= 1024), so softmax and
top-k never leave registers; top-k is K rounds of argmax-and-mask (K is small).

``topk_routing_reference`` is the plain-torch definition the kernel is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 1024


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts, stride_logits_t,
    TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, TOP_K_PAD)
    row_ok = offs_t < num_tokens
    col_ok = offs_e < num_experts

    logits = tl.load(logits_ptr + offs_t[:, None] * stride_logits_t + offs_e[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    probs = tl.where(col_ok[None, :], probs, -1.0)  # padded experts are never picked

    top_weights = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        best_id = tl.argmax(probs, axis=1).to(tl.int32)
        top_weights = tl.where(offs_k[None, :] == k, best[:, None], top_weights)
        top_ids = tl.where(offs_k[None, :] == k, best_id[:, None], top_ids)
        probs = tl.where(offs_e[None, :] == best_id[:, None], -1.0, probs)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=1)[:, None]

    out_offs = offs_t[:, None] * TOP_K + offs_k[None, :]
    out_mask = row_ok[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + out_offs, top_weights, mask=out_mask)
    tl.store(ids_ptr + out_offs, top_ids, mask=out_mask)


def topk_routing(router_logits: torch.Tensor, top_k: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing: returns ``(topk_weights float32 [T, K], topk_ids int32 [T, K])``.

    Weights come sorted by decreasing probability. With ``renormalize`` they sum to 1 per
    token (Qwen3 ``norm_topk_prob``); without, they are the softmax probabilities.
    """
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError(f"router_logits must be a 2-D tensor [T, E], got "
                         f"{getattr(router_logits, 'shape', type(router_logits))}")
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be floating point, got {router_logits.dtype}")
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts={num_experts} > {MAX_EXPERTS} is not supported by the "
                         "one-row-per-program routing kernel")
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))
    grid = (triton.cdiv(num_tokens, block_t),)
    _topk_softmax_kernel[grid](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4,
    )
    return weights, ids


def topk_routing_reference(router_logits: torch.Tensor, top_k: int,
                           renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch definition of :func:`topk_routing`."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
