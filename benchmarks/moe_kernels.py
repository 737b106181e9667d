"""Benchmark (and tune) the MoE experts kernels against torch._grouped_mm.

One MoE layer, E=128 experts, top-8, at the Qwen3-235B (H=4096, I=1536) and Qwen3-30B-A3B
(H=2048, I=768) shapes, token counts 512..64K, softmax routing of random logits.

What is timed (median of ``triton.testing.do_bench``, L2 flushed between runs), the same span
on every side: from (hidden_states, topk_weights, topk_ids) to the combined output [T, H].
Every side therefore pays its permutation: ours the alignment (sort + pad) and either the
gathered loads inside GEMM 1 (Triton backend) or the row scatter (grouped_mm backend);
the baseline a sort, an index_select of the tokens, SiLU*mul, and the weighted gather + K-slot
sum. Routing (softmax/top-k) is excluded on all sides.

    FLOPs = 2 * T * K * (2*I*H + H*I)     (true expert FLOPs, no padding counted)

Columns (TFLOP/s): bf16 = ``fused_experts`` as shipped (the table picks the backend per token
count), bf16 on each backend forced (``triton``: our Triton GEMMs; ``gmm+ours``: torch's
CUTLASS grouped GEMMs inside our permutation/SiLU/combine kernels), the plain torch._grouped_mm
baseline, FP8 with 128x128 weight blocks (Triton; 1x128 token groups quantised inside the
call), FP8-rowwise (per-channel weight scales, per-row activation scales,
torch._scaled_grouped_mm) as shipped, and FP8-rowwise with fast accumulation (``row+fa``, not
shipped: measured to show what exact accumulation costs). Where DeepGEMM loads
(``deepgemm_unavailable_reason()`` is None: sm90, the ``deepgemm`` extra installed), two more
columns, ``dg bf16`` and ``dg fp8`` (``deepgemm_experts``: DeepGEMM's grouped GEMMs inside our
permutation, SiLU*mul and combine; FP8 with 128x128 weight blocks and 1x128 token groups), and
``dgfp8/bf16``, DeepGEMM FP8 against our bf16; otherwise the JSON's ``meta.deepgemm`` says why
not. All columns but those force our kernels (an explicit config), whatever
``ZEROPREFILL_EXPERTS_KERNEL`` says. Errors are max|out - ref| / max|ref| against
``fused_experts_reference`` (fp32 math; for FP8 the reference uses the dequantised weights and
the same activation quantisation).

    python benchmarks/moe_kernels.py                     # table + benchmarks/results/moe_kernels-<gpu>.json
    python benchmarks/moe_kernels.py --tune              # retune the Triton tiles (kernels/configs/<arch>.json) first
    python benchmarks/moe_kernels.py --select-backends   # also write the faster bf16 backend per token count
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from zeroprefill.kernels import (GROUPED_MM, GemmConfig, MoEConfig, deepgemm_experts, deepgemm_unavailable_reason,
                                 fused_experts, fused_experts_reference, get_config, grouped_mm_experts,
                                 moe_align_block_size, quantize_weights_fp8_block, quantize_weights_fp8_rowwise)
from zeroprefill.common.asyncep_moe import select_experts
from zeroprefill.kernels.fused_moe import (_gemm1_gate_up_silu_kernel, _gemm2_down_scatter_kernel,
                                           run_gemm1, run_gemm2)
from zeroprefill.kernels.grouped_mm_moe import ALIGN_M as GROUPED_MM_ALIGN_M
from zeroprefill.kernels.moe_config import CONFIG_DIR, arch_name, clear_config_cache, problem_key
from zeroprefill.kernels.quant import quantize_tokens_fp8_group

SHAPES = {  # name: (E, K, H, I)
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
TOKENS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
TUNE_TOKENS = [1024, 4096, 16384]


def moe_flops(num_tokens: int, top_k: int, hidden: int, inter: int) -> float:
    return 2.0 * num_tokens * top_k * (2 * inter * hidden + hidden * inter)


def grouped_mm_baseline(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The baseline: sort rows by expert, two torch._grouped_mm, un-permute by gather, weighted sum.

    Written to be cheap in plain torch: gathers (index_select) rather than index_put scatters,
    and the routing weights applied by the batched [1, K] x [K, H] product that also sums the slots.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    expert_of_row = topk_ids.reshape(-1)
    _, order = torch.sort(expert_of_row, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    rows_per_expert = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    rows_per_expert.scatter_add_(0, expert_of_row.long(), torch.ones_like(expert_of_row, dtype=torch.int32))
    offs = torch.cumsum(rows_per_expert, 0, dtype=torch.int32)
    x_sorted = x.index_select(0, order // top_k)
    gate_up = torch._grouped_mm(x_sorted, w13.transpose(1, 2), offs=offs)
    act = F.silu(gate_up[:, : two_inter // 2]) * gate_up[:, two_inter // 2:]
    y_sorted = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    slots = y_sorted.index_select(0, inverse).view(num_tokens, top_k, hidden)
    return torch.bmm(topk_weights.to(slots.dtype).unsqueeze(1), slots).squeeze(1)


def compiled_kernel_stats() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of our two GEMM kernels."""
    stats = []
    for jit_fn in (_gemm1_gate_up_silu_kernel, _gemm2_down_scatter_kernel):
        for caches in getattr(jit_fn, "device_caches", {}).values():
            for kernel in caches[0].values():
                meta = kernel.metadata
                constants = getattr(getattr(kernel, "src", None), "constants", {}) or {}
                stats.append({"kernel": jit_fn.__name__, "n_regs": kernel.n_regs, "n_spills": kernel.n_spills,
                              "shared_bytes": meta.shared, "num_warps": meta.num_warps,
                              "num_stages": meta.num_stages,
                              "constexprs": {str(k): v for k, v in constants.items()
                                             if isinstance(v, (int, bool))}})
    return stats


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


