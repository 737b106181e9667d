"""Our two grouped GEMMs against those of an earlier checkout, tile by tile, on the same inputs.

A change to a GEMM of ``kernels/fused_moe.py`` is judged against the kernel it replaces, in
one process on one GPU: ``--before`` is that earlier module's file, loaded beside today's as
part of the same package::

    git show 6202de6:kernels/fused_moe.py > build/fused_moe_before.py
    python benchmarks/gemm_before_after.py --before build/fused_moe_before.py --out gemm_before_after.json

For each GEMM (``--gemms``: 1, the gathered gate/up GEMM with SiLU; 2, the down GEMM with the
scatter), shape, token count and dtype (bf16, block FP8) it times ``run_gemm1`` / ``run_gemm2``
of both modules with the shipped tile, that tile with the other loads (TMA / pointers), and a
few other tiles, all of one point's calls in turns (``_moe_timing.same_clock_ms``, eager: 10
rounds of 3 calls each, L2 flushed before every call; each call's median over the rounds), so
that no tile is timed at another clock than the tiles it is compared with. It checks that both
produce the same output (largest difference relative to its largest value, over the rows in use).
GEMM 2 runs on random activation rows (its time does not depend on their values). Each GEMM's
shipped tile is also timed launched persistent (``GemmConfig.persistent``, after only: an
earlier module runs such a tile one program a tile, as the shipped one). Summary:
``after_vs_before_shipped`` (before's time / after's, > 1: faster now) per point, its minimum
per GEMM and dtype, the best tile of each side, and ``same_tile_before_over_after`` (the spread
of before's time over after's for every tile both timed: the noise where the two compile a tile
alike; ``--spread`` prints it for results files).

A tile tuned for the earlier kernel need not be the best one for today's. ``--write-table``
applies results files to the shipped table, without a GPU. For each table entry it takes the
points whose lookup lands on it, in every file, and the after side's tiles measured at all of
them; each such tile counts by its *slowest* speedup over the entry's own tile (after) at those
points, and the entry takes the tile whose slowest speedup is largest, where that is more than
5% (the margin ``moe_kernels.py --select-backends`` uses). Two tiles within noise of each other
may then take turns at being fastest from run to run without keeping a better tile out::

    python benchmarks/gemm_before_after.py --write-table --from-results run1.json run2.json --dtypes bf16

(It was ``gemm1_before_after.py``, GEMM 1 only, when it wrote ``gemm1_before_after-*.json``;
their points are GEMM 1's.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _moe_timing import SELECT_MARGIN, SHAPES, Layer, gpu_tag, log, same_clock_ms  # noqa: E402
from zeroprefill.kernels import fused_moe  # noqa: E402
from zeroprefill.kernels.align import moe_align_block_size  # noqa: E402
from zeroprefill.kernels.moe_config import (CONFIG_DIR, GemmConfig, arch_name, clear_config_cache,  # noqa: E402
                                            get_config, nearest_token_count, problem_key)
from zeroprefill.kernels.quant import quantize_tokens_fp8_group  # noqa: E402

OTHER_TILES = {
    ("gemm1", "bf16"): [GemmConfig(128, 128, 64, 8, 8, 3, True), GemmConfig(128, 128, 64, 8, 8, 4, True),
                        GemmConfig(64, 128, 64, 8, 4, 4, True),
                        GemmConfig(128, 128, 64, 8, 8, 4, True, persistent=True)],
    ("gemm1", "fp8"): [GemmConfig(64, 128, 128, 8, 4, 3, True), GemmConfig(64, 128, 128, 8, 8, 3, True),
                       GemmConfig(128, 128, 128, 8, 8, 3, True)],
    ("gemm2", "bf16"): [GemmConfig(128, 256, 64, 8, 8, 3, True), GemmConfig(128, 128, 64, 8, 8, 3, True),
                        GemmConfig(128, 128, 64, 8, 8, 3, True, persistent=True),
                        GemmConfig(128, 128, 64, 8, 8, 4, True, persistent=True)],
    ("gemm2", "fp8"): [GemmConfig(64, 128, 128, 8, 4, 3, True), GemmConfig(64, 128, 128, 8, 4, 4, True),
                       GemmConfig(128, 128, 128, 8, 8, 3, True)],
}


def load_before(path: Path) -> ModuleType:
    """``path`` as ``zeroprefill.kernels._gemm_before``: its relative imports are today's package."""
    spec = importlib.util.spec_from_file_location("zeroprefill.kernels._gemm_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gemm_call(module: ModuleType, gemm: str, layer: Layer, topk_ids: torch.Tensor, fp8: bool,
              tile: GemmConfig) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """``module``'s launch of ``gemm`` with ``tile`` on ``layer``'s inputs, as a call returning
    the GEMM's output, and the mask of that output's rows in use."""
    num_experts, top_k, inter = layer.num_experts, layer.top_k, layer.inter
    alignment = moe_align_block_size(topk_ids, num_experts, tile.block_m)
    if gemm == "gemm1":
        x, _, _ = layer.inputs(topk_ids.shape[0])
        x_in, x_scale = quantize_tokens_fp8_group(x) if fp8 else (x, None)
        w13, w13_scale = (layer.w13_fp8, layer.w13_scale) if fp8 else (layer.w13, None)
        used = alignment.sorted_row_ids[:alignment.max_padded_rows] < alignment.num_rows
        return lambda: module.run_gemm1(x_in, x_scale, w13, w13_scale, alignment, tile)[0], used
    generator = torch.Generator(device="cuda").manual_seed(0)
    act = torch.randn(alignment.max_padded_rows, inter, device="cuda", generator=generator)
    act_scale = None
    if fp8:
        act_scale = torch.rand(alignment.max_padded_rows, triton.cdiv(inter, 128), device="cuda",
                               generator=generator) / 64 + 1e-3
        act = act.clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        act = act.to(torch.bfloat16)
    w2, w2_scale = (layer.w2_fp8, layer.w2_scale) if fp8 else (layer.w2, None)
    weights = torch.rand(topk_ids.shape[0], top_k, device="cuda", generator=generator)
    used = torch.ones(alignment.num_rows, dtype=torch.bool, device="cuda")
    used[alignment.position_of_row >= alignment.max_padded_rows] = False  # skipped slots: never written
    return lambda: module.run_gemm2(act, act_scale, w2, w2_scale, weights, alignment, tile, torch.bfloat16), used


