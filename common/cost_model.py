"""True FLOPs of prefill-only work: what a request really costs, not how many tokens it has.

A prefill request of ``L`` prompt tokens of which the first ``P`` hit the prefix cache runs
``N = L - P`` new tokens through every weight they touch, and each new token at position ``i``
attends causally to ``i + 1`` keys (cached ones included). Per transformer layer::

    attention projections  2 * N * (q, k, v, o matmul weights)      (MLA: + 2 * P * kv up-proj,
                                                                     cached latents re-expanded)
    attention scores       flops_per_query_key_pair * sum_{i=P}^{L-1} (i + 1)
                         = flops_per_query_key_pair * N * (L + P + 1) / 2
    router                 2 * N * hidden * num_experts                       (MoE layers)
    routed experts         2 * N * top_k * 3 * hidden * expert_ffn            (MoE layers)
    shared experts         2 * N * 3 * hidden * shared_ffn (+ gate)           (MoE layers)
    dense MLP              2 * N * 3 * hidden * ffn                           (dense layers)

and once per request ``head = 2 * hidden * vocab * head_tokens`` (LM head on the scored
positions; :func:`lm_head_tokens` decides how many, for every caller). Embedding lookups, norms, biases, softmax and activations are not
matmuls and are not counted (they are < 0.1% of the total). ``flops_per_query_key_pair`` is
``2 * heads * (qk_head_dim + v_head_dim)``: ``q·k`` and ``p·v`` over all heads.

A prefix hit removes exactly the linear FLOPs of the ``P`` cached tokens and the score FLOPs
of their own causal triangle ``P * (P + 1) / 2`` pairs; the new tokens still attend to them.

A *batch* of ``T`` tokens drawn from a steady stream of ``C``-token prompts (chunked prefill,
no prefix hits) sits on average at position ``(C + 1) / 2``, so it holds ``T * (C + 1) / 2``
query-key pairs: :func:`layer_flops_at_context` is the per-layer cost the planner uses.

All functions are pure and take a :class:`~zeroprefill.common.model_spec.MoEModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroprefill.common.model_spec import AttentionSpec, MoEModelSpec


@dataclass(frozen=True)
class LayerFlops:
    """True FLOPs of one transformer layer for some new tokens, split by what runs them."""

    attention_projections: int
    attention_scores: int
    router: int
    routed_experts: int
    shared_experts: int
    dense_mlp: int

    @property
    def total(self) -> int:
        return (
            self.attention_projections
            + self.attention_scores
            + self.router
            + self.routed_experts
            + self.shared_experts
            + self.dense_mlp
        )


@dataclass(frozen=True)
class RequestFlops:
    """True FLOPs of one request: every layer plus the head."""

    layers: tuple[LayerFlops, ...]
    head: int

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers) + self.head


def attention_matmul_params(attention: AttentionSpec, hidden_size: int) -> int:
    """Matmul weights a new token goes through in one attention block (no norms, no biases)."""
    h = hidden_size
    if attention.kind == "gqa":
        q = h * attention.num_heads * attention.head_dim
        kv = 2 * h * attention.num_kv_heads * attention.head_dim
        o = attention.num_heads * attention.v_head_dim * h
        return q + kv + o
    if attention.q_lora_rank:
        q = h * attention.q_lora_rank + attention.q_lora_rank * attention.num_heads * attention.head_dim
    else:
        q = h * attention.num_heads * attention.head_dim
    kv_down = h * (attention.kv_lora_rank + attention.qk_rope_head_dim)
    o = attention.num_heads * attention.v_head_dim * h
    return q + kv_down + mla_kv_up_params(attention) + o


def mla_kv_up_params(attention: AttentionSpec) -> int:
    """MLA's latent → per-head (k_nope, v) up-projection; 0 for GQA. Applied to every key."""
    if attention.kind != "mla":
        return 0
    nope = attention.head_dim - attention.qk_rope_head_dim
    return attention.kv_lora_rank * attention.num_heads * (nope + attention.v_head_dim)


def layer_matmul_params(spec: MoEModelSpec, layer_index: int) -> int:
    """Matmul weights one new token multiplies through in layer ``layer_index`` (top-k only)."""
    _check_layer(spec, layer_index)
    attention = attention_matmul_params(spec.attention, spec.hidden_size)
    if layer_index in spec.moe_layer_indices:
        return attention + _moe_params_per_token(spec)
    return attention + spec.dense_mlp_params


