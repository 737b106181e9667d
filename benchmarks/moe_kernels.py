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
CUTLASS grouped GEMMs inside our permutation/SiLU/combine kernels), the plain torch._grouped_mm
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

    layer_vs_gemm_only[_eager]    time of the layer's own GEMM kernels (torch.profiler) /
                                  layer time (graph-replayed; eager)
    fp8_selected_vs_bf16          bf16 layer / block-FP8 layer on the default backend (graphs)
    unfused_glue_bound_layer_vs_gemm_only
                                  the best layer_vs_gemm_only the unfused grouped_mm pipeline
                                  can reach: its GEMM time / (GEMM time + the bytes its scatter,
                                  SiLU*mul and combine must move / the HBM bandwidth measured
                                  here by a 1 GiB device copy), alignment and launch gaps free

    python benchmarks/moe_kernels.py                     # table + benchmarks/results/moe_kernels-<gpu>.json
    python benchmarks/moe_kernels.py --shapes qwen3-235b-a22b qwen3-30b-a3b --tokens 8192 16384
    python benchmarks/moe_kernels.py --sides bf16_triton,bf16_gmm_ours,fp8_selected --profile-tokens 0
                                                         # only what the summary's new keys need
    python benchmarks/moe_kernels.py --tune              # retune the Triton tiles (kernels/configs/<arch>.json) first
    python benchmarks/moe_kernels.py --select-backends   # also write the faster bf16 backend per token count

Progress lines carry the time; the JSON is rewritten after every token count (``complete``
says whether the run finished).
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

from zeroprefill.kernels import (GROUPED_MM, TRITON, GemmConfig, MoEConfig, deepgemm_experts,
                                 deepgemm_unavailable_reason, experts_kernel_choice, fused_experts,
                                 fused_experts_reference, get_config, grouped_mm_experts, moe_align_block_size,
                                 quantize_weights_fp8_block, quantize_weights_fp8_rowwise)
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
SIDES = ("bf16_triton", "bf16_gmm_ours", "grouped_mm", "fp8", "fp8_selected", "fp8_rowwise",
         "fp8_rowwise_fast_accum", "deepgemm_bf16", "deepgemm_fp8")
BF16_SIDES = {GROUPED_MM: "bf16_gmm_ours", TRITON: "bf16_triton"}  # the forced side of each bf16 backend
SUMMARY_MIN_TOKENS = 8192  # summary keys *_min_8k_plus: the worst point at or above this many tokens
COPY_BYTES = 1 << 30       # the device copy that measures HBM bandwidth
_START = time.perf_counter()


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


def log(message: str) -> None:
    """A progress line: the wall-clock time and the seconds since the script started."""
    print(f"[{time.strftime('%H:%M:%S')} {time.perf_counter() - _START:6.0f} s] {message}", flush=True)


def bench_ms(fn: Callable[[], object]) -> float:
    """Eager time of one call (ms): do_bench median, L2 flushed before each call."""
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def graph_ms(fn: Callable[[], object]) -> float:
    """Time of one CUDA-graph replay of ``fn`` (ms), captured once after a warm-up call on the
    capture stream: the GPU time of the call without the host's launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)  # the graph and its memory pool go with this frame


def hbm_bandwidth_gb_s(num_bytes: int = COPY_BYTES) -> float:
    """Measured HBM bandwidth (GB/s): bytes read plus written by a device-to-device copy."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def unfused_glue_bytes(num_tokens: int, top_k: int, hidden: int, inter: int, act_bytes: int = 2) -> int:
    """The least the grouped_mm pipeline's glue kernels can move (bytes), real rows only:

        scatter   read x [T, H] and the T*K positions (int32), write x_sorted [T*K, H]
        SiLU*mul  read gate_up [T*K, 2I], write act [T*K, I]
        combine   read y [T*K, H], the T*K weights (fp32) and positions, write out [T, H]
    """
    rows = num_tokens * top_k
    scatter = act_bytes * (num_tokens + rows) * hidden + 4 * rows
    silu_mul = act_bytes * rows * 3 * inter
    combine = act_bytes * (rows + num_tokens) * hidden + 8 * rows
    return scatter + silu_mul + combine


def is_gemm_kernel(name: str) -> bool:
    """A profiled kernel that is a grouped GEMM: torch's CUTLASS ones, DeepGEMM's, our two Triton ones."""
    return "cutlass" in name or "_gemm" in name


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
        "fp8_selected": lambda: fused_experts(x, layer.w13_fp8, layer.w2_fp8, tw, ti, w13_scale=layer.w13_scale,
                                              w2_scale=layer.w2_scale),
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


