"""Fused MoE experts: two grouped Triton GEMMs over expert-sorted, block-padded rows.

    hidden_states [T, H]      topk_ids/topk_weights [T, K]
          |                          |
          |            [moe_align_block_size] rows r = t*K+k sorted by expert, padded to block_m
          |                          |
          +--(FP8: 1x128 group quant)--+
          v                          v
    [GEMM 1] gather x[r // K] . w13[e]^T -> gate and up of the same columns of I (one pair
             tile; FP8: two accumulators); epilogue: silu(gate) * up  (FP8: quantise to e4m3
             + 1x128 scale in registers)
          v
    act [padded rows, I]   (expert-sorted order, contiguous: GEMM 2 needs no gather)
          v
    [GEMM 2] act . w2[e]^T, times topk_weights[r], scattered to row r of [T*K, H]
          v
    [combine] sum over the K slots -> out [T, H]   (one bandwidth-bound pass, fp32 sums)

Each GEMM is one launch over ``max_padded_rows / block_m`` row blocks x the N tiles, with a
grouped-M swizzle so programs that run together share weight tiles in L2; a row block reads its
expert id from the alignment and returns at once if it lies past the used rows. Or, where the
tile config says ``persistent``, as many programs as the SMs hold walk the used tiles, a
program's next tile's first loads under its previous one's epilogue. The weight tiles come by
per-thread pointer loads or, where a tile config asks for it (``GemmConfig.weight_tma``) and
:func:`gate_up_tiles` / :func:`weight_tiles` can describe the weights (sm90, contiguous), as TMA
copies. GEMM 1 gathers its token rows by pointer loads (sm90's TMA has no row gather); GEMM 2's
activation rows are contiguous and come through TMA with its weight tiles
(:func:`activation_tiles`).

GEMM 1's *pair tile* (bf16, fp16, fp32): ``block_n`` gate rows of ``w13`` and the ``block_n``
up rows that go with them, interleaved (gate n, up n, gate n+1, ...), are one
``[2*block_n, block_k]`` weight tile and one dot into one ``[block_m, 2*block_n]``
accumulator; the epilogue splits the pairs, which a thread holds side by side. Through TMA,
the interleave is a 4-D view of ``w13`` (``[E, I, 2, H]`` by strides): no copy of the weights.
The two-dot form it replaced was up to 11% slower at the best tile of each, and nowhere more
than 1% faster (one H100, one H200: docs/kernels.md).
Block FP8 keeps the two dots: its rescale needs each K step's partial product beside the
accumulator, and at twice the width that spills.

FP8 path: e4m3 weights with 128x128 block scales, activations quantised per token and
128-wide group; every K step (``block_k == 128``, one scale group) rescales the fp32 partial
product by ``a_scale[row] * b_scale[block]`` before accumulating. Where a tile lies inside one
128-row weight block (gemm1 always for gate, for up when I % 128 == 0; gemm2 when
``block_n <= 128``) the weight scale is a scalar folded into the row scale, so the rescale is
one FMA per accumulator element.

Skipped rows: a ``topk_ids`` entry of ``-1`` means "that expert is not in these weights" (as
vLLM's expert maps mark other EP ranks' experts); the (token, slot) gets no GEMM row and adds
nothing. With ``add_to`` the layer's output is added to a given ``[T, H]`` tensor in place, so
experts held in two tensors (a rank's resident shard and a gather buffer of the others') are
one layer in two calls, each skipping the other's experts.

``fused_experts_reference`` is the plain-torch definition (a loop over experts, fp32 math).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .align import ExpertAlignment, moe_align_block_size
from .checks import check_add_to, check_inputs, fp8_scale_format
from .deepgemm import deepgemm_reason, deepgemm_source, disable_after_failure, fp8_layout_in_use, run_deepgemm_experts
from .grouped_mm_moe import ALIGN_M as GROUPED_MM_ALIGN_M
from .grouped_mm_moe import check_row_alignment, grouped_gemm, grouped_mm_experts, weighted_combine
from .moe_config import GROUPED_MM, TRITON, TRITON_GROUPED_MM, GemmConfig, MoEConfig, device_capability, get_config
from .quant import FP8_DTYPE, GROUP_SIZE, ROUND_E4M3_IN_FP32, dequantize_fp8_block, \
    dequantize_fp8_rowwise, quantize_tokens_fp8_group, quantize_weights_fp8_block, round_to_e4m3

try:  # host-side TMA descriptors: Triton 3.4+ (the one torch 2.8 ships)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Which experts kernel ``fused_experts`` runs when no ``config`` is given (read on every call).
EXPERTS_KERNEL_ENV = "ZEROPREFILL_EXPERTS_KERNEL"
AUTO, DEEPGEMM = "auto", "deepgemm"
EXPERTS_KERNELS = (AUTO, TRITON, DEEPGEMM)

logger = logging.getLogger(__name__)
_logged_choices: set[str] = set()


@triton.jit
def _swizzle_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M consecutive row blocks walk the N tiles together."""
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _gate_up_pair_tile(
    a_ptrs, row_ok, w_ptr, w_desc, expert, pid_n, inter, hidden, stride_we, stride_wn,
    EVEN_K: tl.constexpr, WEIGHT_TMA: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM 1's main loop in bf16/fp16/fp32: one dot per K step into a [BLOCK_M, 2*BLOCK_N] pair
    tile, column 2j gate row n_j, column 2j+1 up row I + n_j (n_j = pid_n*BLOCK_N + j); returns
    (gate, up), split from the pairs a thread holds side by side."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_pair = tl.arange(0, 2 * BLOCK_N)
    pair_n = pid_n * BLOCK_N + offs_pair // 2
    # columns past I read row 0; the epilogue discards them
    w_rows = tl.where(pair_n < inter, (offs_pair % 2) * inter + pair_n, 0)
    w_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < hidden - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if WEIGHT_TMA:  # w13 as [E, I, 2, H]: the box is the pair tile; past I and H, zeros
            b = w_desc.load([expert.to(tl.int32), pid_n * BLOCK_N, 0, k * BLOCK_K])
            b = b.reshape(2 * BLOCK_N, BLOCK_K).T
        elif EVEN_K:
            b = tl.load(w_ptrs)
        else:
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))