def matmul_params_per_token(spec: MoEModelSpec) -> int:
    """Matmul weights a new token multiplies through below the LM head (top-k experts only)."""
    attention = spec.num_layers * attention_matmul_params(spec.attention, spec.hidden_size)
    moe = spec.num_moe_layers * _moe_params_per_token(spec)
    dense = spec.num_dense_layers * spec.dense_mlp_params
    return attention + moe + dense


def causal_query_key_pairs(new_tokens: int, cached_tokens: int = 0) -> int:
    """``sum_{i=P}^{P+N-1} (i + 1)``: keys seen by ``N`` new queries after ``P`` cached tokens."""
    _check_counts(new_tokens + cached_tokens, cached_tokens)
    return new_tokens * (2 * cached_tokens + new_tokens + 1) // 2


def layer_flops(
    spec: MoEModelSpec,
    layer_index: int,
    new_tokens: int,
    query_key_pairs: int,
    cached_tokens: int = 0,
) -> LayerFlops:
    """True FLOPs of layer ``layer_index`` for a batch of ``new_tokens`` tokens.

    Args:
        query_key_pairs: causal (query, key) pairs of the batch; for one request
            :func:`causal_query_key_pairs`, summed over requests for a batch.
        cached_tokens: prefix-cache hits of the batch; they cost FLOPs only under MLA, whose
            cached latents are re-expanded through the kv up-projection to serve as keys.
    """
    _check_layer(spec, layer_index)
    if min(new_tokens, query_key_pairs, cached_tokens) < 0:
        raise ValueError(
            f"token and pair counts must be >= 0, got new_tokens={new_tokens}, "
            f"query_key_pairs={query_key_pairs}, cached_tokens={cached_tokens}"
        )
    attention = spec.attention
    projections = 2 * new_tokens * attention_matmul_params(attention, spec.hidden_size)
    projections += 2 * cached_tokens * mla_kv_up_params(attention)
    scores = attention.flops_per_query_key_pair * query_key_pairs
    if layer_index not in spec.moe_layer_indices:
        dense = 2 * new_tokens * spec.dense_mlp_params
        return LayerFlops(projections, scores, 0, 0, 0, dense)
    return LayerFlops(
        attention_projections=projections,
        attention_scores=scores,
        router=2 * new_tokens * spec.router_params_per_layer,
        routed_experts=moe_layer_flops(spec, new_tokens),
        shared_experts=2 * new_tokens * spec.shared_expert_params_per_layer,
        dense_mlp=0,
    )


