"""Correctness of the Triton MoE kernels against their plain-torch references.

Without CUDA the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` before Triton is imported) on tiny shapes; with CUDA the same tests run natively
on the GPU.

Tolerances, as max|out - ref| / max|ref| (the reference is fp32 math):
- fp32: 1e-4 in the interpreter (exact fp32 dots), 1e-2 on GPU (tl.dot uses TF32).
- fp16/bf16: 1e-2 / 2e-2: inputs are exact, the K-slot outputs are rounded once to the
  activation dtype before they are summed (bf16 has an 8-bit mantissa, 2^-8 = 3.9e-3).
- FP8: against the dequantised-weight reference that applies the same 1x128 activation
  quantisation; fp32 output 1e-4 in the interpreter, otherwise 3e-2 (bf16 output rounding, and
  on GPU a different accumulation order can flip an activation's e4m3 rounding).
- grouped_mm backend (bf16): 2e-2, as bf16 above; torch._grouped_mm has a CPU fallback, so the
  Triton permutation/SiLU/combine kernels around it run in the interpreter here.
- FP8-rowwise: torch._scaled_grouped_mm is CUDA-only; on CPU the test swaps in an fp32 loop
  over experts with the same contract, so everything of ours around the GEMMs is still checked
  (3e-2: the GEMM outputs are bf16 before the SiLU and its row quantisation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from zeroprefill.kernels import (GROUPED_MM, TRITON, TRITON_GROUPED_MM, MoEConfig, GemmConfig, dequantize_fp8_block,
                                 dequantize_fp8_rowwise, fused_experts, fused_experts_reference,
                                 moe_align_block_size, quantize_tokens_fp8_group,
                                 quantize_weights_fp8_block, quantize_weights_fp8_rowwise)
from zeroprefill.common.asyncep_moe import select_experts
from zeroprefill.kernels import align, checks, fused_moe, grouped_mm_moe
from zeroprefill.kernels.quant import quantize_tokens_fp8_group_reference

ON_GPU = torch.cuda.is_available()

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
    weights, ids = select_experts(logits, top_k, renormalize=True)  # the router AsyncEP serves with
    return x, weights.contiguous(), ids.contiguous()


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
    # the grouped_mm view of the same layout: segment ends and the inverse permutation
    ends = al.expert_ends.cpu().tolist()
    assert ends[-1] == used and all(e % block_m == 0 for e in ends)
    starts = [0] + ends[:-1]
    for expert in range(num_experts):
        assert ends[expert] - starts[expert] == -(-len(expected.get(expert, [])) // block_m) * block_m
    positions = al.position_of_row.cpu().tolist()
    assert [sorted_ids[p] for p in positions] == list(range(num_rows))


def test_moe_align_skips_negative_ids():
    """Rows with id -1 get no padded position, no block, and positions past the padded order."""
    ids = torch.tensor([[0, -1], [-1, 2], [2, 0], [-1, -1]], dtype=torch.int32, device=DEVICE)
    al = moe_align_block_size(ids, 3, 4)
    placed = [r for r, e in enumerate(ids.flatten().tolist()) if e >= 0]
    positions = al.position_of_row.cpu().tolist()
    assert sorted(r for r, p in enumerate(positions) if p < al.max_padded_rows) == placed
    sorted_ids = al.sorted_row_ids.cpu().tolist()
    assert sorted(r for r in sorted_ids if r != ids.numel()) == placed
    assert al.rows_per_expert.cpu().tolist() == [2, 0, 2]
    assert int(al.num_padded_rows) == 8  # experts 0 and 2, one block of 4 each


# ---------------------------------------------------------------------------- FP8 quantisers

def test_quantize_tokens_matches_reference():
    x = torch.randn(9, 200, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 3
    q, scale = quantize_tokens_fp8_group(x)
    ref_q, ref_scale = quantize_tokens_fp8_group_reference(x)
    torch.testing.assert_close(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_quantize_weights_rowwise():
    w = torch.randn(3, 20, 300, generator=torch.Generator().manual_seed(5))
    w[1, 7] = 0.0  # an all-zero channel quantises to zeros, no division by zero
    q, scale = quantize_weights_fp8_rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 20) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, w.abs().amax(-1).div(448.0).clamp_min(1e-10))
    assert q.float().abs().amax(-1)[0].eq(448.0).all()  # each channel's max maps to e4m3's max
    back = dequantize_fp8_rowwise(q, scale)
    assert back[1, 7].eq(0).all() and rel_err(back, w) < 2 ** -4


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


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp8"])
def test_weight_tiles_through_tma_equal_pointer_loads(kind):
    """Both GEMMs with TMA weight tiles give what their pointer loads give, an uneven K included
    (the descriptor zero-fills past it, as the masked loads do), and each GEMM launched
    persistent what it gives one tile a program; interpreter or sm90."""
    if ON_GPU and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm90")
    num_tokens, num_experts, top_k, hidden, inter = (21, 4, 2, 160, 128) if kind == "fp8" else (21, 4, 2, 80, 64)
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    w13, w2 = make_layer(num_experts, hidden, inter, torch.float32 if kind == "fp8" else dtype)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, dtype)
    scales = {}
    if kind == "fp8":  # K = 160 (GEMM 1) is not a whole number of 128-wide steps
        (w13, w13_scale), (w2, w2_scale) = quantize_weights_fp8_block(w13), quantize_weights_fp8_block(w2)
        scales = dict(w13_scale=w13_scale, w2_scale=w2_scale)
        gemm1, gemm2 = GemmConfig(16, 128, 128, 2, 4, 2), GemmConfig(16, 32, 128, 2, 4, 2)
    else:  # block_k 32: K = 80 (GEMM 1) is not a whole number of steps
        gemm1, gemm2 = GemmConfig(16, 32, 32, 2, 4, 2), GemmConfig(16, 16, 32, 2, 4, 2)
    x_in, x_scale = quantize_tokens_fp8_group(x) if kind == "fp8" else (x, None)
    alignment = moe_align_block_size(ids, num_experts, 16)
    used = alignment.sorted_row_ids[:alignment.max_padded_rows] < alignment.num_rows
    tma1, tma2 = replace(gemm1, weight_tma=True), replace(gemm2, weight_tma=True)
    gemm1_tiles = fused_moe.weight_tiles(w13, inter, tma1) if kind == "fp8" else fused_moe.gate_up_tiles(w13, tma1)
    assert gemm1_tiles is not None and fused_moe.weight_tiles(w2, hidden, tma2) is not None
    # bf16 and FP8 products are exact in fp32, so their sums agree bit for bit; fp32 products are
    # rounded, and the interpreter's matmul (numpy) may sum a transposed tile in another order
    def assert_same(ptr_out: torch.Tensor, tma_out: torch.Tensor) -> None:
        if kind == "fp32":
            torch.testing.assert_close(ptr_out, tma_out, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(ptr_out, tma_out)

    acts = [fused_moe.run_gemm1(x_in, x_scale, w13, scales.get("w13_scale"), alignment, cfg)
            for cfg in (gemm1, tma1, replace(gemm1, persistent=True), replace(tma1, persistent=True))]
    for other in acts[1:]:
        for ptr_out, other_out in zip(acts[0], other):  # act (and its scales in FP8)
            if ptr_out is not None:
                assert_same(ptr_out[used], other_out[used])
    slots = [fused_moe.run_gemm2(*acts[0], w2, scales.get("w2_scale"), weights, alignment, cfg, x.dtype)
             for cfg in (gemm2, tma2, replace(gemm2, persistent=True), replace(tma2, persistent=True))]
    for other in slots[1:]:
        assert_same(slots[0], other)
    assert rel_err(fused_experts(x, w13, w2, weights, ids, config=MoEConfig(tma1, tma2), **scales),
                   fused_experts_reference(x, w13, w2, weights, ids, **scales)) < (3e-2 if kind == "fp8" else TOLERANCE[dtype])


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels compile in every other test")
def test_gemm_kernels_compile_for_sm90(tmp_path):
    """``benchmarks/kernel_resources.py`` compiles both GEMMs for sm90 without a GPU (Triton's bundled
    ptxas, in a process outside the interpreter), every shipped tile in bf16 and FP8, the weight
    tiles in TMA copies (``cp.async.bulk.tensor``) exactly when the tile asks for them: a kernel
    only the interpreter has run must not first fail to compile on an H100."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    done = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["gemm"], r["dtype"], r["loads"]) for r in rows} == {
        (gemm, dtype, loads) for gemm in ("gemm1", "gemm2") for dtype in ("bf16", "fp8") for loads in ("ptr", "tma")}
    for row in rows:
        assert (row["tma_copies"] > 0) == (row["loads"] == "tma") and row["wgmma"] > 0 and row["registers"] <= 255
    # bf16 GEMM 1's pair tile keeps one [block_m, 2*block_n] accumulator: no shipped bf16 tile may spill.
    # A persistent tile ships through TMA; by pointer loads (the fallback) it may spill.
    assert [row for row in rows if row["dtype"] == "bf16" and row["spill_bytes"]
            and not (row["tile"].endswith("persistent") and row["loads"] == "ptr")] == []