@triton.jit
def _gate_up_fp8(
    a_ptrs, a_scale_ptrs, row_ok, w_ptr, w_desc, w_scale_ptr, expert, pid_n, inter, hidden,
    stride_we, stride_wn, stride_wse, stride_wsn,
    UP_SCALE_UNIFORM: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM 1's main loop in block FP8 (BLOCK_N == BLOCK_K == 128): two dots per K step, gate and
    up, each rescaled by its row and weight-block scales before it is accumulated; returns
    (gate, up). Not a pair tile: the [BLOCK_M, 2*BLOCK_N] partial product a rescale needs beside
    its accumulator does not fit in registers (spills; 0.18-0.89x the two dots on one H100)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n_safe = tl.where(offs_n < inter, offs_n, 0)  # load valid memory, discard in the epilogue
    gate_ptrs = w_ptr + expert * stride_we + offs_n_safe[None, :] * stride_wn + offs_k[:, None]
    up_ptrs = gate_ptrs + inter * stride_wn
    gate_row = (expert * 2 * inter + pid_n * BLOCK_N).to(tl.int32)  # WEIGHT_TMA: rows of w13 as [E*2I, H]
    gate_scale_ptr = w_scale_ptr + expert * stride_wse + pid_n * stride_wsn  # the gate tile: one scale block
    if UP_SCALE_UNIFORM:  # I % 128 == 0: so is the up tile
        up_scale_ptrs = w_scale_ptr + expert * stride_wse + (pid_n + inter // 128) * stride_wsn
    else:
        up_scale_ptrs = w_scale_ptr + expert * stride_wse + ((offs_n_safe + inter) // 128) * stride_wsn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < hidden - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if WEIGHT_TMA:  # the descriptor zero-fills columns past H
            b_gate = w_desc.load([gate_row, k * BLOCK_K]).T
            b_up = w_desc.load([gate_row + inter, k * BLOCK_K]).T
        elif EVEN_K:
            b_gate = tl.load(gate_ptrs)
            b_up = tl.load(up_ptrs)
        else:
            b_gate = tl.load(gate_ptrs, mask=k_ok[:, None], other=0.0)
            b_up = tl.load(up_ptrs, mask=k_ok[:, None], other=0.0)
        # fold the weight scale into the per-row token scale: one FMA per accumulator element
        a_scale = tl.load(a_scale_ptrs + k)
        acc_gate += tl.dot(a, b_gate) * (a_scale * tl.load(gate_scale_ptr + k))[:, None]
        if UP_SCALE_UNIFORM:
            acc_up += tl.dot(a, b_up) * (a_scale * tl.load(up_scale_ptrs + k))[:, None]
        else:
            acc_up += tl.dot(a, b_up) * a_scale[:, None] * tl.load(up_scale_ptrs + k)[None, :]
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    return acc_gate, acc_up


@triton.jit
def _gate_up_silu_tile(
    pid_m, pid_n, x_ptr, x_scale_ptr, w_ptr, w_desc, w_scale_ptr, act_ptr, act_scale_ptr,
    sorted_row_ids_ptr, block_expert_ids_ptr, num_rows, inter, hidden, top_k,
    stride_x, stride_xs, stride_we, stride_wn, stride_wse, stride_wsn, stride_act, stride_acts,
    USE_FP8: tl.constexpr, UP_SCALE_UNIFORM: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_TMA: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM 1's tile (pid_m, pid_n), row block pid_m in use: gather, K loop, SiLU*mul epilogue."""
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_row_ids_ptr + offs_m)
    row_ok = rows < num_rows
    tokens = tl.where(row_ok, rows // top_k, 0).to(tl.int64)
    a_ptrs = x_ptr + tokens[:, None] * stride_x + tl.arange(0, BLOCK_K)[None, :]
    if USE_FP8:
        gate, up = _gate_up_fp8(a_ptrs, x_scale_ptr + tokens * stride_xs, row_ok, w_ptr, w_desc, w_scale_ptr,
                                expert, pid_n, inter, hidden, stride_we, stride_wn, stride_wse, stride_wsn,
                                UP_SCALE_UNIFORM, EVEN_K, WEIGHT_TMA, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        gate, up = _gate_up_pair_tile(a_ptrs, row_ok, w_ptr, w_desc, expert, pid_n, inter, hidden, stride_we,
                                      stride_wn, EVEN_K, WEIGHT_TMA, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K)

    act = gate / (1.0 + tl.exp(-gate)) * up
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < inter
    act = tl.where(col_ok[None, :], act, 0.0)
    act_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_n[None, :]
    if USE_FP8:  # BLOCK_N == 128: this tile is exactly one scale group per row
        act_scale = tl.maximum(tl.max(tl.abs(act), axis=1) / 448.0, 1e-10)
        act = round_to_e4m3(tl.clamp(act / act_scale[:, None], -448.0, 448.0), ROUND_IN_FP32)
        tl.store(act_scale_ptr + offs_m.to(tl.int64) * stride_acts + pid_n, act_scale)
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _gemm1_gate_up_silu_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_desc, w_scale_ptr, act_ptr, act_scale_ptr,
    sorted_row_ids_ptr, block_expert_ids_ptr, num_padded_rows_ptr,
    num_rows, inter, hidden, max_blocks_m, top_k,
    stride_x, stride_xs, stride_we, stride_wn, stride_wse, stride_wsn, stride_act, stride_acts,
    USE_FP8: tl.constexpr, UP_SCALE_UNIFORM: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr, DOT_IN_FP32: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """act[p, n] = silu(x[tok(p)] . w13[e, n]) * (x[tok(p)] . w13[e, I + n]) for padded row p.

    One tile a program, or (PERSISTENT) the programs walk the used tiles in strides of the
    grid, as GEMM 2's do.
    """
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    if PERSISTENT:
        used_blocks_m = tl.load(num_padded_rows_ptr) // BLOCK_M
        for tile in tl.range(tl.program_id(0), used_blocks_m * num_pid_n, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _swizzle_tile(tile, used_blocks_m, num_pid_n, GROUP_M)
            _gate_up_silu_tile(
                pid_m, pid_n, x_ptr, x_scale_ptr, w_ptr, w_desc, w_scale_ptr, act_ptr, act_scale_ptr,
                sorted_row_ids_ptr, block_expert_ids_ptr, num_rows, inter, hidden, top_k,
                stride_x, stride_xs, stride_we, stride_wn, stride_wse, stride_wsn, stride_act, stride_acts,
                USE_FP8, UP_SCALE_UNIFORM, EVEN_K, WEIGHT_TMA, DOT_IN_FP32, ROUND_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        pid_m, pid_n = _swizzle_tile(tl.program_id(0), max_blocks_m, num_pid_n, GROUP_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_rows_ptr):
            return
        _gate_up_silu_tile(
            pid_m, pid_n, x_ptr, x_scale_ptr, w_ptr, w_desc, w_scale_ptr, act_ptr, act_scale_ptr,
            sorted_row_ids_ptr, block_expert_ids_ptr, num_rows, inter, hidden, top_k,
            stride_x, stride_xs, stride_we, stride_wn, stride_wse, stride_wsn, stride_act, stride_acts,
            USE_FP8, UP_SCALE_UNIFORM, EVEN_K, WEIGHT_TMA, DOT_IN_FP32, ROUND_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _down_scatter_tile(
    pid_m, pid_n, act_ptr, act_desc, act_scale_ptr, w_ptr, w_desc, w_scale_ptr, out_ptr,
    topk_weights_ptr, sorted_row_ids_ptr, block_expert_ids_ptr, num_rows, hidden, inter,
    stride_act, stride_acts, stride_we, stride_wn, stride_wse, stride_wsn, stride_out,
    USE_FP8: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_TMA: tl.constexpr, ACT_TMA: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM 2's tile (pid_m, pid_n), row block pid_m in use: its K loop and its scattered store."""
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_row_ids_ptr + offs_m)
    row_ok = rows < num_rows

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hidden
    offs_n_safe = tl.where(col_ok, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n_safe[None, :] * stride_wn + offs_k[:, None]
    b_row = (expert * hidden + pid_n * BLOCK_N).to(tl.int32)  # WEIGHT_TMA: rows of w2 as [E*H, I]
    if USE_FP8:
        a_scale_ptrs = act_scale_ptr + offs_m.to(tl.int64) * stride_acts
        if BLOCK_N <= 128:  # the tile lies in one weight scale block
            b_scale_ptrs = w_scale_ptr + expert * stride_wse + (pid_n * BLOCK_N // 128) * stride_wsn
        else:
            b_scale_ptrs = w_scale_ptr + expert * stride_wse + (offs_n_safe // 128) * stride_wsn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        if not EVEN_K:
            k_ok = offs_k < inter - k * BLOCK_K
        if ACT_TMA:  # act rows are contiguous in expert-sorted order; columns past I read as zeros
            a = act_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if WEIGHT_TMA:  # the descriptor zero-fills columns past I
            b = w_desc.load([b_row, k * BLOCK_K]).T
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if USE_FP8:
            a_scale = tl.load(a_scale_ptrs + k)
            if BLOCK_N <= 128:
                acc += tl.dot(a, b) * (a_scale * tl.load(b_scale_ptrs + k))[:, None]
            else:
                acc += tl.dot(a, b) * a_scale[:, None] * tl.load(b_scale_ptrs + k)[None, :]
        elif DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    weight = tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemm2_down_scatter_kernel(
    act_ptr, act_desc, act_scale_ptr, w_ptr, w_desc, w_scale_ptr, out_ptr, topk_weights_ptr,
    sorted_row_ids_ptr, block_expert_ids_ptr, num_padded_rows_ptr,
    num_rows, hidden, inter, max_blocks_m,
    stride_act, stride_acts, stride_we, stride_wn, stride_wse, stride_wsn, stride_out,
    USE_FP8: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_TMA: tl.constexpr, ACT_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[r, n] = topk_weight[r] * (act[p] . w2[e, n]) for padded row p holding row r.

    One tile a program, or (PERSISTENT) the programs walk the used tiles in strides of the
    grid, the tile loop flattened into the K loop so that a tile's first loads overlap the
    previous tile's epilogue.
    """
    num_pid_n = tl.cdiv(hidden, BLOCK_N)
    if PERSISTENT:
        used_blocks_m = tl.load(num_padded_rows_ptr) // BLOCK_M
        for tile in tl.range(tl.program_id(0), used_blocks_m * num_pid_n, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _swizzle_tile(tile, used_blocks_m, num_pid_n, GROUP_M)
            _down_scatter_tile(
                pid_m, pid_n, act_ptr, act_desc, act_scale_ptr, w_ptr, w_desc, w_scale_ptr, out_ptr,
                topk_weights_ptr, sorted_row_ids_ptr, block_expert_ids_ptr, num_rows, hidden, inter,
                stride_act, stride_acts, stride_we, stride_wn, stride_wse, stride_wsn, stride_out,
                USE_FP8, EVEN_K, WEIGHT_TMA, ACT_TMA, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        pid_m, pid_n = _swizzle_tile(tl.program_id(0), max_blocks_m, num_pid_n, GROUP_M)
        if pid_m * BLOCK_M >= tl.load(num_padded_rows_ptr):
            return
        _down_scatter_tile(
            pid_m, pid_n, act_ptr, act_desc, act_scale_ptr, w_ptr, w_desc, w_scale_ptr, out_ptr,
            topk_weights_ptr, sorted_row_ids_ptr, block_expert_ids_ptr, num_rows, hidden, inter,
            stride_act, stride_acts, stride_we, stride_wn, stride_wse, stride_wsn, stride_out,
            USE_FP8, EVEN_K, WEIGHT_TMA, ACT_TMA, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K)


def fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                  w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  config: MoEConfig | None = None, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t,k] * (silu(x W1_e^T) * (x W3_e^T)) W2_e^T``, e = topk_ids[t,k].

    ``w13`` is ``[E, 2I, H]`` with gate rows ``[0, I)`` and up rows ``[I, 2I)``; ``w2`` is
    ``[E, H, I]``. bf16/fp16/fp32 weights must match ``hidden_states``; float8_e4m3fn weights
    need ``w13_scale``/``w2_scale``: 128x128 block scales run the Triton FP8 path, per-output-
    channel scales (``[E, 2I]``, ``[E, H]``) the FP8-rowwise path on ``torch._scaled_grouped_mm``
    (CUDA only). bf16 picks the Triton or the grouped_mm backend from the shipped table.

    ``ZEROPREFILL_EXPERTS_KERNEL`` (see :func:`experts_kernel_setting`) may send bf16 and
    block-FP8 layers to DeepGEMM instead (``deepgemm.py``). ``config`` runs ours with those
    tiles, whatever the variable says (tuning, benchmarks and tests only).

    A ``topk_ids`` entry of ``-1`` skips that (token, slot); ``add_to`` (``[T, H]``) receives the
    output added to it in place, and is returned.
    """
    fp8_format = check_inputs(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    check_add_to(add_to, hidden_states)
    if config is None and _runs_on_deepgemm(hidden_states, w13, fp8_format):
        try:
            return run_deepgemm_experts(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, add_to)
        except (RuntimeError, TypeError, ValueError) as exc:  # before our combine: add_to is untouched
            if experts_kernel_setting() == DEEPGEMM:
                raise
            logger.warning("zeroprefill.kernels: %s; MoE experts on ours from now on", disable_after_failure(exc))
    use_fp8 = fp8_format is not None
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    device = hidden_states.device
    if num_tokens == 0:
        return add_to if add_to is not None else torch.zeros(0, hidden, dtype=hidden_states.dtype, device=device)
    if fp8_format == "rowwise":  # one backend: torch._scaled_grouped_mm
        if config is not None and config.backend != GROUPED_MM:
            raise ValueError(f"FP8-rowwise weights run on backend='grouped_mm' only, got {config}")
        alignment = moe_align_block_size(topk_ids, num_experts, GROUPED_MM_ALIGN_M)
        return grouped_mm_experts(hidden_states, w13, w2, topk_weights, alignment,
                                  w13_scale.reshape(num_experts, two_inter),
                                  w2_scale.reshape(num_experts, hidden), add_to=add_to)
    is_bf16 = hidden_states.dtype == torch.bfloat16
    if config is None:
        config = get_config(num_tokens, top_k, num_experts, hidden, inter, use_fp8, device,
                            allow_grouped_mm=is_bf16 and not use_fp8)
    if config.backend == GROUPED_MM:
        if use_fp8 or not is_bf16:
            raise ValueError(f"backend='grouped_mm' runs bf16 weights and activations (or FP8-rowwise "
                             f"weights), got {hidden_states.dtype} activations, {w13.dtype} weights")
        alignment = moe_align_block_size(topk_ids, num_experts, GROUPED_MM_ALIGN_M)
        return grouped_mm_experts(hidden_states, w13, w2, topk_weights, alignment, add_to=add_to)
    if config.backend == TRITON_GROUPED_MM:
        if use_fp8 or not is_bf16:
            raise ValueError(f"backend='triton_grouped_mm' runs bf16 weights and activations, got "
                             f"{hidden_states.dtype} activations, {w13.dtype} weights")
        alignment = moe_align_block_size(topk_ids, num_experts, config.block_m)
        return triton_then_grouped_mm_experts(hidden_states, w13, w2, topk_weights, alignment, config.gemm1, add_to)
    if use_fp8 and (config.gemm1.block_n != GROUP_SIZE or config.gemm1.block_k != GROUP_SIZE
                    or config.gemm2.block_k != GROUP_SIZE):
        raise ValueError(f"FP8 needs gemm1 block_n=block_k=128 and gemm2 block_k=128, got {config}")

    alignment = moe_align_block_size(topk_ids, num_experts, config.block_m)
    return _grouped_experts(hidden_states, w13, w2, topk_weights, alignment, config,
                            w13_scale if use_fp8 else None, w2_scale if use_fp8 else None, add_to)


def precompile_experts(w13: torch.Tensor, w2: torch.Tensor, top_k: int, max_tokens: int, *,
                       w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                       activation_dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """Run :func:`fused_experts` once at every power-of-two token count up to ``max_tokens``.

    Each lookup of the shipped table (nearest tuned token count, in log space) or the heuristic
    (tiles by rows per expert) lands on a power of two's choice, so this compiles every Triton
    variant, and every DeepGEMM kernel, a serving process can select for this layer shape:
    at start-up, not in the middle of serving. Returns the token counts run.
    """
    device = w13.device
    hidden = w13.shape[2]
    generator = torch.Generator(device=device).manual_seed(0)
    counts = [1 << i for i in range(max(max_tokens, 1).bit_length()) if 1 << i <= max_tokens]
    for num_tokens in counts:
        x = torch.randn(num_tokens, hidden, generator=generator, device=device).to(activation_dtype)
        # top_k slots whatever the expert count (a shard may hold fewer): the kernels' TOP_K
        topk_ids = torch.randint(0, w13.shape[0], (num_tokens, top_k), generator=generator, device=device)
        topk_weights = torch.full((num_tokens, top_k), 1.0 / top_k, device=device)
        fused_experts(x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale)
    return counts


def experts_kernel_setting() -> str:
    """``ZEROPREFILL_EXPERTS_KERNEL``: ``auto`` (default), ``triton`` or ``deepgemm``.

    ``auto``: DeepGEMM for block-FP8 layers where it loads (sm90; the ``deep_gemm`` package, or
    the copy vLLM ships as ``vllm.third_party.deep_gemm``), takes the layer and runs it (a call
    that raises, e.g. an entry point of another signature, switches this process to ours, with a
    warning); ours for bf16, where DeepGEMM gained 1.00-1.16x over ours at 8K-32K tokens on one
    H200 (docs/kernels.md) but builds its kernels at first use, per batch-size bucket: minutes
    of start-up for a serving process that precompiles every size
    (bf16 activations; bf16 or 128x128 block-FP8 weights; H and I aligned), ours otherwise.
    ``triton``: ours always (Triton, or the grouped_mm backend the table picks).
    ``deepgemm``: DeepGEMM always; a layer it cannot take raises, with the reason.
    """
    value = os.environ.get(EXPERTS_KERNEL_ENV, AUTO).strip().lower() or AUTO
    if value not in EXPERTS_KERNELS:
        raise ValueError(f"{EXPERTS_KERNEL_ENV}={value!r} is not one of {', '.join(EXPERTS_KERNELS)}")
    return value


def experts_kernel_choice(activation_dtype: torch.dtype, w13: torch.Tensor, w2: torch.Tensor,
                          w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> str:
    """What :func:`fused_experts` runs for a layer of these weights, and why, in one line (for
    start-up logs: an engine states its kernel once, before serving)."""
    hidden_states = torch.empty(0, w13.shape[2], dtype=activation_dtype, device=w13.device)
    fp8_format = fp8_scale_format(w13, w2, w13_scale, w2_scale) if w13.dtype == FP8_DTYPE else None
    return _choose_backend(hidden_states, w13, fp8_format)[1]


def _choose_backend(hidden_states: torch.Tensor, w13: torch.Tensor, fp8_format: str | None) -> tuple[bool, str]:
    """``(runs on DeepGEMM, the choice in words)`` under ``ZEROPREFILL_EXPERTS_KERNEL``."""
    setting = experts_kernel_setting()
    if setting == TRITON:
        return False, f"ours ({EXPERTS_KERNEL_ENV}={TRITON})"
    if setting == AUTO and fp8_format is None:
        return False, f"ours: bf16 ({EXPERTS_KERNEL_ENV}={AUTO} takes DeepGEMM for block FP8 only; {DEEPGEMM} forces it)"
    reason = deepgemm_reason(hidden_states, w13, fp8_format)
    if reason is None:
        what = f"block FP8 on {fp8_layout_in_use()} rows" if fp8_format else "bf16"
        return True, f"DeepGEMM ({deepgemm_source()}), {what} ({EXPERTS_KERNEL_ENV}={setting})"
    if setting == DEEPGEMM:
        raise RuntimeError(f"{EXPERTS_KERNEL_ENV}={DEEPGEMM}, but DeepGEMM cannot run this MoE layer: {reason}")
    return False, f"ours, not DeepGEMM: {reason}"


def _runs_on_deepgemm(hidden_states: torch.Tensor, w13: torch.Tensor, fp8_format: str | None) -> bool:
    """Apply ``ZEROPREFILL_EXPERTS_KERNEL`` to this layer; logs each distinct choice once."""
    on_deepgemm, message = _choose_backend(hidden_states, w13, fp8_format)
    if message not in _logged_choices:
        _logged_choices.add(message)
        logger.info("zeroprefill.kernels: MoE experts on %s", message)
    return on_deepgemm


def triton_then_grouped_mm_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                                   topk_weights: torch.Tensor, alignment: ExpertAlignment, gemm1: GemmConfig,
                                   add_to: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 experts with the glue of both pipelines fused where it is cheapest.

    Our first GEMM reads each token's row where it lies (no scatter pass) and writes
    ``act = silu(gate) * up`` in expert-sorted order (no SiLU pass); torch's CUTLASS grouped
    GEMM then multiplies those rows by ``w2`` over the same padded segments (``offs`` are the
    alignment's ``expert_ends``: it reads no row past the last one), and the combine sums each
    token's K rows. Padding rows of ``act`` are never written; the rows of ``y`` they produce
    are never read. ``alignment`` must come from ``moe_align_block_size(topk_ids, E, gemm1.block_m)``.
    """
    if alignment.block_m != gemm1.block_m:
        raise ValueError(f"alignment.block_m={alignment.block_m} != gemm1.block_m={gemm1.block_m}")
    check_row_alignment(w2, hidden_states.dtype, "backend='triton_grouped_mm' experts",
                        "use the Triton backend for these weights")
    act, _ = run_gemm1(hidden_states, None, w13, None, alignment, gemm1)
    y = grouped_gemm(act, w2, alignment.expert_ends)
    del act
    return weighted_combine(y, topk_weights, alignment, hidden_states.dtype, add_to)


def _grouped_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, alignment: ExpertAlignment, config: MoEConfig,
                     w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None,
                     add_to: torch.Tensor | None) -> torch.Tensor:
    """Token quantisation (FP8), the two GEMM launches and the K-slot combine."""
    if w13_scale is not None:
        x, x_scale = quantize_tokens_fp8_group(hidden_states)
    else:
        x, x_scale = hidden_states, None
    act, act_scale = run_gemm1(x, x_scale, w13, w13_scale, alignment, config.gemm1)
    slots = run_gemm2(act, act_scale, w2, w2_scale, topk_weights, alignment, config.gemm2,
                      hidden_states.dtype)
    return sum_slots(slots, alignment, hidden_states.shape[0], add_to)


@triton.jit
def _sum_slots_kernel(
    slots_ptr, out_ptr, position_of_row_ptr, hidden, num_positions, stride_slots, stride_out,
    TOP_K: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] (+)= sum_k slots[t*K + k] over the slots that were computed (not skipped), in fp32."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        row = token * TOP_K + k
        used = offs < tl.where(tl.load(position_of_row_ptr + row) < num_positions, hidden, 0)
        acc += tl.load(slots_ptr + row * stride_slots + offs, mask=used, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + token * stride_out + offs
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_slots(slots: torch.Tensor, alignment: ExpertAlignment, num_tokens: int,
              add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``slots [T*K, H]`` (row t*K+k: token t's k-th weighted expert output) -> ``out [T, H]``.

    Rows the alignment skipped were never written and add nothing; ``add_to`` receives the sum.
    """
    hidden = slots.shape[1]
    out = add_to if add_to is not None else torch.empty(num_tokens, hidden, dtype=slots.dtype, device=slots.device)
    block_h = min(triton.next_power_of_2(hidden), 4096)
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        slots, out, alignment.position_of_row, hidden, alignment.max_padded_rows, slots.stride(0), out.stride(0),
        TOP_K=alignment.num_rows // num_tokens, ACCUMULATE=add_to is not None, BLOCK_H=block_h, num_warps=4,
    )
    return out


def _tma_reason(w: torch.Tensor, cfg: GemmConfig, rows_per_segment: int | None = None,
                what: str = "weights") -> str | None:
    """Why ``w [..., K]`` (the expert ``weights [E, N, K]``, or GEMM 2's activation rows) cannot
    be read in TMA tiles; ``None`` when it can. With ``rows_per_segment``, tiles of ``block_n``
    rows of ``w`` viewed as ``[E*N, K]`` must not straddle a segment's end."""
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no host-side tensor descriptors (3.4 or newer has)"
    if not INTERPRETING:
        if w.device.type != "cuda":
            return f"the {what} are on {w.device}, not a CUDA GPU"
        if device_capability(w.device.index) < (9, 0):
            return "TMA needs sm90 (H100/H200) or newer"
    if not w.is_contiguous():
        return f"the {what} are not contiguous"
    if w.data_ptr() % 16 or w.shape[-1] * w.element_size() % 16:
        return f"the rows of the {what} are not 16-byte aligned"
    if rows_per_segment is not None:
        if rows_per_segment % cfg.block_n:
            return f"block_n={cfg.block_n} does not divide {rows_per_segment}: a tile would cross into the next rows"
        if w.numel() // w.shape[-1] >= 2 ** 31:
            return "more than 2^31 weight rows (TMA coordinates are int32)"
    return None


def weight_tiles(w: torch.Tensor, rows_per_segment: int, cfg: GemmConfig) -> TensorDescriptor | None:
    """A TMA descriptor over the expert weights ``w [E, N, K]``, viewed as ``[E*N, K]``, in
    ``[block_n, block_k]`` tiles; ``None`` where TMA cannot read them (:func:`_tma_reason`).

    With it a GEMM loads each weight tile with one Tensor Memory Accelerator copy into shared
    memory, computed by the copy engine, instead of per-thread pointer loads whose addresses the
    warps compute: the same data, fewer instructions and registers in the main loop. Tiles start
    at ``e*N + n`` and must not straddle ``rows_per_segment`` (H for ``w2``; I for an FP8
    ``w13``, gate rows then up rows); columns past K read as zeros.
    """
    if _tma_reason(w, cfg, rows_per_segment) is not None:
        return None
    return TensorDescriptor.from_tensor(w.view(-1, w.shape[2]), [cfg.block_n, cfg.block_k])


def gate_up_tiles(w13: torch.Tensor, cfg: GemmConfig) -> TensorDescriptor | None:
    """GEMM 1's pair tiles through TMA: ``w13 [E, 2I, H]`` viewed, by strides alone, as
    ``[E, I, 2, H]`` (gate row n beside up row I + n), in ``[1, block_n, 2, block_k]`` boxes;
    ``None`` where TMA cannot read it (:func:`_tma_reason`). Rows past I and columns past H
    read as zeros, so any ``block_n`` and ``block_k`` will do."""
    if _tma_reason(w13, cfg) is not None:
        return None
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    return TensorDescriptor(w13, [num_experts, inter, 2, hidden], [two_inter * hidden, hidden, inter * hidden, 1],
                            [1, cfg.block_n, 2, cfg.block_k])


def activation_tiles(act: torch.Tensor, cfg: GemmConfig) -> TensorDescriptor | None:
    """GEMM 2's activation rows through TMA: ``act [padded rows, I]`` (GEMM 1's output, rows
    in expert-sorted order, contiguous) in ``[block_m, block_k]`` tiles; ``None`` where TMA
    cannot read it (:func:`_tma_reason`). Columns past I read as zeros."""
    if _tma_reason(act, cfg, what="activation rows") is not None:
        return None
    return TensorDescriptor.from_tensor(act, [cfg.block_m, cfg.block_k])


@functools.lru_cache(maxsize=None)
def _resident_programs(device: torch.device) -> int:
    """SMs a persistent launch spreads over: all of them (four off CUDA, in the interpreter, so
    that each program walks several tiles)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int, sm_registers: int,
                    sm_shared_bytes: int, sm_threads: int, warp_size: int = 32, sm_programs: int = 32) -> int:
    """How many programs of a compiled kernel one SM holds at once: its registers per thread,
    shared memory and threads against the SM's, and at most ``sm_programs`` (32 resident thread
    blocks on sm80-sm90); at least one."""
    threads = num_warps * warp_size
    fits = min(sm_registers // max(registers * threads, 1), sm_threads // threads, sm_programs)
    if shared_bytes:
        fits = min(fits, sm_shared_bytes // shared_bytes)
    return max(fits, 1)


# Programs per SM of each persistent kernel specialisation, read from its first launch.
_persistent_programs_per_sm: dict[tuple, int] = {}


def _launch(kernel: triton.runtime.JITFunction, num_tiles: int, persistent: bool, args: tuple, meta: dict) -> None:
    """``kernel`` over ``num_tiles`` tiles: one program a tile, or (``persistent``) as many programs
    as the GPU holds at once, each walking tiles in strides of the grid.

    How many an SM holds depends on the compiled kernel, known after its first launch (Triton
    returns it): that launch runs one program per SM, later ones fill each SM as far as the
    kernel's registers and shared memory allow, as Triton's fused-softmax tutorial sizes its grid.
    The result does not depend on the grid: every tile is one program's.
    """
    if not persistent:
        kernel[(num_tiles,)](*args, **meta)
        return
    device = args[0].device
    key = (kernel, device, args[0].dtype, *meta.values())  # a specialisation: dtype of the rows, constexprs
    per_sm = _persistent_programs_per_sm.get(key)
    compiled = kernel[(min(num_tiles, _resident_programs(device) * (per_sm or 1)),)](*args, **meta)
    if per_sm is None:
        _persistent_programs_per_sm[key] = _compiled_programs_per_sm(compiled, device)


def _compiled_programs_per_sm(compiled, device: torch.device) -> int:
    """:func:`programs_per_sm` of a launched kernel; one where the kernel's or the SM's resources
    are not known (the interpreter, a Triton or torch that does not say them)."""
    if device.type != "cuda":
        return 1
    metadata = getattr(compiled, "metadata", None)
    kernel_side = (getattr(compiled, "n_regs", None), getattr(metadata, "shared", None),
                   getattr(metadata, "num_warps", None))
    sm = torch.cuda.get_device_properties(device)
    sm_side = tuple(getattr(sm, name, None) for name in (
        "regs_per_multiprocessor", "shared_memory_per_multiprocessor", "max_threads_per_multi_processor", "warp_size"))
    if None in kernel_side or None in sm_side or not kernel_side[0]:
        return 1
    return programs_per_sm(*kernel_side, *sm_side)


def run_gemm1(x: torch.Tensor, x_scale: torch.Tensor | None, w13: torch.Tensor,
              w13_scale: torch.Tensor | None, alignment: ExpertAlignment,
              cfg: GemmConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GEMM 1 launch: ``act [max_padded_rows, I]`` in expert-sorted order (+ 1x128 scales if FP8).

    ``x`` is ``[T, H]`` in token order (e4m3 with ``x_scale [T, ceil(H/128)]`` for FP8). With
    ``cfg.weight_tma`` the weight tiles come through TMA where :func:`gate_up_tiles` (FP8:
    :func:`weight_tiles`, gate and up tiles apart) can make them, by pointer loads otherwise.
    ``cfg.persistent`` launches as many programs as the GPU holds at once (:func:`_launch`).
    """
    use_fp8 = x_scale is not None
    hidden = x.shape[1]
    inter = w13.shape[1] // 2
    device = x.device
    padded_rows = alignment.max_padded_rows
    blocks_m = padded_rows // cfg.block_m
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    if use_fp8:
        act = torch.empty(padded_rows, inter, dtype=FP8_DTYPE, device=device)
        act_scale = torch.empty(padded_rows, triton.cdiv(inter, GROUP_SIZE), dtype=torch.float32, device=device)
        scale_args = (x_scale, w13_scale, act_scale)
        scale_strides = (x_scale.stride(0), w13_scale.stride(0), w13_scale.stride(1), act_scale.stride(0))
    else:
        act = torch.empty(padded_rows, inter, dtype=x.dtype, device=device)
        act_scale = None
        scale_args = (dummy, dummy, dummy)
        scale_strides = (0, 0, 0, 0)
    w_desc = None
    if cfg.weight_tma:  # FP8 runs two dots on the gate and up tiles, not a pair tile
        w_desc = weight_tiles(w13, inter, cfg) if use_fp8 else gate_up_tiles(w13, cfg)
    args = (x, scale_args[0], w13, w13 if w_desc is None else w_desc, scale_args[1], act, scale_args[2],
            alignment.sorted_row_ids, alignment.block_expert_ids, alignment.num_padded_rows,
            alignment.num_rows, inter, hidden, blocks_m, alignment.num_rows // x.shape[0],
            x.stride(0), scale_strides[0], w13.stride(0), w13.stride(1), scale_strides[1], scale_strides[2],
            act.stride(0), scale_strides[3])
    meta = dict(
        USE_FP8=use_fp8, UP_SCALE_UNIFORM=inter % 128 == 0, EVEN_K=hidden % cfg.block_k == 0,
        WEIGHT_TMA=w_desc is not None, PERSISTENT=cfg.persistent,
        # The Triton CPU interpreter multiplies bf16 dot operands as their uint16 bit patterns;
        # there, upcast them (bf16 products are exact in fp32, so the math is unchanged).
        DOT_IN_FP32=INTERPRETING and x.dtype == torch.bfloat16, ROUND_IN_FP32=ROUND_E4M3_IN_FP32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _launch(_gemm1_gate_up_silu_kernel, blocks_m * triton.cdiv(inter, cfg.block_n), cfg.persistent, args, meta)
    return act, act_scale


def run_gemm2(act: torch.Tensor, act_scale: torch.Tensor | None, w2: torch.Tensor,
              w2_scale: torch.Tensor | None, topk_weights: torch.Tensor, alignment: ExpertAlignment,
              cfg: GemmConfig, out_dtype: torch.dtype) -> torch.Tensor:
    """GEMM 2 launch: ``slots [T*K, H]``, row ``t*K+k`` = weighted output of token t's k-th expert.

    ``cfg.weight_tma`` as in :func:`run_gemm1`; with it the activation rows, contiguous here
    (unlike GEMM 1's gathered token rows), come through TMA as well where
    :func:`activation_tiles` can describe them. ``cfg.persistent`` launches as many programs as
    the GPU holds at once, each walking tiles in strides of the grid (:func:`_launch`).
    """
    use_fp8 = act_scale is not None
    hidden, inter = w2.shape[1], w2.shape[2]
    device = act.device
    blocks_m = alignment.max_padded_rows // cfg.block_m
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    slots = torch.empty(alignment.num_rows, hidden, dtype=out_dtype, device=device)
    if use_fp8:
        scale_args = (act_scale, w2_scale)
        scale_strides = (act_scale.stride(0), w2_scale.stride(0), w2_scale.stride(1))
    else:
        scale_args = (dummy, dummy)
        scale_strides = (0, 0, 0)
    w_desc = weight_tiles(w2, hidden, cfg) if cfg.weight_tma else None
    act_desc = activation_tiles(act, cfg) if w_desc is not None else None
    args = (act, act if act_desc is None else act_desc, scale_args[0], w2, w2 if w_desc is None else w_desc,
            scale_args[1], slots, topk_weights,
            alignment.sorted_row_ids, alignment.block_expert_ids, alignment.num_padded_rows,
            alignment.num_rows, hidden, inter, blocks_m,
            act.stride(0), scale_strides[0], w2.stride(0), w2.stride(1), scale_strides[1], scale_strides[2],
            slots.stride(0))
    meta = dict(
        USE_FP8=use_fp8, EVEN_K=inter % cfg.block_k == 0, WEIGHT_TMA=w_desc is not None,
        ACT_TMA=act_desc is not None, PERSISTENT=cfg.persistent,
        DOT_IN_FP32=INTERPRETING and act.dtype == torch.bfloat16,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _launch(_gemm2_down_scatter_kernel, blocks_m * triton.cdiv(hidden, cfg.block_n), cfg.persistent, args, meta)
    return slots


def fused_experts_reference(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                            w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                            add_to: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch definition of :func:`fused_experts`: a loop over experts in fp32.

    FP8 weights are dequantised; the activations go through the same e4m3 quantise-dequantise
    as in the kernels (input tokens and the SiLU*mul output): 1x128 groups with block-scaled
    weights, whole rows with per-channel (rowwise) weights. So the reference differs from the
    kernels only by accumulation order and rounding. Skipped slots (id -1) and ``add_to`` as in
    :func:`fused_experts`.
    """
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    fp8_format = fp8_scale_format(w13, w2, w13_scale, w2_scale) if w13.dtype == FP8_DTYPE else None
    x = hidden_states.float()
    if fp8_format == "block":
        x_group, act_group = (1, GROUP_SIZE), (1, GROUP_SIZE)
        w13_f, w2_f = dequantize_fp8_block(w13, w13_scale), dequantize_fp8_block(w2, w2_scale)
    elif fp8_format == "rowwise":
        x_group, act_group = (1, hidden), (1, inter)
        w13_f = dequantize_fp8_rowwise(w13, w13_scale.reshape(num_experts, two_inter))
        w2_f = dequantize_fp8_rowwise(w2, w2_scale.reshape(num_experts, hidden))
    else:
        w13_f, w2_f = w13.float(), w2.float()
    if fp8_format is not None:
        x = dequantize_fp8_block(*quantize_weights_fp8_block(x, x_group), x_group)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=hidden_states.device)
    for expert in range(num_experts):
        token_idx, slot_idx = torch.nonzero(topk_ids == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        gate_up = x[token_idx] @ w13_f[expert].T
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        if fp8_format is not None:
            act = dequantize_fp8_block(*quantize_weights_fp8_block(act, act_group), act_group)
        y = act @ w2_f[expert].T
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot_idx, None])
    if add_to is not None:
        return add_to.copy_(out + add_to.float())
    return out.to(hidden_states.dtype)
