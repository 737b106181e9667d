"""One MoE layer timed four ways, beside its kernels' own times: what the timing mode adds.

``moe_kernels.py``'s ``layer_vs_gemm_only`` sets GEMM kernel times from torch.profiler (calls
back to back, L2 warm) against the layer's CUDA-graph replay timed by ``do_bench`` (L2 flushed
before each replay). This times our bf16 layer (the shipped table's tiles) and the CUTLASS
pipeline (``backend="grouped_mm"``) each way on the same inputs, in one process:

    eager_flushed / graph_flushed        do_bench medians, L2 flushed before each call
    eager_back_to_back / graph_back_to_back   20 calls back to back, mean (no flush, no idle)
    kernels_eager_sum / kernels_graph_sum     torch.profiler: every kernel's time per call
    gemm_kernels_eager / gemm_kernels_graph   the GEMM kernels' part of it

    python benchmarks/layer_timing_modes.py --out benchmarks/results/layer_timing_modes-h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _moe_timing import SHAPES, Layer, bench_ms, captured, is_gemm_kernel, profile_kernels  # noqa: E402
from zeroprefill.kernels.fused_moe import fused_experts  # noqa: E402
from zeroprefill.kernels.moe_config import GROUPED_MM, MoEConfig  # noqa: E402


def back_to_back_ms(fn, calls: int = 20) -> float:
    """Mean GPU time of ``calls`` calls issued back to back (ms)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def measure(fn) -> dict:
    graph = captured(fn)
    kernels = {"eager": profile_kernels(fn), "graph": profile_kernels(graph.replay)}
    row = {"eager_flushed": bench_ms(fn), "graph_flushed": bench_ms(graph.replay),
           "eager_back_to_back": back_to_back_ms(fn), "graph_back_to_back": back_to_back_ms(graph.replay)}
    for mode, times in kernels.items():
        row[f"kernels_{mode}_sum"] = sum(times.values())
        row[f"gemm_kernels_{mode}"] = sum(ms for name, ms in times.items() if is_gemm_kernel(name))
    return {**{key: round(value, 4) for key, value in row.items()}, "kernels": kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b", "qwen3-235b-a22b"], choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "layer_timing_modes: error: needs a CUDA GPU (the kernels' correctness runs on CPU in "
                       "tests/test_kernels.py)\n")
    rows = {}
    for shape in args.shapes:
        layer = Layer(SHAPES[shape], args.tokens)
        x, weights, ids = layer.inputs(args.tokens)
        for side, config in (("ours", None), ("cutlass", MoEConfig(backend=GROUPED_MM))):
            row = measure(partial(fused_experts, x, layer.w13, layer.w2, weights, ids, config=config))
            rows[f"{shape} {args.tokens} {side}"] = row
            print(f"{shape:16s} {side:8s} " + " ".join(f"{key} {value:.3f}" for key, value in row.items()
                                                       if key != "kernels"), flush=True)
        del layer
    result = {"rows": rows, "meta": {"command": " ".join(["python benchmarks/layer_timing_modes.py", *sys.argv[1:]]),
                                     "device": torch.cuda.get_device_name(), "torch": torch.__version__}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