def test_persistent_grid_fills_each_sm_as_far_as_the_compiled_kernel_allows(monkeypatch):
    """A persistent launch runs one program per SM until the kernel's resources are known (its
    first launch), then as many as an SM holds: H100 numbers, FP8 GEMM 2's 64x128 tile (80 KiB,
    217 registers, 4 warps) holds two; the bf16 128x256 one (176 KiB, 240 registers) one."""
    from types import SimpleNamespace

    h100 = dict(sm_registers=65536, sm_shared_bytes=233472, sm_threads=2048)
    assert fused_moe.programs_per_sm(217, 80 * 1024, 4, **h100) == 2
    assert fused_moe.programs_per_sm(162, 72 * 1024, 4, **h100) == 3   # the same tile, one a program
    assert fused_moe.programs_per_sm(240, 176 * 1024, 8, **h100) == 1
    assert fused_moe.programs_per_sm(32, 0, 1, **h100) == 32            # the resident-block limit, no shared memory
    assert fused_moe.programs_per_sm(255, 300 * 1024, 8, **h100) == 1   # never fewer than one

    grids = []

    class Kernel:  # a launched Triton kernel returns what it compiled
        def __getitem__(self, grid):
            def launch(*args, **meta):
                grids.append(grid)
                return SimpleNamespace(n_regs=217, metadata=SimpleNamespace(shared=80 * 1024, num_warps=4))
            return launch

    monkeypatch.setattr(fused_moe, "_persistent_programs_per_sm", {})
    monkeypatch.setattr(fused_moe, "_resident_programs", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
        max_threads_per_multi_processor=2048, warp_size=32))
    kernel, on_gpu = Kernel(), SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    for num_tiles in (10_000, 10_000, 200):
        fused_moe._launch(kernel, num_tiles, True, (on_gpu,), {"BLOCK_M": 64})
    fused_moe._launch(kernel, 10_000, False, (on_gpu,), {"BLOCK_M": 64})
    fused_moe._launch(kernel, 10_000, True, (on_gpu,), {"BLOCK_M": 128})  # another specialisation: unknown
    assert grids == [(132,), (264,), (200,), (10_000,), (132,)]

    class Opaque(Kernel):  # a Triton that does not say what it compiled: one program per SM
        def __getitem__(self, grid):
            return lambda *args, **meta: grids.append(grid)

    grids.clear()
    opaque = Opaque()
    for _ in range(2):
        fused_moe._launch(opaque, 10_000, True, (on_gpu,), {"BLOCK_M": 32})
    assert grids == [(132,), (132,)]


def test_weight_tiles_fall_back_to_pointer_loads_where_tma_cannot_read_them():
    w13, w2 = make_layer(4, 48, 40, torch.float32)  # I = 40: GEMM 1's second block_n=32 box ends past I
    x, weights, ids = make_tokens(9, 48, 4, 2, torch.float32)
    odd_tile = GemmConfig(16, 32, 32, 2, 4, 2, weight_tma=True)  # block_n 32 does not divide H = 48
    assert fused_moe.weight_tiles(w2, 48, odd_tile) is None
    assert fused_moe._tma_reason(w2, odd_tile, 48) == "block_n=32 does not divide 48: a tile would cross into the next rows"
    strided = w13.transpose(1, 2).contiguous().transpose(1, 2)
    assert fused_moe._tma_reason(strided, GemmConfig(16, 16, 32)) == "the weights are not contiguous"
    assert fused_moe.gate_up_tiles(strided, odd_tile) is None
    ref = fused_experts_reference(x, w13, w2, weights, ids)
    config = MoEConfig(odd_tile, odd_tile)  # GEMM 1 through TMA (its boxes may end past I), GEMM 2 not
    assert fused_moe.gate_up_tiles(w13, odd_tile) is not None
    assert rel_err(fused_experts(x, w13, w2, weights, ids, config=config), ref) < TOLERANCE[torch.float32]


SPLIT_CONFIGS = {  # how the split-experts test runs each backend
    "triton": dict(config=None),
    "grouped_mm": dict(config=MoEConfig(backend=GROUPED_MM)),
    "triton_grouped_mm": dict(config=MoEConfig(GemmConfig(16, 32, 32), backend=TRITON_GROUPED_MM)),
}


