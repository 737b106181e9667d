"""Every layout of ``benchmarks/e2e_prefill.py`` computes the same forward as one process.

Two gloo ranks build the same tiny Qwen3-MoE stack from seeds (``benchmarks/_layouts.py``),
each runs its own packed requests (TP: the whole group's) through every layout — dp,
AsyncEP (gloo transport, prefetch depth 1 and 2), deduplicated EP, EP with two-batch
overlap, TP — with bf16 and FP8 experts and both routing regimes, over two passes (the
streamer's cross-pass prefetch), and compares the output with a single-process
:class:`LocalStack` run over all ranks' requests at once: every token with balanced routing
(a forced, tie-free expert choice), 90% of tokens with skewed routing (bf16 rounding in
another summation order may flip a near-tied top-k choice, which changes that token). The
two EP layouts are also checked on uneven token counts, a request cut across the two
micro-batches on both ranks, and forced routings where one rank receives nothing, where
every token needs both ranks, and a mix; with the bytes they send counted by hand. Also:
the bytes-minimum functions against hand-computed values, the workload helpers (request
packing, micro-batch split inside a request, attention continuing a split request,
balanced and skewed routing bias), back-to-back timing, and the benchmark script end to
end on CPU (table, JSON summary with null reasons and the timing method, bytes per layer,
PNG).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # the harness modules import each other as scripts do

from _harness import (asyncep_minimum_bytes, ep_minimum_bytes, max_over_mean, remote_token_rank_pairs,  # noqa: E402
                      routing_balance, time_passes, tp_minimum_bytes)
from _layouts import LocalStack, build_stack  # noqa: E402
from _model import (BALANCED_LOGIT_BOOST, PackedBatch, StackConfig, balanced_router_bias, causal_attention,  # noqa: E402
                    dense_weights, expert_weights_bf16, experts_kernel_for, mixed_request_lengths,
                    quantize_experts_fp8, skewed_router_bias)
from tests.multiprocess import run_on_ranks  # noqa: E402
from zeroprefill.common.expert_sharding import ExpertShardLayout  # noqa: E402
from zeroprefill.common.model_spec import MoEModelSpec  # noqa: E402
TINY = {
    "model_type": "qwen3_moe", "hidden_size": 128, "moe_intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "vocab_size": 512, "rope_theta": 10000.0,
}
LAYERS = 2
TOKENS, CONTEXT = 48, 16
#: Max error relative to max |reference|: bf16 sums in another order (TP: partial sums
#: all-reduced in bf16); a layout bug (wrong expert, missing reduction) is O(1).
TOLERANCE = 3e-2
LAYOUTS = ("dp", "asyncep-gloo-d1", "asyncep-gloo-d2", "a2a_ep", "a2a_tbo", "tp")


def _fp8_available() -> bool:
    try:
        import zeroprefill.kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _config() -> StackConfig:
    return StackConfig.from_config(MoEModelSpec.from_hf_config(TINY), TINY)


def _batch(cfg: StackConfig, ranks: list[int], routing: str, skew: torch.Tensor) -> PackedBatch:
    hidden, lengths, biases = [], [], []
    for rank in ranks:
        gen = torch.Generator().manual_seed(100 + rank)
        hidden.append(torch.randn(TOKENS, cfg.hidden, generator=gen).to(torch.bfloat16))
        # rank 0: several requests; rank 1: uneven lengths (tests per-request attention)
        lengths += mixed_request_lengths(TOKENS, CONTEXT if rank == 0 else 3 * CONTEXT, seed=rank)
        biases.append(balanced_router_bias(rank * TOKENS, TOKENS, cfg, torch.device("cpu")))
    if routing == "balanced":
        batch = PackedBatch(torch.cat(hidden), tuple(lengths), torch.cat(biases), bias_per_layer=False)
    else:
        batch = PackedBatch(torch.cat(hidden), tuple(lengths), skew, bias_per_layer=True)
    batch.set_rope(cfg.head_dim, cfg.rope_theta)
    return batch


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def _rows_within(out: torch.Tensor, ref: torch.Tensor, tolerance: float) -> float:
    """Fraction of token rows whose largest error is below ``tolerance`` (relative to max |ref|)."""
    row_error = (out.float() - ref.float()).abs().amax(dim=1) / ref.float().abs().max()
    return float((row_error < tolerance).float().mean())


def _check_layouts(rank: int, world_size: int, dtypes: tuple[str, ...]) -> None:
    cfg = _config()
    device = torch.device("cpu")
    dense = dense_weights(cfg, LAYERS, seed=1, device=device)
    experts_bf16 = [expert_weights_bf16(cfg, layer, seed=2, device=device) for layer in range(LAYERS)]
    skew, _ = skewed_router_bias(cfg, LAYERS, 1.5, seed=3, samples=4096)
    group = list(range(world_size))
    for dtype in dtypes:
        experts_fp8 = [quantize_experts_fp8(e) for e in experts_bf16] if dtype == "fp8" else None
        reference_stack = LocalStack(cfg, dense, experts_kernel_for(device, dtype == "fp8"),
                                     experts_fp8 or experts_bf16)
        for routing in ("balanced", "skewed"):
            reference = reference_stack.forward(_batch(cfg, group, routing, skew))
            mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
            moe_and_attention = _relative_error(reference, _batch(cfg, group, routing, skew).hidden)
            assert moe_and_attention > 0.1, "the layers must change the hidden states for the check to bite"
            for name in LAYOUTS:
                stack = build_stack(name, cfg, dense, experts_bf16, experts_fp8, rank, world_size, device)
                try:
                    for _ in range(2):  # second pass: gathers prefetched during the first
                        if name == "tp":
                            out, expected = stack.forward(_batch(cfg, group, routing, skew)), reference
                        else:
                            out, expected = stack.forward(_batch(cfg, [rank], routing, skew)), reference[mine]
                        if routing == "balanced":  # the bias leaves no near-tie: routing is identical
                            error = _relative_error(out, expected)
                            assert error < TOLERANCE, f"{name} {dtype} {routing} rank {rank}: error {error:.3g}"
                        else:  # bf16 rounding may flip a near-tied top-k choice of a few tokens
                            share = _rows_within(out, expected, TOLERANCE)
                            assert share >= 0.9, f"{name} {dtype} {routing} rank {rank}: {share:.0%} rows match"
                finally:
                    stack.close()


#: Uneven tokens per rank (48, 37); on both the two-batch cut (24, 18) falls inside a request.
EDGE_LENGTHS = ((10, 30, 8), (37,))
#: Forced top-2 experts of global token t (of 8: rank 0 owns 0-3, rank 1 owns 4-7).
FORCED_ROUTINGS = {
    "one_rank": lambda t: (0, 1),  # rank 1 receives nothing, its tokens all go to rank 0
    "both_ranks": lambda t: (t % 4, 4 + (3 * t) % 4),  # every token needs both ranks
    "mixed": lambda t: ((0, 5), (1, 2), (6, 7))[t % 3],
}
ROW_BYTES = TINY["hidden_size"] * 2  # a bf16 hidden row
SLOT_BYTES = 2 * TINY["num_experts_per_tok"] * 4  # its routing slots: local ids and weights (float32)
COUNT_BYTES = 2 * 8  # (tokens, pairs) to one rank, int64


def _forced_batch(cfg: StackConfig, ranks: list[int], routing: str) -> PackedBatch:
    hidden, lengths, biases = [], [], []
    for rank in ranks:
        tokens, first = sum(EDGE_LENGTHS[rank]), sum(sum(n) for n in EDGE_LENGTHS[:rank])
        hidden.append(torch.randn(tokens, cfg.hidden, generator=torch.Generator().manual_seed(200 + rank))
                      .to(torch.bfloat16))
        lengths += EDGE_LENGTHS[rank]
        bias = torch.zeros(tokens, cfg.num_experts, dtype=torch.bfloat16)
        for t in range(tokens):
            bias[t, list(FORCED_ROUTINGS[routing](first + t))] = BALANCED_LOGIT_BOOST
        biases.append(bias)
    batch = PackedBatch(torch.cat(hidden), tuple(lengths), torch.cat(biases), bias_per_layer=False)
    batch.set_rope(cfg.head_dim, cfg.rope_theta)
    return batch


def _check_expert_parallel_edge_cases(rank: int, world_size: int) -> None:
    cfg = _config()
    device = torch.device("cpu")
    dense = dense_weights(cfg, LAYERS, seed=1, device=device)
    experts_bf16 = [expert_weights_bf16(cfg, layer, seed=2, device=device) for layer in range(LAYERS)]
    reference_stack = LocalStack(cfg, dense, experts_kernel_for(device, False), experts_bf16)
    first = sum(sum(n) for n in EDGE_LENGTHS[:rank])
    mine = slice(first, first + sum(EDGE_LENGTHS[rank]))
    for routing in FORCED_ROUTINGS:
        reference = reference_stack.forward(_forced_batch(cfg, list(range(world_size)), routing))
        for name, count_exchanges in (("a2a_ep", 1), ("a2a_tbo", 2)):
            stack = build_stack(name, cfg, dense, experts_bf16, None, rank, world_size, device)
            try:
                batch = _forced_batch(cfg, [rank], routing)
                assert batch.split_in_half()[1].continued_tokens > 0, "the cut must split a request"
                stack.traffic = []
                out = stack.forward(batch)
                error = _relative_error(out, reference[mine])
                assert error < TOLERANCE, f"{name} {routing} rank {rank}: error {error:.3g}"
                assert len(stack.traffic) == LAYERS
                if routing == "one_rank":  # rank 1 sends its 37 tokens out, rank 0 sends 37 rows back
                    tokens_of_rank_1 = sum(EDGE_LENGTHS[1])
                    rows = tokens_of_rank_1 * (ROW_BYTES + SLOT_BYTES if rank == 1 else ROW_BYTES)
                    minimum = 2 * tokens_of_rank_1 * ROW_BYTES if rank == 1 else 0
                    for layer in stack.traffic:
                        assert (layer.moved, layer.minimum) == (rows + count_exchanges * COUNT_BYTES, minimum)
            finally:
                stack.close()


def test_expert_parallel_edge_cases():
    run_on_ranks(2, _check_expert_parallel_edge_cases)


@pytest.mark.parametrize("dtypes", [("bf16",), ("fp8",)], ids=["bf16", "fp8"])
def test_layouts_match_single_process_reference(dtypes):
    if "fp8" in dtypes and not _fp8_available():
        pytest.skip("zeroprefill.kernels (FP8 quantisation and reference) is not importable")
    run_on_ranks(2, _check_layouts, dtypes)


def test_request_packing_and_microbatch_split():
    lengths = mixed_request_lengths(4096, 512, seed=0)
    assert sum(lengths) == 4096 and lengths == sorted(lengths)
    assert sum(n not in (256, 384, 512, 640, 768) for n in lengths) <= 1  # only the cut one
    assert max(lengths) <= 768
    with pytest.raises(ValueError, match="at least one whole request"):
        mixed_request_lengths(256, 512, seed=0)
    hidden = torch.zeros(sum((10, 10, 20, 40)), 4)
    batch = PackedBatch(hidden, (10, 10, 20, 40), None, bias_per_layer=False)
    assert batch.groups == ((0, 2, 10), (20, 1, 20), (40, 1, 40))
    first, second = batch.split_in_half()  # 40 | 40: the cut is a request boundary
    assert (first.lengths, second.lengths, second.continued_tokens) == ((10, 10, 20), (40,), 0)
    # a cut inside a request: its first 4 tokens stay in the first micro-batch
    bias = torch.arange(16.0)[:, None]
    batch = PackedBatch(torch.zeros(16, 4), (4, 8, 4), bias, bias_per_layer=False)
    batch.set_rope(head_dim=4, theta=10000.0)
    first, second = batch.split_in_half()
    assert (first.lengths, second.lengths, second.continued_tokens) == ((4, 4), (4, 4), 4)
    assert first.groups == ((0, 2, 4),) and second.groups == ((0, 1, 4), (4, 1, 4))  # the continued one alone
    assert torch.equal(second.router_bias, bias[8:]) and torch.equal(second.cos, batch.cos[8:])
    second.set_rope(head_dim=4, theta=10000.0)  # positions continue inside the split request
    assert torch.equal(second.cos, batch.cos[8:]) and torch.equal(second.sin, batch.sin[8:])
    odd = PackedBatch(torch.zeros(37, 4), (37,), None, bias_per_layer=False).split_in_half()
    assert [p.hidden.shape[0] for p in odd] == [18, 19] and odd[1].continued_tokens == 18
    with pytest.raises(ValueError, match="strictly inside"):
        batch.split_at(16)
    with pytest.raises(ValueError, match="whole batch"):
        second.split_at(2)


def test_attention_continues_a_split_request():
    """Queries after the cut attend the keys and values before it: equal to the whole request."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, heads, 8, generator=gen) for heads in (4, 2, 2))
    whole = causal_attention(q, k, v, PackedBatch(torch.zeros(10, 1), (10,), None, bias_per_layer=False))
    second = PackedBatch(torch.zeros(6, 1), (6,), None, bias_per_layer=False, continued_tokens=4)
    tail = causal_attention(q[4:], k[4:], v[4:], second, prefix_kv=(k[:4], v[:4]))
    torch.testing.assert_close(tail, whole[4:])
    with pytest.raises(ValueError, match="prefix_kv"):
        causal_attention(q[4:], k[4:], v[4:], second)


