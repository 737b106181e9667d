"""Time the token->expert alignment: ours (three Triton launches) beside vLLM's CUDA kernel.

Every MoE layer of every backend starts with ``moe_align_block_size`` (``kernels/align.py``):
sort the T*K (token, slot) rows by expert and pad each expert's segment to ``block_m`` rows.
It moves almost no bytes, so its time is launch and latency: a fixed cost per layer that
weighs most where the layer is short (few tokens, small experts, FP8). Sides, at E experts
and top-K routing of random logits (softmax top-k, int32 ids as the engines pass them):

    ours    moe_align_block_size_triton: count, scan, place (stable within each expert)
    torch   moe_align_block_size_torch: the plain-torch definition ours must equal, ~20 ops
    vllm    vLLM's moe_align_block_size (its CUDA kernel; atomics, any order within an
            expert), where vLLM imports; the JSON's meta says why not otherwise

Each time is the median of ``triton.testing.do_bench`` over replays of the call captured in a
CUDA graph (L2 flushed before each): GPU time, launches included, no host gaps. Every point
checks ours against torch tensor for tensor (``ours_equals_torch``).

    python benchmarks/moe_align.py                    # table + benchmarks/results/moe_align-<gpu>.json
    python benchmarks/moe_align.py --tokens 1 2048 16384 --block-m 128
    python benchmarks/moe_align.py --sweep            # also ours over the chunk and padding-tile sizes
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _moe_timing import gpu_tag, graph_ms, log  # noqa: E402
from zeroprefill.kernels import align  # noqa: E402

TOKENS = [1, 64, 512, 2048, 8192, 16384, 32768]
BLOCK_MS = [16, 128]  # the grouped_mm path's, DeepGEMM's
FIELDS = ("sorted_row_ids", "block_expert_ids", "num_padded_rows", "expert_ends", "position_of_row",
          "rows_per_expert")


def vllm_align() -> tuple[Callable | None, str]:
    """vLLM's ``moe_align_block_size(topk_ids, block_size, num_experts)``, and its source or why none."""
    try:
        from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size
        import vllm
    except Exception as exc:  # not installed, or no CUDA build of it
        return None, f"not measured: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return moe_align_block_size, f"vllm {vllm.__version__}"


def routed_ids(num_tokens: int, top_k: int, num_experts: int) -> torch.Tensor:
    """``[T, K]`` int32 expert ids: softmax top-k of random logits, as a router picks them."""
    logits = torch.randn(num_tokens, num_experts, device="cuda")
    return torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1).indices.to(torch.int32)


def measure(tokens: list[int], block_ms: list[int], num_experts: int, top_k: int,
            vllm_fn: Callable | None) -> list[dict]:
    """Every token count x block size: ours checked against the torch definition, then each
    side's graph-replayed time (µs), one table row per point."""
    points = []
    print(f"{'tokens':>7} {'block_m':>7} {'ours us':>9} {'torch us':>9} {'vllm us':>9} {'vllm/ours':>9}")
    for num_tokens in tokens:
        topk_ids = routed_ids(num_tokens, top_k, num_experts)
        for block_m in block_ms:
            ours = align.moe_align_block_size_triton(topk_ids, num_experts, block_m)
            ref = align.moe_align_block_size_torch(topk_ids, num_experts, block_m)
            equal = all(torch.equal(getattr(ours, f), getattr(ref, f)) for f in FIELDS)
            calls = {"ours": lambda: align.moe_align_block_size_triton(topk_ids, num_experts, block_m),
                     "torch": lambda: align.moe_align_block_size_torch(topk_ids, num_experts, block_m)}
            if vllm_fn is not None:
                calls["vllm"] = lambda: vllm_fn(topk_ids, block_m, num_experts)
            us = {side: round(graph_ms(call) * 1e3, 2) for side, call in calls.items()}
            point = {"tokens": num_tokens, "block_m": block_m, "rows": topk_ids.numel(), "us_graph": us,
                     "ours_equals_torch": equal}
            if "vllm" in us:
                point["vllm_vs_ours"] = round(us["vllm"] / us["ours"], 2)
            points.append(point)
            vllm_us = f"{us['vllm']:9.1f} {point['vllm_vs_ours']:9.2f}" if "vllm" in us else f"{'-':>9} {'-':>9}"
            print(f"{num_tokens:7d} {block_m:7d} {us['ours']:9.1f} {us['torch']:9.1f} {vllm_us}"
                  f"{'' if equal else '   OURS != TORCH'}", flush=True)
    return points