def layer_flops_at_context(
    spec: MoEModelSpec, layer_index: int, tokens: int, context_tokens: int
) -> LayerFlops:
    """Layer FLOPs of ``tokens`` tokens from a stream of ``context_tokens``-long prompts.

    Each token sits on average at position ``(C + 1) / 2``: ``T * (C + 1) / 2`` query-key
    pairs (rounded down to an integer). No prefix hits.
    """
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
    return layer_flops(spec, layer_index, tokens, tokens * (context_tokens + 1) // 2)


def request_flops_breakdown(
    spec: MoEModelSpec, prompt_tokens: int, cached_tokens: int = 0, head_tokens: int = 1
) -> RequestFlops:
    """Per-layer and head FLOPs of one request; :func:`request_flops` is its total."""
    _check_counts(prompt_tokens, cached_tokens)
    if head_tokens < 0:
        raise ValueError(f"head_tokens must be >= 0, got {head_tokens}")
    new_tokens = prompt_tokens - cached_tokens
    pairs = causal_query_key_pairs(new_tokens, cached_tokens)
    layers = tuple(
        layer_flops(spec, i, new_tokens, pairs, cached_tokens) for i in range(spec.num_layers)
    )
    return RequestFlops(layers, head_flops(spec, min(head_tokens, new_tokens)))


def request_flops(
    spec: MoEModelSpec, prompt_tokens: int, cached_tokens: int = 0, head_tokens: int = 1
) -> int:
    """True FLOPs of one prefill-only request.

    Args:
        prompt_tokens: ``L``, the whole prompt.
        cached_tokens: ``P``, the prompt prefix already in the prefix cache (``0 <= P <= L``).
        head_tokens: positions that go through the LM head (:func:`lm_head_tokens`: 1 for
            a generate request, 0 for pooling ones, which read hidden states).
    """
    _check_counts(prompt_tokens, cached_tokens)
    if head_tokens < 0:
        raise ValueError(f"head_tokens must be >= 0, got {head_tokens}")
    new_tokens = prompt_tokens - cached_tokens
    linear = 2 * new_tokens * matmul_params_per_token(spec)
    kv_up = 2 * cached_tokens * mla_kv_up_params(spec.attention) * spec.num_layers
    head = head_flops(spec, min(head_tokens, new_tokens))
    return linear + kv_up + attention_flops(spec, new_tokens, cached_tokens) + head


def attention_flops(spec: MoEModelSpec, new_tokens: int, cached_tokens: int = 0) -> int:
    """Score and value FLOPs of causal attention over all layers (the quadratic term)."""
    pairs = causal_query_key_pairs(new_tokens, cached_tokens)
    return spec.attention.flops_per_query_key_pair * spec.num_layers * pairs


#: Engine runners, as vLLM names them: ``generate`` answers from next-token logits (the LM
#: head), ``pooling`` from hidden states (a pooler, or a classifier head of a few rows).
RUNNERS = ("generate", "pooling")
#: Prefill-only HTTP endpoints of vLLM and SGLang (each with or without ``/v1``) by the runner
#: that answers them. SGLang's ``/v1/score`` reads label-token probabilities from next-token
#: logits, one LM-head position per item; it is counted as the pooling endpoint vLLM's is
#: (the gateway does not know the engine when it costs a request; one position is < 0.1% of
#: a prompt's FLOPs).
ENDPOINT_RUNNERS = {
    "embeddings": "pooling",
    "pooling": "pooling",
    "encode": "pooling",
    "classify": "pooling",
    "score": "pooling",
    "rerank": "pooling",
}


def endpoint_runner(path: str) -> str:
    """The runner that answers ``path``; ``/v1/x`` and ``/x`` are the same endpoint."""
    name = path.removeprefix("/v1/").lstrip("/")
    if name not in ENDPOINT_RUNNERS:
        raise ValueError(
            f"no prefill-only endpoint {path!r}; known: {', '.join(sorted(ENDPOINT_RUNNERS))} "
            "(each also under /v1)"
        )
    return ENDPOINT_RUNNERS[name]


def lm_head_tokens(runner: str) -> int:
    """Prompt positions that go through the vocabulary-sized LM head, by the serving runner.

    The one decision of ``head_tokens`` for the router, the vLLM scheduler and the SGLang
    balancer: a ``generate`` request computes next-token logits at its last position (1); a
    ``pooling`` request (embeddings, pooling, classify, score, rerank) reads hidden states
    through a pooler or a classifier head of a few rows, never the LM head (0: like norms and
    biases, the classifier head is not counted).
    """
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")
    return 1 if runner == "generate" else 0


def head_flops(spec: MoEModelSpec, head_tokens: int) -> int:
    """LM head FLOPs for ``head_tokens`` scored positions."""
    return 2 * spec.hidden_size * spec.vocab_size * head_tokens


def moe_layer_flops(spec: MoEModelSpec, tokens: int) -> int:
    """FLOPs of one MoE layer's routed experts for ``tokens`` tokens (top-k of them each)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return 2 * tokens * spec.top_k * spec.expert_params


def _moe_params_per_token(spec: MoEModelSpec) -> int:
    return (
        spec.router_params_per_layer
        + spec.shared_expert_params_per_layer
        + spec.top_k * spec.expert_params
    )


def _check_layer(spec: MoEModelSpec, layer_index: int) -> None:
    if not 0 <= layer_index < spec.num_layers:
        raise ValueError(f"layer_index must be in 0..{spec.num_layers - 1}, got {layer_index}")


def _check_counts(prompt_tokens: int, cached_tokens: int) -> None:
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
    if not 0 <= cached_tokens <= prompt_tokens:
        raise ValueError(
            f"cached_tokens must be in 0..prompt_tokens={prompt_tokens}, got {cached_tokens}"
        )
