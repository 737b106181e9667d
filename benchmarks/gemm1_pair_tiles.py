"""GEMM 1 with gate and up in one dot: does one [BM, 2BN] accumulator close the gap to CUTLASS?

Our fused GEMM 1 (``kernels/fused_moe.py``) keeps two [BM, BN] accumulators, gate and up, and
issues two dots per K step. Where it loses to CUTLASS is GEMM 1 alone (GEMM 2, one dot of
[BM, 256], runs at CUTLASS's speed). This times variants that load a *pair tile*: BN gate rows
and the same BN up rows as one [2BN, BK] weight tile, one dot into one [BM, 2BN] accumulator,
split in the epilogue:

    current        the shipped kernel (two dots), TMA weight tiles
    ptr-inter      pointer loads, rows interleaved (gate n, up n, gate n+1, ...): the split is
                   a reshape to [BM, BN, 2] and ``tl.split`` (a thread holds column pairs)
    desc-inter     the same rows through a 4-D TMA descriptor over w13 viewed as [E, I, 2, H]
                   (strides, not a copy)
    desc-pair      a 4-D descriptor over [E, 2, I, H]: gate block then up block, split by a
                   permute
    copy-inter     w13 copied to the interleaved order once, a 2-D descriptor (the layout a
                   loader could store)

    python benchmarks/gemm1_pair_tiles.py --out gemm1_pair_tiles.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _moe_timing import SHAPES, Layer, bench_ms, gpu_tag, log  # noqa: E402
from zeroprefill.kernels.align import moe_align_block_size  # noqa: E402
from zeroprefill.kernels.fused_moe import INTERPRETING, _swizzle_tile, run_gemm1  # noqa: E402
from zeroprefill.kernels.grouped_mm_moe import grouped_gemm, scatter_token_rows, silu_mul  # noqa: E402
from zeroprefill.kernels.moe_config import GemmConfig  # noqa: E402

PTR_INTER, DESC_INTER, DESC_PAIR, COPY_INTER = 0, 1, 2, 3
MODES = {"ptr-inter": PTR_INTER, "desc-inter": DESC_INTER, "desc-pair": DESC_PAIR, "copy-inter": COPY_INTER}


@triton.jit
def _gemm1_pair_kernel(
    x_ptr, w_ptr, w_desc, act_ptr, sorted_row_ids_ptr, block_expert_ids_ptr, num_padded_rows_ptr,
    num_rows, inter, hidden, max_blocks_m, top_k, stride_x, stride_we, stride_wn, stride_act,
    MODE: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzle_tile(tl.program_id(0), max_blocks_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_rows_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_row_ids_ptr + offs_m)
    row_ok = rows < num_rows
    tokens = tl.where(row_ok, rows // top_k, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_x + offs_k[None, :]
    offs_c = tl.arange(0, 2 * BLOCK_N)  # pair-tile column c: gate (c even) or up (c odd) of n = c // 2
    w_rows = (offs_c % 2) * inter + pid_n * BLOCK_N + offs_c // 2
    b_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None]
    first_n = (pid_n * BLOCK_N).to(tl.int32)
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        if MODE == 0:
            b = tl.load(b_ptrs)
        elif MODE == 1:
            b = w_desc.load([expert.to(tl.int32), first_n, 0, k * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K).T
        elif MODE == 2:
            b = w_desc.load([expert.to(tl.int32), 0, first_n, k * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K).T
        else:
            b = w_desc.load([((expert * inter + first_n) * 2).to(tl.int32), k * BLOCK_K]).T
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MODE == 2:
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))
    else:
        gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    act = gate / (1.0 + tl.exp(-gate)) * up
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_n[None, :], act.to(act_ptr.dtype.element_ty))


def pair_descriptor(w13: torch.Tensor, mode: int, cfg: GemmConfig, interleaved: torch.Tensor | None):
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if mode == DESC_INTER:  # [E, I, 2, H]: element (e, n, s, h) at e*2IH + s*IH + n*H + h
        return TensorDescriptor(w13, [num_experts, inter, 2, hidden], [two_inter * hidden, hidden, inter * hidden, 1],
                                [1, cfg.block_n, 2, cfg.block_k])
    if mode == DESC_PAIR:
        return TensorDescriptor(w13, [num_experts, 2, inter, hidden], [two_inter * hidden, inter * hidden, hidden, 1],
                                [1, 2, cfg.block_n, cfg.block_k])
    if mode == COPY_INTER:
        return TensorDescriptor.from_tensor(interleaved.view(-1, hidden), [2 * cfg.block_n, cfg.block_k])
    return None


def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """[E, 2I, H] gate rows then up rows -> [E, I, 2, H] contiguous (gate n, up n, ...)."""
    num_experts, two_inter, hidden = w13.shape
    return w13.view(num_experts, 2, two_inter // 2, hidden).transpose(1, 2).contiguous()


def run_pair(x, w13, alignment, cfg: GemmConfig, mode: int, desc, interleaved) -> torch.Tensor:
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    assert inter % cfg.block_n == 0 and hidden % cfg.block_k == 0
    padded_rows = alignment.max_padded_rows
    blocks_m = padded_rows // cfg.block_m
    act = torch.empty(padded_rows, inter, dtype=x.dtype, device=x.device)
    w = interleaved if mode == COPY_INTER else w13
    _gemm1_pair_kernel[(blocks_m * (inter // cfg.block_n),)](
        x, w13, w if desc is None else desc, act, alignment.sorted_row_ids, alignment.block_expert_ids,
        alignment.num_padded_rows, alignment.num_rows, inter, hidden, blocks_m, alignment.num_rows // x.shape[0],
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        MODE=mode, DOT_IN_FP32=INTERPRETING and x.dtype == torch.bfloat16,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return act


TILES = [GemmConfig(128, 128, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 4), GemmConfig(128, 64, 64, 8, 8, 4),
         GemmConfig(128, 64, 64, 8, 4, 4), GemmConfig(64, 128, 64, 8, 4, 4), GemmConfig(128, 128, 64, 16, 8, 3)]


def measure(shape_name: str, num_tokens: int, tiles: list[GemmConfig], modes: list[str]) -> dict:
    num_experts, top_k, hidden, inter = SHAPES[shape_name]
    layer = Layer(SHAPES[shape_name], num_tokens)
    x, _, topk_ids = layer.inputs(num_tokens)
    w13 = layer.w13
    interleaved = interleave_gate_up(w13)
    ms: dict[str, float] = {}
    errors: dict[str, float] = {}
    aligned = moe_align_block_size(topk_ids, num_experts, 16)
    x_sorted, _ = scatter_token_rows(x, aligned, False, aligned.max_padded_rows)
    gate_up = grouped_gemm(x_sorted, w13, aligned.expert_ends)
    ms["cutlass_gemm1"] = bench_ms(lambda: grouped_gemm(x_sorted, w13, aligned.expert_ends))
    ms["scatter"] = bench_ms(lambda: scatter_token_rows(x, aligned, False, aligned.max_padded_rows))
    ms["silu"] = bench_ms(lambda: silu_mul(gate_up, aligned, False))
    for cfg in tiles:
        alignment = moe_align_block_size(topk_ids, num_experts, cfg.block_m)
        real = alignment.sorted_row_ids[:alignment.max_padded_rows] < alignment.num_rows
        current_cfg = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.num_warps, cfg.num_stages,
                                 weight_tma=True)
        try:
            want = run_gemm1(x, None, w13, None, alignment, current_cfg)[0][real].float()
            ms[f"current {cfg.label}"] = bench_ms(lambda: run_gemm1(x, None, w13, None, alignment, current_cfg))
        except Exception as exc:  # noqa: BLE001 - a tile that does not fit: recorded, the sweep goes on
            errors[f"current {cfg.label}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            want = None
        for mode_name in modes:
            mode = MODES[mode_name]
            key = f"{mode_name} {cfg.label}"
            try:
                desc = pair_descriptor(w13, mode, cfg, interleaved)
                got = run_pair(x, w13, alignment, cfg, mode, desc, interleaved)
                if want is not None:
                    diff = (got[real].float() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
                    errors[f"{key} rel_diff_vs_current"] = diff
                ms[key] = bench_ms(lambda: run_pair(x, w13, alignment, cfg, mode, desc, interleaved))
            except Exception as exc:  # noqa: BLE001
                errors[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
        log(f"{shape_name} {num_tokens} {cfg.label}: " + ", ".join(
            f"{k.split()[0]} {v:.3f}" for k, v in ms.items() if k.endswith(cfg.label)))
    best = {prefix: min((v for k, v in ms.items() if k.startswith(prefix + " ")), default=None)
            for prefix in ["current", *modes]}
    cutlass_side = ms["cutlass_gemm1"] + ms["scatter"] + ms["silu"]
    return {"shape": shape_name, "tokens": num_tokens, "ms": {k: round(v, 4) for k, v in ms.items()},
            "errors": errors, "best_ms": best, "cutlass_gemm1_with_passes_ms": round(cutlass_side, 4),
            "best_vs_cutlass_gemm1": {k: round(ms["cutlass_gemm1"] / v, 3) for k, v in best.items() if v}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[8192, 16384, 32768])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    points = [measure(shape, tokens, TILES, args.modes) for shape in args.shapes for tokens in args.tokens]
    result = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "points": points}
    out = args.out or Path(__file__).parent / "results" / f"gemm1_pair_tiles-{gpu_tag()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for point in points:
        print(point["shape"], point["tokens"], point["best_ms"], "cutlass", point["ms"]["cutlass_gemm1"],
              "with passes", point["cutlass_gemm1_with_passes_ms"])
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