def reference_kind(side: str) -> str:
    """Which fp32 reference a side is checked against: bf16 weights, block FP8 or FP8-rowwise."""
    if side in ("fp8", "fp8_selected", "deepgemm_fp8"):
        return "fp8_block"
    return "fp8_rowwise" if side.startswith("fp8_rowwise") else "bf16"


def measure_point(layer: Layer, name: str, num_tokens: int, side_names: list[str], failures: dict) -> dict:
    """Errors, eager and graph-replayed times of every side at one token count; at >= 8K tokens
    also the GEMM kernels' time of each bf16 backend (torch.profiler)."""
    e, k, h, i = layer.num_experts, layer.top_k, layer.hidden, layer.inter
    x, tw, ti = layer.inputs(num_tokens)
    triton_cfg = get_config(num_tokens, k, e, h, i, False, x.device, allow_grouped_mm=False)
    fp8_cfg = get_config(num_tokens, k, e, h, i, True, x.device)
    fns = {side: fn for side, fn in sides(layer, x, tw, ti, triton_cfg, fp8_cfg).items() if side in side_names}
    weights = {"bf16": {}, "fp8_block": {"w13_scale": layer.w13_scale, "w2_scale": layer.w2_scale},
               "fp8_rowwise": {"w13_scale": layer.w13_rowwise_scale, "w2_scale": layer.w2_rowwise_scale}}
    matrices = {"bf16": (layer.w13, layer.w2), "fp8_block": (layer.w13_fp8, layer.w2_fp8),
                "fp8_rowwise": (layer.w13_fp8_rowwise, layer.w2_fp8_rowwise)}
    refs: dict[str, torch.Tensor] = {}

    def reference(kind: str) -> torch.Tensor:  # each reference once per point
        if kind not in refs:
            refs[kind] = fused_experts_reference(x, *matrices[kind], tw, ti, **weights[kind]).float()
        return refs[kind]

    err, ms, ms_graph, gemm_ms = {}, {}, {}, {}
    for side, fn in fns.items():
        key = f"{name}/{num_tokens}/{side}"
        try:
            out = fn()
            err[side] = rel_err(out, reference(reference_kind(side)))
            if "fp8" in side:
                err[f"{side}_vs_bf16_reference"] = rel_err(out, reference("bf16"))
            del out
            ms[side] = bench_ms(fn)
        except Exception as exc:  # a path that fails here is reported, not fatal to the run
            failures[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"{key} failed: {failures[key]}")
            continue
        try:
            ms_graph[side] = graph_ms(fn)
        except Exception as exc:  # e.g. a host sync inside the call: no graph time for this side
            failures[f"{key}/graph"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"{key} graph capture failed: {failures[key + '/graph']}")
        if num_tokens >= SUMMARY_MIN_TOKENS and side in BF16_SIDES.values():
            gemm_ms[side] = sum(v for kernel, v in profile_kernels(fn).items() if is_gemm_kernel(kernel))
        log(f"{key}: eager {ms[side]:.3f} ms, graph {ms_graph.get(side, float('nan')):.3f} ms")
    try:
        fp8_kernel = experts_kernel_choice(torch.bfloat16, layer.w13_fp8, layer.w2_fp8, layer.w13_scale,
                                           layer.w2_scale)
    except RuntimeError as exc:  # ZEROPREFILL_EXPERTS_KERNEL=deepgemm where DeepGEMM cannot run
        fp8_kernel = str(exc)
    return {"shape": name, "tokens": num_tokens, "flops": moe_flops(num_tokens, k, h, i), "ms": ms,
            "ms_graph": ms_graph, "gemm_kernels_ms": gemm_ms,
            "max_rel_err": {s_: float(f"{v:.3g}") for s_, v in err.items()},
            "config_bf16_triton": triton_cfg.to_json(), "config_fp8": fp8_cfg.to_json(),
            "fp8_selected_kernel": fp8_kernel}