TURN_ROUNDS = 10  # same_clock_ms over one point's calls: rounds, ...
TURN_CALLS = 3    # ... and calls of each per round (the round's median kept)


def measure(before: ModuleType, gemm: str, shape_name: str, num_tokens: int, dtype: str) -> dict:
    num_experts, top_k, hidden, inter = SHAPES[shape_name]
    layer = Layer(SHAPES[shape_name], num_tokens)
    _, _, topk_ids = layer.inputs(num_tokens)
    fp8 = dtype == "fp8"
    shipped = getattr(get_config(num_tokens, top_k, num_experts, hidden, inter, fp8, topk_ids.device,
                                 allow_grouped_mm=False), gemm)
    tiles = [shipped, replace(shipped, weight_tma=not shipped.weight_tma)]
    # the shipped tile launched persistent, through TMA, and one program a tile
    tiles += [replace(shipped, weight_tma=True, persistent=True), replace(shipped, persistent=False)]
    tiles += OTHER_TILES[gemm, dtype]
    tiles = list(dict.fromkeys(tiles))
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    rel_diff: dict[str, float] = {}
    for tile in tiles:
        label = tile_label(tile)
        outs = []
        # A module from before persistent launches would run the tile one program a tile: after only.
        sides = (("after", fused_moe),) if tile.persistent else (("before", before), ("after", fused_moe))
        for side, module in sides:
            call, used = gemm_call(module, gemm, layer, topk_ids, fp8, tile)
            try:
                outs.append(call()[used].float())
                calls[f"{side} {label}"] = call
            except OutOfResources as exc:
                log(f"  {side} {label}: does not fit ({exc})")
        if len(outs) == 2:
            rel_diff[label] = (outs[0] - outs[1]).abs().max().item() / max(outs[0].abs().max().item(), 1e-30)
        del outs
    ms = {name: statistics.median(per_round) for name, per_round in
          same_clock_ms(calls, rounds=TURN_ROUNDS, replays=TURN_CALLS, graphs=False).items()}
    for label in dict.fromkeys(name.split(" ", 1)[1] for name in ms):
        log(f"{gemm} {shape_name} {num_tokens} {dtype} {label}: " + ", ".join(
            f"{side} {ms[f'{side} {label}']:.3f} ms" for side in ("before", "after") if f"{side} {label}" in ms))
    shipped_label = tile_label(shipped)

    def best(side: str) -> tuple[str, float]:
        return min(((k[len(side) + 1:], v) for k, v in ms.items() if k.startswith(side)), key=lambda kv: kv[1])

    return {"gemm": gemm, "shape": shape_name, "tokens": num_tokens, "dtype": dtype, "shipped": shipped_label,
            "ms": {k: round(v, 4) for k, v in ms.items()}, "rel_diff_after_vs_before": rel_diff,
            "after_vs_before_shipped": round(ms[f"before {tile_label(replace(shipped, persistent=False))}"]
                                             / ms[f"after {shipped_label}"], 3),
            "best_before": best("before"), "best_after": best("after")}


