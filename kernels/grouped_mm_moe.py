"""MoE experts on torch's grouped GEMMs (CUTLASS), with the permutation and combine in Triton.

    hidden_states [T, H]           topk_ids/topk_weights [T, K]
          |                                  |
          |     [moe_align_block_size] rows r = t*K+k sorted by expert, each expert padded to 16
          v                                  v
    [scatter_token_rows]  x[t] -> rows position_of_row[t*K+k], k < K  (one read of x per token;
                          FP8-rowwise: quantise the row to e4m3 + one scale first, once per token)
          v
    x_sorted [R, H]  --[torch._grouped_mm / _scaled_grouped_mm, offs = expert_ends]-->  gate_up [R, 2I]
          v
    [silu_mul]  act[p] = silu(gate_up[p, :I]) * gate_up[p, I:]   (FP8-rowwise: + row quantisation)
          v
    act [R, I]  --[torch._grouped_mm / _scaled_grouped_mm]-->  y [R, H]  (expert-sorted order)
          v
    [weighted_combine]  out[t] = sum_k topk_weights[t, k] * y[position_of_row[t*K+k]]  (fp32 sum)

Why this path exists: at large token counts the GEMMs dominate, and torch's CUTLASS grouped
GEMM kernels (TMA, warp-specialised, persistent) beat our Triton GEMMs; what torch lacks is a
cheap permutation, so the three bandwidth-bound steps around the GEMMs are ours: one read of
each token, no separate SiLU pass over a strided view, and the K-slot sum fused with the
un-permute and the routing weights. ``kernels/configs/<arch>.json`` says per token count
whether this path or the Triton one runs for bf16 (``backend: "grouped_mm"``).

FP8-rowwise (weights e4m3 with one float32 scale per output channel, ``w13_scale [E, 2I]``,
``w2_scale [E, H]``; activations quantised per row on the fly) is the format of FP8-dynamic
checkpoints and always takes this path, through ``torch._scaled_grouped_mm``. Block-scaled
checkpoints (128x128, Qwen3-FP8, DeepSeek-V3) take the Triton path of ``fused_moe.py``, or DeepGEMM.

The scatter and SiLU*mul kernels also quantise in 1x128 groups (``group_size=128``), with the
scales stored MN-major: that is the DeepGEMM path (``deepgemm.py``), which runs DeepGEMM's
grouped GEMMs between these same kernels.

Rows are padded to a multiple of ``ALIGN_M`` per expert (16: FP8 GEMMs want 16-byte aligned
groups; CUTLASS's row tiles are 64-128 rows, so the padding adds almost no work). Padding rows
of ``x_sorted`` and ``gate_up`` hold unspecified values (each GEMM output row depends on its
own input row only); SiLU*mul writes zeros there, and the combine reads real rows only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import ExpertAlignment
from .quant import FP8_DTYPE, ROUND_E4M3_IN_FP32, round_to_e4m3

ALIGN_M = 16
# torch's sm90 FP8 grouped GEMM (torch 2.11, ScaledGroupMM.cu) picks its CUTLASS tile from the
# average rows per group, M = a.shape[0] / groups: M <= 128 -> 64x128x128 ping-pong; M >= 2048
# (with N or K >= 2048) -> 128x128x128 (256x128x128 with fast accumulation); otherwise
# 128x256x64, which measured 1.5-2x slower on the Qwen3 shapes (H200: 16K tokens vs 32K). It
# never touches rows past offs[-1], so above the small-tile range the FP8 operand buffers get at
# least this many rows per expert: address space from the caching allocator, no extra work.
FP8_LARGE_TILE_ROWS_PER_EXPERT = 2048
FP8_SMALL_TILE_MAX_ROWS_PER_EXPERT = 128


@triton.jit
def _quantize_e4m3_groups(x, BLOCK: tl.constexpr, GROUP: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
    """``x [BLOCK]`` (fp32, zeros past the valid part) -> e4m3-grid values and one scale per GROUP.

    ``GROUP == BLOCK``: one scale for the whole row (FP8-rowwise); 128: 1x128 groups (block FP8).
    """
    groups = tl.reshape(x, (BLOCK // GROUP, GROUP))
    scale = tl.maximum(tl.max(tl.abs(groups), axis=1) / 448.0, 1e-10)
    groups = round_to_e4m3(tl.clamp(groups / scale[:, None], -448.0, 448.0), ROUND_IN_FP32)
    return tl.reshape(groups, (BLOCK,)), scale


@triton.jit
def _scatter_token_rows_kernel(
    x_ptr, out_ptr, out_scale_ptr, position_of_row_ptr, hidden, num_scales, num_positions, stride_x, stride_out,
    stride_scale_row, stride_scale_group,
    TOP_K: tl.constexpr, QUANTIZE: tl.constexpr, ROUND_IN_FP32: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Copy token t's row to its K sorted positions (FP8: quantised once, e4m3 + a scale per GROUP).

    A skipped row (position ``>= num_positions``) is not written."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden
    row = tl.load(x_ptr + token * stride_x + offs, mask=mask, other=0.0)
    if QUANTIZE:
        row, scale = _quantize_e4m3_groups(row.to(tl.float32), BLOCK_H, GROUP, ROUND_IN_FP32)
        offs_scale = tl.arange(0, BLOCK_H // GROUP)
    row = row.to(out_ptr.dtype.element_ty)
    for k in tl.static_range(TOP_K):
        position = tl.load(position_of_row_ptr + token * TOP_K + k).to(tl.int64)
        placed = position < num_positions  # as a bound (a scalar & a block mask fails in the interpreter)
        tl.store(out_ptr + position * stride_out + offs, row, mask=offs < tl.where(placed, hidden, 0))
        if QUANTIZE:
            tl.store(out_scale_ptr + position * stride_scale_row + offs_scale * stride_scale_group, scale,
                     mask=offs_scale < tl.where(placed, num_scales, 0))


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr, act_ptr, act_scale_ptr, sorted_row_ids_ptr, num_padded_rows_ptr, num_rows, inter, num_scales,
    stride_gate_up, stride_act, stride_scale_row, stride_scale_group,
    QUANTIZE: tl.constexpr, ROUND_IN_FP32: tl.constexpr, BLOCK_I: tl.constexpr, GROUP: tl.constexpr,
):
    """act[p] = silu(gate_up[p, :I]) * gate_up[p, I:] for the used rows; padding rows get zeros.

    FP8: each row is quantised to e4m3 with one scale per GROUP columns.
    """
    position = tl.program_id(0)
    if position >= tl.load(num_padded_rows_ptr):
        return
    is_row = tl.load(sorted_row_ids_ptr + position) < num_rows  # else padding: unspecified input
    position = position.to(tl.int64)
    offs = tl.arange(0, BLOCK_I)
    mask = offs < inter
    load_mask = offs < tl.where(is_row, inter, 0)
    gate = tl.load(gate_up_ptr + position * stride_gate_up + offs, mask=load_mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + position * stride_gate_up + inter + offs, mask=load_mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    if QUANTIZE:
        act, scale = _quantize_e4m3_groups(act, BLOCK_I, GROUP, ROUND_IN_FP32)
        offs_scale = tl.arange(0, BLOCK_I // GROUP)
        tl.store(act_scale_ptr + position * stride_scale_row + offs_scale * stride_scale_group, scale,
                 mask=offs_scale < num_scales)
    tl.store(act_ptr + position * stride_act + offs, act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_combine_kernel(
    y_ptr, out_ptr, topk_weights_ptr, position_of_row_ptr, hidden, num_positions, stride_y, stride_out,
    TOP_K: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] (+)= sum_k topk_weights[t, k] * y[position_of_row[t*K + k]], summed in fp32.

    Skipped rows (position ``>= num_positions``) add nothing; ``ACCUMULATE`` adds to ``out``."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        position = tl.load(position_of_row_ptr + token * TOP_K + k).to(tl.int64)
        weight = tl.load(topk_weights_ptr + token * TOP_K + k)
        used = offs < tl.where(position < num_positions, hidden, 0)  # skipped rows read nothing
        acc += weight * tl.load(y_ptr + position * stride_y + offs, mask=used, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + token * stride_out + offs
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fp8_scales(rows: int, cols: int, group_size: int | None,
               device: torch.device) -> tuple[torch.Tensor, int, int, int]:
    """Scale buffer for ``rows`` quantised rows of ``cols`` columns: ``(scales, count, stride_row, stride_group)``.

    ``group_size=None``: one scale per row, ``[rows]``. Otherwise ``[rows, ceil(cols/group_size)]``
    stored MN-major (the row index is contiguous) with the column stride padded to 16 bytes: the
    layout DeepGEMM's sm90 FP8 kernels read through TMA, which they take as is.
    """
    if group_size is None:
        return torch.empty(rows, dtype=torch.float32, device=device), 1, 1, 0
    count = triton.cdiv(cols, group_size)
    aligned_rows = triton.cdiv(rows, 4) * 4  # TMA: 16-byte aligned strides
    storage = torch.empty(count, aligned_rows, dtype=torch.float32, device=device)
    return storage.t()[:rows], count, 1, aligned_rows


def scatter_token_rows(x: torch.Tensor, alignment: ExpertAlignment, quantize: bool, rows: int,
                       group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [T, H]`` -> ``x_sorted [rows, H]`` (+ float32 scales if ``quantize``, see :func:`fp8_scales`).

    ``rows >= alignment.max_padded_rows``; rows that no token lands on are left unwritten.
    ``group_size`` (with ``quantize``): one scale per ``group_size`` columns instead of per row.
    """
    num_tokens, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=FP8_DTYPE if quantize else x.dtype, device=x.device)
    block_h = max(triton.next_power_of_2(hidden), group_size or 1)
    scale, num_scales, stride_row, stride_group = (fp8_scales(rows, hidden, group_size, x.device) if quantize
                                                   else (None, 0, 0, 0))
    _scatter_token_rows_kernel[(num_tokens,)](
        x, out, scale if quantize else out, alignment.position_of_row, hidden, num_scales,
        alignment.max_padded_rows, x.stride(0), out.stride(0), stride_row, stride_group,
        TOP_K=alignment.num_rows // num_tokens, QUANTIZE=quantize, ROUND_IN_FP32=ROUND_E4M3_IN_FP32,
        BLOCK_H=block_h, GROUP=group_size or block_h, num_warps=4 if hidden <= 4096 else 8,
    )
    return out, scale