class Layer:
    """Random weights of one MoE layer in bf16, FP8 (block and rowwise), plus routing for up to max_tokens."""

    def __init__(self, shape: tuple[int, int, int, int], max_tokens: int, seed: int = 0):
        self.num_experts, self.top_k, self.hidden, self.inter = shape
        gen = torch.Generator(device="cuda").manual_seed(seed)
        e, h, i = self.num_experts, self.hidden, self.inter
        self.w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h ** -0.5).bfloat16()
        self.w2 = (torch.randn(e, h, i, device="cuda", generator=gen) * i ** -0.5).bfloat16()
        self.w13_fp8, self.w13_scale = quantize_weights_fp8_block(self.w13)
        self.w2_fp8, self.w2_scale = quantize_weights_fp8_block(self.w2)
        self.w13_fp8_rowwise, self.w13_rowwise_scale = quantize_weights_fp8_rowwise(self.w13)
        self.w2_fp8_rowwise, self.w2_rowwise_scale = quantize_weights_fp8_rowwise(self.w2)
        self.x = torch.randn(max_tokens, h, device="cuda", generator=gen).bfloat16()
        logits = torch.randn(max_tokens, e, device="cuda", generator=gen)
        self.topk_weights, self.topk_ids = select_experts(logits, self.top_k, renormalize=True)

    def inputs(self, num_tokens: int):
        return (self.x[:num_tokens], self.topk_weights[:num_tokens].contiguous(),
                self.topk_ids[:num_tokens].contiguous())


def candidate_configs(use_fp8: bool, num_tokens: int, top_k: int, num_experts: int):
    """The tile search space: block_m by load, then gemm1 and gemm2 tiles for each block_m."""
    rows_per_expert = num_tokens * top_k / num_experts
    block_ms = [m for m in (32, 64, 128) if m <= 2 * max(rows_per_expert, 16)]
    bk = 128 if use_fp8 else 64
    for bm in block_ms:
        warps = 4 if bm <= 64 else 8
        if use_fp8:
            g1 = [GemmConfig(bm, 128, 128, 8, w, s) for w, s in ((warps, 3), (warps, 4), (8, 2), (8, 3))]
        else:
            g1 = [GemmConfig(bm, bn, bk, gm, warps, s) for bn, gm, s in
                  ((64, 8, 4), (128, 8, 3), (128, 8, 4), (128, 32, 4))]
        g2 = [GemmConfig(bm, bn, bk, gm, w, s) for bn, gm, w, s in
              ((128, 8, warps, 4), (128, 8, warps, 3), (256, 8, 8, 3), (128, 16, warps, 4), (64, 8, 4, 4))]
        yield bm, g1, g2