def tile_label(tile: GemmConfig) -> str:
    """``"128x128x64 g8 w8 s4 tma"``: a ``GemmConfig.label``, its loads, and ``persistent`` if it is."""
    return f"{tile.label} {'tma' if tile.weight_tma else 'ptr'}" + (" persistent" if tile.persistent else "")


def tile_of(label: str) -> GemmConfig:
    """A :func:`tile_label` as the tile."""
    shape, group, warps, stages, loads, *persistent = label.split()
    block_m, block_n, block_k = map(int, shape.split("x"))
    return GemmConfig(block_m, block_n, block_k, int(group[1:]), int(warps[1:]), int(stages[1:]), loads == "tma",
                      persistent == ["persistent"])


def adopt_best_tiles(configs: dict, points: list[dict], margin: float = SELECT_MARGIN) -> list[str]:
    """Apply ``points`` to the table's ``configs`` in place (the rule in the module's docstring);
    returns one line per entry the points reached: its change, or why it stays."""
    speedups: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for point in points:
        num_experts, _, hidden, inter = SHAPES[point["shape"]]
        key = problem_key(point["dtype"] == "fp8", num_experts, hidden, inter)
        gemm = point.get("gemm", "gemm1")  # files of gemm1_before_after.py: GEMM 1's points
        if key not in configs:  # the heuristic's tiles: nothing in the table to change
            continue
        entry = nearest_token_count(configs[key], point["tokens"])
        if gemm not in configs[key][entry]:  # an entry on another backend (triton_grouped_mm: no GEMM 2 tile)
            continue
        label = tile_label(GemmConfig(**configs[key][entry][gemm]))
        # Both GEMMs walk the same padded row blocks: a tile must keep the other GEMM's block_m.
        other = configs[key][entry].get("gemm2" if gemm == "gemm1" else "gemm1")
        shipped_ms = point["ms"].get(f"after {label}")  # the entry's tile unmeasured: no tile can win here
        speedups.setdefault((key, entry, gemm), []).append(
            {name[len("after "):]: shipped_ms / ms for name, ms in point["ms"].items() if shipped_ms
             and name.startswith("after ")
             and (other is None or tile_of(name[len("after "):]).block_m == other["block_m"])})
    changes = []
    for (key, entry, gemm), measured in speedups.items():
        # each tile measured at every point, by its slowest speedup over the entry's tile
        everywhere = set(measured[0]).intersection(*measured[1:])
        worst = {label: min(point[label] for point in measured) for label in everywhere}
        best = max(worst, key=worst.get, default=None)
        if best is None:
            changes.append(f"{key} {entry} {gemm}: kept (the entry's tile was not timed at every point)")
        elif worst[best] > 1 + margin:
            tile = tile_of(best)
            configs[key][entry][gemm] = tile.to_json()
            changes.append(f"{key} {entry} {gemm}: {tile_label(tile)} ({worst[best]:.3f}x the entry's tile)")
        else:
            changes.append(f"{key} {entry} {gemm}: kept (best {best}, {worst[best]:.3f}x the entry's tile)")
    return changes


def same_tile_spread(points: list[dict]) -> dict[str, list[float]]:
    """Per GEMM, ``[min, median, max, count]`` of before's time over after's for every tile both
    sides timed: where the two modules compile a tile to the same instructions, the run's noise."""
    ratios: dict[str, list[float]] = {}
    for point in points:
        for name, ms in point["ms"].items():
            after = point["ms"].get("after " + name[len("before "):]) if name.startswith("before ") else None
            if after:
                ratios.setdefault(point.get("gemm", "gemm1"), []).append(ms / after)
    return {gemm: [round(min(r), 3), round(statistics.median(r), 3), round(max(r), 3), len(r)]
            for gemm, r in sorted(ratios.items())}