def test_minimum_bytes_by_hand():
    # 4 experts, 2 per rank: token 0 -> rank 0 only, 1 -> rank 1 only, 2 and 3 -> both ranks
    owner = torch.tensor([0, 0, 1, 1])
    ids = torch.tensor([[0, 1], [2, 3], [0, 3], [1, 2]])
    assert remote_token_rank_pairs(ids, owner, rank=0, world_size=2) == 3  # tokens 1, 2, 3 need rank 1
    assert remote_token_rank_pairs(ids, owner, rank=1, world_size=2) == 3  # tokens 0, 2, 3 need rank 0
    # 4 ranks, 2 experts each: token 0 -> ranks {0, 2}, token 1 -> ranks {0, 1}; from rank 0: 2 remote pairs
    assert remote_token_rank_pairs(torch.tensor([[0, 5], [1, 2]]), torch.arange(8) // 2, 0, 4) == 2
    # 3 pairs x 4096 hidden x 2 bytes, out and back
    assert ep_minimum_bytes(3, 4096, 2) == 49_152
    # Qwen3-235B bf16 layer: 128 experts x 3 x 4096 x 1536 x 2 bytes = 4,831,838,208 B
    layer = 128 * 3 * 4096 * 1536 * 2
    assert asyncep_minimum_bytes(layer, 2) == 2_415_919_104
    assert asyncep_minimum_bytes(layer, 4) == 3_623_878_656
    assert asyncep_minimum_bytes(layer, 1) == 0
    # 2 ranks x 16K tokens: two all-reduces of 256 MiB, a ring sends half of each from each rank
    assert tp_minimum_bytes(32768, 4096, 2, 2) == 536_870_912
    assert tp_minimum_bytes(32768, 4096, 2, 4) == 805_306_368  # 2 x 2 x 3/4 x 256 MiB


def test_time_passes_back_to_back():
    calls = []
    ms = time_passes(lambda: calls.append(1), warmup=2, iters=3, device=torch.device("cpu"))
    assert len(calls) == 2 + 1 + 3 and ms >= 0  # warmup, the lead-in pass, the timed ones
    with pytest.raises(ValueError, match="iters"):
        time_passes(lambda: None, warmup=0, iters=0, device=torch.device("cpu"))


def test_routing_bias_regimes():
    cfg = _config()
    layout = ExpertShardLayout(cfg.num_experts, 2)
    bias = balanced_router_bias(0, 64, cfg, torch.device("cpu"))
    logits = torch.randn(64, cfg.num_experts) + bias.float()
    ids = torch.topk(logits, cfg.top_k, dim=-1).indices
    balance = routing_balance([ids], layout)
    assert balance["expert_max_over_mean"] == 1.0 and balance["ep_rank_max_over_mean"] == 1.0
    skew, alphas = skewed_router_bias(cfg, 3, 1.5, seed=0, samples=8192)
    assert skew.shape == (3, cfg.num_experts) and all(a > 0 for a in alphas)
    for layer in range(3):
        ids = torch.topk(torch.randn(20000, cfg.num_experts) + skew[layer], cfg.top_k, dim=-1).indices
        ratio = max_over_mean(torch.bincount(ids.reshape(-1), minlength=cfg.num_experts))
        assert 1.4 < ratio < 1.6, f"layer {layer}: max/mean expert load {ratio:.3f}, calibrated for 1.5"


def test_benchmark_script_on_cpu(tmp_path):
    out = tmp_path / "e2e.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "e2e_prefill.py"), "--device", "cpu", "--gpus", "2",
         "--quick", "--dtypes", "bf16", "--tokens", "64", "--contexts", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    layouts = {r["layout"] for r in result["points"]}
    assert layouts == set(LAYOUTS)
    summary = result["summary"]
    assert summary["peak_tflops_used"] == 989.0
    assert summary["timing"] == result["meta"]["timing"] == "back-to-back"
    for key in ("mfu_235b_bf16_above_threshold", "speedup_short_ctx_balanced", "speedup_short_ctx_skewed",
                "speedup_32k_ctx", "exposed_comm_above_threshold", "exposed_comm_16k_plus",
                "speedup_vs_fair_best_16k_plus", "baseline_bytes_per_layer"):
        assert summary[key] is None and summary["reasons"][key]
    for row in result["points"]:
        assert row["ms_per_layer"] > 0 and row["mfu"] > 0
        assert (row["exposed_comm"] is None) == (row["layout"] == "dp")
        assert row["speedup_vs_best_baseline"] > 0
        moved, minimum = row["bytes_per_layer"]["moved"], row["bytes_per_layer"]["minimum"]
        assert moved >= minimum and (moved > 0) == (row["layout"] != "dp")
        if row["layout"].startswith("a2a"):  # rows at their minimum, plus routing slots and counts
            assert minimum < moved < 1.2 * minimum
    tbo = [row for row in result["points"] if row["layout"] == "a2a_tbo"]
    assert tbo and all(row["microbatch_tokens"] == [32, 32] for row in tbo)
    assert "tiny" in proc.stdout and "a2a_tbo" in proc.stdout and "timing: back-to-back" in proc.stdout


def test_layout_names_carry_asyncep_transport_depth_and_copy_streams():
    from _layouts import LayoutName, parse_layout

    assert parse_layout("asyncep-nccl-d1") == LayoutName("asyncep", "nccl", 1, 1)
    assert parse_layout("asyncep-copy_engine-d2-s4") == LayoutName("asyncep", "copy_engine", 2, 4)
    assert parse_layout("dp") == LayoutName("dp")
    for bad in ("asyncep-nccl", "asyncep-nccl-d1-s0", "asyncep-nccl-d1-x2", "asyncep-nccl-d1-s2-z", "ep-fast"):
        with pytest.raises(ValueError, match="unknown layout"):
            parse_layout(bad)
