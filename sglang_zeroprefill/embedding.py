"""Embeddings from MoE causal LMs under ``--is-embedding``: last-token pooling, L2-normalised.

SGLang's embedding path calls ``model.forward(input_ids, positions, forward_batch,
get_embedding=True)`` (``ModelRunner``'s extend path and the runners' warm-up) and expects an
``EmbeddingPoolerOutput``. Its dense causal LMs (Qwen2, Qwen3, Llama ``ForCausalLM``) take that
keyword and pool with ``Pooler(PoolingType.LAST, normalize=True)``; its MoE causal LMs
(``Qwen3MoeForCausalLM``, ``Qwen2MoeForCausalLM``, ``MixtralForCausalLM``, ...) do not, in every
release from 0.5.17 to 0.5.23, so the server dies at its first forward pass ("forward() got an
unexpected keyword argument 'get_embedding'").

With this plugin loaded, a model served for embeddings that contains ``FusedMoE`` layers and
whose ``forward`` lacks ``get_embedding`` gets it, after loading (``ModelRunner.maybe_init_dwdp``,
``AFTER`` hook): for an embedding forward, :class:`LastTokenPooling` takes the place of the
model's ``logits_processor`` — which every such model calls as ``logits_processor(input_ids,
hidden_states, lm_head, forward_batch, ...)`` on its final, normed hidden states — for the
duration of the call. The model's own ``forward`` runs unchanged, so whatever it does before
its head (context-parallel metadata, auxiliary hidden states, CUDA-graph replay of its body)
still happens. It is the pooling SGLang's dense models use and vLLM's Qwen3 embedding models
declare (last token, L2 norm), computed by SGLang's own ``Pooler``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

_ADDED_ATTR = "_zeroprefill_embedding_forward"


class LastTokenPooling(nn.Module):
    """Called where a causal LM calls its ``LogitsProcessor``: the pooled embedding, not logits."""

    def __init__(self) -> None:
        super().__init__()
        from sglang.srt.layers.pooler import Pooler, PoolingType

        self.pooler = Pooler(pooling_type=PoolingType.LAST, normalize=True)

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor, lm_head: nn.Module,
                forward_batch: Any, *unused: Any, **unused_kwargs: Any) -> Any:
        return self.pooler(hidden_states, forward_batch)  # EmbeddingPoolerOutput


def lacks_embedding_forward(model: nn.Module) -> bool:
    """Whether ``model`` is a MoE causal LM whose ``forward`` cannot produce embeddings."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    if getattr(model, _ADDED_ATTR, False) or "get_embedding" in inspect.signature(model.forward).parameters:
        return False
    return isinstance(getattr(model, "logits_processor", None), nn.Module) and any(
        isinstance(module, FusedMoE) for module in model.modules()
    )


def add_embedding_forward(model: nn.Module) -> None:
    """Give ``model.forward`` a ``get_embedding`` keyword that pools instead of computing logits."""
    causal_lm_forward = model.forward
    pooling = LastTokenPooling()

    @functools.wraps(causal_lm_forward)
    def forward(*args: Any, get_embedding: bool = False, **kwargs: Any) -> Any:
        if not get_embedding:
            return causal_lm_forward(*args, **kwargs)
        logits_processor = model.logits_processor
        model.logits_processor = pooling
        try:
            return causal_lm_forward(*args, **kwargs)
        finally:
            model.logits_processor = logits_processor

    model.forward = forward
    setattr(model, _ADDED_ATTR, True)


def after_maybe_init_dwdp(result: Any, model_runner: Any, *args: Any, **kwargs: Any) -> Any:
    """``AFTER`` hook on ``ModelRunner.maybe_init_dwdp`` (after loading, before graph capture)."""
    model = model_runner.model
    if not model_runner.is_generation and lacks_embedding_forward(model):
        add_embedding_forward(model)
        logger.info("sglang_zeroprefill: %s serves embeddings: last-token pooling of the final hidden states, "
                    "L2-normalised", type(model).__name__)
    return result
