"""Benchmark (and tune) the MoE experts kernels against torch._grouped_mm.

One MoE layer, E=128 experts, top-8, at the Qwen3-235B (H=4096, I=1536) and Qwen3-30B-A3B
(H=2048, I=768) shapes, token counts 512..64K, softmax routing of random logits.

What is timed, the same span on every side: from (hidden_states, topk_weights, topk_ids) to the
combined output [T, H]. Every side therefore pays its permutation: ours the alignment (sort + pad)
and either the gathered loads inside GEMM 1 (Triton backend) or the row scatter (grouped_mm
backend); the baseline a sort, an index_select of the tokens, SiLU*mul, and the weighted gather +
K-slot sum. Routing (softmax/top-k) is excluded on all sides. Two timings of each side, both the
median of ``triton.testing.do_bench`` with L2 flushed between runs:

    ms        eager: the Python call, as a benchmark loop issues it; where the GPU finishes small
              kernels faster than the host launches them, the gaps count
    ms_graph  the same call captured once in a CUDA graph (after warm-up), then graph.replay():
              GPU time without host launch gaps, as a serving engine that replays CUDA graphs
              (or whose CPU runs ahead) sees the layer

    FLOPs = 2 * T * K * (2*I*H + H*I)     (true expert FLOPs, no padding counted)

Columns (TFLOP/s, eager): bf16 = ``fused_experts`` as shipped (the table picks the backend per
token count), bf16 on each backend forced (``triton``: our Triton GEMMs; ``gmm+ours``: torch's
CUTLASS grouped GEMMs inside our permutation/SiLU/combine kernels; ``trit+gmm``: our Triton first
GEMM, its gather and SiLU*mul fused, then torch's second GEMM), the plain torch._grouped_mm
baseline, FP8 with 128x128 weight blocks (Triton; 1x128 token groups quantised inside the
call), FP8-rowwise (per-channel weight scales, per-row activation scales,
torch._scaled_grouped_mm) as shipped, and FP8-rowwise with fast accumulation (``row+fa``, not
shipped: measured to show what exact accumulation costs). Where DeepGEMM loads
(``deepgemm_unavailable_reason()`` is None: sm90, the ``deepgemm`` extra installed), two more
columns, ``dg bf16`` and ``dg fp8`` (``deepgemm_experts``: DeepGEMM's grouped GEMMs inside our
permutation, SiLU*mul and combine; FP8 with 128x128 weight blocks and 1x128 token groups), and
``dgfp8/bf16``, DeepGEMM FP8 against our bf16; otherwise the JSON's ``meta.deepgemm`` says why
not. All those force our kernels or DeepGEMM, whatever ``ZEROPREFILL_EXPERTS_KERNEL`` says; the
side ``fp8_selected`` is block FP8 through ``fused_experts`` with ``config=None``, so on the
backend it selects by default (honouring ``ZEROPREFILL_EXPERTS_KERNEL``; its choice is in the
point's ``fp8_selected_kernel``). Errors are max|out - ref| / max|ref| against
``fused_experts_reference`` (fp32 math; for FP8 the reference uses the dequantised weights and
the same activation quantisation). A second line per token count gives the graph timings.

Where the shipped bf16 layer's time goes, at every token count >= 8192 (summary keys, the
minimum over those points; each point has its own value):

    layer_vs_gemm_only[_eager]    time of the layer's GEMMs alone (torch.profiler: the CUTLASS
                                  grouped GEMM kernels of the grouped_mm side, glue-free; the
                                  shipped side's own GEMM kernels where that side did not run) /
                                  the shipped layer's time (graph-replayed; eager), the two
                                  measured seconds apart
    layer_vs_gemm_pair_same_clock the same ratio with both timed in turns, graph against graph
                                  (the CUTLASS GEMM pair on rows sorted beforehand, and the
                                  layer as fused_experts runs it by default): the median over
                                  15 rounds; the point keeps the rounds' range and both times.
                                  Separate measurements carry the GPU's drift between them:
                                  ``--profile-drift FILES`` prints each side's GEMM kernels as
                                  profiled twice in one run
    fp8_selected_vs_bf16          bf16 layer / block-FP8 layer on the default backend (graphs)
    deepgemm_fp8_psum_vs_m_indices  DeepGEMM block FP8: m_indices row layout / psum row layout (graphs)
    unfused_glue_bound_layer_vs_gemm_only
                                  the best layer_vs_gemm_only the unfused grouped_mm pipeline
                                  can reach: its GEMM time / (GEMM time + the bytes its scatter,
                                  SiLU*mul and combine must move / the HBM bandwidth measured
                                  here by a 1 GiB device copy), alignment and launch gaps free
    fp8_unfused_glue_bound_vs_bf16
                                  the best fp8_selected_vs_bf16 an FP8 layer with the same unfused
                                  glue can reach, the bf16 layer's time / (the fp8_selected side's
                                  GEMM kernels + its glue bytes, FP8 operands, at that bandwidth),
                                  where fp8_selected runs DeepGEMM; also per shape at the profiled
                                  token count (fp8_unfused_glue_bound_vs_bf16_<shape>_<tokens>)

    python benchmarks/moe_kernels.py                     # table + benchmarks/results/moe_kernels-<gpu>.json
    python benchmarks/moe_kernels.py --shapes qwen3-235b-a22b qwen3-30b-a3b --tokens 8192 16384
    python benchmarks/moe_kernels.py --sides bf16_triton,bf16_gmm_ours,fp8_selected --profile-tokens 0
                                                         # only what the summary's new keys need
    python benchmarks/moe_kernels.py --tune --select-backends
                                                         # retune the Triton tiles (kernels/configs/<arch>.json) first;
                                                         # that drops the bf16 backend choices, which the
                                                         # selection then measures again
    python benchmarks/moe_kernels.py --select-backends   # also write the fastest bf16 backend per token count
                                                         # (graph-replayed, where > --select-margin faster)
    python benchmarks/moe_kernels.py --resummarize benchmarks/results/moe_kernels-h100.json
                                                         # the summary again from a file's points and
                                                         # profiles (keys added since it was measured)

Progress lines carry the time; the JSON is rewritten after every token count (``complete``
says whether the run finished).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

# The measurements are in _moe_timing.py beside this file: on the path when this runs as a script,
# added when it is imported as benchmarks.moe_kernels (the tests).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _moe_timing import (BF16_SIDES, SELECT_MARGIN, SHAPES, SUMMARY_MIN_TOKENS, Layer, compiled_kernel_stats,  # noqa: E402
                         gpu_tag, hbm_bandwidth_gb_s, is_gemm_kernel, log, measure_point, profile_sides, tune)
from zeroprefill.kernels import GROUPED_MM, TRITON, TRITON_GROUPED_MM, MoEConfig, deepgemm_unavailable_reason, get_config  # noqa: E402
from zeroprefill.kernels.moe_config import CONFIG_DIR, arch_name, clear_config_cache, problem_key  # noqa: E402

TOKENS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
TUNE_TOKENS = [1024, 4096, 16384]
SIDES = ("bf16_triton", "bf16_gmm_ours", "bf16_triton_gmm", "grouped_mm", "fp8", "fp8_selected", "fp8_rowwise",
         "fp8_rowwise_fast_accum", "deepgemm_bf16", "deepgemm_fp8", "deepgemm_fp8_psum")


#: Bytes per element of the GEMM operands the glue writes (x_sorted, act): bf16, and block FP8
#: (an e4m3 byte plus one float32 scale per 128 elements).
BF16_OPERAND_BYTES, BLOCK_FP8_OPERAND_BYTES = 2.0, 1.0 + 4.0 / 128


def unfused_glue_bytes(num_tokens: int, top_k: int, hidden: int, inter: int,
                       operand_bytes: float = BF16_OPERAND_BYTES) -> float:
    """The least the unfused pipeline's glue kernels can move (bytes), real rows only; the
    activations, GEMM outputs and layer output are bf16, the GEMM operands ``operand_bytes``
    per element:

        scatter   read x [T, H] and the T*K positions (int32), write x_sorted [T*K, H]
        SiLU*mul  read gate_up [T*K, 2I], write act [T*K, I]
        combine   read y [T*K, H], the T*K weights (fp32) and positions, write out [T, H]
    """
    rows = num_tokens * top_k
    scatter = 2 * num_tokens * hidden + operand_bytes * rows * hidden + 4 * rows
    silu_mul = 2 * rows * 2 * inter + operand_bytes * rows * inter
    combine = 2 * (rows + num_tokens) * hidden + 8 * rows
    return scatter + silu_mul + combine


def run_benchmark(shapes: dict, tokens: list[int], profile_tokens: int, select_margin: float | None,
                  side_names: list[str], save: Callable[[dict], None]) -> dict:
    """Every shape and token count; ``save`` gets the results so far after every point.
    ``select_margin``: None keeps the shipped bf16 table; a margin rewrites it per shape
    (:func:`write_backend_choice`)."""
    points, profiles, failures = [], {}, {}
    with_deepgemm = deepgemm_unavailable_reason() is None
    bandwidth = hbm_bandwidth_gb_s()
    log(f"HBM bandwidth (1 GiB device copy, read + write): {bandwidth:.0f} GB/s")

    def results() -> dict:
        return {"summary": summarize(points, profiles, bandwidth), "points": points,
                "profile_ms_per_call": profiles, "failures": failures, "compiled_kernels": compiled_kernel_stats()}

    for name, shape in shapes.items():
        layer = Layer(shape, max(tokens))
        e, k, h, i = layer.num_experts, layer.top_k, layer.hidden, layer.inter
        log(f"{name}: E={e} top-{k} H={h} I={i}, weights ready")
        print_header(with_deepgemm)
        shape_points = []
        for num_tokens in tokens:
            point = measure_point(layer, name, num_tokens, side_names, failures)
            finish_point(point, layer, with_deepgemm, bandwidth)
            shape_points.append(point)
            points.append(point)
            save(results())
        if select_margin is not None:  # the shipped bf16 choice may change: recompute the points' bf16 columns
            write_backend_choice(name, shape, shape_points, select_margin)
            print_header(with_deepgemm)
            for point in shape_points:
                finish_point(point, layer, with_deepgemm, bandwidth)
        for point in shape_points:
            if point["tokens"] == profile_tokens:
                log(f"{name}: profiling every side at {profile_tokens} tokens")
                profiles[name] = profile_sides(layer, point)
        save(results())
        del layer
        torch.cuda.empty_cache()
    return results()


def summarize(points: list[dict], profiles: dict, bandwidth_gb_s: float) -> dict:
    """The summary: per ratio, its worst (minimum) value over the points with >= 8K tokens."""
    def worst(key: str, field: str | None = None) -> float | None:  # field: of a point's dict-valued key
        values = [p[key] if field is None else p[key][field] for p in points
                  if p["tokens"] >= SUMMARY_MIN_TOKENS and p.get(key) is not None]
        return min(values) if values else None

    summary = {
        "bf16_vs_grouped_mm_min_8k_plus": worst("bf16_vs_grouped_mm"),
        "fp8_vs_bf16_min_8k_plus": worst("fp8_vs_bf16"),
        "fp8_rowwise_vs_bf16_min_8k_plus": worst("fp8_rowwise_vs_bf16"),
        "fp8_rowwise_fast_accum_vs_bf16_min_8k_plus": worst("fp8_rowwise_fast_accum_vs_bf16"),
        "deepgemm_bf16_vs_bf16_min_8k_plus": worst("deepgemm_bf16_vs_bf16"),
        "deepgemm_fp8_vs_bf16_min_8k_plus": worst("deepgemm_fp8_vs_bf16"),
        "fp8_selected_vs_bf16_min_8k_plus": worst("fp8_selected_vs_bf16"),
        "deepgemm_fp8_psum_vs_m_indices_min_8k_plus": worst("deepgemm_fp8_psum_vs_m_indices"),
        "deepgemm_fp8_psum_vs_bf16_min_8k_plus": worst("deepgemm_fp8_psum_vs_bf16"),
        "layer_vs_gemm_only_min_8k_plus": worst("layer_vs_gemm_only"),
        "layer_vs_gemm_only_eager_min_8k_plus": worst("layer_vs_gemm_only_eager"),
        "unfused_glue_bound_layer_vs_gemm_only": worst("unfused_glue_bound_layer_vs_gemm_only"),
        "fp8_unfused_glue_bound_vs_bf16_min_8k_plus": worst("fp8_unfused_glue_bound_vs_bf16"),
        "hbm_copy_bandwidth_gb_s": round(bandwidth_gb_s),
        "targets": {"bf16_vs_grouped_mm": 1.05, "fp8_vs_bf16": 1.6, "layer_vs_gemm_only": 0.9},
    }
    if (same_clock := worst("layer_vs_gemm_pair_same_clock", "ratio")) is not None:  # absent from older files
        summary["layer_vs_gemm_pair_same_clock_min_8k_plus"] = same_clock
    for name, prof in profiles.items():  # GEMM kernels alone, without permutation/combine
        gemm_ms = {side: sum(v for k_, v in prof[side].items() if is_gemm_kernel(k_))
                   for side in prof if side != "tokens"}
        summary[f"gemm_kernels_only_ms_{name}_{prof['tokens']}"] = {k_: round(v, 3) for k_, v in gemm_ms.items()}
        point = next((p for p in points if p["shape"] == name and p["tokens"] == prof["tokens"]), None)
        if point is not None and gemm_ms.get("fp8_selected") and point["ms_graph"].get("bf16"):
            summary[f"fp8_unfused_glue_bound_vs_bf16_{name}_{prof['tokens']}"] = fp8_unfused_glue_bound(
                point, gemm_ms["fp8_selected"], bandwidth_gb_s)
    return summary


def fp8_unfused_glue_bound(point: dict, fp8_gemm_ms: float, bandwidth_gb_s: float) -> float:
    """The best ``fp8_selected_vs_bf16`` an FP8 layer whose glue runs beside its GEMMs can reach
    against this bf16 layer: the bf16 layer's time / (the FP8 side's GEMM kernels + the bytes
    its scatter, SiLU*mul and combine must move at the measured bandwidth; alignment and
    launch gaps free)."""
    _, top_k, hidden, inter = SHAPES[point["shape"]]
    glue_bytes = unfused_glue_bytes(point["tokens"], top_k, hidden, inter, BLOCK_FP8_OPERAND_BYTES)
    glue_ms = glue_bytes / (bandwidth_gb_s * 1e9) * 1e3
    return round(point["ms_graph"]["bf16"] / (fp8_gemm_ms + glue_ms), 3)


def profile_drift(results: dict) -> list[dict]:
    """The GEMM kernels of each bf16 side profiled twice in one run: at its point
    (``gemm_kernels_ms``, right after that side was timed) and once every point of the shape
    had run (``profile_ms_per_call``); ``first_over_second`` > 1: the first took longer."""
    rows = []
    for shape, prof in results.get("profile_ms_per_call", {}).items():
        point = next((p for p in results["points"] if p["shape"] == shape and p["tokens"] == prof["tokens"]), None)
        for side in BF16_SIDES.values():
            if point is None or side not in prof or side not in point.get("gemm_kernels_ms", {}):
                continue
            second = sum(v for kernel, v in prof[side].items() if is_gemm_kernel(kernel))
            first = point["gemm_kernels_ms"][side]
            rows.append({"shape": shape, "tokens": prof["tokens"], "side": side, "first_ms": round(first, 3),
                         "second_ms": round(second, 3), "first_over_second": round(first / second, 3)})
    return rows


def resummarize(path: Path) -> dict:
    """Rewrite ``path``'s summary from its points and profiles (no GPU), keeping every other
    key; the bandwidth is the one it recorded. Returns the new summary."""
    results = json.loads(path.read_text())
    summary = summarize(results["points"], results["profile_ms_per_call"], results["summary"]["hbm_copy_bandwidth_gb_s"])
    results["summary"] = summary
    results["meta"]["resummarized"] = "python benchmarks/moe_kernels.py --resummarize " + path.name
    path.write_text(json.dumps(results, indent=1) + "\n")
    return summary


def add_ratios(point: dict, bandwidth_gb_s: float, hidden: int, inter: int, top_k: int) -> None:
    """From the point's times (and its ``bf16_backend``): the shipped bf16 entries, TFLOP/s and
    every ratio; ``None`` where a side it needs did not run."""
    shipped = BF16_SIDES[point["bf16_backend"]]
    for table in (point["ms"], point["ms_graph"], point["gemm_kernels_ms"]):
        table.pop("bf16", None)
        if shipped in table:  # the shipped call is exactly this forced call: same kernels, same config
            table["bf16"] = table[shipped]
    tflops = {side: point["flops"] / (v * 1e-3) / 1e12 for side, v in point["ms"].items()}
    tflops_graph = {side: point["flops"] / (v * 1e-3) / 1e12 for side, v in point["ms_graph"].items()}
    point["tflops"] = {side: round(v, 1) for side, v in tflops.items()}
    point["tflops_graph"] = {side: round(v, 1) for side, v in tflops_graph.items()}

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return round(numerator / denominator, 3) if numerator is not None and denominator else None

    for side in ("fp8", "fp8_rowwise", "fp8_rowwise_fast_accum", "deepgemm_bf16", "deepgemm_fp8"):
        point[f"{side}_vs_bf16"] = ratio(tflops.get(side), tflops.get("bf16"))
    point["bf16_vs_grouped_mm"] = ratio(tflops.get("bf16"), tflops.get("grouped_mm"))
    point["fp8_selected_vs_bf16"] = ratio(tflops_graph.get("fp8_selected"), tflops_graph.get("bf16"))
    point["deepgemm_fp8_psum_vs_m_indices"] = ratio(tflops_graph.get("deepgemm_fp8_psum"), tflops_graph.get("deepgemm_fp8"))
    point["deepgemm_fp8_psum_vs_bf16"] = ratio(tflops_graph.get("deepgemm_fp8_psum"), tflops_graph.get("bf16"))
    gemm = point["gemm_kernels_ms"]
    # The GEMMs alone: torch's CUTLASS pair (the grouped_mm side's GEMM kernels, no glue in them)
    # where it ran, else the shipped side's own GEMM kernels (whose epilogues may hold glue).
    gemm_only = gemm.get(BF16_SIDES[GROUPED_MM], gemm.get("bf16"))
    point["layer_vs_gemm_only"] = ratio(gemm_only, point["ms_graph"].get("bf16"))
    point["layer_vs_gemm_only_eager"] = ratio(gemm_only, point["ms"].get("bf16"))
    glue_ms = unfused_glue_bytes(point["tokens"], top_k, hidden, inter) / (bandwidth_gb_s * 1e9) * 1e3
    point["unfused_glue_min_ms"] = round(glue_ms, 4)
    gmm_gemm = gemm.get(BF16_SIDES[GROUPED_MM])
    point["unfused_glue_bound_layer_vs_gemm_only"] = (
        ratio(gmm_gemm, gmm_gemm + glue_ms) if gmm_gemm is not None else None)
    fp8_gemm = gemm.get("fp8_selected")  # only DeepGEMM's GEMMs are glue-free (our Triton ones fuse it)
    point["fp8_unfused_glue_bound_vs_bf16"] = (
        fp8_unfused_glue_bound(point, fp8_gemm, bandwidth_gb_s)
        if fp8_gemm and point["ms_graph"].get("bf16") and str(point.get("fp8_selected_kernel", "")).startswith("DeepGEMM")
        else None)
    for table in (point["ms"], point["ms_graph"], point["gemm_kernels_ms"]):
        for side, v in table.items():
            table[side] = round(v, 4)


def print_header(with_deepgemm: bool) -> None:
    dg_header = f" {'dg bf16':>7} {'dg fp8':>7} {'dgfp8/bf16':>10}" if with_deepgemm else ""
    print(f"{'tokens':>7} {'bf16':>7} {'backend':>17} {'triton':>7} {'gmm+ours':>8} {'trit+gmm':>8} {'gmm':>7} "
          f"{'fp8':>7} {'fp8 row':>7} {'row+fa':>7} {'bf16/gmm':>8} {'fp8/bf16':>8} {'row/bf16':>8}{dg_header}  "
          f"max rel err (bf16 trit/gmm+ours/trit+gmm, fp8, row, row+fa{', dg bf16, dg fp8' if with_deepgemm else ''})",
          flush=True)


def finish_point(point: dict, layer: Layer, with_deepgemm: bool, bandwidth_gb_s: float) -> None:
    """The shipped bf16 choice (after any table rewrite), TFLOP/s and ratios; print two rows
    (eager TFLOP/s and errors; graph-replayed TFLOP/s and the layer/GEMM ratios)."""
    point["bf16_backend"] = get_config(point["tokens"], layer.top_k, layer.num_experts, layer.hidden, layer.inter,
                                       False, torch.device("cuda")).backend
    add_ratios(point, bandwidth_gb_s, layer.hidden, layer.inter, layer.top_k)
    tflops, tflops_graph = point["tflops"], point["tflops_graph"]
    nan = float("nan")

    def value(x: float | None) -> float:
        return nan if x is None else x

    row = [f"{point['tokens']:>7}", f"{tflops.get('bf16', nan):>7.1f}", f"{point['bf16_backend']:>17}",
           f"{tflops.get('bf16_triton', nan):>7.1f}", f"{tflops.get('bf16_gmm_ours', nan):>8.1f}",
           f"{tflops.get('bf16_triton_gmm', nan):>8.1f}", f"{tflops.get('grouped_mm', nan):>7.1f}", f"{tflops.get('fp8', nan):>7.1f}",
           f"{tflops.get('fp8_rowwise', nan):>7.1f}", f"{tflops.get('fp8_rowwise_fast_accum', nan):>7.1f}"]
    row += [f"{value(point[key]):>8.3f}" for key in ("bf16_vs_grouped_mm", "fp8_vs_bf16", "fp8_rowwise_vs_bf16")]
    error_sides = ["bf16_triton", "bf16_gmm_ours", "bf16_triton_gmm", "fp8", "fp8_rowwise", "fp8_rowwise_fast_accum"]
    if with_deepgemm:
        row += [f"{tflops.get('deepgemm_bf16', nan):>7.1f}", f"{tflops.get('deepgemm_fp8', nan):>7.1f}",
                f"{value(point['deepgemm_fp8_vs_bf16']):>10.3f}"]
        error_sides += ["deepgemm_bf16", "deepgemm_fp8"]
    errors = " ".join(f"{point['max_rel_err'].get(side, nan):.1e}" for side in error_sides)
    print(" ".join(row) + "  " + errors, flush=True)
    graph = " ".join(f"{side} {v:.1f}" for side, v in tflops_graph.items())
    print(f"{'':>7} graph TFLOP/s: {graph}; fp8 selected/bf16 {value(point['fp8_selected_vs_bf16']):.3f} "
          f"(unfused-glue bound {value(point['fp8_unfused_glue_bound_vs_bf16']):.3f}); "
          f"GEMMs/layer {value(point['layer_vs_gemm_only']):.3f} (eager {value(point['layer_vs_gemm_only_eager']):.3f},"
          f" unfused-glue bound {value(point['unfused_glue_bound_layer_vs_gemm_only']):.3f};"
          f" timed in turns {value((point.get('layer_vs_gemm_pair_same_clock') or {}).get('ratio')):.3f})", flush=True)


def choose_bf16_backend(point: dict, margin: float = SELECT_MARGIN) -> str | None:
    """The bf16 backend to ship at ``point``'s token count: the fastest measured one, by its
    graph-replayed time (what an engine that replays CUDA graphs runs): as timed in turns with
    the others (``layer_vs_gemm_pair_same_clock.ms``) where all of them were, else as timed one
    by one (eager where a side has no graph time), unless the shipped choice (``bf16_backend``)
    is within ``margin`` of it. None where no bf16 side was measured."""
    sides = {backend: side for backend, side in BF16_SIDES.items() if side in point["ms"]}
    in_turns = (point.get("layer_vs_gemm_pair_same_clock") or {}).get("ms", {})
    if all(side in in_turns for side in sides.values()):
        measured = {backend: in_turns[side] for backend, side in sides.items()}
    else:
        measured = {backend: point["ms_graph"].get(side, point["ms"][side]) for backend, side in sides.items()}
    if not measured:
        return None
    fastest = min(measured, key=measured.get)
    shipped = point.get("bf16_backend")
    if shipped in measured and measured[fastest] >= (1 - margin) * measured[shipped]:
        return shipped
    return fastest


def write_backend_choice(name: str, shape: tuple[int, int, int, int], shape_points: list[dict],
                         margin: float = SELECT_MARGIN) -> None:
    """Per measured token count, write :func:`choose_bf16_backend`'s choice into the shipped table.

    A winner with Triton GEMMs keeps the tile config it was measured with; token counts already
    in the table but not measured here keep their entry.
    """
    num_experts, _, hidden, inter = shape
    path = CONFIG_DIR / f"{arch_name(torch.device('cuda'))}.json"
    table = json.loads(path.read_text()) if path.exists() else {"configs": {}}
    entries = table["configs"].setdefault(problem_key(False, num_experts, hidden, inter), {})
    for point in shape_points:
        chosen = choose_bf16_backend(point, margin)
        if chosen is None:
            continue
        triton_cfg = MoEConfig.from_json(point["config_bf16_triton"])
        entries[str(point["tokens"])] = {
            GROUPED_MM: {"backend": GROUPED_MM},
            TRITON: point["config_bf16_triton"],
            TRITON_GROUPED_MM: MoEConfig(triton_cfg.gemm1, backend=TRITON_GROUPED_MM).to_json(),
        }[chosen]
    table["configs"][problem_key(False, num_experts, hidden, inter)] = dict(
        sorted(entries.items(), key=lambda kv: int(kv[0])))
    table["note"] = ("written by benchmarks/moe_kernels.py (--tune: Triton tiles; --select-backends: per measured "
                     f"token count the fastest bf16 backend by graph-replayed time, where it beats the shipped one by "
                     f"more than {margin:.0%}); lookups take the nearest token count")
    path.write_text(json.dumps(table, indent=1) + "\n")
    clear_config_cache()
    print(f"  {name}: bf16 backends written to {path}")


def deepgemm_version() -> str | None:
    """``sgl-deep-gemm <version>`` with its ``apache-tvm-ffi``, where DeepGEMM loads."""
    if deepgemm_unavailable_reason() is not None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed as a distribution"

    return f"sgl-deep-gemm {installed('sgl-deep-gemm')}, apache-tvm-ffi {installed('apache-tvm-ffi')}"


def split_list(values: list[str]) -> list[str]:
    """``a,b c`` -> ``[a, b, c]``: list arguments take commas, spaces or both."""
    return [item for value in values for item in value.split(",") if item]


TIMING = {
    "span": "(x, topk_weights, topk_ids) -> out [T, H] on every side, permutation/alignment and combine "
            "counted on all sides, routing excluded; 'bf16' is the shipped choice (bf16_backend), whose "
            "times are those of the forced backend it names",
    "ms, tflops": "eager: triton.testing.do_bench median of the call, L2 flushed (host launch gaps count)",
    "ms_graph, tflops_graph": "the call captured once in a CUDA graph after warm-up; do_bench median of "
                              "graph.replay(), L2 flushed (no host launch gaps)",
    "gemm_kernels_ms": "torch.profiler: GPU time per call of the grouped-GEMM kernels of each bf16 backend "
                       "(CUTLASS / our Triton GEMMs) and of fp8_selected, at >= 8192 tokens",
    "bf16_vs_grouped_mm, fp8_vs_bf16, fp8_rowwise_vs_bf16, fp8_rowwise_fast_accum_vs_bf16, "
    "deepgemm_bf16_vs_bf16, deepgemm_fp8_vs_bf16": "eager TFLOP/s ratios",
    "fp8_selected_vs_bf16": "graph: bf16 layer time / block-FP8 layer time, fused_experts(config=None) "
                            "on the backend it selects (fp8_selected_kernel)",
    "deepgemm_fp8_psum_vs_m_indices, deepgemm_fp8_psum_vs_bf16": "graph: DeepGEMM block FP8 with the m_indices row "
                                                                  "layout (resp. the bf16 layer) / with the psum layout",
    "layer_vs_gemm_only": "graph: gemm_kernels_ms.bf16_gmm_ours (else .bf16) / ms_graph.bf16",
    "layer_vs_gemm_only_eager": "eager: gemm_kernels_ms.bf16_gmm_ours (else .bf16) / ms.bf16",
    "layer_vs_gemm_pair_same_clock": "graph against graph, timed in turns (15 rounds, 5 replays each per round, "
                                     "L2 flushed before each): CUTLASS's two grouped GEMMs on rows sorted and "
                                     "SiLU*mul applied beforehand / fused_experts with the shipped table's "
                                     "choice; ratio (median over rounds), range, ms (medians: layer, gemm_pair "
                                     "and each bf16 side, which --select-backends then compares)",
    "unfused_glue_bound_layer_vs_gemm_only": "gemm_kernels_ms.bf16_gmm_ours / (that + unfused_glue_min_ms); "
                                             "unfused_glue_min_ms = unfused_glue_bytes (scatter, SiLU*mul, "
                                             "combine; real rows) / hbm_copy_bandwidth_gb_s",
    "fp8_unfused_glue_bound_vs_bf16": "graph: ms_graph.bf16 / (gemm_kernels_ms.fp8_selected + the FP8 glue's "
                                      "bytes / hbm_copy_bandwidth_gb_s), where fp8_selected runs DeepGEMM",
    "hbm_copy_bandwidth_gb_s": "(read + written bytes) / do_bench median of a 1 GiB device-to-device copy",
    "*_min_8k_plus": "the minimum over the points with >= 8192 tokens",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="retune kernels/configs/<arch>.json first")
    parser.add_argument("--tune-only", action="store_true", help="tune and exit")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="subset of " + ", ".join(SHAPES))
    parser.add_argument("--tokens", nargs="+", default=[",".join(map(str, TOKENS))])
    parser.add_argument("--sides", nargs="+", default=list(SIDES),
                        help="subset of " + ", ".join(SIDES) + " (DeepGEMM's where it loads)")
    parser.add_argument("--select-backends", action="store_true",
                        help="write the fastest bf16 backend (graph-replayed) per measured token count into the table, "
                             "where it beats the shipped one by more than --select-margin")
    parser.add_argument("--select-margin", type=float, default=SELECT_MARGIN,
                        help=f"how much faster a backend must be to replace the shipped one (default {SELECT_MARGIN})")
    parser.add_argument("--profile-tokens", type=int, default=16384,
                        help="profile every side's kernels at this token count (0: none)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/moe_kernels-<gpu>.json)")
    parser.add_argument("--resummarize", type=Path, metavar="JSON",
                        help="recompute the summary of a results file from its points and profiles, and exit")
    parser.add_argument("--profile-drift", type=Path, nargs="+", metavar="JSON",
                        help="print, for results files, each bf16 side's GEMM kernels as profiled twice in one "
                             "run (at the point, and after the shape's last point), and exit")
    args = parser.parse_args()
    if args.profile_drift:
        try:
            for path in args.profile_drift:
                for row in profile_drift(json.loads(path.read_text())):
                    print(f"{path.name} {row['shape']} {row['tokens']} {row['side']}: {row['first_ms']:.3f} ms, "
                          f"then {row['second_ms']:.3f} ms ({row['first_over_second']:.3f}x)")
        except (OSError, ValueError, KeyError) as exc:
            parser.exit(2, f"moe_kernels: error: {exc}\n")
        return
    if args.resummarize:
        try:
            print(json.dumps(resummarize(args.resummarize)))
        except (OSError, ValueError, KeyError) as exc:
            parser.exit(2, f"moe_kernels: error: {args.resummarize}: {exc}\n")
        return
    shapes = {n: SHAPES[n] for n in split_list(args.shapes)}
    tokens = [int(t) for t in split_list(args.tokens)]
    side_names = split_list(args.sides)
    unknown = sorted(set(side_names) - set(SIDES))
    if unknown:
        parser.error(f"unknown sides {unknown}; choose from {', '.join(SIDES)}")
    gpu = torch.cuda.get_device_name()
    if args.tune or args.tune_only:
        start = time.time()
        print(f"tuning -> {tune(shapes, TUNE_TOKENS)} ({time.time() - start:.0f} s)")
        if args.tune_only:
            return
    meta = {
        "command": "python benchmarks/moe_kernels.py " + " ".join(sys.argv[1:]),
        "device": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "timing": TIMING,
        "selected_backends_in_this_run": args.select_backends,
        "select_margin": args.select_margin if args.select_backends else None,
        "deepgemm": deepgemm_version() or f"not measured: {deepgemm_unavailable_reason()}",
        "flops": "2*T*K*(2*I*H + H*I)",
        "error": "max|out-ref|/max|ref| vs fused_experts_reference (fp32; FP8: dequantised weights + same "
                 "activation quantisation); fp8_vs_bf16_reference is FP8 vs the bf16-weight reference",
    }
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"moe_kernels-{gpu_tag()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict, complete: bool = False) -> None:
        out.write_text(json.dumps({**results, "meta": meta, "complete": complete}, indent=1) + "\n")

    log(f"{gpu}: shapes {', '.join(shapes)}, tokens {tokens}, sides {', '.join(side_names)} -> {out}")
    results = run_benchmark(shapes, tokens, args.profile_tokens, args.select_margin if args.select_backends else None,
                            side_names, save)
    save(results, complete=True)
    print(f"\nsummary: {json.dumps(results['summary'])}")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
