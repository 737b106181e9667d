"""FP8 (e4m3) quantisation in two formats.

Block (Qwen3-FP8, DeepSeek-V3 checkpoints): 128x128 weight blocks, 1x128 activation groups:

    weight  w [.., N, K]  ->  w_fp8 [.., N, K],  scale [.., ceil(N/128), ceil(K/128)]  (float32)
    tokens  x [T, K]      ->  x_fp8 [T, K],      scale [T, ceil(K/128)]                (float32)

Rowwise (FP8-dynamic checkpoints): one scale per weight output channel, one per token row
(the row quantisers are fused into ``grouped_mm_moe.py``'s kernels):

    weight  w [.., N, K]  ->  w_fp8 [.., N, K],  scale [.., N]                         (float32)
    tokens  x [T, K]      ->  x_fp8 [T, K],      scale [T]                             (float32)

In both, dequantised value = w_fp8 * scale[block]; scale = amax(block) / 448.

Weights are quantised once, offline (plain torch is fine). Activations are quantised on every
call, so that is a Triton kernel (one program per ``BLOCK_T`` tokens x one 128-wide group).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP_SIZE = 128
MIN_SCALE = 1e-10  # all-zero groups quantise to 0 without dividing by zero
# The Triton CPU interpreter's fp32->e4m3 cast truncates where rounding carries into the
# exponent (e.g. 125.4 -> 64 instead of 128). There, kernels round in fp32 first (see
# ``round_to_e4m3``); GPUs use the hardware cast.
ROUND_E4M3_IN_FP32 = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_to_e4m3(x, ROUND_IN_FP32: tl.constexpr):
    """``x`` (fp32, |x| <= 448) rounded to the e4m3 grid, as a value the e4m3 cast keeps exactly.

    A no-op unless ``ROUND_IN_FP32`` (the interpreter); there it rounds to nearest, ties to
    even, like the hardware cast (ties are common with bf16 inputs).
    """
    if ROUND_IN_FP32:
        magnitude = tl.abs(x)
        step = tl.exp2(tl.floor(tl.log2(tl.maximum(magnitude, 0.015625))) - 3.0)  # 3 mantissa bits
        steps = magnitude / step
        nearest = tl.floor(steps + 0.5)
        odd = nearest - 2.0 * tl.floor(nearest * 0.5) == 1.0
        nearest = tl.where((nearest - steps == 0.5) & odd, nearest - 1.0, nearest)
        rounded = nearest * step
        x = tl.where(x < 0, -rounded, rounded)
    return x


def quantize_weights_fp8_block(w: torch.Tensor,
                               block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w [..., N, K]`` to e4m3 with one float32 scale per ``block`` tile.

    Returns ``(w_fp8 [..., N, K], scales [..., ceil(N/bn), ceil(K/bk)])``; edge tiles that are
    cut by N or K get the scale of their valid part.
    """
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dims [..., N, K], got shape {tuple(w.shape)}")
    bn, bk = block
    n, k = w.shape[-2:]
    nb, kb = triton.cdiv(n, bn), triton.cdiv(k, bk)
    padded = torch.zeros(*w.shape[:-2], nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w.float()
    tiles = padded.unflatten(-1, (kb, bk)).unflatten(-3, (nb, bn))  # [..., nb, bn, kb, bk]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scales = (amax / FP8_MAX).clamp_min(MIN_SCALE)
    q = (tiles / scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    w_fp8 = q.flatten(-4, -3).flatten(-2, -1)[..., :n, :k].to(FP8_DTYPE).contiguous()
    return w_fp8, scales.contiguous()


def dequantize_fp8_block(w_fp8: torch.Tensor, scales: torch.Tensor,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Inverse of :func:`quantize_weights_fp8_block`, in float32."""
    n, k = w_fp8.shape[-2:]
    full = scales.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return w_fp8.float() * full[..., :n, :k]


def quantize_weights_fp8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w [..., N, K]`` to e4m3 with one float32 scale per output channel: ``scales [..., N]``."""
    w_fp8, scales = quantize_weights_fp8_block(w, (1, w.shape[-1]))
    return w_fp8, scales.squeeze(-1).contiguous()


def dequantize_fp8_rowwise(w_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_weights_fp8_rowwise`, in float32."""
    return w_fp8.float() * scales.unsqueeze(-1)


@triton.jit
def _quantize_token_groups_kernel(
    x_ptr, q_ptr, scale_ptr, num_tokens, hidden, stride_x, stride_q, stride_s,
    BLOCK_T: tl.constexpr, GROUP: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    group = tl.program_id(1)
    offs_k = group * GROUP + tl.arange(0, GROUP)
    mask = (offs_t < num_tokens)[:, None] & (offs_k < hidden)[None, :]
    x = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-10)
    q = round_to_e4m3(tl.clamp(x / scale[:, None], -448.0, 448.0), ROUND_IN_FP32)
    tl.store(q_ptr + offs_t[:, None] * stride_q + offs_k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + offs_t * stride_s + group, scale, mask=offs_t < num_tokens)


def quantize_tokens_fp8_group(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group (1x128) e4m3 quantisation: ``(x_fp8 [T, K], scales [T, ceil(K/128)])``."""
    num_tokens, hidden = x.shape
    q = torch.empty(num_tokens, hidden, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(num_tokens, triton.cdiv(hidden, GROUP_SIZE), dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return q, scales
    block_t = 16
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, GROUP_SIZE))
    _quantize_token_groups_kernel[grid](
        x, q, scales, num_tokens, hidden, x.stride(0), q.stride(0), scales.stride(0),
        BLOCK_T=block_t, GROUP=GROUP_SIZE, ROUND_IN_FP32=ROUND_E4M3_IN_FP32, num_warps=4,
    )
    return q, scales


def quantize_tokens_fp8_group_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch definition of :func:`quantize_tokens_fp8_group`."""
    return quantize_weights_fp8_block(x, block=(1, GROUP_SIZE))