@pytest.mark.parametrize("backend", list(SPLIT_CONFIGS))
def test_experts_in_two_tensors_with_skipped_slots(backend):
    """A layer whose experts live in two tensors = two calls, each skipping the other's experts
    (id -1) and adding into one output: the resident-shard + gather-buffer split of AsyncEP."""
    num_tokens, num_experts, top_k, hidden, inter, first = 17, 6, 3, 64, 48, 2
    w13, w2 = make_layer(num_experts, hidden, inter, torch.bfloat16)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, torch.bfloat16)
    ids[3] = torch.tensor([4, 5, 3])  # a token with no expert in the first tensor
    ids[5] = torch.tensor([0, 1, 0])[:top_k]  # ... and one with none in the second
    in_first = ids < first
    ids_first = torch.where(in_first, ids, -1)
    ids_second = torch.where(in_first, -1, ids - first)
    config = SPLIT_CONFIGS[backend]["config"]
    out = fused_experts(x, w13[:first].contiguous(), w2[:first].contiguous(), weights, ids_first, config=config)
    assert out[3].abs().max() == 0  # its slots were all skipped
    returned = fused_experts(x, w13[first:].contiguous(), w2[first:].contiguous(), weights, ids_second,
                             config=config, add_to=out)
    assert returned is out
    assert rel_err(out, fused_experts_reference(x, w13, w2, weights, ids)) < TOLERANCE[torch.bfloat16]


def test_fp8_experts_with_skipped_slots():
    num_tokens, num_experts, top_k, hidden, inter = 9, 4, 2, 128, 128
    w13, w2 = make_layer(num_experts, hidden, inter, torch.float32)
    (w13_q, w13_s), (w2_q, w2_s) = quantize_weights_fp8_block(w13), quantize_weights_fp8_block(w2)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, torch.float32)
    kept = torch.where(ids % 2 == 0, ids, -1)
    out = fused_experts(x, w13_q, w2_q, weights, kept, w13_scale=w13_s, w2_scale=w2_s)
    ref = fused_experts_reference(x, w13_q, w2_q, weights, kept, w13_scale=w13_s, w2_scale=w2_s)
    assert rel_err(out, ref) < (1e-4 if not ON_GPU else 3e-2)


def _scaled_grouped_gemm_fp32(a, a_scale, w, w_scale, offs, fast_accum=False):
    """torch._scaled_grouped_mm's contract, as an fp32 loop over expert segments (CPU stand-in)."""
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.bfloat16, device=a.device)
    start = 0
    for expert, end in enumerate(offs.tolist()):
        w_f = dequantize_fp8_rowwise(w[expert], w_scale[expert])
        out[start:end] = ((a[start:end].float() * a_scale[start:end, None]) @ w_f.T).bfloat16()
        start = end
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_mm_backend_bf16(case):
    num_tokens, num_experts, top_k, hidden, inter = CASES[case]
    w13, w2 = make_layer(num_experts, hidden, inter, torch.bfloat16)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, torch.bfloat16)
    out = fused_experts(x, w13, w2, weights, ids, config=MoEConfig(backend=GROUPED_MM))
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, hidden)
    assert rel_err(out, fused_experts_reference(x, w13, w2, weights, ids)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("case", list(CASES))
def test_triton_then_grouped_mm_backend_bf16(case):
    """Our first GEMM (gather and SiLU*mul fused) into torch's second: the same layer."""
    num_tokens, num_experts, top_k, hidden, inter = CASES[case]
    w13, w2 = make_layer(num_experts, hidden, inter, torch.bfloat16)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, torch.bfloat16)
    config = MoEConfig(GemmConfig(16, 32, 32), backend=TRITON_GROUPED_MM)
    out = fused_experts(x, w13, w2, weights, ids, config=config)
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, hidden)
    assert rel_err(out, fused_experts_reference(x, w13, w2, weights, ids)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter",
                         [(9, 4, 2, 160, 96), (21, 5, 3, 64, 48)])
