"""The AsyncEP MoE layer: each pass either streams weights to the tokens or tokens to the weights.

Where expert parallelism moves activations to the experts (dispatch AllToAll, combine
AllToAll), AsyncEP moves the experts to the activations: the streamer gathers the other
ranks' shards of the layer, so each rank routes and computes its own tokens locally and the
tokens never leave the rank. Expert load balance is perfect by construction. That pays once a
pass carries enough FLOPs to hide a layer's gather; below the *switch point* a pass cannot be
shorter than layers x one gather, however few tokens it carries, so there the layer moves the
tokens instead (:class:`~zeroprefill.common.token_exchange.TokenExchange`, deduplicated EP on
the resident shards, no gather issued). The choice is per forward pass, from the largest token
count of any rank (the same on every rank, so collectives stay in lockstep)::

    hidden [T, H], router_logits [T, E]
        -> select_experts                top-k per the model's rule (softmax / sigmoid, renorm)
        max tokens of any rank >= switch point (or unknown):          stream weights
            -> streamer.acquire(layer)   resident shard [C, ...] in place + ring slot of the
                                         other ranks' shards
            -> experts kernel, twice     the resident rows, then the gathered rows added in
            -> streamer.release(layer)
        below the switch point:                                        move tokens
            -> exchange.run              tokens to the ranks holding their experts; each runs
                                         its resident shard; partial rows back, summed
        -> out [T, H]

With one rank there is nothing to gather or exchange: every layer is its resident shard.

The experts kernel is any callable ``fn(hidden, w13, w2, topk_weights, topk_ids, *, add_to,
**scales)`` with vLLM's weight layout (``w13`` rows ``[0, I)`` gate, ``[I, 2I)`` up;
SiLU-gated), where a ``topk_ids`` entry of ``-1`` skips that slot and ``add_to`` (``[T, H]`` or
None) receives the output added to it. Block-FP8 experts stream their 128x128 scales beside
the weights (tensors named ``w13_scale`` and ``w2_scale``), and every tensor whose name ends
in ``_scale`` reaches the kernel by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from zeroprefill.common.block_fp8 import FP8_DTYPE, dequantize_block_fp8
from zeroprefill.common.streamer import ExpertRows, ExpertWeightStreamer
from zeroprefill.common.token_exchange import TokenExchange

ExpertsKernel = Callable[..., torch.Tensor]

SCORING_FUNCS = ("softmax", "sigmoid")


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scoring_func: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: ``(topk_weights float32 [T, K], topk_ids int64 [T, K])``.

    ``softmax``: probabilities over all experts, top-k, optionally renormalised to sum to one
    (Qwen3 ``norm_topk_prob``; Mixtral's softmax over the selected logits is the same thing).
    ``sigmoid``: independent sigmoid scores (DeepSeek-V3 style, without group limits).
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in 1..{num_experts} (the number of experts)")
    if scoring_func == "softmax":
        scores = torch.softmax(router_logits.float(), dim=-1)
    elif scoring_func == "sigmoid":
        scores = torch.sigmoid(router_logits.float())
    else:
        raise ValueError(f"unknown scoring_func {scoring_func!r}; choose one of {SCORING_FUNCS}")
    topk_weights, topk_ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def experts_reference(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch experts: a loop over the experts that received tokens (any device).

    Block-FP8 weights (float8_e4m3fn with ``w13_scale [E, 2I/128, H/128]`` and ``w2_scale
    [E, H/128, I/128]``, 128x128 blocks as vLLM loads them) are dequantised one expert at a
    time and run in float32 on unquantised activations: the exact math the FP8 weights stand
    for (the GPU kernels also quantise the activations per 1x128 group). A ``topk_ids`` entry
    of ``-1`` skips its slot; ``add_to`` receives the output added to it, in place.
    """
    block_fp8 = _check_block_fp8(w13, w2, w13_scale, w2_scale)
    num_tokens, hidden = hidden_states.shape
    out = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=hidden_states.device)
    if add_to is not None:
        out += add_to
    if num_tokens == 0:
        return _deliver(out, hidden_states.dtype, add_to)
    intermediate = w2.shape[2]
    flat_ids = topk_ids.reshape(-1)
    flat_tokens = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(topk_ids.shape[1])
    flat_weights = topk_weights.reshape(-1).float()
    for expert in torch.unique(flat_ids[flat_ids >= 0]).tolist():
        rows = (flat_ids == expert).nonzero(as_tuple=True)[0]
        tokens = flat_tokens[rows]
        if block_fp8:
            w13_e = dequantize_block_fp8(w13[expert], w13_scale[expert])
            w2_e = dequantize_block_fp8(w2[expert], w2_scale[expert])
        else:
            w13_e, w2_e = w13[expert], w2[expert]
        x = hidden_states[tokens].to(w13_e.dtype)
        gate_up = x @ w13_e.t()
        act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        y = (act @ w2_e.t()).float() * flat_weights[rows, None]
        out.index_add_(0, tokens, y)
    return _deliver(out, hidden_states.dtype, add_to)


