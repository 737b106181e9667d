"""MoE experts on DeepGEMM's grouped GEMMs (sm90), inside our permutation, SiLU*mul and combine.

    hidden_states [T, H]           topk_ids/topk_weights [T, K]
          |                                  |
          |     [moe_align_block_size] rows r = t*K+k sorted by expert, each expert padded to 128
          |     (DeepGEMM's M alignment on sm90, ``get_mk_alignment_for_contiguous_layout()``)
          v                                  v
    [scatter_token_rows]  x[t] -> its K sorted rows (block FP8: quantised once per token to
                          e4m3 + one float32 scale per 1x128 group, scales written MN-major)
          v
    x_sorted [R, H] + the layout: psum [E] (where each expert's real rows end): bf16, and block
                                  FP8 where ZEROPREFILL_DEEPGEMM_FP8_LAYOUT=psum and the DeepGEMM
                                  takes it; else FP8 m_indices [R] (the row's expert, -1 on
                                  padding rows), the default
          v
    [m_grouped_{fp8,bf16}_gemm_nt_contiguous]  x_sorted . w13[e]^T  ->  gate_up [R, 2I] (bf16)
          v
    [silu_mul]  act = silu(gate_up[:, :I]) * gate_up[:, I:]  (block FP8: re-quantised per 1x128
                group, MN-major scales; padding rows are zeros)
          v
    [m_grouped_{fp8,bf16}_gemm_nt_contiguous]  act . w2[e]^T  ->  y [R, H] (bf16)
          v
    [weighted_combine]  out[t] = sum_k topk_weights[t, k] * y[position_of_row[t*K+k]]  (fp32 sum)

Only the two GEMMs are DeepGEMM's; alignment, scatter (with the activation quantiser), SiLU*mul
and combine are the kernels of the grouped_mm path (``grouped_mm_moe.py``), the FP8 ones with
1x128 groups here. Nothing waits on the GPU: R is the host-known bound
``T*K + min(T*K, E) * 127`` rounded up to 128.

DeepGEMM's contract, as read in sgl-project/DeepGEMM (the source of the ``sgl-deep-gemm``
wheel: ``csrc/apis/gemm.hpp``, ``csrc/apis/layout.hpp``, ``csrc/utils/layout.hpp``,
``deep_gemm/include/deep_gemm/common/scheduler.cuh``, the sm90 kernels, ``tests/generators.py``):

- ``m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), d, m_indices)``: ``a [M, K]`` e4m3
  with ``sfa [M, ceil(K/128)]`` float32 (1x128 groups), ``b [G, N, K]`` e4m3 with
  ``sfb [G, ceil(N/128), ceil(K/128)]`` float32 (128x128 blocks, contiguous), ``d [M, N]`` bf16,
  ``m_indices [M]`` int32. With float32 scales the sm90 recipe defaults to ``(1, 128, 128)``.
  ``sfa`` is transposed to MN-major with a 16-byte aligned column stride unless it already is;
  ours is written that way, so no transpose kernel runs. A block of rows takes its expert from
  its first row, and the math of a 64-row slice whose first row is -1 is skipped (its loads
  still run); what -1 rows hold in ``d`` is unspecified.
- ``m_grouped_bf16_gemm_nt_contiguous(a, b, d, psum, use_psum_layout=True)``: bf16 ``a [M, K]``,
  ``b [G, N, K]``, ``d [M, N]``; sm90 needs ``K % 64 == 0``. ``psum [G]`` int32: expert e's rows
  are ``[align(psum[e-1], 128), psum[e])``, and only the row blocks inside those ranges are
  scheduled. (The sm90 bf16 kernel never checks -1 rows, so with ``m_indices`` it would
  multiply every padding block as well.) What ``d`` holds outside those rows is unspecified.

So every expert's segment starts at a multiple of 128, and only the real rows of ``y`` are read.

FP8 row layouts. With ``m_indices`` the FP8 kernel's scheduler walks every row block of R: past
the last expert's segment there are up to ``E * 127`` rows of -1 (about ``E * 64`` with random
routing) whose blocks skip the math but still load their A tiles and expert 0's B tiles, a
cost that does not shrink with the token count. The psum layout schedules only the blocks that
hold real rows. DeepGEMM 2.5.0 (vLLM 0.26's copy) carries the psum case in its sm90 scheduler
(``scheduler/gemm.cuh``: ``get_next_block``, ``get_global_idx``, ``is_computation_valid``) and
no assertion against it in its host code; an older build read here (sgl-deep-gemm's) lacks the
case in the row-validity check, where the kernel would trap. On one H100 with vLLM 0.26's copy
the psum layout matched the reference as m_indices does (``tests/test_kernels_gpu.py``) and its
layer alone ran 1.04-1.10x m_indices' at 8K-16K tokens, 0.93-0.99x at 32K
(``benchmarks/moe_kernels.py`` sides ``deepgemm_fp8``, ``deepgemm_fp8_psum``); yet through a vLLM
server (Qwen3-30B-A3B, two runs each, alternating) the psum server answered 15-18% fewer tokens
per second than the m_indices one, at the same GPU time per layer (docs/kernels.md). So
``m_indices`` is the default and psum is asked for by name (``ZEROPREFILL_DEEPGEMM_FP8_LAYOUT=psum``);
a DeepGEMM older than 2.5.0, or one whose host code rejects it, is answered with ``m_indices``
from then on, with one warning. vLLM's own DeepGEMM MoE takes the psum layout on sm90 from 0.32.
Requirements checked before this path is taken (:func:`deepgemm_reason`): a CUDA sm90 device,
``deep_gemm`` importable, bf16 activations (DeepGEMM writes bf16), bf16 weights with H and I
divisible by 64, or e4m3 weights with 128x128 block scales and H, I divisible by 128.
FP8-rowwise weights stay on ``torch._scaled_grouped_mm``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import sys
from types import ModuleType

import torch
import torch.nn.functional as F

from .align import ExpertAlignment, moe_align_block_size
from .checks import check_add_to, check_inputs
from .grouped_mm_moe import scatter_token_rows, silu_mul, weighted_combine
from .moe_config import MoEConfig, device_capability
from .quant import GROUP_SIZE

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'zeroprefill[deepgemm]', or serve with a vLLM that ships it"
#: The FP8 GEMM's row layout: ``m_indices`` (default) or ``psum`` (above, "FP8 row layouts").
FP8_LAYOUT_ENV = "ZEROPREFILL_DEEPGEMM_FP8_LAYOUT"
PSUM, M_INDICES = "psum", "m_indices"
FP8_LAYOUTS = (M_INDICES, PSUM)
FP8_PSUM_MIN_VERSION = (2, 5)  # DeepGEMM 2.5.0 (vLLM 0.26's copy): the first read with psum in its sm90 scheduler
#: Where DeepGEMM is looked for, in order: the package, then the copy inside vLLM's wheel.
MODULES = ("deep_gemm", "vllm.third_party.deep_gemm")
REQUIRED_FUNCTIONS = ("get_mk_alignment_for_contiguous_layout", "m_grouped_bf16_gemm_nt_contiguous",
                      "m_grouped_fp8_gemm_nt_contiguous")
PSUM_ALIGNMENT = 128  # DeepGEMM's psum scheduler rounds each expert's end up to 128 (scheduler.cuh)
BF16_MULTIPLE = 64   # sm90 bf16 grouped GEMM: K % 64 == 0 (both GEMMs: K = H, then K = I)
FP8_MULTIPLE = 128   # 1x128 activation groups and 128x128 weight blocks, whole in H and I


def device_unsupported_reason(device: torch.device) -> str | None:
    """Why DeepGEMM's kernels cannot run on ``device``, or None (a CUDA sm90 GPU)."""
    if device.type != "cuda":
        return f"tensors are on {device}; DeepGEMM runs on CUDA GPUs"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    index = torch.cuda.current_device() if device.index is None else device.index
    major, minor = device_capability(index)
    if (major, minor) != (9, 0):
        return f"cuda:{index} is sm{major}{minor}; this path runs DeepGEMM's sm90 kernels (H100/H200) only"
    return None


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    """Import DeepGEMM once: ``(module, None)``, or ``(None, why not)`` in one line.

    The ``deep_gemm`` package first (``pip install 'zeroprefill[deepgemm]'``), else the copy
    vLLM ships inside its wheel (``vllm.third_party.deep_gemm``: DeepGEMM 2.5.0 in vLLM 0.26)
    where vLLM is loaded already, so a vLLM server has DeepGEMM with no other wheel, whatever
    apache-tvm-ffi vLLM pins.
    """
    reasons = []
    for name in MODULES:
        host = name.split(".")[0]
        if name != host and host not in sys.modules:  # never import vLLM into a process that has not
            reasons.append(f"{name}: {host} is not loaded here")
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # not installed, or broken: missing CUDA libraries, an ABI mismatch, no CUDA home
            if isinstance(exc, ModuleNotFoundError) and name.startswith(exc.name or "\0"):
                reasons.append(f"{name} is not installed")
            else:
                detail = " ".join(str(exc).split())
                reasons.append(f"import {name} failed: {type(exc).__name__}{': ' + detail if detail else ''}")
            continue
        missing = [function for function in REQUIRED_FUNCTIONS if not hasattr(module, function)]
        if missing:
            version = getattr(module, "__version__", "of unknown version")
            reasons.append(f"{name} {version} lacks {', '.join(missing)}")
            continue
        return module, None
    return None, f"{'; '.join(reasons)} ({INSTALL_HINT})"