def test_fused_experts_fp8_rowwise(num_tokens, num_experts, top_k, hidden, inter, monkeypatch):
    if not ON_GPU:
        monkeypatch.setattr(grouped_mm_moe, "scaled_grouped_gemm", _scaled_grouped_gemm_fp32)
    w13, w2 = make_layer(num_experts, hidden, inter, torch.float32)
    (w13_q, w13_s), (w2_q, w2_s) = quantize_weights_fp8_rowwise(w13), quantize_weights_fp8_rowwise(w2)
    x, weights, ids = make_tokens(num_tokens, hidden, num_experts, top_k, torch.bfloat16)
    out = fused_experts(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
    ref = fused_experts_reference(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 3e-2
    # vLLM's channel-wise layout [E, N, 1] is the same format
    out_3d = fused_experts(x, w13_q, w2_q, weights, ids, w13_scale=w13_s[..., None], w2_scale=w2_s[..., None])
    assert torch.equal(out_3d, out)
    # operand buffers with spare rows past the last expert (the large-tile allocation) change nothing
    monkeypatch.setattr(grouped_mm_moe, "FP8_SMALL_TILE_MAX_ROWS_PER_EXPERT", 0)
    monkeypatch.setattr(grouped_mm_moe, "FP8_LARGE_TILE_ROWS_PER_EXPERT", 64)
    assert torch.equal(fused_experts(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s), out)
    assert rel_err(out, fused_experts_reference(x, w13.bfloat16(), w2.bfloat16(), weights, ids)) < 0.1


def test_backend_config_validation():
    with pytest.raises(ValueError, match="not one of"):
        MoEConfig(backend="cublas")
    with pytest.raises(ValueError, match="takes no Triton tile configs"):
        MoEConfig(GemmConfig(16, 32, 32), GemmConfig(16, 32, 32), backend=GROUPED_MM)
    with pytest.raises(ValueError, match="needs both gemm1 and gemm2"):
        MoEConfig(GemmConfig(16, 32, 32))
    with pytest.raises(ValueError, match="first GEMM's tile config only"):
        MoEConfig(GemmConfig(16, 32, 32), GemmConfig(16, 32, 32), backend=TRITON_GROUPED_MM)
    with pytest.raises(ValueError, match="first GEMM's tile config only"):
        MoEConfig(backend=TRITON_GROUPED_MM)
    for persistent in (MoEConfig(GemmConfig(16, 32, 32), GemmConfig(16, 32, 32, persistent=True)),
                       MoEConfig(GemmConfig(16, 32, 32, persistent=True), GemmConfig(16, 32, 32))):
        assert MoEConfig.from_json(persistent.to_json()) == persistent
    grouped = MoEConfig(backend=GROUPED_MM)
    assert MoEConfig.from_json(grouped.to_json()) == grouped
    hybrid = MoEConfig(GemmConfig(64, 128, 64), backend=TRITON_GROUPED_MM)
    assert MoEConfig.from_json(hybrid.to_json()) == hybrid and hybrid.block_m == 64
    tiles = MoEConfig(GemmConfig(16, 32, 32), GemmConfig(16, 64, 32))
    assert MoEConfig.from_json(tiles.to_json()) == tiles


def test_grouped_mm_backend_rejects_what_it_cannot_run():
    w13, w2 = make_layer(4, 32, 16, torch.float16)
    x, weights, ids = make_tokens(5, 32, 4, 2, torch.float16)
    with pytest.raises(ValueError, match="runs bf16"):
        fused_experts(x, w13, w2, weights, ids, config=MoEConfig(backend=GROUPED_MM))
    w13, w2 = make_layer(4, 36, 16, torch.bfloat16)
    x, weights, ids = make_tokens(5, 36, 4, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="divisible by 8, got H=36"):
        fused_experts(x, w13, w2, weights, ids, config=MoEConfig(backend=GROUPED_MM))
    with pytest.raises(ValueError, match="divisible by 8, got H=36"):
        fused_experts(x, w13, w2, weights, ids, config=MoEConfig(GemmConfig(16, 32, 32), backend=TRITON_GROUPED_MM))
    (w13_q, w13_s), (w2_q, w2_s) = quantize_weights_fp8_rowwise(w13), quantize_weights_fp8_rowwise(w2)
    with pytest.raises(ValueError, match="divisible by 16, got H=36"):
        fused_experts(x, w13_q, w2_q, weights, ids, w13_scale=w13_s, w2_scale=w2_s)


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
    (lambda a: a.update(topk_ids=torch.zeros(5, 0, dtype=torch.int32, device=DEVICE),
                        topk_weights=torch.zeros(5, 0, device=DEVICE)), ValueError, "top_k=0"),
    (lambda a: a["topk_ids"].__setitem__((2, 1), 7), ValueError, "topk_ids contains 7"),
    (lambda a: a["topk_ids"].__setitem__((0, 0), -2), ValueError, "topk_ids contains -2"),
    (lambda a: a.update(add_to=torch.zeros(5, 31, dtype=torch.bfloat16, device=DEVICE)), ValueError, "add_to must be"),
    (lambda a: a.update(w13_scale=torch.ones(4, 1, 1, device=DEVICE)), ValueError, "only for"),
])
def test_bad_inputs_raise(change, error, message, monkeypatch):
    monkeypatch.setattr(checks, "CHECK_IDS_ON_GPU", True)
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
    w2_q_row, w2_s_row = quantize_weights_fp8_rowwise(args["w2"])
    with pytest.raises(ValueError, match="w13_scale is block but w2_scale is rowwise"):
        fused_experts(args["hidden_states"], w13_q, w2_q_row, args["topk_weights"], args["topk_ids"],
                      w13_scale=w13_s, w2_scale=w2_s_row)
    with pytest.raises(ValueError, match=r"w2_scale has shape \(4, 7\)"):
        fused_experts(args["hidden_states"], w13_q, w2_q_row, args["topk_weights"], args["topk_ids"],
                      w13_scale=w13_s, w2_scale=torch.ones(4, 7, device=DEVICE))


def test_precompile_runs_every_power_of_two_up_to_the_budget():
    w13, w2 = make_layer(4, 32, 16, torch.float32)
    assert fused_moe.precompile_experts(w13, w2, 2, 20, activation_dtype=torch.float32) == [1, 2, 4, 8, 16]


# ---------------------------------------------------------------------------- alignment kernels

ALIGN_CASES = {  # name: (T, K, E, block_m, fraction of skipped slots)
    "one_row": (1, 1, 1, 1, 0.0),
    "odd_block": (33, 4, 5, 3, 0.3),
    "grouped_mm": (100, 8, 16, 16, 0.1),
    "bins_past_128": (70, 3, 130, 16, 0.05),
    "deepgemm_block": (64, 2, 3, 128, 0.0),
    "qwen3_experts": (40, 8, 128, 128, 0.05),
    "all_skipped": (9, 2, 4, 4, 1.0),
}


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", list(ALIGN_CASES))
def test_moe_align_triton_equals_torch(case, ids_dtype, monkeypatch):
    """The three Triton kernels give the torch definition's tensors exactly: over many small
    chunks scanned in several tiles, over larger chunks with a small padding tile, and at the
    defaults."""
    num_tokens, top_k, num_experts, block_m, skip = ALIGN_CASES[case]
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen)
    ids[torch.rand(num_tokens, top_k, generator=gen) < skip] = -1
    ids = ids.to(ids_dtype).to(DEVICE)
    ref = align.moe_align_block_size_torch(ids, num_experts, block_m)
    for rows_per_program, tile_elements, scan_tile in ((16, 64, 16), (64, 16, 16),
                                                       (align.ROWS_PER_PROGRAM, align.TILE_ELEMENTS, align.SCAN_TILE)):
        monkeypatch.setattr(align, "ROWS_PER_PROGRAM", rows_per_program)
        monkeypatch.setattr(align, "TILE_ELEMENTS", tile_elements)
        monkeypatch.setattr(align, "SCAN_TILE", scan_tile)
        out = align.moe_align_block_size_triton(ids, num_experts, block_m)
        for field in ("sorted_row_ids", "block_expert_ids", "num_padded_rows", "expert_ends", "position_of_row",
                      "rows_per_expert"):
            got, want = getattr(out, field), getattr(ref, field)
            assert got.dtype == want.dtype and torch.equal(got, want), field
        assert (out.num_rows, out.block_m) == (ref.num_rows, ref.block_m)
    # stable: each expert's rows in ascending order, then its padding
    sorted_ids, ends = ref.sorted_row_ids.cpu().tolist(), ref.expert_ends.cpu().tolist()
    for expert, rows in enumerate(align.moe_align_block_size_reference(ids, num_experts, block_m)):
        start = ends[expert - 1] if expert else 0
        assert sorted_ids[start:ends[expert]] == rows + [ids.numel()] * (ends[expert] - start - len(rows))


def test_moe_align_default_is_triton(monkeypatch):
    """On CUDA, and on CPU in the interpreter, the default is the Triton pair; zero rows take torch."""
    calls = []
    triton_align = align.moe_align_block_size_triton
    monkeypatch.setattr(align, "moe_align_block_size_triton", lambda *a: calls.append(a) or triton_align(*a))
    ids = torch.tensor([[1, 0]], dtype=torch.int32, device=DEVICE)
    assert moe_align_block_size(ids, 2, 4).expert_ends.cpu().tolist() == [4, 8]
    assert len(calls) == 1
    empty = moe_align_block_size(ids[:0], 2, 4)
    assert len(calls) == 1 and empty.max_padded_rows == 0 and empty.expert_ends.cpu().tolist() == [0, 0]