def _deliver(out: torch.Tensor, dtype: torch.dtype, add_to: torch.Tensor | None) -> torch.Tensor:
    """The fp32 result in the activations' dtype, written into ``add_to`` when given."""
    if add_to is None:
        return out.to(dtype)
    return add_to.copy_(out)


def _check_block_fp8(
    w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None
) -> bool:
    """Whether the experts are block FP8; raises if weights and scales do not go together."""
    fp8 = [w.dtype == FP8_DTYPE for w in (w13, w2)]
    scaled = [scale is not None for scale in (w13_scale, w2_scale)]
    if fp8 == [True, True] and scaled == [True, True]:
        return True
    if fp8 == [False, False] and scaled == [False, False]:
        return False
    raise ValueError(
        f"block-FP8 experts need float8_e4m3fn w13 and w2 with both w13_scale and w2_scale; got "
        f"w13 {w13.dtype}, w2 {w2.dtype}, w13_scale {'given' if scaled[0] else 'None'}, "
        f"w2_scale {'given' if scaled[1] else 'None'}"
    )


def default_experts_kernel(device: torch.device, weight_dtype: torch.dtype) -> ExpertsKernel:
    """``zeroprefill.kernels.fused_experts`` on CUDA (Triton, or CUTLASS grouped GEMMs with our
    fused permutation, per its shipped table), the reference loop elsewhere."""
    if torch.device(device).type == "cuda":
        from zeroprefill.kernels import fused_experts

        return fused_experts
    return experts_reference


