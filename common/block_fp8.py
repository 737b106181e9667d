"""Block FP8 as the checkpoints AsyncEP serves store it, in plain torch (no Triton).

Qwen3-*-FP8 and DeepSeek-V3 ship every linear weight ``w [..., N, K]`` as e4m3 values with
one float32 scale per 128x128 tile, named ``weight_scale_inv`` (it multiplies, despite the
name)::

    w ~= w_fp8.float() * scale_inv[..., n // 128, k // 128]

Activations are quantised at run time (dynamic, per token and 128-wide group) by the GPU
kernels; the CPU reference (:func:`zeroprefill.common.asyncep_moe.experts_reference`)
dequantises the weights and keeps the activations as they are. The tiny-model generator
uses :func:`quantize_block_fp8` to write a block-FP8 checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zeroprefill.common.model_spec import FP8_WEIGHT_BLOCK

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_MIN_SCALE = 1e-12  # an all-zero tile quantises to zeros without dividing by zero


def block_scale_shape(rows: int, cols: int, block: int = FP8_WEIGHT_BLOCK) -> tuple[int, int]:
    """Tiles of a ``[rows, cols]`` weight: ``(ceil(rows / block), ceil(cols / block))``."""
    return -(-rows // block), -(-cols // block)


def quantize_block_fp8(w: torch.Tensor, block: int = FP8_WEIGHT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` -> ``(e4m3 [..., N, K], float32 scale_inv [..., ceil(N/b), ceil(K/b)])``."""
    n, k = w.shape[-2:]
    tiles_n, tiles_k = block_scale_shape(n, k, block)
    padded = w.new_zeros((*w.shape[:-2], tiles_n * block, tiles_k * block), dtype=torch.float32)
    padded[..., :n, :k] = w.float()
    tiles = padded.unflatten(-1, (tiles_k, block)).unflatten(-3, (tiles_n, block))  # [.., tn, b, tk, b]
    scale_inv = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp_min(_MIN_SCALE)
    scaled = (tiles / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    w_fp8 = scaled.flatten(-4, -3).flatten(-2, -1)[..., :n, :k].to(FP8_DTYPE).contiguous()
    return w_fp8, scale_inv.contiguous()


def dequantize_block_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_WEIGHT_BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_block_fp8`, in float32."""
    n, k = w_fp8.shape[-2:]
    if tuple(scale_inv.shape[-2:]) != block_scale_shape(n, k, block):
        raise ValueError(
            f"scales of shape {tuple(scale_inv.shape)} do not tile a [{n}, {k}] weight in "
            f"{block}x{block} blocks (expected trailing dims {block_scale_shape(n, k, block)})"
        )
    full = scale_inv.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return w_fp8.float() * full[..., :n, :k]


def expert_format(shard: Mapping[str, torch.Tensor]) -> str:
    """How one layer's expert shard is stored, for start-up logs: ``"bfloat16"``, or
    ``"float8_e4m3fn + block scales"`` where the shard carries ``w13_scale``."""
    weights = str(shard["w13"].dtype).removeprefix("torch.")
    return f"{weights} + block scales" if "w13_scale" in shard else weights