def deepgemm_source() -> str:
    """Which DeepGEMM this process runs (``"deep_gemm 0.1.3"``, ...), or why none, in one line."""
    module, reason = _load()
    if module is None:
        return f"none: {reason}"
    return f"{module.__name__} {getattr(module, '__version__', '(version unknown)')}"


_failed_at_first_use: str | None = None


def disable_after_failure(exc: BaseException) -> str:
    """Stop using DeepGEMM in this process after a call raised (an API or a JIT build this
    release does not have); returns the reason every later choice reports."""
    global _failed_at_first_use
    detail = " ".join(str(exc).split())[:300]
    _failed_at_first_use = f"{deepgemm_source()} failed at first use: {type(exc).__name__}: {detail}"
    return _failed_at_first_use


def deepgemm_unavailable_reason() -> str | None:
    """Why DeepGEMM cannot run in this process (current CUDA device, the install), or None."""
    return device_unsupported_reason(torch.device("cuda")) or _load()[1] or _failed_at_first_use


def deepgemm_reason(hidden_states: torch.Tensor, w13: torch.Tensor, fp8_format: str | None) -> str | None:
    """Why DeepGEMM cannot run this layer, or None: the device, the install, dtypes, alignment.

    ``fp8_format`` is what :func:`check_inputs` returned for the call (None for bf16 weights).
    """
    reason = device_unsupported_reason(hidden_states.device) or _load()[1] or _failed_at_first_use
    if reason is not None:
        return reason
    if hidden_states.dtype != torch.bfloat16:
        return f"activations are {hidden_states.dtype}; DeepGEMM's grouped GEMMs take and write bf16"
    if fp8_format == "rowwise":
        return "FP8-rowwise weights (per-channel scales); DeepGEMM's sm90 grouped GEMM takes 128x128 block scales"
    hidden, inter = hidden_states.shape[1], w13.shape[1] // 2
    multiple = FP8_MULTIPLE if fp8_format == "block" else BF16_MULTIPLE
    if hidden % multiple or inter % multiple:
        kind = "block-FP8" if fp8_format == "block" else "bf16"
        return f"H={hidden}, I={inter}: DeepGEMM's {kind} grouped GEMM needs both divisible by {multiple}"
    return None


