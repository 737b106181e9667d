"""``moe_kernels.py``'s measurements: one MoE layer's sides, timed, checked and profiled.

- :class:`Layer`: random weights in bf16 and FP8 (block, rowwise) and routing for one shape;
- :func:`sides`: every measured call on it (ours on each backend, the plain torch._grouped_mm
  baseline, FP8, DeepGEMM's where it loads), over the same span;
- the clocks: :func:`bench_ms` (eager), :func:`graph_ms` (CUDA-graph replay),
  :func:`profile_kernels` (torch.profiler, per kernel), :func:`hbm_bandwidth_gb_s`, and
  :func:`same_clock_ms`, which times several calls (graphs, or eager) in turns, so that a
  ratio between them does not carry the GPU's clock drift between two separate measurements;
- :func:`measure_point`: errors and times of every side at one token count;
- ``--tune``: :func:`tune` searches the Triton tiles, each GEMM's candidates timed in turns
  (:func:`medians_in_turns`), and writes ``kernels/configs/<arch>.json``.

The table, the ratios and the summary built from these points are in ``moe_kernels.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
import triton

from zeroprefill.kernels import (GROUPED_MM, TRITON, TRITON_GROUPED_MM, GemmConfig, MoEConfig, deepgemm_experts,
                                 deepgemm_unavailable_reason, experts_kernel_choice, fused_experts,
                                 fused_experts_reference, get_config, grouped_mm_experts, moe_align_block_size,
                                 quantize_weights_fp8_block, quantize_weights_fp8_rowwise)
from zeroprefill.common.asyncep_moe import select_experts
from zeroprefill.kernels.deepgemm import fp8_psum_refused_reason
from zeroprefill.kernels.fused_moe import (_gemm1_gate_up_silu_kernel, _gemm2_down_scatter_kernel,
                                           run_gemm1, run_gemm2)
from zeroprefill.kernels.grouped_mm_moe import ALIGN_M as GROUPED_MM_ALIGN_M
from zeroprefill.kernels.grouped_mm_moe import grouped_gemm, scatter_token_rows, silu_mul
from zeroprefill.kernels.moe_config import CONFIG_DIR, arch_name, clear_config_cache, problem_key
from zeroprefill.kernels.quant import quantize_tokens_fp8_group

BF16_SIDES = {GROUPED_MM: "bf16_gmm_ours", TRITON: "bf16_triton",  # the forced side of each bf16 backend
              TRITON_GROUPED_MM: "bf16_triton_gmm"}
SUMMARY_MIN_TOKENS = 8192  # summary keys *_min_8k_plus: the worst point at or above this many tokens
SHAPES = {  # name: (E, K, H, I)
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
#: A measured choice (a bf16 backend, a tile's weight loads) replaces the shipped one only when
#: it is faster by more than this: on one H100 the same layer's time moved by up to 14% between
#: two runs of one session (its GEMM kernels' by up to 7%), and most margins between the bf16
#: backends were smaller than that.
SELECT_MARGIN = 0.05
COPY_BYTES = 1 << 30       # the device copy that measures HBM bandwidth
L2_FLUSH_BYTES = 256 << 20  # zeroed before every timed replay in same_clock_ms, as do_bench does
SAME_CLOCK_ROUNDS = 15     # same_clock_ms: rounds of turns ...
SAME_CLOCK_REPLAYS = 5     # ... each call replayed this many times per turn (the turn's median)
_START = time.perf_counter()
Key = TypeVar("Key", bound=Hashable)  # what same_clock_ms's callers name their calls by


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


def gpu_tag() -> str:
    """The results files' GPU name: ``h100``, ``h200``, else the device name in snake case."""
    gpu = torch.cuda.get_device_name()
    return "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.replace(" ", "_").lower()


