"""Correctness of the Triton MoE kernels against their plain-torch references.

Without CUDA the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported) on tiny shapes; with CUDA the same tests run natively on the GPU.

Tolerances, as max|out - ref| / max|ref| (the reference is fp32 math):
- fp32: 1e-4 in the interpreter (exact fp32 dots), 1e-2 on GPU (tl.dot uses TF32).
- fp16/bf16: 1e-2 / 2e-2: inputs are exact, the K-slot outputs are rounded once to the
  activation dtype before they are summed (bf16 has an 8-bit mantissa, 2^-8 = 3.9e-3).
- FP8: against the dequantised-weight reference that applies the same 1x128 activation
  quantisation; fp32 output 1e-4 in the interpreter, otherwise 3e-2 (bf16 output rounding, and
  on GPU a different accumulation order can flip an activation's e4m3 rounding).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

from zeroprefill.kernels import (MoEConfig, GemmConfig, dequantize_fp8_block, fused_experts,  # noqa: E402
                                 fused_experts_reference, moe_align_block_size,
                                 quantize_tokens_fp8_group, quantize_weights_fp8_block,
                                 topk_routing, topk_routing_reference)
from zeroprefill.kernels import fused_moe  # noqa: E402
from zeroprefill.kernels.quant import quantize_tokens_fp8_group_reference  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
TOLERANCE = {torch.float32: 1e-2 if ON_GPU else 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def make_layer(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden ** -0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * inter ** -0.5).to(dtype)
    return w13.to(DEVICE), w2.to(DEVICE)


def make_tokens(num_tokens: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype,
                seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(DEVICE)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(DEVICE)
    weights, ids = topk_routing_reference(logits, top_k, renormalize=True)
    return x, weights.contiguous(), ids.contiguous()


# ---------------------------------------------------------------------------- routing

@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(37, 8, 2), (5, 12, 4), (3, 6, 6)])
def test_topk_routing_matches_reference(num_tokens, num_experts, top_k, renormalize):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    weights, ids = topk_routing(logits, top_k, renormalize)
    ref_weights, ref_ids = topk_routing_reference(logits, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens, device=DEVICE))


def test_topk_routing_bad_inputs():
    with pytest.raises(ValueError, match="top_k=9"):
        topk_routing(torch.randn(4, 8, device=DEVICE), 9, True)
    with pytest.raises(ValueError, match="2-D"):
        topk_routing(torch.randn(4, 8, 2, device=DEVICE), 2, True)
    weights, ids = topk_routing(torch.randn(0, 8, device=DEVICE), 2, True)
    assert weights.shape == ids.shape == (0, 2)


# ---------------------------------------------------------------------------- alignment

@pytest.mark.parametrize("block_m", [4, 16])
def test_moe_align_block_size(block_m):
    num_experts = 6
    ids = torch.tensor([[0, 3], [3, 1], [0, 3], [5, 3], [3, 0]], dtype=torch.int32, device=DEVICE)
    al = moe_align_block_size(ids, num_experts, block_m)
    num_rows = ids.numel()
    used = int(al.num_padded_rows)
    assert used % block_m == 0 and used <= al.max_padded_rows
    sorted_ids = al.sorted_row_ids.cpu().tolist()
    blocks = al.block_expert_ids.cpu().tolist()
    flat = ids.flatten().tolist()
    seen: dict[int, list[int]] = {}
    for b in range(used // block_m):
        for row in sorted_ids[b * block_m:(b + 1) * block_m]:
            if row != num_rows:
                assert flat[row] == blocks[b]
                seen.setdefault(blocks[b], []).append(row)
    expected = {e: [r for r, x in enumerate(flat) if x == e] for e in set(flat)}
    assert seen == expected  # every row exactly once, in stable order; experts 2, 4 get no block
    assert all(r == num_rows for r in sorted_ids[used:])


# ---------------------------------------------------------------------------- FP8 quantisers

def test_quantize_tokens_matches_reference():
    x = torch.randn(9, 200, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 3
    q, scale = quantize_tokens_fp8_group(x)
    ref_q, ref_scale = quantize_tokens_fp8_group_reference(x)
    torch.testing.assert_close(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_quantize_weights_roundtrip():
    w = torch.randn(3, 200, 300, generator=torch.Generator().manual_seed(4))
    q, scale = quantize_weights_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2, 3)
    assert rel_err(dequantize_fp8_block(q, scale), w) < 2 ** -4  # e4m3: 3 mantissa bits


# ---------------------------------------------------------------------------- fused experts

CASES = {  # name: (T, E, K, H, I)
    "random": (19, 4, 2, 64, 48),
    "T_below_block": (3, 4, 2, 64, 32),
    "odd_sizes": (11, 5, 3, 40, 24),
    "top1": (13, 3, 1, 32, 32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_experts_matches_reference(case, dtype):
    num_tokens, num_experts, top_k, hidden, inter = CASES[case]
    w13, w2 = make_layer(num_experts, hidden, inter, dtype)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, dtype)
    out = fused_experts(x, w13, w2, weights, ids)
    ref = fused_experts_reference(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_experts_with_no_tokens_and_all_to_one():
    w13, w2 = make_layer(6, 64, 48, torch.float32)
    x, weights, _ = make_tokens(10, 64, 6, 2, torch.float32)
    # experts 2..5 receive nothing; every token uses experts 0 and 1 (int64 ids)
    ids = torch.tensor([[1, 0]] * 10, dtype=torch.int64, device=DEVICE)
    assert rel_err(fused_experts(x, w13, w2, weights, ids),
                   fused_experts_reference(x, w13, w2, weights, ids)) < TOLERANCE[torch.float32]
    # top-1, all tokens to the last expert
    ids1 = torch.full((10, 1), 5, dtype=torch.int32, device=DEVICE)
    ones = torch.ones(10, 1, device=DEVICE)
    assert rel_err(fused_experts(x, w13, w2, ones, ids1),
                   fused_experts_reference(x, w13, w2, ones, ids1)) < TOLERANCE[torch.float32]


def test_zero_tokens():
    w13, w2 = make_layer(4, 32, 32, torch.bfloat16)
    x = torch.empty(0, 32, dtype=torch.bfloat16, device=DEVICE)
    out = fused_experts(x, w13, w2, torch.empty(0, 2, device=DEVICE),
                        torch.empty(0, 2, dtype=torch.int32, device=DEVICE))
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16


def test_explicit_config_with_several_blocks():
    """block_m=16 with 40 rows per expert: several row blocks per expert and a partial one."""
    w13, w2 = make_layer(2, 64, 64, torch.float32)
    x, weights, ids = make_tokens(40, 64, 2, 2, torch.float32)
    config = MoEConfig(GemmConfig(16, 32, 32, 2, 4, 2), GemmConfig(16, 64, 32, 2, 4, 2))
    assert rel_err(fused_experts(x, w13, w2, weights, ids, config=config),
                   fused_experts_reference(x, w13, w2, weights, ids)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter",
                         [(9, 4, 2, 160, 96), (4, 3, 3, 128, 128), (12, 5, 2, 256, 200)])
def test_fused_experts_fp8(num_tokens, num_experts, top_k, hidden, inter, act_dtype):
    w13, w2 = make_layer(num_experts, hidden, inter, torch.float32)
    (w13_q, w13_s), (w2_q, w2_s) = quantize_weights_fp8_block(w13), quantize_weights_fp8_block(w2)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, act_dtype)
    out = fused_experts(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
    ref = fused_experts_reference(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
    assert out.dtype == act_dtype
    tol = 1e-4 if act_dtype == torch.float32 and not ON_GPU else 3e-2
    assert rel_err(out, ref) < tol
    # and close to the unquantised layer (what FP8 costs in accuracy)
    assert rel_err(out, fused_experts_reference(x, w13.to(act_dtype), w2.to(act_dtype), weights, ids)) < 0.1


# ---------------------------------------------------------------------------- bad inputs

def _valid():
    w13, w2 = make_layer(4, 32, 16, torch.bfloat16)
    x, weights, ids = make_tokens(5, 32, 4, 2, torch.bfloat16)
    return dict(hidden_states=x, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids)


@pytest.mark.parametrize("change,error,message", [
    (lambda a: a.update(w13=a["w13"].float()), TypeError, "must match hidden_states"),
    (lambda a: a.update(hidden_states=a["hidden_states"].to(torch.int32)), TypeError, "hidden_states dtype"),
    (lambda a: a.update(topk_weights=a["topk_weights"].bfloat16()), TypeError, "topk_weights must be float32"),
    (lambda a: a.update(topk_ids=a["topk_ids"].float()), TypeError, "topk_ids must be int32 or int64"),
    (lambda a: a.update(w2=a["w2"][:, :16].contiguous()), ValueError, r"w2 must be \[E, H, I\]"),
    (lambda a: a.update(w13=a["w13"][:, :, :16].contiguous()), ValueError, "w13 hidden size 16"),
    (lambda a: a.update(w13=a["w13"][:, :31].contiguous()), ValueError, "odd dim 1 = 31"),
    (lambda a: a.update(hidden_states=a["hidden_states"].t().contiguous().t()), ValueError, "contiguous"),
    (lambda a: a.update(topk_ids=a["topk_ids"][:4]), ValueError, r"\[T=5, K\]"),
    (lambda a: a.update(topk_ids=torch.zeros(5, 5, dtype=torch.int32, device=DEVICE),
                        topk_weights=torch.zeros(5, 5, device=DEVICE)), ValueError, "top_k=5"),
    (lambda a: a["topk_ids"].__setitem__((2, 1), 7), ValueError, "topk_ids contains 7"),
    (lambda a: a["topk_ids"].__setitem__((0, 0), -1), ValueError, "topk_ids contains -1"),
    (lambda a: a.update(w13_scale=torch.ones(4, 1, 1, device=DEVICE)), ValueError, "only for"),
])
def test_bad_inputs_raise(change, error, message, monkeypatch):
    monkeypatch.setattr(fused_moe, "CHECK_IDS_ON_GPU", True)
    args = _valid()
    change(args)
    with pytest.raises(error, match=message):
        fused_experts(**args)


def test_fp8_needs_scales():
    args = _valid()
    w13_q, w13_s = quantize_weights_fp8_block(args["w13"])
    w2_q, _ = quantize_weights_fp8_block(args["w2"])
    with pytest.raises(ValueError, match="need w2_scale"):
        fused_experts(args["hidden_states"], w13_q, w2_q, args["topk_weights"], args["topk_ids"],
                      w13_scale=w13_s)
    with pytest.raises(TypeError, match="both must be"):
        fused_experts(args["hidden_states"], w13_q, args["w2"], args["topk_weights"], args["topk_ids"],
                      w13_scale=w13_s)