def grouped_layout(alignment: ExpertAlignment) -> torch.Tensor:
    """The FP8 GEMM's ``m_indices [R]`` (int32): each padded row's expert, -1 on padding rows."""
    experts = alignment.block_expert_ids.repeat_interleave(alignment.block_m)
    return torch.where(alignment.sorted_row_ids < alignment.num_rows, experts, -1)


def psum_layout(alignment: ExpertAlignment) -> torch.Tensor:
    """The bf16 GEMM's ``psum [E]`` (int32): the end of each expert's real rows.

    Needs ``alignment.block_m == PSUM_ALIGNMENT``: expert e's segment then starts at
    ``align(psum[e-1], 128)``, which is where the alignment put it.
    """
    segment_starts = F.pad(alignment.expert_ends[:-1], (1, 0))
    return (segment_starts + alignment.rows_per_expert).to(torch.int32)


_fp8_psum_refused: str | None = None


def fp8_layout_setting() -> str:
    """``ZEROPREFILL_DEEPGEMM_FP8_LAYOUT``: ``m_indices`` (default) or ``psum``; ``m_indices`` from
    the moment this process's DeepGEMM refused the psum layout for FP8."""
    value = os.environ.get(FP8_LAYOUT_ENV, M_INDICES).strip().lower() or M_INDICES
    if value not in FP8_LAYOUTS:
        raise ValueError(f"{FP8_LAYOUT_ENV}={value!r} is not one of {', '.join(FP8_LAYOUTS)}")
    return M_INDICES if _fp8_psum_refused else value


