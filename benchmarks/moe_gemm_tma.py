"""Time our grouped expert GEMMs with the weight tiles loaded through TMA, or by pointer loads.

Our two Triton GEMMs (``kernels/fused_moe.py``) read the weight tiles either through a TMA
descriptor (``GemmConfig.weight_tma``, ``weight_tiles``: one Tensor Memory Accelerator copy per
tile, sm90) or with per-thread pointer loads (every other case). This times both, tile
configuration by tile configuration, at the Qwen3 MoE shapes in bf16 and block FP8, beside
what the fused GEMM 1 must beat to be worth running instead of torch's CUTLASS grouped GEMM,
which needs our row scatter before it and our SiLU*mul pass after it:

    gemm1 ptr|tma CFG   ours: gathered token rows . w13[e]^T, SiLU*mul in the epilogue
    gemm2 ptr|tma CFG   ours: act . w2[e]^T, times the routing weight, scattered to token order
    fp8 gemm1|gemm2 ... the same in block FP8 (e4m3, 128x128 weight scales, 1x128 activation scales)
    cutlass_gemm1       torch._grouped_mm over pre-scattered rows (no gather, no SiLU)
    cutlass_gemm2       torch._grouped_mm over act
    scatter, silu, combine   our passes around the CUTLASS GEMMs (kernels/grouped_mm_moe.py)

Each time is ``triton.testing.do_bench``'s median (L2 flushed before each call), E = 128,
top-8 of random logits (``moe_kernels.py``'s random layer). Every configuration checks that TMA and pointer loads give the same
output (``max_abs_diff``, 0 expected: same tiles, same order).

    python benchmarks/moe_gemm_tma.py       # table + benchmarks/results/moe_gemm_tma-<gpu>.json
    python benchmarks/moe_gemm_tma.py --shapes qwen3-30b-a3b --tokens 16384

The shipped tiles at each point are timed too (``shipped``: their TMA/pointer ratio). This
benchmark decides nothing: the shipped table's tiles, their loads included, change by one rule,
``gemm_before_after.py --write-table``, which times each entry's tile with the other loads
among its candidates (until the nineteenth session this script had a table rule of its own,
for the loads alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _moe_timing import SHAPES, Layer, bench_ms, gpu_tag, log  # noqa: E402
from zeroprefill.kernels.align import ExpertAlignment, moe_align_block_size  # noqa: E402
from zeroprefill.kernels.fused_moe import gate_up_tiles, run_gemm1, run_gemm2, weight_tiles  # noqa: E402
from zeroprefill.kernels.grouped_mm_moe import (grouped_gemm, scatter_token_rows, silu_mul,  # noqa: E402
                                                weighted_combine)
from zeroprefill.kernels.moe_config import GemmConfig, arch_name, get_config  # noqa: E402
from zeroprefill.kernels.quant import quantize_tokens_fp8_group  # noqa: E402

TOKENS = [8192, 16384, 32768]
GEMM1_CONFIGS = [GemmConfig(128, 128, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 4),
                 GemmConfig(128, 128, 128, 8, 8, 2), GemmConfig(64, 128, 64, 8, 4, 4),
                 GemmConfig(128, 64, 64, 8, 4, 4)]
GEMM2_CONFIGS = [GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 4),
                 GemmConfig(64, 128, 64, 8, 4, 4)]
# block FP8: block_k 128 (one scale group per step), GEMM 1 block_n 128; the shipped sm90 tiles
FP8_GEMM1_CONFIGS = [GemmConfig(64, 128, 128, 8, 4, 3), GemmConfig(64, 128, 128, 8, 4, 4),
                     GemmConfig(64, 128, 128, 8, 8, 3)]
FP8_GEMM2_CONFIGS = [GemmConfig(64, 128, 128, 8, 4, 3), GemmConfig(64, 128, 128, 8, 4, 4)]


def shipped_tiles(shape: tuple[int, int, int, int], num_tokens: int) -> dict[str, GemmConfig]:
    """The tiles the shipped table runs at this point (``gemm1``, ``gemm2``, ``fp8 gemm1``, ...),
    as pointer-load tiles; a bf16 entry on the grouped_mm backend has none."""
    num_experts, top_k, hidden, inter = shape
    tiles = {}
    for fp8 in (False, True):
        config = get_config(num_tokens, top_k, num_experts, hidden, inter, fp8, torch.device("cuda"))
        for gemm in ("gemm1", "gemm2"):
            if getattr(config, gemm) is not None:
                tiles[("fp8 " if fp8 else "") + gemm] = replace(getattr(config, gemm), weight_tma=False)
    return tiles


def time_both_loads(label: str, tiles: list[GemmConfig], descriptor: Callable[[GemmConfig], object | None],
                    run: Callable[[GemmConfig], torch.Tensor], ms: dict, max_abs_diff: dict,
                    compared: Callable[[torch.Tensor, GemmConfig], torch.Tensor] = lambda out, cfg: out) -> None:
    """Each tile whose weights TMA can read (``descriptor(tile)`` is not None): ``run(tile)``
    timed with pointer and with TMA loads, and the largest difference between the ``compared``
    parts of the two outputs."""
    for cfg in tiles:
        if descriptor(replace(cfg, weight_tma=True)) is None:
            continue
        outs = []
        for tma in (False, True):
            loads = replace(cfg, weight_tma=tma)
            try:
                outs.append(compared(run(loads), loads).float())
            except OutOfResources as exc:  # TMA's staging buffers can push a tile past shared memory
                log(f"  {label} {'tma' if tma else 'ptr'} {cfg.label}: does not fit ({exc})")
                continue
            ms[f"{label} {'tma' if tma else 'ptr'} {cfg.label}"] = bench_ms(lambda: run(loads))
        if len(outs) == 2:
            max_abs_diff[f"{label} {cfg.label}"] = (outs[0] - outs[1]).abs().max().item()


def measure_point(shape: tuple[int, int, int, int], num_tokens: int) -> dict:
    """One shape and token count: CUTLASS and the passes, then ours both ways per tile (the
    benchmark's and the shipped ones), bf16 and FP8."""
    num_experts, top_k, hidden, inter = shape
    layer = Layer(shape, num_tokens)
    w13, w2, w13_fp8, w13_scale, w2_fp8, w2_scale = (layer.w13, layer.w2, layer.w13_fp8, layer.w13_scale,
                                                     layer.w2_fp8, layer.w2_scale)
    x, topk_weights, topk_ids = layer.inputs(num_tokens)
    ms: dict[str, float] = {}
    max_abs_diff: dict[str, float] = {}

    aligned = moe_align_block_size(topk_ids, num_experts, 16)
    rows, ends = aligned.max_padded_rows, aligned.expert_ends
    x_sorted, _ = scatter_token_rows(x, aligned, False, rows)
    gate_up = grouped_gemm(x_sorted, w13, ends)
    act, _ = silu_mul(gate_up, aligned, False)
    y = grouped_gemm(act, w2, ends)
    ms["cutlass_gemm1"] = bench_ms(lambda: grouped_gemm(x_sorted, w13, ends))
    ms["cutlass_gemm2"] = bench_ms(lambda: grouped_gemm(act, w2, ends))
    ms["scatter"] = bench_ms(lambda: scatter_token_rows(x, aligned, False, rows))
    ms["silu"] = bench_ms(lambda: silu_mul(gate_up, aligned, False))
    ms["combine"] = bench_ms(lambda: weighted_combine(y, topk_weights, aligned, torch.bfloat16))

    alignments: dict[int, ExpertAlignment] = {}

    def aligned_to(block_m: int) -> ExpertAlignment:
        if block_m not in alignments:
            alignments[block_m] = moe_align_block_size(topk_ids, num_experts, block_m)
        return alignments[block_m]

    def real_rows(out: torch.Tensor, cfg: GemmConfig) -> torch.Tensor:  # padding rows hold anything
        alignment = aligned_to(cfg.block_m)
        return out[alignment.sorted_row_ids[:alignment.max_padded_rows] < alignment.num_rows]

    shipped = shipped_tiles(shape, num_tokens)

    def with_shipped(label: str, tiles: list[GemmConfig]) -> list[GemmConfig]:
        tile = shipped.get(label)
        return tiles + [tile] if tile is not None and tile not in tiles else tiles

    x_fp8, x_scale = quantize_tokens_fp8_group(x)
    acts = {block_m: run_gemm1(x, None, w13, None, aligned_to(block_m), GemmConfig(block_m, 128, 64))[0]
            for block_m in {cfg.block_m for cfg in with_shipped("gemm2", GEMM2_CONFIGS)}}
    acts_fp8 = {block_m: run_gemm1(x_fp8, x_scale, w13_fp8, w13_scale, aligned_to(block_m),
                                   GemmConfig(block_m, 128, 128, num_warps=4))
                for block_m in {cfg.block_m for cfg in with_shipped("fp8 gemm2", FP8_GEMM2_CONFIGS)}}
    time_both_loads("gemm1", with_shipped("gemm1", GEMM1_CONFIGS), partial(gate_up_tiles, w13), lambda cfg: run_gemm1(
        x, None, w13, None, aligned_to(cfg.block_m), cfg)[0], ms, max_abs_diff, real_rows)
    time_both_loads("gemm2", with_shipped("gemm2", GEMM2_CONFIGS), partial(weight_tiles, w2, hidden), lambda cfg: run_gemm2(
        acts[cfg.block_m], None, w2, None, topk_weights, aligned_to(cfg.block_m), cfg, torch.bfloat16),
        ms, max_abs_diff)
    time_both_loads("fp8 gemm1", with_shipped("fp8 gemm1", FP8_GEMM1_CONFIGS), partial(weight_tiles, w13_fp8, inter), lambda cfg: run_gemm1(
        x_fp8, x_scale, w13_fp8, w13_scale, aligned_to(cfg.block_m), cfg)[0], ms, max_abs_diff, real_rows)
    time_both_loads("fp8 gemm2", with_shipped("fp8 gemm2", FP8_GEMM2_CONFIGS), partial(weight_tiles, w2_fp8, hidden), lambda cfg: run_gemm2(
        *acts_fp8[cfg.block_m], w2_fp8, w2_scale, topk_weights, aligned_to(cfg.block_m), cfg, torch.bfloat16),
        ms, max_abs_diff)

    def best(prefix: str) -> tuple[str, float]:
        return min(((k, v) for k, v in ms.items() if k.startswith(prefix)), key=lambda kv: kv[1])

    def tma_vs_ptr(label: str) -> float:
        return round(best(f"{label} ptr")[1] / best(f"{label} tma")[1], 3)

    gemm1_flops = 2 * num_tokens * top_k * hidden * 2 * inter
    best_ptr, best_tma = best("gemm1 ptr"), best("gemm1 tma")
    cutlass_side = ms["cutlass_gemm1"] + ms["scatter"] + ms["silu"]
    return {
        "tokens": num_tokens, "ms": {k: round(v, 4) for k, v in ms.items()},
        "max_abs_diff_tma_vs_ptr": max_abs_diff,
        "shipped_bf16_backend": get_config(num_tokens, top_k, num_experts, hidden, inter, False, x.device).backend,
        "shipped": {label: {"tile": tile.label, "tma_vs_ptr": round(ms[f"{label} ptr {tile.label}"]
                                                                   / ms[f"{label} tma {tile.label}"], 3)}
                    for label, tile in shipped.items() if f"{label} tma {tile.label}" in ms},
        "gemm1_best_ptr": best_ptr[0], "gemm1_best_tma": best_tma[0],
        **{f"{label.replace(' ', '_')}_tma_vs_ptr": tma_vs_ptr(label)
           for label in ("gemm1", "gemm2", "fp8 gemm1", "fp8 gemm2")},
        "gemm1_tma_tflops": round(gemm1_flops / (best_tma[1] * 1e-3) / 1e12, 1),
        "cutlass_gemm1_tflops": round(gemm1_flops / (ms["cutlass_gemm1"] * 1e-3) / 1e12, 1),
        # > 1: our fused GEMM 1 is faster than CUTLASS's GEMM 1 with the scatter and SiLU passes it needs
        "gemm1_tma_vs_cutlass_with_passes": round(cutlass_side / best_tma[1], 3),
        "gemm1_ptr_vs_cutlass_with_passes": round(cutlass_side / best_ptr[1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/moe_gemm_tma-<gpu>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "moe_gemm_tma: error: needs a CUDA GPU (the kernels' correctness runs on CPU in "
                       "tests/test_kernels.py)\n")
    if torch.cuda.get_device_capability() < (9, 0):
        parser.exit(2, f"moe_gemm_tma: error: TMA needs sm90 (H100/H200) or newer, this is "
                       f"{torch.cuda.get_device_name()}\n")
    if min(args.tokens) < 1:
        parser.error("tokens must be >= 1")
    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"moe_gemm_tma-{gpu_tag()}.json"
    meta = {"command": "python benchmarks/moe_gemm_tma.py " + " ".join(sys.argv[1:]), "device": gpu,
            "arch": arch_name(torch.device("cuda")), "torch": torch.__version__, "triton": triton.__version__,
            "timing": "do_bench median of one eager call, L2 flushed", "summary": "minimum over the points"}
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for name in args.shapes:
        for num_tokens in args.tokens:
            log(f"{gpu}: {name}, {num_tokens} tokens")
            point = measure_point(SHAPES[name], num_tokens)
            results.setdefault(name, []).append(point)
            for key, value in point["ms"].items():
                print(f"  {key:34s} {value:8.4f} ms")
            print(f"  TMA/ptr: gemm1 {point['gemm1_tma_vs_ptr']}, gemm2 {point['gemm2_tma_vs_ptr']}, "
                  f"fp8 gemm1 {point['fp8_gemm1_tma_vs_ptr']}, fp8 gemm2 {point['fp8_gemm2_tma_vs_ptr']}; "
                  f"gemm1 TMA vs CUTLASS + scatter + SiLU {point['gemm1_tma_vs_cutlass_with_passes']}", flush=True)
            points = [p for shape_points in results.values() for p in shape_points]
            summary = {key: min(p[key] for p in points) for key in
                       ("gemm1_tma_vs_ptr", "gemm2_tma_vs_ptr", "fp8_gemm1_tma_vs_ptr", "fp8_gemm2_tma_vs_ptr",
                        "gemm1_tma_vs_cutlass_with_passes")}
            summary["tma_equals_ptr_everywhere"] = all(
                v == 0 for p in points for v in p["max_abs_diff_tma_vs_ptr"].values())
            complete = name == args.shapes[-1] and num_tokens == args.tokens[-1]
            out.write_text(json.dumps({"summary": summary, "points": results, "meta": meta, "complete": complete},
                                      indent=1) + "\n")  # after every point: a cut-off run keeps what it measured
            torch.cuda.empty_cache()
    print(f"\nsummary: {json.dumps(summary)}")
    log(f"wrote {out}")
    if not summary["tma_equals_ptr_everywhere"]:
        sys.exit("moe_gemm_tma: TMA and pointer loads gave different outputs (max_abs_diff_tma_vs_ptr)")


if __name__ == "__main__":
    main()
