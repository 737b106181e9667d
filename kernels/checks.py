"""Argument checks shared by every experts backend (Triton, grouped_mm, DeepGEMM).

``check_inputs`` validates a ``fused_experts`` call (shapes, dtypes, devices, the FP8 scale
format) and returns the FP8 format; ``check_add_to`` validates the tensor an output is added
to. A ``topk_ids`` entry of :data:`SKIP_ID` names no expert of the given weights: that
(token, slot) is skipped (how experts held in two tensors, or on other ranks, are left out).
"""

from __future__ import annotations

import os

import torch
import triton

from .quant import FP8_DTYPE

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SKIP_ID = -1  # a topk_ids entry naming no expert of these weights: the slot is skipped
# Checking that every topk id is in [-1, E) needs a host sync; done on CPU tensors always and on
# GPU tensors only when this is set (the serving path must not stall the host per layer).
CHECK_IDS_ON_GPU = os.environ.get("ZEROPREFILL_CHECK_TOPK_IDS", "0") == "1"


def check_inputs(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None) -> str | None:
    """Validate the ``fused_experts`` arguments; returns the FP8 format (:func:`fp8_scale_format`),
    None for unquantised weights."""
    names = {"hidden_states": hidden_states, "w13": w13, "w2": w2,
             "topk_weights": topk_weights, "topk_ids": topk_ids}
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, (t, dims) in {"hidden_states": (hidden_states, 2), "w13": (w13, 3), "w2": (w2, 3),
                            "topk_weights": (topk_weights, 2), "topk_ids": (topk_ids, 2)}.items():
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    for name, t in names.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape "
                             f"{tuple(t.shape)}); call .contiguous() first")
        if t.device != hidden_states.device:
            raise ValueError(f"{name} is on {t.device}, hidden_states on {hidden_states.device}")

    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, w13_hidden = w13.shape
    if two_inter % 2:
        raise ValueError(f"w13 must be [E, 2*I, H] (gate rows then up rows), got odd dim 1 = {two_inter}")
    inter = two_inter // 2
    if w13_hidden != hidden:
        raise ValueError(f"w13 hidden size {w13_hidden} != hidden_states hidden size {hidden}")
    if tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w2 must be [E, H, I] = {(num_experts, hidden, inter)}, got {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [T={num_tokens}, K]")
    top_k = topk_ids.shape[1]
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: topk_ids must have at least one slot per token")
    if hidden_states.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"hidden_states dtype {hidden_states.dtype} not in {ACTIVATION_DTYPES}")
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")

    fp8_format = None
    if w13.dtype == FP8_DTYPE:
        if w2.dtype != FP8_DTYPE:
            raise TypeError(f"w13 is {w13.dtype} but w2 is {w2.dtype}; both must be {FP8_DTYPE}")
        fp8_format = fp8_scale_format(w13, w2, w13_scale, w2_scale)
        for name, scale in (("w13_scale", w13_scale), ("w2_scale", w2_scale)):
            if scale.dtype != torch.float32 or not scale.is_contiguous():
                raise ValueError(f"{name} must be contiguous float32, got {scale.dtype} "
                                 f"contiguous={scale.is_contiguous()}")
            if scale.device != hidden_states.device:
                raise ValueError(f"{name} is on {scale.device}, hidden_states on {hidden_states.device}")
    else:
        if w13.dtype != hidden_states.dtype or w2.dtype != hidden_states.dtype:
            raise TypeError(f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must match hidden_states "
                            f"({hidden_states.dtype}), or both be {FP8_DTYPE} with scales")
        if w13_scale is not None or w2_scale is not None:
            raise ValueError(f"w13_scale/w2_scale are only for {FP8_DTYPE} weights, got {w13.dtype}")

    if topk_ids.numel() and (topk_ids.device.type == "cpu" or CHECK_IDS_ON_GPU):
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < SKIP_ID or high >= num_experts:
            bad = low if low < SKIP_ID else high
            raise ValueError(f"topk_ids contains {bad}, outside [0, num_experts={num_experts}) "
                             f"and not {SKIP_ID} (skip)")
    return fp8_format


def check_add_to(add_to: torch.Tensor | None, hidden_states: torch.Tensor) -> None:
    """``add_to`` must be a contiguous ``[T, H]`` tensor of the activations' dtype and device."""
    if add_to is None:
        return
    if (add_to.shape != hidden_states.shape or add_to.dtype != hidden_states.dtype
            or add_to.device != hidden_states.device or not add_to.is_contiguous()):
        raise ValueError(f"add_to must be a contiguous {tuple(hidden_states.shape)} {hidden_states.dtype} tensor "
                         f"on {hidden_states.device}, got {tuple(add_to.shape)} {add_to.dtype} on {add_to.device}")


def fp8_scale_format(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
                     w2_scale: torch.Tensor | None) -> str:
    """``"block"`` (128x128 block scales) or ``"rowwise"`` (one scale per output channel).

    Block: ``w13_scale [E, ceil(2I/128), ceil(H/128)]``, ``w2_scale [E, ceil(H/128), ceil(I/128)]``.
    Rowwise: ``w13_scale [E, 2I]``, ``w2_scale [E, H]`` (a trailing dim of 1, as vLLM's
    channel-wise checkpoints store them, is accepted too).
    """
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    block = {"w13_scale": (num_experts, triton.cdiv(two_inter, 128), triton.cdiv(hidden, 128)),
             "w2_scale": (num_experts, triton.cdiv(hidden, 128), triton.cdiv(inter, 128))}
    rowwise = {"w13_scale": (num_experts, two_inter), "w2_scale": (num_experts, hidden)}
    formats = []
    for name, scale in (("w13_scale", w13_scale), ("w2_scale", w2_scale)):
        if scale is None:
            raise ValueError(f"FP8 weights need {name}: float32 128x128 block scales {block[name]} "
                             f"or per-output-channel scales {rowwise[name]}")
        shape = tuple(scale.shape)
        if shape == block[name]:
            formats.append("block")
        elif shape in (rowwise[name], rowwise[name] + (1,)):
            formats.append("rowwise")
        else:
            raise ValueError(f"{name} has shape {shape}; expected 128x128 block scales {block[name]} "
                             f"or per-output-channel scales {rowwise[name]}")
    if formats[0] != formats[1]:
        raise ValueError(f"w13_scale is {formats[0]} but w2_scale is {formats[1]}; use one FP8 format")
    return formats[0]