def write_table(arch: str, points: list[dict]) -> list[str]:
    """:func:`adopt_best_tiles` on ``kernels/configs/<arch>.json``, rewritten in place."""
    path = CONFIG_DIR / f"{arch}.json"
    table = json.loads(path.read_text())
    changes = adopt_best_tiles(table["configs"], points)
    if "benchmarks/gemm_before_after.py --write-table" not in table.get("note", ""):  # the table names its writers once
        table["note"] = (table.get("note", "") + "; benchmarks/gemm_before_after.py --write-table: GEMM tiles "
                         "re-chosen after a change to the kernel")
    path.write_text(json.dumps(table, indent=1) + "\n")
    clear_config_cache()
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the earlier kernels/fused_moe.py")
    parser.add_argument("--write-table", action="store_true",
                        help="apply --from-results to the shipped table (see above) instead of timing")
    parser.add_argument("--from-results", type=Path, nargs="+",
                        help="with --write-table: results files of this script (a tile changes only where all agree)")
    parser.add_argument("--gemms", nargs="+", default=["1", "2"], choices=["1", "2"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[8192, 16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--spread", type=Path, nargs="+", metavar="RESULTS",
                        help="print same_tile_spread of these results files together, without a GPU")
    args = parser.parse_args()
    if args.spread:
        try:
            points = [p for path in args.spread for p in json.loads(path.read_text())["points"]]
            print(json.dumps(same_tile_spread(points)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.exit(2, f"gemm_before_after: error: --spread: {type(exc).__name__}: {exc}\n")
        return
    if args.write_table:
        if not args.from_results or not all(path.is_file() for path in args.from_results):
            parser.exit(2, "gemm_before_after: error: --write-table needs --from-results, results files\n")
        points, archs = [], set()
        for path in args.from_results:
            try:
                results = json.loads(path.read_text())
                device = results["meta"]["device"]
                points += [p for p in results["points"] if p["dtype"] in args.dtypes
                           and p.get("gemm", "gemm1")[-1] in args.gemms]
            except (ValueError, KeyError, TypeError) as exc:
                parser.exit(2, f"gemm_before_after: error: {path} is not a results file of this script "
                               f"({type(exc).__name__}: {exc})\n")
            arch = results["meta"].get("arch") or ("sm90" if "H100" in device or "H200" in device else None)
            if arch is None:
                parser.exit(2, f"gemm_before_after: error: {path} does not say which table it measured\n")
            archs.add(arch)
        if len(archs) > 1:
            parser.exit(2, f"gemm_before_after: error: the results measured different tables ({sorted(archs)})\n")
        for change in write_table(arch, points):
            print(change)
        return
    if args.before is None or not args.before.is_file():
        parser.exit(2, f"gemm_before_after: error: --before {args.before}: no such file\n")
    if not torch.cuda.is_available():
        parser.exit(2, "gemm_before_after: error: needs a CUDA GPU (the kernels' correctness runs on CPU in "
                       "tests/test_kernels.py)\n")
    before = load_before(args.before)
    gemms = [f"gemm{number}" for number in args.gemms]
    points = [measure(before, gemm, shape, tokens, dtype)
              for gemm in gemms for shape in args.shapes for tokens in args.tokens for dtype in args.dtypes]
    summary = {f"after_vs_before_shipped_min_{gemm}_{dtype}": min(
        p["after_vs_before_shipped"] for p in points if p["gemm"] == gemm and p["dtype"] == dtype)
        for gemm in gemms for dtype in args.dtypes}
    summary["max_rel_diff_after_vs_before"] = max(v for p in points for v in p["rel_diff_after_vs_before"].values())
    summary["same_tile_before_over_after"] = same_tile_spread(points)
    result = {"summary": summary, "points": points,
              "meta": {"command": " ".join(["python benchmarks/gemm_before_after.py", *sys.argv[1:]]),
                       "device": torch.cuda.get_device_name(), "arch": arch_name(torch.device("cuda")),
                       "torch": torch.__version__, "triton": triton.__version__,
                       "timing": f"one point's calls in turns, eager, L2 flushed before each: {TURN_ROUNDS} rounds of "
                                 f"{TURN_CALLS} calls each, the median over the rounds of each round's median"}}
    out = args.out or Path(__file__).parent / "results" / f"gemm_before_after-{gpu_tag()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'gemm':5s} {'shape':16s} {'tokens':>6s} {'dtype':5s} {'shipped tile':28s} {'after/before':>12s}")
    for p in points:
        print(f"{p['gemm']:5s} {p['shape']:16s} {p['tokens']:6d} {p['dtype']:5s} {p['shipped']:28s} "
              f"{p['after_vs_before_shipped']:12.3f}")
    print("summary:", json.dumps(summary))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