@pytest.mark.skipif(ON_GPU, reason="the benchmark's answer on a machine without CUDA")
@pytest.mark.parametrize("name,args", [("moe_align", []), ("moe_gemm_tma", []),
                                       ("gemm_before_after", ["--before", "kernels/fused_moe.py"]),
                                       ("layer_timing_modes", [])])
def test_kernel_benchmarks_say_they_need_a_gpu(name, args):
    """The kernel benchmarks without CUDA: one line saying so, exit 2, no traceback."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=root)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"{name}: error: needs a CUDA GPU (the kernels' correctness "
                                                    "runs on CPU in tests/test_kernels.py)")


def test_gemm_before_after_loads_an_earlier_module_beside_todays():
    """``benchmarks/gemm_before_after.py --before FILE`` imports FILE inside today's package, so
    an earlier ``fused_moe.py``'s relative imports resolve; here today's file against itself,
    both GEMMs, with pointer loads and (GEMM 2's activation rows too) through TMA."""
    from benchmarks import gemm_before_after as bench

    before = bench.load_before(Path(fused_moe.__file__))
    assert before is not fused_moe and before.__name__ == "zeroprefill.kernels._gemm_before"
    w13, w2 = make_layer(4, 64, 32, torch.bfloat16)
    x, weights, ids = make_tokens(9, 64, 4, 2, torch.bfloat16)
    alignment = moe_align_block_size(ids, 4, 16)
    used = alignment.sorted_row_ids[:alignment.max_padded_rows] < alignment.num_rows  # padding rows hold anything
    for tile in (GemmConfig(16, 16, 32, 2, 4, 2), GemmConfig(16, 16, 32, 2, 4, 2, weight_tma=True)):
        act, _ = fused_moe.run_gemm1(x, None, w13, None, alignment, tile)
        assert torch.equal(before.run_gemm1(x, None, w13, None, alignment, tile)[0][used], act[used])
        assert torch.equal(before.run_gemm2(act, None, w2, None, weights, alignment, tile, x.dtype),
                           fused_moe.run_gemm2(act, None, w2, None, weights, alignment, tile, x.dtype))


def test_gemm_before_after_adopts_the_tile_whose_slowest_speedup_is_largest_past_the_margin():
    from benchmarks import gemm_before_after as bench

    def tile(group_m: int, weight_tma: bool = True) -> dict:
        return {"block_m": 128, "block_n": 128, "block_k": 64, "group_m": group_m, "num_warps": 8, "num_stages": 4,
                "weight_tma": weight_tma}

    def entry(group_m: int) -> dict:
        return {"gemm1": tile(group_m), "gemm2": tile(8, weight_tma=False)}

    def point(tokens: int, shipped_ms: float, best: str = "128x128x64 g8 w8 s4 tma", best_ms: float = 1.0,
              **gemm) -> dict:  # no "gemm" key: a point of gemm1_before_after.py, GEMM 1's
        shipped = "128x128x64 g8 w8 s4 ptr" if gemm else "128x128x64 g32 w8 s4 tma"
        return {"shape": "qwen3-235b-a22b", "dtype": "bf16", "tokens": tokens, "best_after": [best, best_ms],
                "ms": {f"after {shipped}": shipped_ms, f"after {best}": best_ms}, **gemm}

    configs = {"bf16_E128_H4096_I1536": {"4096": entry(32), "16384": entry(32), "131072": entry(32)}}
    changes = bench.adopt_best_tiles(configs, [
        point(4096, 1.10),                       # 10% faster: switched
        point(16384, 1.04),                      # 4%: within the margin
        point(65536, 1.20), point(131072, 1.20, best="128x128x64 g16 w8 s4 tma"),  # one entry, two bests
        point(16384, 1.08, gemm="gemm2"),        # GEMM 2 through TMA, 8% faster: switched, GEMM 1 left alone
        point(4096, 1.10, best="64x128x64 g8 w4 s4 tma", gemm="gemm2"),  # not GEMM 1's block_m: not a candidate
        point(131072, 1.10, best="128x128x64 g8 w8 s4 tma persistent", gemm="gemm2"),  # launched persistent
    ])
    table = configs["bf16_E128_H4096_I1536"]
    assert table["4096"]["gemm1"]["group_m"] == 8
    assert [table[e]["gemm1"]["group_m"] for e in ("16384", "131072")] == [32, 32]
    assert table["16384"]["gemm2"] == tile(8) and table["4096"]["gemm2"] == tile(8, weight_tma=False)
    assert changes[0] == "bf16_E128_H4096_I1536 4096 gemm1: 128x128x64 g8 w8 s4 tma (1.100x the entry's tile)"
    assert changes[3] == "bf16_E128_H4096_I1536 16384 gemm2: 128x128x64 g8 w8 s4 tma (1.080x the entry's tile)"
    assert changes[4] == ("bf16_E128_H4096_I1536 4096 gemm2: kept (best 128x128x64 g8 w8 s4 ptr, "
                          "1.000x the entry's tile)")
    assert table["131072"]["gemm2"] == dict(tile(8), persistent=True)
    assert changes[5] == ("bf16_E128_H4096_I1536 131072 gemm2: 128x128x64 g8 w8 s4 tma persistent "
                          "(1.100x the entry's tile)")
    assert all("kept" in change for change in changes[1:3]) and len(changes) == 6
    assert changes[2] == "bf16_E128_H4096_I1536 131072 gemm1: kept (best 128x128x64 g32 w8 s4 tma, 1.000x the entry's tile)"

    # Several runs: each tile by its slowest speedup. Two persistent tiles trade places as the fastest,
    # both well past the margin: the one whose slowest speedup is larger wins. A tile far ahead in one
    # run and behind the entry's in the other does not.
    def run(s3_ms: float, s4_ms: float, lucky_ms: float) -> dict:
        return {"shape": "qwen3-235b-a22b", "dtype": "bf16", "tokens": 4096, "gemm": "gemm1",
                "ms": {"after 128x128x64 g8 w8 s4 tma": 1.0, "after 128x128x64 g8 w8 s3 tma persistent": s3_ms,
                       "after 128x128x64 g8 w8 s4 tma persistent": s4_ms, "after 64x128x64 g8 w4 s4 tma": lucky_ms}}

    configs = {"bf16_E128_H4096_I1536": {"4096": {"gemm1": tile(8)}}}
    changes = bench.adopt_best_tiles(configs, [run(0.85, 0.88, 0.70), run(0.91, 0.87, 1.10)])
    assert configs["bf16_E128_H4096_I1536"]["4096"]["gemm1"] == dict(tile(8), persistent=True)
    assert changes == ["bf16_E128_H4096_I1536 4096 gemm1: 128x128x64 g8 w8 s4 tma persistent (1.136x the entry's tile)"]
    untimed = run(0.5, 0.5, 0.5)
    del untimed["ms"]["after 128x128x64 g8 w8 s4 tma persistent"]  # now the entry's tile
    assert bench.adopt_best_tiles(configs, [untimed]) == [
        "bf16_E128_H4096_I1536 4096 gemm1: kept (the entry's tile was not timed at every point)"]
    assert bench.tile_of("64x128x128 g8 w4 s3 ptr") == GemmConfig(64, 128, 128, 8, 4, 3, False)
    persistent = GemmConfig(128, 128, 64, 8, 8, 4, True, persistent=True)
    assert bench.tile_of(bench.tile_label(persistent)) == persistent


def test_gemm_before_after_same_tile_spread():
    """The noise of a run: before's time over after's for every tile both sides timed, per GEMM."""
    from benchmarks import gemm_before_after as bench

    points = [{"gemm": "gemm2", "ms": {"before a": 1.1, "after a": 1.0, "before b": 0.9, "after b": 1.0,
                                        "after b persistent": 0.5}},
              {"ms": {"before a": 2.0, "after a": 2.0}}]  # no "gemm": a gemm1_before_after.py point
    assert bench.same_tile_spread(points) == {"gemm1": [1.0, 1.0, 1.0, 1], "gemm2": [0.9, 1.0, 1.1, 2]}


def test_gemm_before_after_write_table_refuses_a_file_it_did_not_write(tmp_path):
    root = Path(__file__).resolve().parents[1]
    other = tmp_path / "moe_kernels.json"
    other.write_text(json.dumps({"points": [], "meta": {"command": "python benchmarks/moe_kernels.py"}}))
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gemm_before_after.py"), "--write-table",
                           "--from-results", str(other)], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not a results file of this script (KeyError: 'device')" in done.stderr
    runs = []
    for arch in ("sm90", "sm100"):  # two runs must have measured the same table
        runs.append(tmp_path / f"{arch}.json")
        runs[-1].write_text(json.dumps({"points": [], "meta": {"device": "GPU", "arch": arch}}))
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gemm_before_after.py"), "--write-table",
                           "--from-results", *map(str, runs)], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "the results measured different tables (['sm100', 'sm90'])" in done.stderr