class AsyncEPMoE:
    """One MoE layer under AsyncEP: route locally; stream weights, or below the switch point
    move tokens.

    Args:
        streamer: the rank's weight streamer (shared by all MoE layers of the model).
        layer: this layer's position among the model's MoE layers (0-based, execution order).
        top_k, renormalize, scoring_func: the model's routing rule (see :func:`select_experts`).
        experts_kernel: overrides :func:`default_experts_kernel`.
        exchange: the token exchange over the streamer's ranks (None with one rank).
        switch_tokens: a pass whose largest per-rank token count is below this moves tokens
            (needs ``exchange``); 0 never does.
    """

    def __init__(
        self,
        streamer: ExpertWeightStreamer,
        layer: int,
        top_k: int,
        renormalize: bool,
        scoring_func: str = "softmax",
        experts_kernel: ExpertsKernel | None = None,
        exchange: TokenExchange | None = None,
        switch_tokens: int = 0,
    ) -> None:
        num_experts = streamer.layout.num_experts
        if not 0 <= layer < streamer.num_layers:
            raise ValueError(f"layer {layer} is outside the streamer's {streamer.num_layers} MoE layers")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..{num_experts} (the number of experts)")
        if scoring_func not in SCORING_FUNCS:
            raise ValueError(f"unknown scoring_func {scoring_func!r}; choose one of {SCORING_FUNCS}")
        if switch_tokens < 0:
            raise ValueError(f"switch_tokens must be >= 0, got {switch_tokens}")
        if switch_tokens and exchange is None and streamer.streams_weights:
            raise ValueError("switch_tokens > 0 moves tokens below it: pass the token exchange")
        self.streamer = streamer
        self.layer = layer
        self.top_k = top_k
        self.renormalize = renormalize
        self.scoring_func = scoring_func
        self.exchange = exchange
        self.switch_tokens = switch_tokens
        w13_shape, w13_dtype = streamer.expert_shapes["w13"]
        self.hidden_size = w13_shape[1]
        # FP8 block scales travel with the weights and reach the kernel as keyword arguments.
        self.scale_names = tuple(name for name in streamer.expert_shapes if name.endswith("_scale"))
        self.experts_kernel = experts_kernel or default_experts_kernel(streamer.device, w13_dtype)

    def moves_tokens(self, max_tokens: int | None) -> bool:
        """Whether a pass whose largest per-rank token count is ``max_tokens`` moves tokens.

        ``None`` (not known) streams weights. With one rank nothing moves either way.
        """
        return self.streamer.streams_weights and max_tokens is not None and max_tokens < self.switch_tokens

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                max_tokens: int | None = None) -> torch.Tensor:
        """MoE output ``[T, H]`` for this rank's ``T`` tokens (``T`` may be 0: still joins).

        ``max_tokens``: the largest token count of any rank of the group in this pass, the
        same on every rank (it picks the pass's mode, :meth:`moves_tokens`).
        """
        self._check_hidden(hidden_states)
        expected_logits = (hidden_states.shape[0], self.streamer.layout.num_experts)
        if tuple(router_logits.shape) != expected_logits:
            raise ValueError(f"router_logits must have shape {expected_logits}, got {tuple(router_logits.shape)}")
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize, self.scoring_func)
        return self._run_experts(hidden_states, topk_weights, topk_ids, max_tokens)

    def forward_routed(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        max_tokens: int | None = None,
    ) -> torch.Tensor:
        """Like :meth:`forward` for an engine that has routed already (global expert ids)."""
        self._check_hidden(hidden_states)
        if topk_ids.shape != topk_weights.shape or topk_ids.shape[:1] != hidden_states.shape[:1]:
            raise ValueError(
                f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
                f"[tokens={hidden_states.shape[0]}, top_k]"
            )
        return self._run_experts(hidden_states, topk_weights, topk_ids, max_tokens)

    def _run_experts(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        max_tokens: int | None,
    ) -> torch.Tensor:
        hidden_states = hidden_states.contiguous()
        if self.moves_tokens(max_tokens):
            resident = self.streamer.resident(self.layer)
            return self.exchange.run(
                hidden_states, topk_weights, topk_ids, max_tokens,
                lambda x, weights, rows: self._run_part(x, weights, rows, resident.tensors, None),
            )
        experts = self.streamer.acquire(self.layer)
        try:
            out = None
            for part in experts.parts():
                out = self._run_part(hidden_states, topk_weights, _rows_of(part, topk_ids), part.tensors, out)
            return out
        finally:
            self.streamer.release(self.layer)

    def _run_part(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, rows: torch.Tensor,
                  tensors, add_to: torch.Tensor | None) -> torch.Tensor:
        scales = {name: tensors[name] for name in self.scale_names}
        return self.experts_kernel(hidden_states, tensors["w13"], tensors["w2"], topk_weights, rows,
                                   add_to=add_to, **scales)

    def _check_hidden(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [tokens, {self.hidden_size}], got shape {tuple(hidden_states.shape)}"
            )

    __call__ = forward


def _rows_of(part: ExpertRows, topk_ids: torch.Tensor) -> torch.Tensor:
    """``topk_ids`` (global, ``-1`` allowed) as rows of ``part``'s tensors, ``-1`` where it lacks them."""
    if part.row_of_expert is None:
        return topk_ids
    ids = topk_ids.long()
    return torch.where(ids >= 0, part.row_of_expert[ids.clamp(min=0)], -1)


def moe_reference(
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scoring_func: str = "softmax",
) -> torch.Tensor:
    """Dense single-process MoE with every expert resident: the ground truth for AsyncEP."""
    topk_weights, topk_ids = select_experts(router_logits, top_k, renormalize, scoring_func)
    return experts_reference(hidden_states, w13, w2, topk_weights, topk_ids)
