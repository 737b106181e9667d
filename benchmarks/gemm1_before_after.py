"""GEMM 1 of this checkout against GEMM 1 of an earlier one, tile by tile, on the same inputs.

A change to ``kernels/fused_moe.py``'s first GEMM is judged against the kernel it replaces, in
one process on one GPU: ``--before`` is that earlier module's file, loaded beside today's as
part of the same package::

    git show 6202de6:kernels/fused_moe.py > build/fused_moe_before.py
    python benchmarks/gemm1_before_after.py --before build/fused_moe_before.py --out gemm1_before_after.json

For each shape, token count and dtype (bf16, block FP8) it times ``run_gemm1`` of both modules
(``triton.testing.do_bench`` medians, L2 flushed) with the shipped tile, that tile with the other
weight loads (TMA / pointers), and a few other tiles, and checks that both produce the same
``act`` (largest difference relative to its largest value, over the rows in use). Summary:
``after_vs_before_shipped`` (before's time / after's, > 1: faster now) per point, its minimum,
and the best tile of each side.

A tile tuned for the earlier kernel need not be the best one for today's. ``--write-table``
applies a results file to the shipped table, without a GPU: a table entry's GEMM 1 tile becomes
the after side's best where that was more than 5% faster (the margin ``moe_kernels.py
--select-backends`` uses) than the entry's own tile, after, at every point whose lookup lands
on the entry, and the same tile was best at all of them::

    python benchmarks/gemm1_before_after.py --write-table --from-results gemm1_before_after.json --dtypes bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch
import triton
from triton.runtime.errors import OutOfResources

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _moe_timing import SELECT_MARGIN, SHAPES, Layer, bench_ms, gpu_tag, log  # noqa: E402
from zeroprefill.kernels import fused_moe  # noqa: E402
from zeroprefill.kernels.align import moe_align_block_size  # noqa: E402
from zeroprefill.kernels.moe_config import (CONFIG_DIR, GemmConfig, arch_name, clear_config_cache,  # noqa: E402
                                            get_config, nearest_token_count, problem_key)
from zeroprefill.kernels.quant import quantize_tokens_fp8_group  # noqa: E402

OTHER_TILES = {
    "bf16": [GemmConfig(128, 128, 64, 8, 8, 3, True), GemmConfig(128, 128, 64, 8, 8, 4, True),
             GemmConfig(64, 128, 64, 8, 4, 4, True)],
    "fp8": [GemmConfig(64, 128, 128, 8, 4, 3, True), GemmConfig(64, 128, 128, 8, 8, 3, True),
            GemmConfig(128, 128, 128, 8, 8, 3, True)],
}


def load_before(path: Path) -> ModuleType:
    """``path`` as ``zeroprefill.kernels._gemm1_before``: its relative imports are today's package."""
    spec = importlib.util.spec_from_file_location("zeroprefill.kernels._gemm1_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(before: ModuleType, shape_name: str, num_tokens: int, dtype: str) -> dict:
    num_experts, top_k, hidden, inter = SHAPES[shape_name]
    layer = Layer(SHAPES[shape_name], num_tokens)
    x, _, topk_ids = layer.inputs(num_tokens)
    fp8 = dtype == "fp8"
    w13, w13_scale = (layer.w13_fp8, layer.w13_scale) if fp8 else (layer.w13, None)
    x_in, x_scale = quantize_tokens_fp8_group(x) if fp8 else (x, None)
    shipped = get_config(num_tokens, top_k, num_experts, hidden, inter, fp8, x.device, allow_grouped_mm=False).gemm1
    tiles = [shipped, replace(shipped, weight_tma=not shipped.weight_tma)]
    tiles += [tile for tile in OTHER_TILES[dtype] if tile not in tiles]
    ms: dict[str, float] = {}
    rel_diff: dict[str, float] = {}
    for tile in tiles:
        alignment = moe_align_block_size(topk_ids, num_experts, tile.block_m)
        used = alignment.sorted_row_ids[:alignment.max_padded_rows] < alignment.num_rows
        label = f"{tile.label} {'tma' if tile.weight_tma else 'ptr'}"
        outs = []
        for side, module in (("before", before), ("after", fused_moe)):
            def call(module=module, tile=tile, alignment=alignment):
                return module.run_gemm1(x_in, x_scale, w13, w13_scale, alignment, tile)
            try:
                outs.append(call()[0][used].float())
                ms[f"{side} {label}"] = bench_ms(call)
            except OutOfResources as exc:
                log(f"  {side} {label}: does not fit ({exc})")
        if len(outs) == 2:
            rel_diff[label] = (outs[0] - outs[1]).abs().max().item() / max(outs[0].abs().max().item(), 1e-30)
        log(f"{shape_name} {num_tokens} {dtype} {label}: " + ", ".join(
            f"{side} {ms[f'{side} {label}']:.3f} ms" for side in ("before", "after") if f"{side} {label}" in ms))
    shipped_label = f"{shipped.label} {'tma' if shipped.weight_tma else 'ptr'}"

    def best(side: str) -> tuple[str, float]:
        return min(((k[len(side) + 1:], v) for k, v in ms.items() if k.startswith(side)), key=lambda kv: kv[1])

    return {"shape": shape_name, "tokens": num_tokens, "dtype": dtype, "shipped": shipped_label,
            "ms": {k: round(v, 4) for k, v in ms.items()}, "rel_diff_after_vs_before": rel_diff,
            "after_vs_before_shipped": round(ms[f"before {shipped_label}"] / ms[f"after {shipped_label}"], 3),
            "best_before": best("before"), "best_after": best("after")}


def tile_of(label: str) -> GemmConfig:
    """``"128x128x64 g8 w8 s4 tma"`` (a ``GemmConfig.label`` and its loads) as the tile."""
    shape, group, warps, stages, loads = label.split()
    block_m, block_n, block_k = map(int, shape.split("x"))
    return GemmConfig(block_m, block_n, block_k, int(group[1:]), int(warps[1:]), int(stages[1:]), loads == "tma")


def adopt_best_tiles(configs: dict, points: list[dict], margin: float = SELECT_MARGIN) -> list[str]:
    """Apply ``points`` to the table's ``configs`` in place (the rule in the module's docstring);
    returns one line per entry the points reached: its change, or why it stays."""
    votes: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for point in points:
        num_experts, _, hidden, inter = SHAPES[point["shape"]]
        key = problem_key(point["dtype"] == "fp8", num_experts, hidden, inter)
        if key not in configs:  # the heuristic's tiles: nothing in the table to change
            continue
        entry = nearest_token_count(configs[key], point["tokens"])
        table_tile = configs[key][entry]["gemm1"]
        label = f"{GemmConfig(**table_tile).label} {'tma' if table_tile.get('weight_tma') else 'ptr'}"
        best, best_ms = point["best_after"]
        shipped_ms = point["ms"].get(f"after {label}")
        speedup = shipped_ms / best_ms if shipped_ms else 0.0  # the entry's tile unmeasured: no vote to switch
        votes.setdefault((key, entry), []).append((best, speedup))
    changes = []
    for (key, entry), measured in votes.items():
        best_tiles = {best for best, _ in measured}
        slowest = min(speedup for _, speedup in measured)
        if len(best_tiles) == 1 and slowest > 1 + margin:
            tile = tile_of(best_tiles.pop())
            configs[key][entry]["gemm1"] = {field: getattr(tile, field) for field in configs[key][entry]["gemm1"]}
            changes.append(f"{key} {entry} gemm1: {tile.label} {'tma' if tile.weight_tma else 'ptr'} "
                           f"({slowest:.3f}x the entry's tile)")
        else:
            changes.append(f"{key} {entry} gemm1: kept (best {sorted(best_tiles)}, {slowest:.3f}x the entry's tile)")
    return changes


def write_table(arch: str, points: list[dict]) -> list[str]:
    """:func:`adopt_best_tiles` on ``kernels/configs/<arch>.json``, rewritten in place."""
    path = CONFIG_DIR / f"{arch}.json"
    table = json.loads(path.read_text())
    changes = adopt_best_tiles(table["configs"], points)
    note = "; benchmarks/gemm1_before_after.py --write-table: GEMM 1 tiles re-chosen after a change to the kernel"
    if note not in table.get("note", ""):
        table["note"] = table.get("note", "") + note
    path.write_text(json.dumps(table, indent=1) + "\n")
    clear_config_cache()
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the earlier kernels/fused_moe.py")
    parser.add_argument("--write-table", action="store_true",
                        help="apply --from-results to the shipped table (see above) instead of timing")
    parser.add_argument("--from-results", type=Path, help="with --write-table: a results file of this script")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[8192, 16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.write_table:
        if args.from_results is None or not args.from_results.is_file():
            parser.exit(2, "gemm1_before_after: error: --write-table needs --from-results, a results file\n")
        try:
            results = json.loads(args.from_results.read_text())
            device = results["meta"]["device"]
            points = [p for p in results["points"] if p["dtype"] in args.dtypes]
        except (ValueError, KeyError, TypeError) as exc:
            parser.exit(2, f"gemm1_before_after: error: {args.from_results} is not a results file of this script "
                           f"({type(exc).__name__}: {exc})\n")
        arch = results["meta"].get("arch") or ("sm90" if "H100" in device or "H200" in device else None)
        if arch is None:
            parser.exit(2, f"gemm1_before_after: error: {args.from_results} does not say which table it measured\n")
        for change in write_table(arch, points):
            print(change)
        return
    if args.before is None or not args.before.is_file():
        parser.exit(2, f"gemm1_before_after: error: --before {args.before}: no such file\n")
    if not torch.cuda.is_available():
        parser.exit(2, "gemm1_before_after: error: needs a CUDA GPU (the kernels' correctness runs on CPU in "
                       "tests/test_kernels.py)\n")
    before = load_before(args.before)
    points = [measure(before, shape, tokens, dtype)
              for shape in args.shapes for tokens in args.tokens for dtype in args.dtypes]
    summary = {f"after_vs_before_shipped_min_{dtype}": min(p["after_vs_before_shipped"] for p in points
                                                          if p["dtype"] == dtype) for dtype in args.dtypes}
    summary["max_rel_diff_after_vs_before"] = max(v for p in points for v in p["rel_diff_after_vs_before"].values())
    result = {"summary": summary, "points": points,
              "meta": {"command": " ".join(["python benchmarks/gemm1_before_after.py", *sys.argv[1:]]),
                       "device": torch.cuda.get_device_name(), "arch": arch_name(torch.device("cuda")),
                       "torch": torch.__version__,
                       "triton": triton.__version__}}
    out = args.out or Path(__file__).parent / "results" / f"gemm1_before_after-{gpu_tag()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'shape':16s} {'tokens':>6s} {'dtype':5s} {'shipped tile':28s} {'after/before':>12s}")
    for p in points:
        print(f"{p['shape']:16s} {p['tokens']:6d} {p['dtype']:5s} {p['shipped']:28s} {p['after_vs_before_shipped']:12.3f}")
    print("summary:", json.dumps(summary))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