def test_gemm_before_after_write_table_names_itself_in_the_tables_note_once(tmp_path, monkeypatch):
    from benchmarks import gemm_before_after as bench

    note = "written by moe_kernels.py; benchmarks/gemm_before_after.py --write-table (first as gemm1_before_after.py)"
    (tmp_path / "sm90.json").write_text(json.dumps({"note": note, "configs": {}}))
    (tmp_path / "sm80.json").write_text(json.dumps({"note": "written by moe_kernels.py", "configs": {}}))
    monkeypatch.setattr(bench, "CONFIG_DIR", tmp_path)
    for _ in range(2):
        bench.write_table("sm90", [])
        bench.write_table("sm80", [])
    assert json.loads((tmp_path / "sm90.json").read_text())["note"] == note
    assert json.loads((tmp_path / "sm80.json").read_text())["note"].count("gemm_before_after.py --write-table") == 1


# ---------------------------------------------------------------------------- benchmark summary arithmetic

def test_moe_kernels_backend_choice_by_graph_time_with_a_margin():
    from benchmarks import moe_kernels as bench

    def point(shipped: str, graph: dict) -> dict:
        return {"bf16_backend": shipped, "ms": {"bf16_gmm_ours": 10.0, "bf16_triton": 9.0, "bf16_triton_gmm": 11.0},
                "ms_graph": graph}

    # eager says Triton; the graph-replayed times, what a serving engine runs, decide
    assert bench.choose_bf16_backend(point(TRITON, {"bf16_gmm_ours": 9.0, "bf16_triton": 10.0,
                                                    "bf16_triton_gmm": 9.9})) == GROUPED_MM
    # 4% faster than the shipped choice is within the margin: the shipped one stays
    assert bench.choose_bf16_backend(point(TRITON, {"bf16_gmm_ours": 9.6, "bf16_triton": 10.0,
                                                    "bf16_triton_gmm": 10.5})) == TRITON
    assert bench.choose_bf16_backend(point(TRITON, {"bf16_gmm_ours": 9.6, "bf16_triton": 10.0}), margin=0.03) == GROUPED_MM
    # no graph time for a side: its eager time stands in; the shipped backend not measured: the fastest
    assert bench.choose_bf16_backend(point("none", {"bf16_gmm_ours": 9.5})) == TRITON
    assert bench.choose_bf16_backend({"bf16_backend": TRITON, "ms": {"fp8": 1.0}, "ms_graph": {}}) is None
    # timed in turns with the others: those times decide, where every measured side has one
    in_turns = point(TRITON, {"bf16_gmm_ours": 9.0, "bf16_triton": 10.0, "bf16_triton_gmm": 9.9})
    in_turns["layer_vs_gemm_pair_same_clock"] = {"ms": {"layer": 9.5, "gemm_pair": 8.5, "bf16_gmm_ours": 9.8,
                                                        "bf16_triton": 9.5, "bf16_triton_gmm": 9.6}}
    assert bench.choose_bf16_backend(in_turns) == TRITON
    del in_turns["layer_vs_gemm_pair_same_clock"]["ms"]["bf16_triton_gmm"]  # one side not in turns: one by one
    assert bench.choose_bf16_backend(in_turns) == GROUPED_MM