def tune_one(layer: Layer, use_fp8: bool, num_tokens: int) -> tuple[MoEConfig, float]:
    """Tune GEMM 1 and GEMM 2 separately for each block_m; keep the fastest pair."""
    x, topk_weights, topk_ids = layer.inputs(num_tokens)
    w13, w2 = (layer.w13_fp8, layer.w2_fp8) if use_fp8 else (layer.w13, layer.w2)
    w13_scale, w2_scale = (layer.w13_scale, layer.w2_scale) if use_fp8 else (None, None)
    xq, x_scale = quantize_tokens_fp8_group(x) if use_fp8 else (x, None)
    best: tuple[float, MoEConfig] | None = None
    for bm, g1_list, g2_list in candidate_configs(use_fp8, num_tokens, layer.top_k, layer.num_experts):
        alignment = moe_align_block_size(topk_ids, layer.num_experts, bm)
        g1_times = {}
        for cfg in g1_list:
            try:
                g1_times[cfg] = bench_ms(lambda: run_gemm1(xq, x_scale, w13, w13_scale, alignment, cfg))
            except Exception as exc:  # e.g. out of shared memory for this tile
                print(f"  skip {cfg}: {type(exc).__name__}")
        g1 = min(g1_times, key=g1_times.get)
        act, act_scale = run_gemm1(xq, x_scale, w13, w13_scale, alignment, g1)
        g2_times = {}
        for cfg in g2_list:
            try:
                g2_times[cfg] = bench_ms(lambda: run_gemm2(act, act_scale, w2, w2_scale, topk_weights,
                                                           alignment, cfg, x.dtype))
            except Exception as exc:
                print(f"  skip {cfg}: {type(exc).__name__}")
        g2 = min(g2_times, key=g2_times.get)
        total = g1_times[g1] + g2_times[g2]
        print(f"  T={num_tokens} fp8={use_fp8} block_m={bm}: gemm1 {g1_times[g1]:.3f} ms {g1}, "
              f"gemm2 {g2_times[g2]:.3f} ms {g2}")
        if best is None or total < best[0]:
            best = (total, MoEConfig(g1, g2))
    return best[1], best[0]


def tune(shapes: dict, tokens: list[int]) -> Path:
    path = CONFIG_DIR / f"{arch_name(torch.device('cuda'))}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text())["configs"] if path.exists() else {}
    for name, shape in shapes.items():
        layer = Layer(shape, max(tokens))
        for use_fp8 in (False, True):
            key = problem_key(use_fp8, layer.num_experts, layer.hidden, layer.inter)
            table[key] = {}
            for num_tokens in tokens:
                config, _ = tune_one(layer, use_fp8, num_tokens)
                table[key][str(num_tokens)] = config.to_json()
            path.write_text(json.dumps({  # after every problem: a cut-off run keeps what it found
                "device": torch.cuda.get_device_name(),
                "triton": triton.__version__,
                "note": "written by benchmarks/moe_kernels.py --tune; lookups take the nearest token count",
                "configs": table}, indent=1) + "\n")
        del layer
        torch.cuda.empty_cache()
    clear_config_cache()
    return path


