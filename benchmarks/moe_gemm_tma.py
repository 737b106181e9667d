"""Time our grouped expert GEMMs with the weight tiles loaded through TMA, or by pointer loads.

Our two Triton GEMMs (``kernels/fused_moe.py``) read the weight tiles either through a TMA
descriptor (``GemmConfig.weight_tma``, ``weight_tiles``: one Tensor Memory Accelerator copy per
tile, sm90) or with per-thread pointer loads (every other case). This times both, tile
configuration by tile configuration, at the Qwen3 MoE shapes in bf16, beside what the fused
GEMM 1 must beat to be worth running instead of torch's CUTLASS grouped GEMM, which needs our
row scatter before it and our SiLU*mul pass after it:

    gemm1 ptr|tma CFG   ours: gathered token rows . w13[e]^T, SiLU*mul in the epilogue
    gemm2 ptr|tma CFG   ours: act . w2[e]^T, times the routing weight, scattered to token order
    cutlass_gemm1       torch._grouped_mm over pre-scattered rows (no gather, no SiLU)
    cutlass_gemm2       torch._grouped_mm over act
    scatter, silu, combine   our passes around the CUTLASS GEMMs (kernels/grouped_mm_moe.py)

Each time is ``triton.testing.do_bench``'s median (L2 flushed before each call), E = 128,
top-8 of random logits. Every configuration checks that TMA and pointer loads give the same
output (``max_abs_diff``, 0 expected: same tiles, same order).

    python benchmarks/moe_gemm_tma.py       # table + benchmarks/results/moe_gemm_tma-<gpu>.json
    python benchmarks/moe_gemm_tma.py --shapes qwen3-30b-a3b --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _moe_timing import bench_ms, gpu_tag, log  # noqa: E402
from zeroprefill.kernels.align import moe_align_block_size  # noqa: E402
from zeroprefill.kernels.fused_moe import run_gemm1, run_gemm2, weight_tiles  # noqa: E402
from zeroprefill.kernels.grouped_mm_moe import grouped_gemm, scatter_token_rows, silu_mul, weighted_combine  # noqa: E402
from zeroprefill.kernels.moe_config import GemmConfig, get_config  # noqa: E402

SHAPES = {"qwen3-235b-a22b": (128, 8, 4096, 1536), "qwen3-30b-a3b": (128, 8, 2048, 768)}  # E, K, H, I
TOKENS = [8192, 16384, 32768]
GEMM1_CONFIGS = [GemmConfig(128, 128, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 4),
                 GemmConfig(128, 128, 64, 16, 8, 5), GemmConfig(128, 128, 128, 8, 8, 2),
                 GemmConfig(64, 128, 64, 8, 4, 4), GemmConfig(128, 64, 64, 8, 4, 4)]
GEMM2_CONFIGS = [GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 4),
                 GemmConfig(64, 128, 64, 8, 4, 4)]


def tag(cfg: GemmConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} g{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}"


def measure_point(shape: tuple[int, int, int, int], num_tokens: int) -> dict:
    """One shape and token count: CUTLASS and the passes, then ours both ways per configuration."""
    num_experts, top_k, hidden, inter = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden ** -0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=gen) * inter ** -0.5).bfloat16()
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).bfloat16()
    logits = torch.randn(num_tokens, num_experts, device="cuda", generator=gen)
    topk_weights, topk_ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    topk_ids = topk_ids.to(torch.int32)
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

    for cfg in GEMM1_CONFIGS:
        if weight_tiles(w13, inter, replace(cfg, weight_tma=True)) is None:
            continue
        aligned = moe_align_block_size(topk_ids, num_experts, cfg.block_m)
        used = aligned.sorted_row_ids[:aligned.max_padded_rows] < aligned.num_rows
        outs = []
        for tma in (False, True):
            loads = replace(cfg, weight_tma=tma)
            outs.append(run_gemm1(x, None, w13, None, aligned, loads)[0][used])
            ms[f"gemm1 {'tma' if tma else 'ptr'} {tag(cfg)}"] = bench_ms(
                lambda: run_gemm1(x, None, w13, None, aligned, loads))
        max_abs_diff[f"gemm1 {tag(cfg)}"] = (outs[0].float() - outs[1].float()).abs().max().item()
    for cfg in GEMM2_CONFIGS:
        if weight_tiles(w2, hidden, replace(cfg, weight_tma=True)) is None:
            continue
        aligned = moe_align_block_size(topk_ids, num_experts, cfg.block_m)
        act = run_gemm1(x, None, w13, None, aligned, GemmConfig(cfg.block_m, 128, 64))[0]
        outs = []
        for tma in (False, True):
            loads = replace(cfg, weight_tma=tma)
            outs.append(run_gemm2(act, None, w2, None, topk_weights, aligned, loads, torch.bfloat16))
            ms[f"gemm2 {'tma' if tma else 'ptr'} {tag(cfg)}"] = bench_ms(
                lambda: run_gemm2(act, None, w2, None, topk_weights, aligned, loads, torch.bfloat16))
        max_abs_diff[f"gemm2 {tag(cfg)}"] = (outs[0].float() - outs[1].float()).abs().max().item()

    def best(prefix: str) -> tuple[str, float]:
        return min(((k, v) for k, v in ms.items() if k.startswith(prefix)), key=lambda kv: kv[1])

    shipped = get_config(num_tokens, top_k, num_experts, hidden, inter, False, x.device)
    gemm1_flops = 2 * num_tokens * top_k * hidden * 2 * inter
    best_ptr, best_tma = best("gemm1 ptr"), best("gemm1 tma")
    cutlass_side = ms["cutlass_gemm1"] + ms["scatter"] + ms["silu"]
    return {
        "tokens": num_tokens, "ms": {k: round(v, 4) for k, v in ms.items()},
        "max_abs_diff_tma_vs_ptr": max_abs_diff,
        "shipped_backend": shipped.backend,
        "gemm1_best_ptr": best_ptr[0], "gemm1_best_tma": best_tma[0],
        "gemm1_tma_vs_ptr": round(best_ptr[1] / best_tma[1], 3),
        "gemm2_tma_vs_ptr": round(best("gemm2 ptr")[1] / best("gemm2 tma")[1], 3),
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
            "torch": torch.__version__, "triton": triton.__version__,
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
            print(f"  gemm1 TMA/ptr {point['gemm1_tma_vs_ptr']}, gemm2 TMA/ptr {point['gemm2_tma_vs_ptr']}, "
                  f"gemm1 TMA vs CUTLASS + scatter + SiLU {point['gemm1_tma_vs_cutlass_with_passes']}", flush=True)
            points = [p for shape_points in results.values() for p in shape_points]
            summary = {key: min(p[key] for p in points) for key in
                       ("gemm1_tma_vs_ptr", "gemm2_tma_vs_ptr", "gemm1_tma_vs_cutlass_with_passes")}
            summary["tma_equals_ptr_everywhere"] = all(
                v == 0 for p in points for v in p["max_abs_diff_tma_vs_ptr"].values())
            complete = name == args.shapes[-1] and num_tokens == args.tokens[-1]
            out.write_text(json.dumps({"summary": summary, "points": results, "meta": meta, "complete": complete},
                                      indent=1) + "\n")  # after every point: a cut-off run keeps what it measured
            torch.cuda.empty_cache()
    print(f"\nsummary: {json.dumps(summary)}")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
