"""GPU-only checks of the MoE kernels at real layer shapes, with the shipped tile table.

Skipped without CUDA. Tolerances as max|out - ref| / max|ref| (fp32 reference): bf16 2e-2 (both
backends), FP8 3e-2 against the dequantised-weight reference with the same activation
quantisation (block: 1x128 groups; rowwise: whole rows).
"""

from __future__ import annotations

import pytest
import torch

from zeroprefill.kernels import (GROUPED_MM, MoEConfig, fused_experts, fused_experts_reference,
                                 quantize_weights_fp8_block, quantize_weights_fp8_rowwise)
from zeroprefill.common.asyncep_moe import select_experts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


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