def bench_ms(fn: Callable[[], object]) -> float:
    """Eager time of one call (ms): do_bench median, L2 flushed before each call."""
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def captured(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``fn`` captured once in a CUDA graph, after a warm-up call on the capture stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_ms(fn: Callable[[], object]) -> float:
    """Time of one CUDA-graph replay of ``fn`` (ms): the GPU time of the call without the host's
    launch gaps."""
    return bench_ms(captured(fn).replay)  # the graph and its memory pool go with the call


def l2_flush_buffer() -> torch.Tensor:
    """What :func:`same_clock_ms` zeroes before every timed call: larger than any GPU's L2."""
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")


def same_clock_ms(calls: dict[Key, Callable[[], object]], rounds: int = SAME_CLOCK_ROUNDS,
                  replays: int = SAME_CLOCK_REPLAYS, graphs: bool = True) -> dict[Key, list[float]]:
    """Each call's time (ms), per round: the calls take turns, ``replays`` runs each (L2 flushed
    before every one, the turn's median kept), in an order reversed every other round. With
    ``graphs`` each call is captured in a CUDA graph and replayed (no host launch gaps; each
    graph keeps its outputs' memory); without, called as it is (as ``do_bench`` does). A ratio
    taken round by round compares times a few milliseconds apart: on one H100, at its power
    cap, the same GEMM kernels profiled twice in one run differed by up to 11%
    (``moe_kernels.py --profile-drift``), more than the margins such ratios decide."""
    runs = {name: captured(fn).replay for name, fn in calls.items()} if graphs else dict(calls)
    flush = l2_flush_buffer()
    for run in runs.values():  # warm: a graph's first replay uploads it
        run()
    names = list(runs)
    per_round: dict[Key, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        events: dict[Key, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        for name in names if r % 2 == 0 else names[::-1]:
            events[name] = []
            for _ in range(replays):
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runs[name]()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize()
        for name, pairs in events.items():
            per_round[name].append(statistics.median(start.elapsed_time(end) for start, end in pairs))
    return per_round


def medians_in_turns(calls: dict[Key, Callable[[], object]], rounds: int = 5, replays: int = 3) -> dict[Key, float]:
    """Each call's median time (ms) over :func:`same_clock_ms` rounds, eager; a call that raises
    on its first run (e.g. a tile out of shared memory) is reported and left out."""
    runnable = {}
    for key, call in calls.items():
        try:
            call()
            runnable[key] = call
        except Exception as exc:  # a candidate that cannot run here is skipped, not fatal
            print(f"  skip {key}: {type(exc).__name__}")
    per_round = same_clock_ms(runnable, rounds=rounds, replays=replays, graphs=False)
    return {key: statistics.median(times) for key, times in per_round.items()}


def gemm_pair(layer: Layer, x: torch.Tensor, topk_ids: torch.Tensor) -> Callable[[], object]:
    """The layer's two GEMMs and nothing else: torch's CUTLASS grouped GEMMs (the kernels of the
    ``bf16_gmm_ours`` side) on rows sorted by expert, and SiLU*mul applied, once beforehand."""
    alignment = moe_align_block_size(topk_ids, layer.num_experts, GROUPED_MM_ALIGN_M)
    x_sorted, _ = scatter_token_rows(x, alignment, quantize=False, rows=alignment.max_padded_rows)
    act, _ = silu_mul(grouped_gemm(x_sorted, layer.w13, alignment.expert_ends), alignment, quantize=False)
    ends = alignment.expert_ends
    return lambda: (grouped_gemm(x_sorted, layer.w13, ends), grouped_gemm(act, layer.w2, ends))


def layer_vs_gemm_pair(layer: Layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       bf16_sides: dict[str, Callable[[], object]] | None = None) -> dict:
    """The shipped bf16 layer (``fused_experts`` as a server calls it: the table's choice) against
    its two GEMMs alone (:func:`gemm_pair`), timed in turns (:func:`same_clock_ms`) with the
    ``bf16_sides`` (each backend forced): the median and range over the rounds of GEMM-pair time
    / layer time, and every call's median time (``ms``: ``layer``, ``gemm_pair`` and the sides)."""
    ms = same_clock_ms({"layer": lambda: fused_experts(x, layer.w13, layer.w2, topk_weights, topk_ids),
                        "gemm_pair": gemm_pair(layer, x, topk_ids), **(bf16_sides or {})})
    ratios = [gemm / whole for gemm, whole in zip(ms["gemm_pair"], ms["layer"])]
    return {"ratio": round(statistics.median(ratios), 3), "range": [round(min(ratios), 3), round(max(ratios), 3)],
            "ms": {name: round(statistics.median(v), 4) for name, v in ms.items()}, "rounds": len(ratios)}


def hbm_bandwidth_gb_s(num_bytes: int = COPY_BYTES) -> float:
    """Measured HBM bandwidth (GB/s): bytes read plus written by a device-to-device copy."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


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
        if torch.cuda.get_device_capability() >= (9, 0):  # each tile with TMA loads too, one program a tile or persistent
            g1 += [replace(cfg, weight_tma=True, persistent=persistent) for cfg in g1 for persistent in (False, True)]
            g2 += [replace(cfg, weight_tma=True, persistent=persistent) for cfg in g2 for persistent in (False, True)]
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
        # each GEMM's candidates timed in turns: none is judged at another clock than its rivals
        g1_times = medians_in_turns({cfg: partial(run_gemm1, xq, x_scale, w13, w13_scale, alignment, cfg)
                                     for cfg in g1_list})
        g1 = min(g1_times, key=g1_times.get)
        act, act_scale = run_gemm1(xq, x_scale, w13, w13_scale, alignment, g1)
        g2_times = medians_in_turns({cfg: partial(run_gemm2, act, act_scale, w2, w2_scale, topk_weights,
                                                  alignment, cfg, x.dtype) for cfg in g2_list})
        g2 = min(g2_times, key=g2_times.get)
        total = g1_times[g1] + g2_times[g2]
        print(f"  T={num_tokens} fp8={use_fp8} block_m={bm}: gemm1 {g1_times[g1]:.3f} ms {g1}, "
              f"gemm2 {g2_times[g2]:.3f} ms {g2}")
        if best is None or total < best[0]:
            best = (total, MoEConfig(g1, g2))
    return best[1], best[0]


def tune(shapes: dict, tokens: list[int]) -> Path:
    """Retune every tile of ``shapes`` (bf16 and block FP8) at ``tokens`` into the arch's table.
    Each tuned problem's entries are replaced whole: bf16 backend choices measured against the
    old tiles go with them (``moe_kernels.py --select-backends`` measures them again)."""
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
        "bf16_triton_gmm": lambda: fused_experts(x, layer.w13, layer.w2, tw, ti,
                                                 config=MoEConfig(triton_cfg.gemm1, backend=TRITON_GROUPED_MM)),
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
            "deepgemm_fp8": lambda: deepgemm_experts(x, layer.w13_fp8, layer.w2_fp8, tw, ti, w13_scale=layer.w13_scale,
                                                     w2_scale=layer.w2_scale, fp8_layout="m_indices"),
            "deepgemm_fp8_psum": lambda: psum_only(deepgemm_experts(x, layer.w13_fp8, layer.w2_fp8, tw, ti,
                                                                    w13_scale=layer.w13_scale,
                                                                    w2_scale=layer.w2_scale, fp8_layout="psum"))}


def psum_only(out: torch.Tensor) -> torch.Tensor:
    """``out``, where DeepGEMM took the psum layout for FP8; else a failure of that side (it ran
    on m_indices, which side ``deepgemm_fp8`` times already)."""
    refused = fp8_psum_refused_reason()
    if refused is not None:
        raise RuntimeError(f"DeepGEMM refused the psum layout for FP8: {refused}")
    return out


def reference_kind(side: str) -> str:
    """Which fp32 reference a side is checked against: bf16 weights, block FP8 or FP8-rowwise."""
    if side in ("fp8", "fp8_selected", "deepgemm_fp8", "deepgemm_fp8_psum"):
        return "fp8_block"
    return "fp8_rowwise" if side.startswith("fp8_rowwise") else "bf16"


def measure_point(layer: Layer, name: str, num_tokens: int, side_names: list[str], failures: dict) -> dict:
    """Errors, eager and graph-replayed times of every side at one token count; at >= 8K tokens
    also the GEMM kernels' time of each bf16 backend and of ``fp8_selected`` (torch.profiler)."""
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
        if num_tokens >= SUMMARY_MIN_TOKENS and side in (*BF16_SIDES.values(), "fp8_selected"):
            gemm_ms[side] = sum(v for kernel, v in profile_kernels(fn).items() if is_gemm_kernel(kernel))
        log(f"{key}: eager {ms[side]:.3f} ms, graph {ms_graph.get(side, float('nan')):.3f} ms")
    same_clock = None
    if num_tokens >= SUMMARY_MIN_TOKENS and any(side in side_names for side in BF16_SIDES.values()):
        try:
            same_clock = layer_vs_gemm_pair(layer, x, tw, ti, {side: fns[side] for side in BF16_SIDES.values()
                                                               if side in ms_graph})
            log(f"{name}/{num_tokens}: GEMM pair / layer, timed in turns: {same_clock['ratio']:.3f} "
                f"(rounds {same_clock['range'][0]:.3f}-{same_clock['range'][1]:.3f}), {same_clock['ms']}")
        except Exception as exc:  # e.g. no torch._grouped_mm on this GPU
            failures[f"{name}/{num_tokens}/same_clock"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        fp8_kernel = experts_kernel_choice(torch.bfloat16, layer.w13_fp8, layer.w2_fp8, layer.w13_scale,
                                           layer.w2_scale)
    except RuntimeError as exc:  # ZEROPREFILL_EXPERTS_KERNEL=deepgemm where DeepGEMM cannot run
        fp8_kernel = str(exc)
    return {"shape": name, "tokens": num_tokens, "flops": moe_flops(num_tokens, k, h, i), "ms": ms,
            "ms_graph": ms_graph, "gemm_kernels_ms": gemm_ms,
            "max_rel_err": {s_: float(f"{v:.3g}") for s_, v in err.items()},
            "config_bf16_triton": triton_cfg.to_json(), "config_fp8": fp8_cfg.to_json(),
            "fp8_selected_kernel": fp8_kernel, "layer_vs_gemm_pair_same_clock": same_clock}


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