def test_moe_kernels_benchmark_summary_arithmetic():
    from benchmarks import moe_kernels as bench

    # scatter 2*(2+4)*4 + 4*4 = 64, SiLU*mul 2*4*3*3 = 72, combine 2*(4+2)*4 + 8*4 = 80
    assert bench.unfused_glue_bytes(2, 2, 4, 3) == 216
    glue_bytes = bench.unfused_glue_bytes(16384, 8, 4096, 1536)
    assert glue_bytes == 3 * 2 * 16384 * 9 * 4096 + 12 * 16384 * 8  # Qwen3-235B: three 1.2 GB passes
    bandwidth = glue_bytes / 1e9 / 1e-3  # GB/s at which the glue takes exactly 1 ms

    def point(tokens: int, backend: str, gemm_kernels_ms: dict | None = None,
              fp8_kernel: str = "DeepGEMM (deep_gemm 2.5.0), block FP8 on m_indices rows") -> dict:
        p = {"shape": "qwen3-235b-a22b", "tokens": tokens, "flops": 1e12, "bf16_backend": backend,
             "ms": {"bf16_gmm_ours": 10.0, "bf16_triton": 12.5, "bf16_triton_gmm": 9.8, "grouped_mm": 12.0,
                    "fp8": 8.0},
             "ms_graph": {"bf16_gmm_ours": 9.5, "bf16_triton_gmm": 9.4, "fp8_selected": 5.0},
             "gemm_kernels_ms": gemm_kernels_ms or {"bf16_gmm_ours": 9.0, "bf16_triton": 11.0,
                                                    "bf16_triton_gmm": 9.2, "fp8_selected": 3.5},
             "fp8_selected_kernel": fp8_kernel}
        bench.add_ratios(p, bandwidth, 4096, 1536, 8)
        return p

    gmm = point(16384, GROUPED_MM)
    assert gmm["ms"]["bf16"] == 10.0 and gmm["ms_graph"]["bf16"] == 9.5 and gmm["tflops"]["bf16"] == 100.0
    assert gmm["bf16_vs_grouped_mm"] == 1.2 and gmm["fp8_vs_bf16"] == 1.25 and gmm["fp8_rowwise_vs_bf16"] is None
    assert gmm["fp8_selected_vs_bf16"] == 1.9  # graph times: 9.5 / 5.0
    assert gmm["layer_vs_gemm_only"] == 0.947 and gmm["layer_vs_gemm_only_eager"] == 0.9
    assert gmm["unfused_glue_min_ms"] == 1.0 and gmm["unfused_glue_bound_layer_vs_gemm_only"] == 0.9  # 9 / (9 + 1)
    # FP8: DeepGEMM's GEMMs (3.5 ms) + the glue's bytes with 1-byte operands and a scale per 128.
    fp8_glue_ms = bench.unfused_glue_bytes(16384, 8, 4096, 1536, bench.BLOCK_FP8_OPERAND_BYTES) / glue_bytes
    assert gmm["fp8_unfused_glue_bound_vs_bf16"] == round(9.5 / (3.5 + fp8_glue_ms), 3)
    # Our Triton FP8 GEMMs hold glue in them: no bound from them.
    assert point(16384, GROUPED_MM, fp8_kernel="ours (Triton)")["fp8_unfused_glue_bound_vs_bf16"] is None
    # The GEMMs alone are CUTLASS's (9 ms, no glue in them), whichever backend ships: the shipped
    # Triton layer (no graph time of it here) eager 9 / 12.5; the Triton-then-CUTLASS one 9 / 9.4,
    # not its own GEMM kernels' 9.2 (its first GEMM holds the gather and SiLU*mul).
    triton_point = point(8192, "triton")
    assert triton_point["layer_vs_gemm_only"] is None and triton_point["layer_vs_gemm_only_eager"] == 0.72
    hybrid = point(16384, "triton_grouped_mm")
    assert hybrid["ms_graph"]["bf16"] == 9.4 and hybrid["layer_vs_gemm_only"] == 0.957
    # Without the grouped_mm side, the shipped side's own GEMM kernels stand in.
    assert point(8192, "triton", {"bf16_triton": 11.0})["layer_vs_gemm_only_eager"] == 0.88
    small = point(4096, GROUPED_MM)
    small["layer_vs_gemm_only_eager"] = 0.1  # below 8K tokens: not in the summary
    assert "layer_vs_gemm_pair_same_clock_min_8k_plus" not in bench.summarize([small, gmm], {}, bandwidth)
    for p, ratio in ((small, 0.5), (gmm, 0.93), (hybrid, 0.91)):  # timed in turns where measured
        p["layer_vs_gemm_pair_same_clock"] = {"ratio": ratio, "range": [ratio - 0.01, ratio + 0.01]}
    summary = bench.summarize([small, gmm, triton_point, hybrid], {}, bandwidth)
    assert summary["layer_vs_gemm_pair_same_clock_min_8k_plus"] == 0.91
    assert summary["layer_vs_gemm_only_min_8k_plus"] == 0.947
    assert summary["layer_vs_gemm_only_eager_min_8k_plus"] == 0.72
    assert summary["fp8_selected_vs_bf16_min_8k_plus"] == 1.88  # the hybrid point: 9.4 / 5.0
    assert summary["unfused_glue_bound_layer_vs_gemm_only"] == 0.9
    assert summary["fp8_unfused_glue_bound_vs_bf16_min_8k_plus"] == min(
        p["fp8_unfused_glue_bound_vs_bf16"] for p in (gmm, triton_point, hybrid) if p["fp8_unfused_glue_bound_vs_bf16"])
    assert summary["fp8_rowwise_vs_bf16_min_8k_plus"] is None
    assert summary["hbm_copy_bandwidth_gb_s"] == round(bandwidth)
    assert bench.split_list(["qwen3-235b-a22b,qwen3-30b-a3b", "8192"]) == ["qwen3-235b-a22b", "qwen3-30b-a3b", "8192"]


def test_moe_kernels_fp8_unfused_glue_bound(tmp_path):
    """At the profiled token count: the bf16 layer's time over the FP8 side's GEMM kernels plus
    the bytes its glue moves with 1-byte operands and a 4-byte scale per 128; ``--resummarize``
    adds it to a file measured before the key existed."""
    from benchmarks import moe_kernels as bench

    rows, hidden, inter = 16384 * 8, 4096, 1536
    fp8_bytes = bench.unfused_glue_bytes(16384, 8, hidden, inter, bench.BLOCK_FP8_OPERAND_BYTES)
    assert bench.unfused_glue_bytes(16384, 8, hidden, inter) - fp8_bytes == (2 - 1 - 4 / 128) * rows * (hidden + inter)
    bandwidth = fp8_bytes / 1e9 / 1e-3  # the FP8 glue takes exactly 1 ms
    point = {"shape": "qwen3-235b-a22b", "tokens": 16384, "ms_graph": {"bf16": 9.5, "fp8_selected": 5.6}}
    profiles = {"qwen3-235b-a22b": {"tokens": 16384, "fp8_selected": {
        "void deep_gemm::sm90_fp8_gemm_1d2d_impl<(cute::UMMA::Major)0, 0u, 3072u, 4096u": 2.5,
        "void deep_gemm::sm90_fp8_gemm_1d2d_impl<(cute::UMMA::Major)0, 0u, 4096u, 1536u": 1.5,
        "_silu_mul_kernel": 0.3}}}
    summary = bench.summarize([point], profiles, bandwidth)
    assert summary["gemm_kernels_only_ms_qwen3-235b-a22b_16384"] == {"fp8_selected": 4.0}
    assert summary["fp8_unfused_glue_bound_vs_bf16_qwen3-235b-a22b_16384"] == 1.9  # 9.5 / (4.0 + 1.0)
    results = tmp_path / "moe_kernels.json"
    results.write_text(json.dumps({"summary": {"hbm_copy_bandwidth_gb_s": bandwidth}, "points": [point],
                                   "profile_ms_per_call": profiles, "meta": {"device": "H100"}}))
    assert bench.resummarize(results)["fp8_unfused_glue_bound_vs_bf16_qwen3-235b-a22b_16384"] == 1.9
    rewritten = json.loads(results.read_text())
    assert rewritten["points"] == [point] and rewritten["meta"]["device"] == "H100"
    assert rewritten["meta"]["resummarized"] == "python benchmarks/moe_kernels.py --resummarize moe_kernels.json"