def silu_mul(gate_up: torch.Tensor, alignment: ExpertAlignment, quantize: bool,
             group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``gate_up [R, 2I]`` -> ``act [R, I]`` (+ float32 scales if ``quantize``, see :func:`fp8_scales`).

    Only the first ``alignment.max_padded_rows`` rows are computed (R may be larger).
    ``group_size`` (with ``quantize``): one scale per ``group_size`` columns instead of per row.
    """
    rows, two_inter = gate_up.shape
    inter = two_inter // 2
    act = torch.empty(rows, inter, dtype=FP8_DTYPE if quantize else gate_up.dtype, device=gate_up.device)
    block_i = max(triton.next_power_of_2(inter), group_size or 1)
    scale, num_scales, stride_row, stride_group = (fp8_scales(rows, inter, group_size, gate_up.device)
                                                   if quantize else (None, 0, 0, 0))
    _silu_mul_kernel[(alignment.max_padded_rows,)](
        gate_up, act, scale if quantize else act, alignment.sorted_row_ids, alignment.num_padded_rows,
        alignment.num_rows, inter, num_scales, gate_up.stride(0), act.stride(0), stride_row, stride_group,
        QUANTIZE=quantize, ROUND_IN_FP32=ROUND_E4M3_IN_FP32, BLOCK_I=block_i, GROUP=group_size or block_i,
        num_warps=4,
    )
    return act, scale


def weighted_combine(y: torch.Tensor, topk_weights: torch.Tensor, alignment: ExpertAlignment,
                     out_dtype: torch.dtype, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``y [R, H]`` in sorted order -> ``out [T, H]``: each token's K rows, weighted, summed in fp32.

    Skipped rows add nothing. ``add_to`` (``[T, H]``, ``out_dtype``): the sum is added to it, in place.
    """
    num_tokens, top_k = topk_weights.shape
    hidden = y.shape[1]
    out = add_to if add_to is not None else torch.empty(num_tokens, hidden, dtype=out_dtype, device=y.device)
    block_h = min(triton.next_power_of_2(hidden), 4096)
    _weighted_combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, out, topk_weights, alignment.position_of_row, hidden, alignment.max_padded_rows,
        y.stride(0), out.stride(0), TOP_K=top_k, ACCUMULATE=add_to is not None, BLOCK_H=block_h, num_warps=4,
    )
    return out