def profile_sides(layer: Layer, point: dict) -> dict:
    """Kernel times per call of every side that ran at this point (the shipped bf16 included)."""
    e, k, h, i = layer.num_experts, layer.top_k, layer.hidden, layer.inter
    x, tw, ti = layer.inputs(point["tokens"])
    shipped_cfg = get_config(point["tokens"], k, e, h, i, False, x.device)
    calls = {"bf16": partial(fused_experts, x, layer.w13, layer.w2, tw, ti, config=shipped_cfg),
             **sides(layer, x, tw, ti, MoEConfig.from_json(point["config_bf16_triton"]),
                     MoEConfig.from_json(point["config_fp8"]))}
    profile = {"tokens": point["tokens"]}
    for side, fn in calls.items():
        if side in point["ms"]:  # paths that failed (or were not asked for) are not profiled
            profile[side] = profile_kernels(fn)
    return profile


def run_benchmark(shapes: dict, tokens: list[int], profile_tokens: int, select_backends: bool,
                  side_names: list[str], save: Callable[[dict], None]) -> dict:
    """Every shape and token count; ``save`` gets the results so far after every point."""
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
        if select_backends:  # the shipped bf16 choice may change: recompute the points' bf16 columns
            write_backend_choice(name, shape, shape_points)
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
    def worst(key: str) -> float | None:
        values = [p[key] for p in points if p["tokens"] >= SUMMARY_MIN_TOKENS and p.get(key) is not None]
        return min(values) if values else None

    summary = {
        "bf16_vs_grouped_mm_min_8k_plus": worst("bf16_vs_grouped_mm"),
        "fp8_vs_bf16_min_8k_plus": worst("fp8_vs_bf16"),
        "fp8_rowwise_vs_bf16_min_8k_plus": worst("fp8_rowwise_vs_bf16"),
        "fp8_rowwise_fast_accum_vs_bf16_min_8k_plus": worst("fp8_rowwise_fast_accum_vs_bf16"),
        "deepgemm_bf16_vs_bf16_min_8k_plus": worst("deepgemm_bf16_vs_bf16"),
        "deepgemm_fp8_vs_bf16_min_8k_plus": worst("deepgemm_fp8_vs_bf16"),
        "fp8_selected_vs_bf16_min_8k_plus": worst("fp8_selected_vs_bf16"),
        "layer_vs_gemm_only_min_8k_plus": worst("layer_vs_gemm_only"),
        "layer_vs_gemm_only_eager_min_8k_plus": worst("layer_vs_gemm_only_eager"),
        "unfused_glue_bound_layer_vs_gemm_only": worst("unfused_glue_bound_layer_vs_gemm_only"),
        "hbm_copy_bandwidth_gb_s": round(bandwidth_gb_s),
        "targets": {"bf16_vs_grouped_mm": 1.05, "fp8_vs_bf16": 1.6, "layer_vs_gemm_only": 0.9},
    }
    for name, prof in profiles.items():  # GEMM kernels alone, without permutation/combine
        gemm_ms = {side: sum(v for k_, v in prof[side].items() if is_gemm_kernel(k_))
                   for side in prof if side != "tokens"}
        summary[f"gemm_kernels_only_ms_{name}_{prof['tokens']}"] = {k_: round(v, 3) for k_, v in gemm_ms.items()}
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
    gemm = point["gemm_kernels_ms"]
    point["layer_vs_gemm_only"] = ratio(gemm.get("bf16"), point["ms_graph"].get("bf16"))
    point["layer_vs_gemm_only_eager"] = ratio(gemm.get("bf16"), point["ms"].get("bf16"))
    glue_ms = unfused_glue_bytes(point["tokens"], top_k, hidden, inter) / (bandwidth_gb_s * 1e9) * 1e3
    point["unfused_glue_min_ms"] = round(glue_ms, 4)
    gmm_gemm = gemm.get(BF16_SIDES[GROUPED_MM])
    point["unfused_glue_bound_layer_vs_gemm_only"] = (
        ratio(gmm_gemm, gmm_gemm + glue_ms) if gmm_gemm is not None else None)
    for table in (point["ms"], point["ms_graph"], point["gemm_kernels_ms"]):
        for side, v in table.items():
            table[side] = round(v, 4)