def test_the_committed_h100_summary_is_what_resummarize_computes(tmp_path):
    """``moe_kernels-h100.json``'s summary follows from its own points and profiles."""
    from benchmarks import moe_kernels as bench

    committed = Path(bench.__file__).resolve().parent / "results" / "moe_kernels-h100.json"
    copy = tmp_path / committed.name
    copy.write_text(committed.read_text())
    assert bench.resummarize(copy) == json.loads(committed.read_text())["summary"]


def test_moe_kernels_profile_drift_sets_a_sides_two_profiles_side_by_side():
    """``--profile-drift``: a side's GEMM kernels at its point against the later profile of the
    same token count (glue kernels left out); sides or shapes profiled once are skipped."""
    from benchmarks import moe_kernels as bench

    results = {"points": [{"shape": "qwen3-30b-a3b", "tokens": 16384,
                           "gemm_kernels_ms": {"bf16_triton": 2.2, "bf16_gmm_ours": 2.0}}],
               "profile_ms_per_call": {
                   "qwen3-30b-a3b": {"tokens": 16384,
                                     "bf16_triton": {"_gemm1_gate_up_silu_kernel": 1.3, "_gemm2_down_scatter_kernel": 0.7,
                                                     "_sum_slots_kernel": 0.2},
                                     "bf16_triton_gmm": {"_gemm1_gate_up_silu_kernel": 1.4}},
                   "qwen3-235b-a22b": {"tokens": 16384, "bf16_triton": {"_gemm1_gate_up_silu_kernel": 5.0}}}}
    assert bench.profile_drift(results) == [{"shape": "qwen3-30b-a3b", "tokens": 16384, "side": "bf16_triton",
                                             "first_ms": 2.2, "second_ms": 2.0, "first_over_second": 1.1}]


@pytest.fixture
def drifting_gpu(monkeypatch):
    """A stand-in GPU clock for ``_moe_timing``'s timing in turns: ``work(name, units)`` is a
    call that takes ``units`` of time, each call 1% slower than the one before (a clock sinking
    under its power limit); ``order`` lists the calls made."""
    from benchmarks import _moe_timing as timing

    clock = {"now": 0.0, "slowdown": 1.0}
    order: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool = False):
            self.at = None

        def record(self):
            self.at = clock["now"]

        def elapsed_time(self, end: "Event") -> float:
            return end.at - self.at

    def work(name: str, units: float):
        def call():
            order.append(name)
            clock["now"] += units * clock["slowdown"]
            clock["slowdown"] *= 1.01
        return call

    monkeypatch.setattr(timing.torch.cuda, "Event", Event)
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(timing, "l2_flush_buffer", lambda: timing.torch.empty(8, dtype=timing.torch.uint8))
    return timing, work, order


def test_calls_timed_in_turns_cancel_a_drifting_clock(drifting_gpu):
    """``same_clock_ms``: each round's times stay 2:1 for calls of 2 and 1 units of work, though
    the later rounds' times are longer, and the order of the turns alternates."""
    timing, work, order = drifting_gpu
    ms = timing.same_clock_ms({"double": work("double", 2.0), "single": work("single", 1.0)},
                              rounds=4, replays=3, graphs=False)
    assert [len(v) for v in ms.values()] == [4, 4] and ms["double"][3] > ms["double"][0] * 1.2
    assert all(1.9 < d / s < 2.1 for d, s in zip(ms["double"], ms["single"])), ms
    turns = order[2:]  # after one warm-up call of each
    assert turns[:6] == ["double"] * 3 + ["single"] * 3 and turns[6:12] == ["single"] * 3 + ["double"] * 3


def test_tile_candidates_timed_in_turns_skip_the_ones_that_cannot_run(drifting_gpu, capsys):
    """``medians_in_turns`` (the tuner's): a candidate that raises on its first run is left out
    with a line that says so; the others' medians keep their ratio under the drift."""
    timing, work, _ = drifting_gpu

    def too_big():
        raise RuntimeError("out of resources: shared memory")

    times = timing.medians_in_turns({"128x256": work("a", 3.0), "256x256": too_big, "64x128": work("b", 1.0)})
    assert set(times) == {"128x256", "64x128"} and 2.85 < times["128x256"] / times["64x128"] < 3.15
    assert "skip 256x256: RuntimeError" in capsys.readouterr().out


def test_the_gemm_pair_yardstick_runs_the_layers_own_two_gemms():
    """``_moe_timing.gemm_pair`` (what the layer is timed against): CUTLASS's GEMM 1 over the
    token rows sorted by expert and GEMM 2 over their SiLU*mul, each real row equal to that
    token's unweighted expert output."""
    from types import SimpleNamespace

    from benchmarks._moe_timing import gemm_pair
    from zeroprefill.kernels.align import moe_align_block_size as align
    from zeroprefill.kernels.grouped_mm_moe import ALIGN_M

    gen = torch.Generator(device=DEVICE).manual_seed(3)
    layer = SimpleNamespace(num_experts=4, top_k=2, hidden=32, inter=16)
    layer.w13 = (torch.randn(4, 32, 32, generator=gen, device=DEVICE) * 0.2).bfloat16()
    layer.w2 = (torch.randn(4, 32, 16, generator=gen, device=DEVICE) * 0.2).bfloat16()
    x = torch.randn(24, 32, generator=gen, device=DEVICE).bfloat16()
    topk_ids = torch.stack([torch.randperm(4, generator=gen, device=DEVICE)[:2] for _ in range(24)]).int()
    _, y = gemm_pair(layer, x, topk_ids)()
    alignment = align(topk_ids, 4, ALIGN_M)  # grouped_mm's row alignment: the positions gemm_pair used
    for row in range(48):
        token, expert = row // 2, topk_ids.view(-1)[row].item()
        gate_up = x[token].float() @ layer.w13[expert].float().T
        expected = (torch.nn.functional.silu(gate_up[:16]) * gate_up[16:]) @ layer.w2[expert].float().T
        got = y[alignment.position_of_row[row]].float()
        assert torch.allclose(got, expected, rtol=3e-2, atol=3e-2), (row, (got - expected).abs().max())
