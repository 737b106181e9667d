"""Where a server's GPU time goes, from the torch-profiler (Chrome JSON) traces vLLM writes.

``vllm serve --profiler-config '{"profiler": "torch", "torch_profiler_dir": DIR, ...}'`` plus
``POST /start_profile`` … ``POST /stop_profile`` leaves one trace per worker in ``DIR``
(``*.pt.trace.json.gz``). For each, this module sums GPU time per category of kernel name:

- ``moe_experts``: the experts' kernels, routing and permutation (vLLM's ``fused_moe``, ours,
  DeepGEMM's grouped GEMMs);
- ``quant``: activation quantisation before FP8 dense layers (vLLM's per-token-group quantiser);
- ``attention``: attention and KV-cache writes;
- ``communication``: NCCL and the all-reduce / all-to-all kernels;
- ``gemm``: the other matrix multiplies (QKV, output projection, gate, LM head), DeepGEMM's
  dense ones included (one group: ``deep_gemm::...<major, M, N, K, 1u, ...>``);
- ``peer_copy`` / ``memcpy``: copy-engine transfers (AsyncEP's copy-engine gathers are the
  peer-to-peer ones; the torch profiler may not record peer-to-peer copies at all, so check a
  trace for them before reading AsyncEP's exposed communication, and read ``idle_s`` with it);
- ``other``: norms, activations, elementwise work, pooling.

and measures, on the GPU's timeline, the *exposed* communication: time during which a
``communication`` kernel or a peer copy runs and no other kernel does.

Where the GPU idles (``host``): each gap between busy spans ends with a kernel the host
launched at some time. If that launch came after the gap began, the GPU waited for the host
(``host_bound_s``), and the host's recorded work on the launching thread in that span says
what it was doing: the innermost op at each instant (aten ops, vLLM's annotations, CUDA API
calls; ``(no op)`` where the thread ran Python the profiler does not record), as a path of
up to three nested names (``host_bound_by_op``). A launch issued before the gap began means
the kernel waited on the device (a stream or event dependency: ``device_wait_s``). The CUDA
calls that block the host (``sync_calls``: stream, event and device synchronisations,
synchronous copies) are counted over the whole trace.

    python benchmarks/trace_breakdown.py DIR        # prints the table for every trace in DIR
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

#: The experts' kernels version 3 of the rules moved from ``other`` to ``moe_experts``: our Triton
#: combine (``_sum_slots_kernel``), token->expert alignment and experts' activation quantiser, and
#: the row permutation of vLLM's DeepGEMM MoE (``_fwd_kernel_ep_scatter_2``, ``_fwd_kernel_ep_gather``).
_MOE_GLUE_ADDED_IN_3 = r"sum_slots|count_rows|scan_counts|place_rows|quantize_token_groups|ep_scatter|ep_gather"
MOE_ADDED_IN_3 = re.compile(_MOE_GLUE_ADDED_IN_3, re.IGNORECASE)

# First match wins, so the specific patterns come before the generic GEMM one.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        # DeepGEMM's dense GEMMs: the template's group count (after M, N, K) is 1.
        ("gemm", r"deep_gemm::\w+<[^,<>]+,\s*\d+u,\s*\d+u,\s*\d+u,\s*1u,"),
        ("moe_experts", r"fused_moe|moe_align|moe_sum|topk|gate_up_silu|down_scatter|grouped_mm|scatter_token_rows"
                        r"|weighted_combine|silu_mul|deep_gemm|m_grouped|count_and_sort|expert|" + _MOE_GLUE_ADDED_IN_3),
        ("quant", r"per_token_group_quant|scaled_fp8_quant|quant_8bit"),
        # Before attention: FlashInfer's all-reduce kernels carry "flashinfer" in their names.
        ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|cross_device|lamport"),
        ("attention", r"flash|fmha|attention|attn|reshape_and_cache|paged|mla"),
        ("communication", r"all_?to_?all|all2all|one_?shot|two_?shot|dispatch|combine"),
        ("gemm", r"gemm|nvjet|cutlass|xmma|matmul|cublas|sm90_|wgmma"),
    )
)
COMMUNICATION = ("communication", "peer_copy")
#: Recorded with every breakdown. Version 1 (until 2026-12-06) put DeepGEMM's dense GEMMs under
#: ``moe_experts`` and activation quantisation under ``other``; version 2 (until 2026-12-07) put
#: the experts' kernels :data:`MOE_ADDED_IN_3` names under ``other``. :func:`upgrade` moves them.
CATEGORY_RULES = 3
#: Kernels listed by GPU time in each breakdown: enough that every kernel a layer runs more
#: than a few microseconds of is there (a Qwen3-MoE layer served in FP8 runs about 25).
TOP_KERNELS = 40


def categorize(name: str, cat: str) -> str:
    """The category of one GPU event (``cat`` is the trace's own: kernel, gpu_memcpy, ...)."""
    if cat == "gpu_memcpy":
        return "peer_copy" if "ptop" in name.lower().replace(" ", "") else "memcpy"
    if cat == "gpu_memset":
        return "other"
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def breakdown(events: list[dict]) -> dict:
    """Per-category GPU time, the busy and exposed-communication time, and the top kernels.

    ``events``: Chrome-trace events; those with ``cat`` kernel / gpu_memcpy / gpu_memset and
    a ``dur`` (microseconds) are the GPU's.
    """
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not gpu:
        return {"gpu_events": 0}
    seconds: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    compute: list[tuple[float, float]] = []
    communication: list[tuple[float, float]] = []
    for event in gpu:
        start, duration = float(event["ts"]) / 1e6, float(event["dur"]) / 1e6
        category = categorize(event.get("name", ""), event["cat"])
        seconds[category] += duration
        entry = per_kernel[event.get("name", "?")]
        entry[0] += duration
        entry[1] += 1
        (communication if category in COMMUNICATION else compute).append((start, start + duration))
    window = max(s + d for s, d in ((float(e["ts"]) / 1e6, float(e["dur"]) / 1e6) for e in gpu)) - min(
        float(e["ts"]) / 1e6 for e in gpu)
    compute_busy = _union_s(compute)
    busy = _union_s(compute + communication)
    top = sorted(per_kernel.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    return {
        "gpu_events": len(gpu),
        "window_s": window,
        "busy_s": busy,
        "compute_busy_s": compute_busy,
        "exposed_communication_s": busy - compute_busy,
        "exposed_communication_fraction": (busy - compute_busy) / window if window else 0.0,
        # No kernel at all: host gaps, and compute waiting on a gather the trace may not show
        # (CUPTI records peer-to-peer copies apart from the memcpy records the profiler asks for).
        "idle_s": window - busy,
        "category_rules": CATEGORY_RULES,
        "seconds_by_category": dict(sorted(seconds.items(), key=lambda item: -item[1])),
        "top_kernels": [{"name": name[:160], "seconds": s, "count": count} for name, (s, count) in top],
        "host": host_breakdown(events, gpu),
    }


HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
SYNC_CALL = re.compile(r"Synchronize$|^cudaMemcpy$|^cuMemcpy[DH]to[DH]$")
#: Host ops listed by the GPU-idle time they account for in each breakdown.
TOP_HOST_OPS = 15
_LONG_HOST_EVENT_S = 1e-3  # host events at least this long are checked against every span


class _HostThread:
    """One host thread's recorded events, for "which events overlap this span" queries."""

    def __init__(self, spans: list[tuple[float, float, str]]) -> None:
        self.short = sorted(span for span in spans if span[1] - span[0] < _LONG_HOST_EVENT_S)
        self.long = [span for span in spans if span[1] - span[0] >= _LONG_HOST_EVENT_S]
        self.short_starts = [span[0] for span in self.short]

    def overlapping(self, start: float, end: float) -> list[tuple[float, float, str]]:
        found = [span for span in self.long if span[0] < end and span[1] > start]
        index = bisect.bisect_left(self.short_starts, end)
        while index > 0 and self.short_starts[index - 1] > start - _LONG_HOST_EVENT_S:
            index -= 1
            span = self.short[index]
            if span[1] > start:
                found.append(span)
        return found


def _innermost_ops(spans: list[tuple[float, float, str]], start: float, end: float) -> dict[str, float]:
    """Seconds of ``[start, end]`` under each innermost op (as ``outer > ... > inner``, up to three
    names), ``(no op)`` where none is recorded; ``spans`` nest (a thread's trace events do)."""
    seconds: dict[str, float] = defaultdict(float)
    stack: list[list] = []  # [end, path, clipped seconds, children's clipped seconds]

    def close(frame: list) -> None:
        if frame[2] > frame[3]:
            seconds[frame[1]] += frame[2] - frame[3]

    covered = 0.0
    for span_start, span_end, name in sorted(spans, key=lambda span: (span[0], -span[1])):
        while stack and stack[-1][0] <= span_start:
            close(stack.pop())
        clipped = min(span_end, end) - max(span_start, start)
        if clipped <= 0:
            continue
        if stack:
            stack[-1][3] += clipped
            path = " > ".join((stack[-1][1].split(" > ") + [name])[-3:])
        else:
            covered += clipped
            path = name
        stack.append([span_end, path, clipped, 0.0])
    while stack:
        close(stack.pop())
    if end - start - covered > 0:
        seconds["(no op)"] += end - start - covered
    return seconds


def host_breakdown(events: list[dict], gpu: list[dict]) -> dict:
    """Where the GPU waited for the host: see the module's docstring (``host``)."""
    launch_of: dict[int, dict] = {}
    threads: dict[tuple, list[tuple[float, float, str]]] = defaultdict(list)
    sync_calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.get("cat") not in HOST_CATEGORIES or "dur" not in event:
            continue
        start, duration = float(event["ts"]) / 1e6, float(event["dur"]) / 1e6
        name = event.get("name", "?")
        threads[(event.get("pid"), event.get("tid"))].append((start, start + duration, name))
        if event["cat"] in LAUNCH_CATEGORIES:
            correlation = (event.get("args") or {}).get("correlation")
            if correlation is not None:
                launch_of[correlation] = event
            if SYNC_CALL.search(name):
                sync_calls[name][0] += 1
                sync_calls[name][1] += duration
    indexed = {key: _HostThread(spans) for key, spans in threads.items()}
    by_op: dict[str, float] = defaultdict(float)
    gaps, host_bound, device_wait, unlinked = 0, 0.0, 0.0, 0.0
    busy_until = None
    for event in sorted(gpu, key=lambda e: float(e["ts"])):
        start = float(event["ts"]) / 1e6
        if busy_until is not None and start > busy_until:
            gaps += 1
            launch = launch_of.get((event.get("args") or {}).get("correlation"))
            if launch is None:
                unlinked += start - busy_until
            else:
                launched = float(launch["ts"]) / 1e6
                waited_for_host = min(launched, start) - busy_until
                if waited_for_host > 0:
                    host_bound += waited_for_host
                    thread = indexed[(launch.get("pid"), launch.get("tid"))]
                    for path, seconds in _innermost_ops(thread.overlapping(busy_until, launched), busy_until,
                                                        busy_until + waited_for_host).items():
                        by_op[path] += seconds
                device_wait += start - busy_until - max(waited_for_host, 0.0)
        end = start + float(event["dur"]) / 1e6
        busy_until = end if busy_until is None else max(busy_until, end)
    top = sorted(by_op.items(), key=lambda item: -item[1])[:TOP_HOST_OPS]
    return {
        "idle_gaps": gaps,
        "host_bound_s": host_bound,
        "device_wait_s": device_wait,
        "unlinked_s": unlinked,  # gaps whose next kernel's launch is not in the trace
        "host_bound_by_op": [{"op": path[:160], "seconds": seconds} for path, seconds in top],
        "sync_calls": {name: {"count": count, "seconds": seconds}
                       for name, (count, seconds) in sorted(sync_calls.items(), key=lambda item: -item[1][1])},
    }


def upgrade(result: dict) -> dict:
    """A breakdown recorded under earlier rules, its listed kernels moved to today's categories
    (``seconds_by_category`` exact where every moved kernel is among ``top_kernels``)."""
    rules = result.get("category_rules", 1)
    if rules >= CATEGORY_RULES:
        return result
    seconds = dict(result["seconds_by_category"])
    for kernel in result["top_kernels"]:
        was, now = categorize_under(rules, kernel["name"]), categorize(kernel["name"], "kernel")
        if was != now:
            seconds[was] -= kernel["seconds"]
            seconds[now] = seconds.get(now, 0.0) + kernel["seconds"]
    return result | {"category_rules": CATEGORY_RULES, "seconds_by_category": seconds}


def categorize_under(rules: int, name: str) -> str:
    """A kernel's category under an earlier version of the rules: today's, but before version 3
    the kernels of :data:`MOE_ADDED_IN_3` under ``other``, and before version 2 DeepGEMM under
    ``moe_experts`` and no ``quant``."""
    category = categorize(name, "kernel")
    if rules < 3 and MOE_ADDED_IN_3.search(name):
        category = "other"
    if rules < 2:
        if category == "quant":
            category = "other"
        if "deep_gemm" in name:
            category = "moe_experts"
    return category


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    return data["traceEvents"] if isinstance(data, dict) else data


def breakdown_dir(directory: Path) -> list[dict]:
    """:func:`breakdown` of every trace under ``directory`` that holds GPU events."""
    results = []
    for path in sorted(directory.rglob("*.json*")):
        if not path.name.endswith((".json", ".json.gz")):
            continue
        result = breakdown(load_events(path))
        if result["gpu_events"]:
            results.append({"trace": path.name} | result)
    return results


def print_breakdown(results: list[dict]) -> None:
    for result in results:
        print(f"{result['trace']}: window {result['window_s'] * 1e3:.1f} ms, GPU busy {result['busy_s'] * 1e3:.1f} ms, "
              f"exposed communication {result['exposed_communication_s'] * 1e3:.1f} ms "
              f"({result['exposed_communication_fraction']:.1%})")
        for category, seconds in result["seconds_by_category"].items():
            print(f"  {category:<15}{seconds * 1e3:>10.1f} ms  {seconds / result['window_s']:>6.1%} of the window")
        host = result.get("host")
        if host:
            print(f"  GPU idle in {host['idle_gaps']} gaps: waiting for the host {host['host_bound_s'] * 1e3:.2f} ms, "
                  f"on the device {host['device_wait_s'] * 1e3:.2f} ms, launch not traced {host['unlinked_s'] * 1e3:.2f} ms")
            for entry in host["host_bound_by_op"][:8]:
                print(f"    {entry['seconds'] * 1e3:8.2f} ms  {entry['op']}")
            for name, call in host["sync_calls"].items():
                print(f"    {name}: {call['count']} calls, {call['seconds'] * 1e3:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a folder of torch-profiler traces")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"trace_breakdown: error: {args.directory} is not a folder", file=sys.stderr)
        return 2
    results = breakdown_dir(args.directory)
    if not results:
        print(f"trace_breakdown: error: no trace with GPU events under {args.directory}", file=sys.stderr)
        return 2
    print_breakdown(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