def profile_kernels(fn, steps: int = 3) -> dict[str, float]:
    """GPU kernel time per call, by kernel name (ms), from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for evt in prof.key_averages():
        device_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if device_us > 0:  # kernels whose names differ only past 80 characters are summed
            name = evt.key[:80]
            times[name] = times.get(name, 0.0) + device_us / steps / 1000
    return {name: round(ms, 4) for name, ms in sorted(times.items(), key=lambda kv: -kv[1])}


def sides(layer: Layer, x: torch.Tensor, tw: torch.Tensor, ti: torch.Tensor, triton_cfg: MoEConfig,
          fp8_cfg: MoEConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """Every measured side at one token count, as calls (the same ones are timed and profiled)."""
    return {
        "bf16_triton": lambda: fused_experts(x, layer.w13, layer.w2, tw, ti, config=triton_cfg),
        "bf16_gmm_ours": lambda: fused_experts(x, layer.w13, layer.w2, tw, ti, config=MoEConfig(backend=GROUPED_MM)),
        "grouped_mm": lambda: grouped_mm_baseline(x, layer.w13, layer.w2, tw, ti),
        "fp8": lambda: fused_experts(x, layer.w13_fp8, layer.w2_fp8, tw, ti, w13_scale=layer.w13_scale,
                                     w2_scale=layer.w2_scale, config=fp8_cfg),
        "fp8_rowwise": lambda: fused_experts(x, layer.w13_fp8_rowwise, layer.w2_fp8_rowwise, tw, ti,
                                             w13_scale=layer.w13_rowwise_scale, w2_scale=layer.w2_rowwise_scale,
                                             config=MoEConfig(backend=GROUPED_MM)),
        "fp8_rowwise_fast_accum": lambda: grouped_mm_experts(  # same span: alignment included
            x, layer.w13_fp8_rowwise, layer.w2_fp8_rowwise, tw,
            moe_align_block_size(ti, layer.num_experts, GROUPED_MM_ALIGN_M), layer.w13_rowwise_scale,
            layer.w2_rowwise_scale, fast_accum=True),
        **deepgemm_calls(layer, x, tw, ti),
    }


def deepgemm_calls(layer: Layer, x: torch.Tensor, tw: torch.Tensor, ti: torch.Tensor) -> dict:
    """The DeepGEMM sides (bf16, block FP8), or none where DeepGEMM does not load."""
    if deepgemm_unavailable_reason() is not None:
        return {}
    return {"deepgemm_bf16": lambda: deepgemm_experts(x, layer.w13, layer.w2, tw, ti),
            "deepgemm_fp8": lambda: deepgemm_experts(x, layer.w13_fp8, layer.w2_fp8, tw, ti,
                                                     w13_scale=layer.w13_scale, w2_scale=layer.w2_scale)}


def run_benchmark(shapes: dict, tokens: list[int], profile_tokens: int, select_backends: bool) -> dict:
    points, profiles, failures = [], {}, {}
    with_deepgemm = deepgemm_unavailable_reason() is None
    for name, shape in shapes.items():
        layer = Layer(shape, max(tokens))
        e, k, h, i = layer.num_experts, layer.top_k, layer.hidden, layer.inter
        print(f"\n{name}: E={e} top-{k} H={h} I={i}")
        dg_header = f" {'dg bf16':>7} {'dg fp8':>7} {'dgfp8/bf16':>10}" if with_deepgemm else ""
        print(f"{'tokens':>7} {'bf16':>7} {'backend':>10} {'triton':>7} {'gmm+ours':>8} {'gmm':>7} {'fp8':>7} "
              f"{'fp8 row':>7} {'row+fa':>7} {'bf16/gmm':>8} {'fp8/bf16':>8} {'row/bf16':>8}{dg_header}  "
              f"max rel err (bf16 trit/gmm+ours, fp8, row, row+fa{', dg bf16, dg fp8' if with_deepgemm else ''})")
        shape_points = []
        for num_tokens in tokens:
            x, tw, ti = layer.inputs(num_tokens)
            triton_cfg = get_config(num_tokens, k, e, h, i, False, x.device, allow_grouped_mm=False)
            fp8_cfg = get_config(num_tokens, k, e, h, i, True, x.device)
            fns = sides(layer, x, tw, ti, triton_cfg, fp8_cfg)
            refs = {"bf16": fused_experts_reference(x, layer.w13, layer.w2, tw, ti).float()}
            err, ms = {}, {}
            for side, fn in fns.items():
                try:
                    if side in ("fp8", "deepgemm_fp8"):
                        ref = fused_experts_reference(x, layer.w13_fp8, layer.w2_fp8, tw, ti,
                                                      w13_scale=layer.w13_scale, w2_scale=layer.w2_scale).float()
                    elif side.startswith("fp8_rowwise"):
                        ref = fused_experts_reference(x, layer.w13_fp8_rowwise, layer.w2_fp8_rowwise, tw, ti,
                                                      w13_scale=layer.w13_rowwise_scale,
                                                      w2_scale=layer.w2_rowwise_scale).float()
                    else:
                        ref = refs["bf16"]
                    out = fn()
                    err[side] = rel_err(out, ref)
                    if "fp8" in side:
                        err[f"{side}_vs_bf16_reference"] = rel_err(out, refs["bf16"])
                    del out, ref
                    ms[side] = bench_ms(fn)
                except Exception as exc:  # a path that fails here is reported, not fatal to the run
                    failures[f"{name}/{num_tokens}/{side}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(f"  {side} failed: {failures[f'{name}/{num_tokens}/{side}']}")
            del refs
            point = {"shape": name, "tokens": num_tokens,
                     "flops": moe_flops(num_tokens, k, h, i), "ms": ms,
                     "max_rel_err": {s_: float(f"{v:.3g}") for s_, v in err.items()},
                     "config_bf16_triton": triton_cfg.to_json(), "config_fp8": fp8_cfg.to_json()}
            shape_points.append(point)
        if select_backends:
            write_backend_choice(name, shape, shape_points)
        for point in shape_points:
            finish_point(point, layer, with_deepgemm)
            points.append(point)
            if point["tokens"] == profile_tokens:
                x, tw, ti = layer.inputs(profile_tokens)
                shipped_cfg = get_config(profile_tokens, k, e, h, i, False, x.device)
                calls = {"bf16": partial(fused_experts, x, layer.w13, layer.w2, tw, ti, config=shipped_cfg),
                         **sides(layer, x, tw, ti, MoEConfig.from_json(point["config_bf16_triton"]),
                                 MoEConfig.from_json(point["config_fp8"]))}
                profiles[name] = {"tokens": profile_tokens}
                for side, fn in calls.items():
                    if side in point["ms"]:  # paths that failed above are not profiled
                        profiles[name][side] = profile_kernels(fn)
        del layer
        torch.cuda.empty_cache()

    def worst(key: str) -> float | None:
        values = [p[key] for p in points if p["tokens"] >= 8192 and p.get(key) is not None]
        return min(values) if values else None

    summary = {
        "bf16_vs_grouped_mm_min_8k_plus": worst("bf16_vs_grouped_mm"),
        "fp8_vs_bf16_min_8k_plus": worst("fp8_vs_bf16"),
        "fp8_rowwise_vs_bf16_min_8k_plus": worst("fp8_rowwise_vs_bf16"),
        "fp8_rowwise_fast_accum_vs_bf16_min_8k_plus": worst("fp8_rowwise_fast_accum_vs_bf16"),
        "deepgemm_bf16_vs_bf16_min_8k_plus": worst("deepgemm_bf16_vs_bf16"),
        "deepgemm_fp8_vs_bf16_min_8k_plus": worst("deepgemm_fp8_vs_bf16"),
        "targets": {"bf16_vs_grouped_mm": 1.05, "fp8_vs_bf16": 1.6},
    }
    for name, prof in profiles.items():  # GEMM kernels alone, without permutation/combine
        gemm_ms = {side: sum(v for k_, v in prof[side].items() if "cutlass" in k_ or "_gemm" in k_)
                   for side in prof if side != "tokens"}
        summary[f"gemm_kernels_only_ms_{name}_{prof['tokens']}"] = {k_: round(v, 3) for k_, v in gemm_ms.items()}
    return {"summary": summary, "points": points, "profile_ms_per_call": profiles,
            "failures": failures, "compiled_kernels": compiled_kernel_stats()}


def finish_point(point: dict, layer: Layer, with_deepgemm: bool) -> None:
    """The shipped bf16 choice (after any table rewrite), TFLOP/s and ratios; print one row."""
    ms = point["ms"]
    backend = get_config(point["tokens"], layer.top_k, layer.num_experts, layer.hidden, layer.inter, False,
                         torch.device("cuda")).backend
    point["bf16_backend"] = backend
    shipped = "bf16_gmm_ours" if backend == GROUPED_MM else "bf16_triton"
    if shipped in ms:
        ms["bf16"] = ms[shipped]  # the shipped call is exactly this forced call: same kernels, same config
    tflops = {side: point["flops"] / (v * 1e-3) / 1e12 for side, v in ms.items()}
    point["ms"] = {side: round(v, 4) for side, v in ms.items()}
    point["tflops"] = {side: round(v, 1) for side, v in tflops.items()}

    def ratio(a: str, b: str) -> float | None:
        return round(tflops[a] / tflops[b], 3) if a in tflops and b in tflops else None

    point["bf16_vs_grouped_mm"] = ratio("bf16", "grouped_mm")
    point["fp8_vs_bf16"] = ratio("fp8", "bf16")
    point["fp8_rowwise_vs_bf16"] = ratio("fp8_rowwise", "bf16")
    point["fp8_rowwise_fast_accum_vs_bf16"] = ratio("fp8_rowwise_fast_accum", "bf16")
    point["deepgemm_bf16_vs_bf16"] = ratio("deepgemm_bf16", "bf16")
    point["deepgemm_fp8_vs_bf16"] = ratio("deepgemm_fp8", "bf16")
    nan = float("nan")
    row = [f"{point['tokens']:>7}", f"{tflops.get('bf16', nan):>7.1f}", f"{backend:>10}",
           f"{tflops.get('bf16_triton', nan):>7.1f}", f"{tflops.get('bf16_gmm_ours', nan):>8.1f}",
           f"{tflops.get('grouped_mm', nan):>7.1f}", f"{tflops.get('fp8', nan):>7.1f}",
           f"{tflops.get('fp8_rowwise', nan):>7.1f}", f"{tflops.get('fp8_rowwise_fast_accum', nan):>7.1f}"]
    row += [f"{point[key] if point[key] is not None else nan:>8.3f}"
            for key in ("bf16_vs_grouped_mm", "fp8_vs_bf16", "fp8_rowwise_vs_bf16")]
    error_sides = ["bf16_triton", "bf16_gmm_ours", "fp8", "fp8_rowwise", "fp8_rowwise_fast_accum"]
    if with_deepgemm:
        ratio_dg = point["deepgemm_fp8_vs_bf16"]
        row += [f"{tflops.get('deepgemm_bf16', nan):>7.1f}", f"{tflops.get('deepgemm_fp8', nan):>7.1f}",
                f"{ratio_dg if ratio_dg is not None else nan:>10.3f}"]
        error_sides += ["deepgemm_bf16", "deepgemm_fp8"]
    errors = " ".join(f"{point['max_rel_err'].get(side, nan):.1e}" for side in error_sides)
    print(" ".join(row) + "  " + errors, flush=True)


def write_backend_choice(name: str, shape: tuple[int, int, int, int], shape_points: list[dict]) -> None:
    """Per measured token count, write the faster bf16 backend into the shipped table.

    A Triton winner keeps the tile config it was measured with; token counts already in the
    table but not measured here keep their entry.
    """
    num_experts, _, hidden, inter = shape
    path = CONFIG_DIR / f"{arch_name(torch.device('cuda'))}.json"
    table = json.loads(path.read_text()) if path.exists() else {"configs": {}}
    entries = table["configs"].setdefault(problem_key(False, num_experts, hidden, inter), {})
    for point in shape_points:
        ms = point["ms"]
        if "bf16_triton" not in ms and "bf16_gmm_ours" not in ms:
            continue
        grouped_wins = ms.get("bf16_gmm_ours", float("inf")) < ms.get("bf16_triton", float("inf"))
        entries[str(point["tokens"])] = ({"backend": GROUPED_MM} if grouped_wins
                                         else point["config_bf16_triton"])
    table["configs"][problem_key(False, num_experts, hidden, inter)] = dict(
        sorted(entries.items(), key=lambda kv: int(kv[0])))
    table["note"] = ("written by benchmarks/moe_kernels.py (--tune: Triton tiles; --select-backends: the faster "
                     "bf16 backend per measured token count); lookups take the nearest token count")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="retune kernels/configs/<arch>.json first")
    parser.add_argument("--tune-only", action="store_true", help="tune and exit")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--select-backends", action="store_true",
                        help="write the faster bf16 backend per measured token count into the table")
    parser.add_argument("--profile-tokens", type=int, default=16384)
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/moe_kernels-<gpu>.json)")
    args = parser.parse_args()
    shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")]
    gpu = torch.cuda.get_device_name()
    if args.tune or args.tune_only:
        start = time.time()
        print(f"tuning -> {tune(shapes, TUNE_TOKENS)} ({time.time() - start:.0f} s)")
        if args.tune_only:
            return
    results = run_benchmark(shapes, tokens, args.profile_tokens, args.select_backends)
    results["meta"] = {
        "command": "python benchmarks/moe_kernels.py " + " ".join(sys.argv[1:]),
        "device": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "timing": "triton.testing.do_bench median, L2 flushed; span = (x, topk_weights, topk_ids) -> out [T, H] "
                  "on every side, permutation/alignment and combine counted on all sides, routing excluded; "
                  "'bf16' is the shipped choice (bf16_backend), whose time is that of the forced backend it names",
        "selected_backends_in_this_run": args.select_backends,
        "deepgemm": deepgemm_version() or f"not measured: {deepgemm_unavailable_reason()}",
        "flops": "2*T*K*(2*I*H + H*I)",
        "error": "max|out-ref|/max|ref| vs fused_experts_reference (fp32; FP8: dequantised weights + same "
                 "activation quantisation); fp8_vs_bf16_reference is FP8 vs the bf16-weight reference",
    }
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.replace(" ", "_").lower()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"moe_kernels-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nsummary: {json.dumps(results['summary'])}\nwrote {out}")


if __name__ == "__main__":
    main()
