"""GPU-only checks of the MoE kernels at real layer shapes, with the shipped tile table.

Skipped without CUDA. Tolerances as max|out - ref| / max|ref| (fp32 reference): bf16 2e-2 (every
backend), FP8 3e-2 against the dequantised-weight reference with the same activation
quantisation (block: 1x128 groups; rowwise: whole rows). The DeepGEMM tests also need
``deep_gemm`` on an sm90 GPU (the ``deepgemm`` extra); the same tolerances against the
reference, and twice them between DeepGEMM and our Triton path (each may err either way).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from zeroprefill.kernels import align, fused_moe
from zeroprefill.kernels import (EXPERTS_KERNEL_ENV, GROUPED_MM, TRITON_GROUPED_MM, MoEConfig, deepgemm_experts,
                                 deepgemm_unavailable_reason, experts_kernel_choice, fused_experts,
                                 fused_experts_reference, get_config, quantize_weights_fp8_block,
                                 quantize_weights_fp8_rowwise)
from zeroprefill.kernels.deepgemm import fp8_psum_refused_reason
from zeroprefill.common.asyncep_moe import select_experts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("num_tokens", [1, 3000, 16384, 65536])
@pytest.mark.parametrize("block_m", [16, 128])
def test_alignment_equals_torch_at_serving_sizes(num_tokens, block_m):
    """The compiled count/scan/place kernels give the torch definition's tensors exactly, up to
    64K tokens x top-8 (4,096 chunks of 128 rows), with a share of skipped (-1) slots."""
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    ids = torch.randint(0, 128, (num_tokens, 8), device="cuda", generator=gen, dtype=torch.int32)
    ids[torch.rand(num_tokens, 8, device="cuda", generator=gen) < 0.05] = -1
    ours = align.moe_align_block_size_triton(ids, 128, block_m)
    ref = align.moe_align_block_size_torch(ids, 128, block_m)
    for field in ("sorted_row_ids", "block_expert_ids", "num_padded_rows", "expert_ends", "position_of_row",
                  "rows_per_expert"):
        assert torch.equal(getattr(ours, field), getattr(ref, field)), field


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0), reason="TMA needs sm90")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_tokens", [7, 4096])
def test_weight_tiles_through_tma_at_qwen3_30b_shapes(num_tokens, fp8):
    """Both GEMMs with TMA weight tiles (``GemmConfig.weight_tma``), compiled, give what their
    pointer loads give, bit for bit, at Qwen3-30B-A3B's expert shapes with each shipped tile."""
    num_experts, top_k, hidden, inter = 128, 8, 2048, 768
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden ** -0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * inter ** -0.5).bfloat16()
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    weights, ids = select_experts(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), top_k, True)
    scales = {}
    if fp8:
        (w13, w13_scale), (w2, w2_scale) = quantize_weights_fp8_block(w13), quantize_weights_fp8_block(w2)
        scales = dict(w13_scale=w13_scale, w2_scale=w2_scale)
    shipped = get_config(num_tokens, top_k, num_experts, hidden, inter, fp8, x.device, allow_grouped_mm=False)
    outs = [fused_experts(x, w13, w2, weights, ids, **scales,
                          config=MoEConfig(replace(shipped.gemm1, weight_tma=tma), replace(shipped.gemm2, weight_tma=tma)))
            for tma in (False, True)]
    tma1 = replace(shipped.gemm1, weight_tma=True)
    assert (fused_moe.weight_tiles(w13, inter, tma1) if fp8 else fused_moe.gate_up_tiles(w13, tma1)) is not None
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], fused_experts_reference(x, w13, w2, weights, ids, **scales)) < (3e-2 if fp8 else 2e-2)