def check_row_alignment(w2: torch.Tensor, operand_dtype: torch.dtype, what: str, instead: str) -> None:
    """torch's grouped GEMMs want 16-byte aligned row strides: H and I (``w2 [E, H, I]``) whole
    multiples of 16 bytes of ``operand_dtype``; a one-line ``ValueError`` naming ``what`` and
    what to do ``instead`` otherwise."""
    hidden, inter = w2.shape[1], w2.shape[2]
    multiple = 16 // operand_dtype.itemsize
    if hidden % multiple or inter % multiple:
        raise ValueError(f"{what} need hidden and intermediate sizes divisible by {multiple}, "
                         f"got H={hidden}, I={inter}; {instead}")


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a [R, K] . w[e]^T`` per expert segment (bf16): ``torch._grouped_mm``."""
    return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)


def scaled_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor,
                        w_scale: torch.Tensor, offs: torch.Tensor, fast_accum: bool = False) -> torch.Tensor:
    """``(a_scale[r] * a[r]) . (w_scale[e, n] * w[e, n])`` per expert segment (e4m3 in, bf16 out).

    ``fast_accum`` keeps the whole K loop in the tensor cores' FP8 accumulator (no periodic
    promotion to fp32): faster, less exact.
    """
    if a.device.type != "cuda":
        raise RuntimeError(f"FP8-rowwise experts need torch._scaled_grouped_mm on a CUDA GPU (sm90), "
                           f"got tensors on {a.device}; use bf16 or 128x128 block-scaled weights there")
    return torch._scaled_grouped_mm(a, w.transpose(1, 2), a_scale, w_scale, offs=offs,
                                    out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def grouped_mm_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       topk_weights: torch.Tensor, alignment: ExpertAlignment,
                       w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                       fast_accum: bool = False, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """The experts layer on torch's grouped GEMMs; bf16, or FP8-rowwise when scales are given.

    ``alignment`` must come from ``moe_align_block_size(topk_ids, E, ALIGN_M)``. FP8-rowwise
    scales are ``w13_scale [E, 2I]`` and ``w2_scale [E, H]`` (float32, per output channel);
    ``fast_accum`` is passed to ``torch._scaled_grouped_mm`` (off in ``fused_experts``).
    ``add_to``: the output is added to it in place (see :func:`weighted_combine`).
    """
    if alignment.block_m != ALIGN_M:
        raise ValueError(f"grouped_mm_experts needs rows aligned to {ALIGN_M}, got block_m={alignment.block_m}")
    rowwise = w13_scale is not None
    if rowwise:
        check_row_alignment(w2, FP8_DTYPE, "FP8-rowwise experts", "use 128x128 block-scaled weights")
    else:
        check_row_alignment(w2, hidden_states.dtype, "grouped_mm experts", "use the Triton backend for these weights")
    offs = alignment.expert_ends
    num_experts = w13.shape[0]
    rows = alignment.max_padded_rows
    if rowwise and rows > FP8_SMALL_TILE_MAX_ROWS_PER_EXPERT * num_experts:
        rows = max(rows, FP8_LARGE_TILE_ROWS_PER_EXPERT * num_experts)  # see FP8_LARGE_TILE_ROWS_PER_EXPERT
    x_sorted, x_scale = scatter_token_rows(hidden_states, alignment, quantize=rowwise, rows=rows)
    if rowwise:
        gate_up = scaled_grouped_gemm(x_sorted, x_scale, w13, w13_scale, offs, fast_accum)
    else:
        gate_up = grouped_gemm(x_sorted, w13, offs)
    del x_sorted, x_scale  # the peak is one GEMM's input and output, never three [rows, .] buffers
    act, act_scale = silu_mul(gate_up, alignment, quantize=rowwise)
    del gate_up
    if rowwise:
        y = scaled_grouped_gemm(act, act_scale, w2, w2_scale, offs, fast_accum)
    else:
        y = grouped_gemm(act, w2, offs)
    return weighted_combine(y, topk_weights, alignment, hidden_states.dtype, add_to)
