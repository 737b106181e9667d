"""True FLOPs: hand-computed Qwen3-235B/30B counts, exact prefix-hit savings, MLA, batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from zeroprefill.common.cost_model import (
    ENDPOINT_RUNNERS,
    causal_query_key_pairs,
    endpoint_runner,
    layer_flops,
    layer_flops_at_context,
    lm_head_tokens,
    request_flops,
    request_flops_breakdown,
)
from zeroprefill.common.model_spec import MoEModelSpec

CONFIGS = Path(__file__).resolve().parents[1] / "common" / "model_configs"

# Qwen3-235B-A22B: hidden 4096, 64 q / 4 kv heads of dim 128, 128 experts top-8, expert FFN
# 1536, 94 layers (all MoE), vocab 151936. Matmul weights one token meets in one layer:
Q235_ATTENTION = 4096 * 64 * 128 + 2 * 4096 * 4 * 128 + 64 * 128 * 4096  # = 71,303,168
Q235_ROUTER = 4096 * 128  # = 524,288
Q235_TOPK_EXPERTS = 8 * 3 * 4096 * 1536  # = 150,994,944
Q235_LAYER = Q235_ATTENTION + Q235_ROUTER + Q235_TOPK_EXPERTS  # = 222,822,400
Q235_PAIR = 2 * 64 * (128 + 128)  # q.k and p.v over 64 heads = 32,768 FLOPs per (q, k) pair
Q235_HEAD = 2 * 4096 * 151936  # LM head per scored position = 1,244,659,712

# Qwen3-30B-A3B: hidden 2048, 32 q / 4 kv heads of dim 128, 128 experts top-8, FFN 768, 48 layers.
Q30_LAYER = (2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 32 * 128 * 2048) + 2048 * 128 + 8 * 3 * 2048 * 768
Q30_PAIR = 2 * 32 * (128 + 128)
Q30_HEAD = 2 * 2048 * 151936


@pytest.fixture(scope="module")
def q235() -> MoEModelSpec:
    return MoEModelSpec.from_pretrained(CONFIGS / "qwen3-235b-a22b.json")


@pytest.fixture(scope="module")
def q30() -> MoEModelSpec:
    return MoEModelSpec.from_pretrained(CONFIGS / "qwen3-30b-a3b.json")


def test_qwen3_235b_layer_flops_by_hand(q235):
    # One 2048-token prompt, no cache: 2048 * 2049 / 2 = 2,098,176 causal pairs per layer.
    layer = request_flops_breakdown(q235, 2048).layers[17]
    assert Q235_LAYER == 222_822_400
    assert layer.attention_projections == 2 * 2048 * Q235_ATTENTION
    assert layer.attention_scores == Q235_PAIR * 2_098_176
    assert layer.router == 2 * 2048 * Q235_ROUTER
    assert layer.routed_experts == 2 * 2048 * Q235_TOPK_EXPERTS
    assert (layer.shared_experts, layer.dense_mlp) == (0, 0)
    assert layer.total == 2 * 2048 * 222_822_400 + 32_768 * 2_098_176  # = 912,680,550,400 + 68,753,031,168
    assert layer.total == 981_433_581_568


def test_qwen3_235b_request_flops_by_hand(q235):
    # linear 2 * 2048 * 94 * 222,822,400 + scores 94 * 32,768 * 2,098,176 + head 1,244,659,712
    expected = 2 * 2048 * 94 * Q235_LAYER + 94 * Q235_PAIR * 2_098_176 + Q235_HEAD
    assert expected == 92_256_001_327_104
    assert request_flops(q235, 2048) == expected
    assert request_flops_breakdown(q235, 2048).total == expected
    # 32K context: attention is ~120% of the linear FLOPs (docs/design.md, measured anchors).
    scores = 94 * Q235_PAIR * (32768 * 32769 // 2)
    linear = 2 * 32768 * 94 * Q235_LAYER
    assert request_flops(q235, 32768) == linear + scores + Q235_HEAD
    assert 1.15 < scores / linear < 1.25


def test_qwen3_30b_request_flops_by_hand(q30):
    assert Q30_LAYER == 56_885_248
    expected = 2 * 2048 * 48 * Q30_LAYER + 48 * Q30_PAIR * (2048 * 2049 // 2) + Q30_HEAD
    assert expected == 12_834_789_916_672
    assert request_flops(q30, 2048) == expected
    # Embeddings (no head): head_tokens=0 drops exactly the LM head.
    assert request_flops(q30, 2048, head_tokens=0) == expected - Q30_HEAD


@pytest.mark.parametrize("prompt,cached", [(2048, 1024), (4096, 4000), (512, 0), (300, 300)])
def test_prefix_hits_remove_exactly_their_own_flops(q235, prompt, cached):
    # The P cached tokens drop their linear FLOPs and their own causal triangle P(P+1)/2;
    # new tokens still attend to them. The head (1 position) stays while any token is new.
    saved = 2 * cached * 94 * Q235_LAYER + 94 * Q235_PAIR * (cached * (cached + 1) // 2)
    head_change = Q235_HEAD if cached == prompt else 0  # nothing new: nothing to score
    assert request_flops(q235, prompt) - request_flops(q235, prompt, cached) == saved + head_change
    assert causal_query_key_pairs(prompt - cached, cached) == (
        prompt * (prompt + 1) // 2 - cached * (cached + 1) // 2
    )


def test_batch_at_context_matches_whole_prompts(q30):
    # T tokens of C-token prompts hold T (C + 1) / 2 pairs: for T = C it is one whole prompt.
    for context in (1, 512, 4097):
        assert layer_flops_at_context(q30, 3, context, context) == request_flops_breakdown(
            q30, context
        ).layers[3]
    # Per-token cost grows with context (attention), linear part does not.
    short = layer_flops_at_context(q30, 0, 4096, 512).total
    long = layer_flops_at_context(q30, 0, 4096, 32768).total
    assert long - short == Q30_PAIR * (4096 * 32769 // 2 - 4096 * 513 // 2)


def test_mla_dense_layers_and_cached_latents():
    config = {
        "model_type": "deepseek_v3", "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 100,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "intermediate_size": 96,
        "num_attention_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4, "v_head_dim": 8,
    }
    spec = MoEModelSpec.from_hf_config(config)
    # q: 64*24 + 24*4*12; kv down: 64*(16+4); kv up: 16*4*(8+8); o: 4*8*64.
    attention = 64 * 24 + 24 * 4 * 12 + 64 * 20 + 16 * 4 * 16 + 4 * 8 * 64
    dense = layer_flops(spec, 0, 10, 55)
    assert dense.dense_mlp == 2 * 10 * 3 * 64 * 96 and dense.routed_experts == dense.router == 0
    moe = layer_flops(spec, 1, 10, 55)
    assert moe.attention_projections == 2 * 10 * attention
    assert moe.attention_scores == 2 * 4 * (12 + 8) * 55
    assert moe.router == 2 * 10 * 64 * 8
    assert moe.routed_experts == 2 * 10 * 2 * 3 * 64 * 16
    assert moe.shared_experts == 2 * 10 * 3 * 64 * 16
    # A prefix hit under MLA still re-expands the cached latents through kv up-projection.
    kv_up = 16 * 4 * (8 + 8)
    cached = layer_flops(spec, 1, 10, 55, cached_tokens=30)
    assert cached.attention_projections - moe.attention_projections == 2 * 30 * kv_up
    assert request_flops_breakdown(spec, 40, 30).total == request_flops(spec, 40, 30)


def test_bad_counts_raise(q30):
    with pytest.raises(ValueError, match="layer_index"):
        layer_flops(q30, 48, 1, 1)
    with pytest.raises(ValueError, match="cached_tokens"):
        request_flops(q30, 10, 11)
    with pytest.raises(ValueError, match="context_tokens"):
        layer_flops_at_context(q30, 0, 10, 0)


def test_lm_head_is_charged_by_the_runner_and_an_endpoint_with_or_without_v1_agrees():
    assert lm_head_tokens("generate") == 1  # next-token logits at the last position
    assert lm_head_tokens("pooling") == 0  # a pooler or classifier head reads hidden states
    for name in ENDPOINT_RUNNERS:
        assert endpoint_runner(f"/{name}") == endpoint_runner(f"/v1/{name}")
    assert lm_head_tokens(endpoint_runner("/classify")) == lm_head_tokens(endpoint_runner("/v1/classify")) == 0
    assert {endpoint_runner(p) for p in ("/v1/embeddings", "/pooling", "/score", "/v1/rerank")} == {"pooling"}
    with pytest.raises(ValueError, match="unknown runner 'draft'"):
        lm_head_tokens("draft")
    with pytest.raises(ValueError, match="no prefill-only endpoint '/v1/completions'"):
        endpoint_runner("/v1/completions")
