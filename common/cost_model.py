"""True FLOPs of prefill-only work: what a request really costs, not how many tokens it has.

A prefill request of ``L`` prompt tokens of which the first ``P`` hit the prefix cache runs
``L - P`` new tokens through every weight they touch, and each new token at position ``i``
attends causally to ``i + 1`` keys (cached ones included)::

    linear    = 2 * (L - P) * active_matmul_params          (attention projections, router,
                                                             top-k + shared experts, dense MLPs)
    attention = flops_per_query_key_pair * num_layers * sum_{i=P}^{L-1} (i + 1)
              = flops_per_query_key_pair * num_layers * (L - P) * (L + P + 1) / 2
    head      = 2 * hidden * vocab * head_tokens             (LM head on the scored positions)

Embedding lookups and norms are not matmuls and are not counted. All functions are pure and
take a :class:`~zeroprefill.common.model_spec.MoEModelSpec`.
"""

from __future__ import annotations

from zeroprefill.common.model_spec import MoEModelSpec


def matmul_params_per_token(spec: MoEModelSpec) -> int:
    """Weights a new token multiplies through below the LM head (top-k experts only)."""
    attention = spec.num_layers * spec.attention_params_per_layer
    moe = spec.num_moe_layers * (
        spec.router_params_per_layer
        + spec.shared_expert_params_per_layer
        + spec.top_k * spec.expert_params
    )
    dense = spec.num_dense_layers * spec.dense_mlp_params
    return attention + moe + dense


def causal_query_key_pairs(new_tokens: int, cached_tokens: int = 0) -> int:
    """``sum_{i=P}^{P+N-1} (i + 1)``: keys seen by ``N`` new queries after ``P`` cached tokens."""
    _check_counts(new_tokens + cached_tokens, cached_tokens)
    return new_tokens * (2 * cached_tokens + new_tokens + 1) // 2


def attention_flops(spec: MoEModelSpec, new_tokens: int, cached_tokens: int = 0) -> int:
    """Score and value FLOPs of causal attention over all layers (the quadratic term)."""
    pairs = causal_query_key_pairs(new_tokens, cached_tokens)
    return spec.attention.flops_per_query_key_pair * spec.num_layers * pairs


def request_flops(
    spec: MoEModelSpec, prompt_tokens: int, cached_tokens: int = 0, head_tokens: int = 1
) -> int:
    """True FLOPs of one prefill-only request.

    Args:
        prompt_tokens: ``L``, the whole prompt.
        cached_tokens: ``P``, the prompt prefix already in the prefix cache (``0 <= P <= L``).
        head_tokens: positions that go through the LM head (1 for last-token scoring,
            0 for embeddings/pooling that read hidden states).
    """
    _check_counts(prompt_tokens, cached_tokens)
    if head_tokens < 0:
        raise ValueError(f"head_tokens must be >= 0, got {head_tokens}")
    new_tokens = prompt_tokens - cached_tokens
    linear = 2 * new_tokens * matmul_params_per_token(spec)
    head = 2 * spec.hidden_size * spec.vocab_size * min(head_tokens, new_tokens)
    return linear + attention_flops(spec, new_tokens, cached_tokens) + head


def moe_layer_flops(spec: MoEModelSpec, tokens: int) -> int:
    """FLOPs of one MoE layer's routed experts for ``tokens`` tokens (what hides a gather)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return 2 * tokens * spec.top_k * spec.expert_params


def _check_counts(prompt_tokens: int, cached_tokens: int) -> None:
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
    if not 0 <= cached_tokens <= prompt_tokens:
        raise ValueError(
            f"cached_tokens must be in 0..prompt_tokens={prompt_tokens}, got {cached_tokens}"
        )