@pytest.mark.parametrize("num_tokens", [1, 200, 2048])
@pytest.mark.parametrize("hidden,inter", [(2048, 768), (4096, 1536), (1000, 328)])
def test_layer_shapes_bf16_and_fp8(num_tokens, hidden, inter):
    num_experts, top_k = 128, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden ** -0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * inter ** -0.5).bfloat16()
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    weights, ids = select_experts(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), top_k, True)

    ref = fused_experts_reference(x, w13, w2, weights, ids)
    assert rel_err(fused_experts(x, w13, w2, weights, ids), ref) < 2e-2
    assert rel_err(fused_experts(x, w13, w2, weights, ids, config=MoEConfig(backend=GROUPED_MM)), ref) < 2e-2
    gemm1 = get_config(num_tokens, top_k, num_experts, hidden, inter, False, x.device, allow_grouped_mm=False).gemm1
    hybrid = MoEConfig(gemm1, backend=TRITON_GROUPED_MM)
    assert rel_err(fused_experts(x, w13, w2, weights, ids, config=hybrid), ref) < 2e-2

    (w13_q, w13_s), (w2_q, w2_s) = quantize_weights_fp8_block(w13), quantize_weights_fp8_block(w2)
    out8 = fused_experts(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
    ref8 = fused_experts_reference(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
    assert rel_err(out8, ref8) < 3e-2

    (w13_r, w13_rs), (w2_r, w2_rs) = quantize_weights_fp8_rowwise(w13), quantize_weights_fp8_rowwise(w2)
    if hidden % 16:
        with pytest.raises(ValueError, match="divisible by 16"):
            fused_experts(x, w13_r, w2_r, weights, ids, w13_scale=w13_rs, w2_scale=w2_rs)
        return
    out_row = fused_experts(x, w13_r, w2_r, weights, ids, w13_scale=w13_rs, w2_scale=w2_rs)
    ref_row = fused_experts_reference(x, w13_r, w2_r, weights, ids, w13_scale=w13_rs, w2_scale=w2_rs)
    assert rel_err(out_row, ref_row) < 3e-2
    assert rel_err(out_row, ref) < 0.1


DEEPGEMM_REASON = deepgemm_unavailable_reason() if torch.cuda.is_available() else "needs a CUDA GPU"


@pytest.mark.skipif(DEEPGEMM_REASON is not None, reason=f"DeepGEMM unavailable: {DEEPGEMM_REASON}")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("num_tokens", [1, 8192])
def test_deepgemm_matches_triton_at_qwen3_235b_shapes(num_tokens, fp8, monkeypatch):
    """DeepGEMM vs our Triton kernels: 128 experts, H 4096, I 1536, top-8 (Qwen3-235B-A22B)."""
    num_experts, top_k, hidden, inter = 128, 8, 4096, 1536
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden ** -0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * inter ** -0.5).bfloat16()
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    weights, ids = select_experts(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), top_k, True)
    layer = {"w13": w13, "w2": w2}
    if fp8:
        (w13_q, w13_s), (w2_q, w2_s) = quantize_weights_fp8_block(w13), quantize_weights_fp8_block(w2)
        layer = {"w13": w13_q, "w2": w2_q, "w13_scale": w13_s, "w2_scale": w2_s}
    del w13, w2

    ref = fused_experts_reference(x, topk_weights=weights, topk_ids=ids, **layer)
    triton_config = get_config(num_tokens, top_k, num_experts, hidden, inter, fp8, x.device, allow_grouped_mm=False)
    ours = fused_experts(x, topk_weights=weights, topk_ids=ids, config=triton_config, **layer)
    dg = deepgemm_experts(x, topk_weights=weights, topk_ids=ids, **layer)
    tolerance = 3e-2 if fp8 else 2e-2
    assert rel_err(ours, ref) < tolerance
    assert rel_err(dg, ref) < tolerance
    assert rel_err(dg, ours) < 2 * tolerance
    monkeypatch.delenv(EXPERTS_KERNEL_ENV, raising=False)  # auto: DeepGEMM's very call for block FP8, ours for bf16
    auto = fused_experts(x, topk_weights=weights, topk_ids=ids, **layer)
    if fp8:
        assert torch.equal(auto, dg)
        # dg ran the default m_indices row layout; psum: the same products, only real row blocks
        dg_psum = deepgemm_experts(x, topk_weights=weights, topk_ids=ids, fp8_layout="psum", **layer)
        assert fp8_psum_refused_reason() is None, fp8_psum_refused_reason()
        assert rel_err(dg_psum, ref) < tolerance and rel_err(dg_psum, dg) < 1e-2
    else:
        choice = experts_kernel_choice(x.dtype, **layer)
        assert choice.startswith("ours: bf16"), choice
        monkeypatch.setenv(EXPERTS_KERNEL_ENV, "triton")
        assert torch.equal(auto, fused_experts(x, topk_weights=weights, topk_ids=ids, **layer))


def test_calls_timed_in_turns_measure_each_calls_own_time():
    """``same_clock_ms`` (moe_kernels.py's GEMM-pair/layer ratio): a call that runs the GEMM pair
    twice takes about twice as long as one, round by round; the GEMM pair over the layer is a
    plausible fraction (ours may beat CUTLASS's GEMMs, so a little over 1 too)."""
    from benchmarks._moe_timing import Layer, gemm_pair, layer_vs_gemm_pair, same_clock_ms

    layer = Layer((128, 8, 2048, 768), 8192)  # Qwen3-30B-A3B's experts
    x, topk_weights, topk_ids = layer.inputs(8192)
    once = gemm_pair(layer, x, topk_ids)
    ms = same_clock_ms({"once": once, "twice": lambda: (once(), once())}, rounds=4)
    assert all(1.7 < twice / one < 2.3 for one, twice in zip(ms["once"], ms["twice"])), ms
    result = layer_vs_gemm_pair(layer, x, topk_weights, topk_ids)
    assert 0.5 < result["ratio"] < 1.2 and result["range"][0] <= result["ratio"] <= result["range"][1], result
    assert result["rounds"] == 15 and result["ms"]["layer"] > 0
