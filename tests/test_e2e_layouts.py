"""Every layout of ``benchmarks/e2e_prefill.py`` computes the same forward as one process.

Two gloo ranks build the same tiny Qwen3-MoE stack from seeds (``benchmarks/_layouts.py``),
each runs its own packed requests (TP: the whole group's) through every layout — dp,
AsyncEP (gloo transport, prefetch depth 1 and 2), AllToAll-EP, AllToAll-EP with two-batch
overlap, TP — with bf16 and FP8 experts and both routing regimes, over two passes (the
streamer's cross-pass prefetch), and compares the output with a single-process
:class:`LocalStack` run over all ranks' requests at once: every token with balanced routing
(a forced, tie-free expert choice), 90% of tokens with skewed routing (bf16 rounding in
another summation order may flip a near-tied top-k choice, which changes that token). Also: the workload helpers
(request packing, micro-batch split, balanced and skewed routing bias) and the benchmark
script end to end on CPU (table, JSON summary with null reasons, PNG).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks._layouts import (LocalStack, PackedBatch, StackConfig, balanced_router_bias, build_stack,
                                 dense_weights, expert_weights_bf16, experts_kernel_for, max_over_mean,
                                 mixed_request_lengths, quantize_experts_fp8, routing_balance, skewed_router_bias)
from tests.multiprocess import run_on_ranks
from zeroprefill.common.expert_sharding import ExpertShardLayout
from zeroprefill.common.model_spec import MoEModelSpec

REPO = Path(__file__).resolve().parent.parent
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
    first, second = batch.split_in_two()
    assert (first.lengths, second.lengths) == ((10, 10, 20), (40,))


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
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    layouts = {r["layout"] for r in result["points"]}
    assert layouts == set(LAYOUTS)
    summary = result["summary"]
    assert summary["peak_tflops_used"] == 989.0
    for key in ("mfu_235b_bf16_above_threshold", "speedup_short_ctx_balanced", "speedup_short_ctx_skewed",
                "speedup_32k_ctx", "exposed_comm_above_threshold"):
        assert summary[key] is None and summary["reasons"][key]
    for row in result["points"]:
        assert row["ms_per_layer"] > 0 and row["mfu"] > 0
        assert (row["exposed_comm"] is None) == (row["layout"] == "dp")
        assert row["speedup_vs_best_baseline"] > 0
    assert "tiny" in proc.stdout and "a2a_tbo" in proc.stdout