def fp8_layout_in_use() -> str:
    """The row layout this process's block-FP8 GEMMs run on: the setting, but ``m_indices`` where
    the loaded DeepGEMM cannot take psum (:func:`_fp8_psum_blocked_reason`)."""
    layout = fp8_layout_setting()
    deep_gemm = _load()[0]
    if layout == PSUM and deep_gemm is not None and _fp8_psum_blocked_reason(
            deep_gemm, int(deep_gemm.get_mk_alignment_for_contiguous_layout())):
        return M_INDICES
    return layout


def _fp8_psum_blocked_reason(deep_gemm: ModuleType, alignment: int) -> str | None:
    """Why ``deep_gemm``, whose contiguous layout aligns expert segments to ``alignment`` rows,
    cannot run the psum layout for FP8 now: a refusal already seen, its version, or an
    alignment other than the 128 the psum scheduler assumes; None if it can."""
    if _fp8_psum_refused:
        return _fp8_psum_refused
    if alignment != PSUM_ALIGNMENT:
        return f"{deepgemm_source()} aligns expert segments to {alignment} rows, the psum layout to {PSUM_ALIGNMENT}"
    return _fp8_psum_unsupported_reason(deep_gemm)


def fp8_psum_refused_reason() -> str | None:
    """Why this process's DeepGEMM does not take the psum layout for FP8 (it refused it), or None."""
    return _fp8_psum_refused


@functools.cache
def _fp8_psum_unsupported_reason(deep_gemm: ModuleType) -> str | None:
    """Why ``deep_gemm`` cannot be given the psum layout for FP8 on sm90, by its version; None if it can."""
    version = str(getattr(deep_gemm, "__version__", ""))
    parsed = re.match(r"(\d+)\.(\d+)", version)
    if parsed is None or tuple(map(int, parsed.groups())) < FP8_PSUM_MIN_VERSION:
        return (f"{deepgemm_source()} predates DeepGEMM {'.'.join(map(str, FP8_PSUM_MIN_VERSION))}, whose sm90 "
                "scheduler is the first read here with the psum case")
    return None


def _refuse_fp8_psum(reason: str) -> None:
    """This DeepGEMM does not take the psum layout for FP8 (which was asked for by name): ``m_indices``
    from now on, with one warning."""
    global _fp8_psum_refused
    _fp8_psum_refused = reason
    logger.warning("zeroprefill.kernels: DeepGEMM's FP8 GEMM does not take the psum layout (%s); m_indices "
                   "from now on", reason)


def _grouped_gemm(deep_gemm: ModuleType, a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor,
                  w_scale: torch.Tensor | None, layout: torch.Tensor, out: torch.Tensor, psum: bool) -> None:
    """``out[r] = a[r] . w[e]^T`` for the rows of each expert e: block FP8 when ``a_scale`` is
    given, bf16 otherwise; ``layout`` is ``psum`` when ``psum`` (bf16 always), else ``m_indices``."""
    if a_scale is None:
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, w, out, layout, use_psum_layout=True)
    elif psum:
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, a_scale), (w, w_scale), out, layout, use_psum_layout=True)
    else:
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a, a_scale), (w, w_scale), out, layout)