def print_header(with_deepgemm: bool) -> None:
    dg_header = f" {'dg bf16':>7} {'dg fp8':>7} {'dgfp8/bf16':>10}" if with_deepgemm else ""
    print(f"{'tokens':>7} {'bf16':>7} {'backend':>10} {'triton':>7} {'gmm+ours':>8} {'gmm':>7} {'fp8':>7} "
          f"{'fp8 row':>7} {'row+fa':>7} {'bf16/gmm':>8} {'fp8/bf16':>8} {'row/bf16':>8}{dg_header}  "
          f"max rel err (bf16 trit/gmm+ours, fp8, row, row+fa{', dg bf16, dg fp8' if with_deepgemm else ''})",
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

    row = [f"{point['tokens']:>7}", f"{tflops.get('bf16', nan):>7.1f}", f"{point['bf16_backend']:>10}",
           f"{tflops.get('bf16_triton', nan):>7.1f}", f"{tflops.get('bf16_gmm_ours', nan):>8.1f}",
           f"{tflops.get('grouped_mm', nan):>7.1f}", f"{tflops.get('fp8', nan):>7.1f}",
           f"{tflops.get('fp8_rowwise', nan):>7.1f}", f"{tflops.get('fp8_rowwise_fast_accum', nan):>7.1f}"]
    row += [f"{value(point[key]):>8.3f}" for key in ("bf16_vs_grouped_mm", "fp8_vs_bf16", "fp8_rowwise_vs_bf16")]
    error_sides = ["bf16_triton", "bf16_gmm_ours", "fp8", "fp8_rowwise", "fp8_rowwise_fast_accum"]
    if with_deepgemm:
        row += [f"{tflops.get('deepgemm_bf16', nan):>7.1f}", f"{tflops.get('deepgemm_fp8', nan):>7.1f}",
                f"{value(point['deepgemm_fp8_vs_bf16']):>10.3f}"]
        error_sides += ["deepgemm_bf16", "deepgemm_fp8"]
    errors = " ".join(f"{point['max_rel_err'].get(side, nan):.1e}" for side in error_sides)
    print(" ".join(row) + "  " + errors, flush=True)
    graph = " ".join(f"{side} {v:.1f}" for side, v in tflops_graph.items())
    print(f"{'':>7} graph TFLOP/s: {graph}; fp8 selected/bf16 {value(point['fp8_selected_vs_bf16']):.3f}; "
          f"GEMMs/layer {value(point['layer_vs_gemm_only']):.3f} (eager {value(point['layer_vs_gemm_only_eager']):.3f},"
          f" unfused-glue bound {value(point['unfused_glue_bound_layer_vs_gemm_only']):.3f})", flush=True)


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
                       "(CUTLASS / our Triton GEMMs), at >= 8192 tokens",
    "bf16_vs_grouped_mm, fp8_vs_bf16, fp8_rowwise_vs_bf16, fp8_rowwise_fast_accum_vs_bf16, "
    "deepgemm_bf16_vs_bf16, deepgemm_fp8_vs_bf16": "eager TFLOP/s ratios",
    "fp8_selected_vs_bf16": "graph: bf16 layer time / block-FP8 layer time, fused_experts(config=None) "
                            "on the backend it selects (fp8_selected_kernel)",
    "layer_vs_gemm_only": "graph: gemm_kernels_ms.bf16 / ms_graph.bf16",
    "layer_vs_gemm_only_eager": "eager: gemm_kernels_ms.bf16 / ms.bf16",
    "unfused_glue_bound_layer_vs_gemm_only": "gemm_kernels_ms.bf16_gmm_ours / (that + unfused_glue_min_ms); "
                                             "unfused_glue_min_ms = unfused_glue_bytes (scatter, SiLU*mul, "
                                             "combine; real rows) / hbm_copy_bandwidth_gb_s",
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
                        help="write the faster bf16 backend per measured token count into the table")
    parser.add_argument("--profile-tokens", type=int, default=16384,
                        help="profile every side's kernels at this token count (0: none)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/moe_kernels-<gpu>.json)")
    args = parser.parse_args()
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
        "deepgemm": deepgemm_version() or f"not measured: {deepgemm_unavailable_reason()}",
        "flops": "2*T*K*(2*I*H + H*I)",
        "error": "max|out-ref|/max|ref| vs fused_experts_reference (fp32; FP8: dequantised weights + same "
                 "activation quantisation); fp8_vs_bf16_reference is FP8 vs the bf16-weight reference",
    }
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.replace(" ", "_").lower()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"moe_kernels-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict, complete: bool = False) -> None:
        out.write_text(json.dumps({**results, "meta": meta, "complete": complete}, indent=1) + "\n")

    log(f"{gpu}: shapes {', '.join(shapes)}, tokens {tokens}, sides {', '.join(side_names)} -> {out}")
    results = run_benchmark(shapes, tokens, args.profile_tokens, args.select_backends, side_names, save)
    save(results, complete=True)
    print(f"\nsummary: {json.dumps(results['summary'])}")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