SWEEP = {"ROWS_PER_PROGRAM": [64, 128, 256, 512], "TILE_ELEMENTS": [4096, 8192]}


def sweep(tokens: list[int], block_ms: list[int], num_experts: int, top_k: int) -> list[dict]:
    """Ours at every ``ROWS_PER_PROGRAM`` x ``TILE_ELEMENTS`` of :data:`SWEEP` (the rows of a chunk,
    the padding pass's tile): the evidence for the shipped constants."""
    shipped = {name: getattr(align, name) for name in SWEEP}
    rows = []
    print(f"\nsweep (ours, us): {'tokens':>7} {'block_m':>7} " + " ".join(
        f"{p:>5}x{t:<5}" for p in SWEEP["ROWS_PER_PROGRAM"] for t in SWEEP["TILE_ELEMENTS"]))
    try:
        for num_tokens in tokens:
            topk_ids = routed_ids(num_tokens, top_k, num_experts)
            for block_m in block_ms:
                us = {}
                for chunk in SWEEP["ROWS_PER_PROGRAM"]:
                    for tile in SWEEP["TILE_ELEMENTS"]:
                        align.ROWS_PER_PROGRAM, align.TILE_ELEMENTS = chunk, tile
                        us[f"{chunk}x{tile}"] = round(graph_ms(
                            lambda: align.moe_align_block_size_triton(topk_ids, num_experts, block_m)) * 1e3, 2)
                rows.append({"tokens": num_tokens, "block_m": block_m, "us_graph": us})
                print(f"{'':17} {num_tokens:7d} {block_m:7d} " + " ".join(f"{v:11.1f}" for v in us.values()),
                      flush=True)
    finally:
        for name, value in shipped.items():
            setattr(align, name, value)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--block-m", type=int, nargs="+", default=BLOCK_MS)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--sweep", action="store_true",
                        help="also time ours over ROWS_PER_PROGRAM x TILE_ELEMENTS (the shipped constants' evidence)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/moe_align-<gpu>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "moe_align: error: needs a CUDA GPU (the kernels' correctness runs on CPU in "
                       "tests/test_kernels.py)\n")
    if min(args.tokens) < 1 or min(args.block_m) < 1 or args.experts < 1 or not 1 <= args.top_k <= args.experts:
        parser.error("tokens and block_m must be >= 1, and 1 <= top_k <= experts")
    torch.manual_seed(0)
    vllm_fn, vllm_source = vllm_align()
    gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"moe_align-{gpu_tag()}.json"
    log(f"{gpu}: E={args.experts} top-{args.top_k}, tokens {args.tokens}, block_m {args.block_m}; vLLM: {vllm_source}")
    points = measure(args.tokens, args.block_m, args.experts, args.top_k, vllm_fn)
    sweep_rows = sweep(args.tokens, args.block_m, args.experts, args.top_k) if args.sweep else None
    ratios = [p["vllm_vs_ours"] for p in points if "vllm_vs_ours" in p]
    summary = {"ours_max_us": max(p["us_graph"]["ours"] for p in points),
               "vllm_vs_ours_min": min(ratios) if ratios else None,
               "ours_equals_torch_everywhere": all(p["ours_equals_torch"] for p in points)}
    meta = {"command": "python benchmarks/moe_align.py " + " ".join(sys.argv[1:]), "device": gpu,
            "torch": torch.__version__, "triton": triton.__version__, "vllm": vllm_source,
            "experts": args.experts, "top_k": args.top_k,
            "shipped": {name: getattr(align, name) for name in SWEEP},
            "timing": "us_graph: do_bench median of a CUDA-graph replay of the call, L2 flushed (GPU time, "
                      "launches included)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "points": points, "sweep": sweep_rows, "meta": meta},
                                    indent=1) + "\n")
    print(f"\nsummary: {json.dumps(summary)}")
    log(f"wrote {out}")
    if not summary["ours_equals_torch_everywhere"]:
        sys.exit("moe_align: ours differs from the torch definition (see the table)")


if __name__ == "__main__":
    main()