def run_deepgemm_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13_scale: torch.Tensor | None,
                         w2_scale: torch.Tensor | None, add_to: torch.Tensor | None = None,
                         fp8_layout: str | None = None) -> torch.Tensor:
    """The experts layer on DeepGEMM, for arguments that passed :func:`check_inputs` and
    :func:`deepgemm_reason`; ``w13_scale``/``w2_scale`` (128x128 blocks) select block FP8, whose
    GEMMs take ``fp8_layout`` (None: :func:`fp8_layout_setting`). Skipped slots (id -1) and
    ``add_to`` as in :func:`~zeroprefill.kernels.fused_experts`."""
    deep_gemm = _load()[0]
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, _ = w13.shape
    device = hidden_states.device
    if num_tokens == 0:
        return add_to if add_to is not None else torch.zeros(0, hidden, dtype=hidden_states.dtype, device=device)
    use_fp8 = w13_scale is not None
    if use_fp8:
        block_m = int(deep_gemm.get_mk_alignment_for_contiguous_layout())
        alignment = moe_align_block_size(topk_ids, num_experts, block_m)
        psum = (fp8_layout or fp8_layout_setting()) == PSUM
        if psum and (reason := _fp8_psum_blocked_reason(deep_gemm, block_m)):
            if reason != _fp8_psum_refused:  # said once
                _refuse_fp8_psum(reason)
            psum = False
    else:
        alignment = moe_align_block_size(topk_ids, num_experts, PSUM_ALIGNMENT)
        psum = True
    layout = psum_layout(alignment) if psum else grouped_layout(alignment)
    rows = alignment.max_padded_rows
    group_size = GROUP_SIZE if use_fp8 else None
    x_sorted, x_scale = scatter_token_rows(hidden_states, alignment, use_fp8, rows, group_size)
    gate_up = torch.empty(rows, two_inter, dtype=torch.bfloat16, device=device)
    try:
        _grouped_gemm(deep_gemm, x_sorted, x_scale, w13, w13_scale, layout, gate_up, psum)
    except RuntimeError as exc:
        if not (use_fp8 and psum):
            raise
        _refuse_fp8_psum(f"{deepgemm_source()}: {' '.join(str(exc).split())[:200]}")
        psum, layout = False, grouped_layout(alignment)
        _grouped_gemm(deep_gemm, x_sorted, x_scale, w13, w13_scale, layout, gate_up, psum)
    del x_sorted, x_scale
    act, act_scale = silu_mul(gate_up, alignment, use_fp8, group_size)
    del gate_up
    y = torch.empty(rows, hidden, dtype=torch.bfloat16, device=device)
    _grouped_gemm(deep_gemm, act, act_scale, w2, w2_scale, layout, y, psum)
    return weighted_combine(y, topk_weights, alignment, hidden_states.dtype, add_to)


def deepgemm_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                     w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                     config: MoEConfig | None = None, add_to: torch.Tensor | None = None,
                     fp8_layout: str | None = None) -> torch.Tensor:
    """:func:`~zeroprefill.kernels.fused_experts` on DeepGEMM, whatever ``ZEROPREFILL_EXPERTS_KERNEL``
    says; raises ``RuntimeError`` with the reason where DeepGEMM cannot run the layer.

    ``config`` (tiles of our kernels) must be None: DeepGEMM picks its own. ``fp8_layout``
    (``m_indices`` or ``psum``; None: ``ZEROPREFILL_DEEPGEMM_FP8_LAYOUT``) is the block-FP8 GEMMs'
    row layout.
    """
    if fp8_layout not in (None, *FP8_LAYOUTS):
        raise ValueError(f"fp8_layout={fp8_layout!r} is not one of {', '.join(FP8_LAYOUTS)}")
    if config is not None:
        raise ValueError(f"config={config} holds tiles of our kernels; DeepGEMM picks its own, pass None")
    fp8_format = check_inputs(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    check_add_to(add_to, hidden_states)
    reason = deepgemm_reason(hidden_states, w13, fp8_format)
    if reason is not None:
        raise RuntimeError(f"DeepGEMM cannot run this MoE layer: {reason}")
    return run_deepgemm_experts(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, add_to,
                                fp8_layout)
