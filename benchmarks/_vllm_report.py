"""``vllm_serve.py``'s report: the summary of its runs, the table, the plot, imported runs.

- :func:`best_by_layout`: each layout's best closed-loop point over its token-budget sweep;
  :func:`summarize`: AsyncEP's best against stock's best per model and context (with the SM
  clock each side's window ran at and how busy its GPU was), and the summary keys of the one- and two-GPU runs
  (docs/gpu.md lists them);
- :func:`print_table` and :func:`plot` (``--replot`` redraws both from the JSON alone);
- :data:`METHOD`, what each number counts (written to the JSON);
- :func:`import_runs` (``--import-runs``): runs of other files measured on this GPU and vLLM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from _serving import CPU_LISTED_CORES, lowest_over_gpus
from _vllm_layouts import LAYOUTS, UNREACHABLE_FLOPS_BUDGET, is_asyncep_layout

def best_by_layout(runs: list[dict], model: str, context: int) -> dict[str, dict]:
    """Each layout's best closed-loop point over its token-budget sweep."""
    best: dict[str, dict] = {}
    for run in runs:
        if run["model"] != model or not run.get("started"):
            continue
        for entry in run.get("measurements", []):
            if entry["context"] != context or entry["closed_loop"]["failed"] or not entry["closed_loop"]["requests"]:
                continue  # a point with failures, or nothing answered in its window, is no peak
            point = entry["closed_loop"] | {"max_num_batched_tokens": run["max_num_batched_tokens"]}
            if run["layout"] not in best or point["input_tokens_per_s_per_gpu"] > best[run["layout"]]["input_tokens_per_s_per_gpu"]:
                best[run["layout"]] = point
    return best


def open_loop_p99(runs: list[dict], model: str, context: int) -> dict[str, dict[str, dict]]:
    """p99 latency per offered rate (requests/s), per layout: equal load, side by side
    (``p99_at_least``: a lower bound, where requests cut off unanswered decide it)."""
    table: dict[str, dict[str, dict]] = {}
    for run in runs:
        if run["model"] != model:
            continue
        for entry in run.get("measurements", []):
            if entry["context"] != context:
                continue
            for point in entry["open_loop"]:
                label = f"{run['layout']}@{run['max_num_batched_tokens']}"
                table.setdefault(str(point["offered_requests_per_s"]), {})[label] = {
                    "p99_s": point["p99_s"], "p99_at_least": point.get("p99_at_least", False)}
    return table


def light_load_p99_ratio(p99_by_rate: dict[str, dict[str, dict]]) -> dict | None:
    """AsyncEP's best p99 over stock DP+EP's best at the lowest offered rate both ran (from
    :func:`open_loop_p99`); None if none. ``at_least``: either p99 is a lower bound."""
    def side(points: dict[str, dict], asyncep: bool) -> dict | None:
        mine = [p for label, p in points.items()
                if is_asyncep_layout(label.split("@")[0]) == asyncep and (asyncep or "-ep" in label)]
        return min(mine, key=lambda p: p["p99_s"]) if mine else None

    for rate in sorted(p99_by_rate, key=float):
        ours, stock = side(p99_by_rate[rate], True), side(p99_by_rate[rate], False)
        if ours and stock and stock["p99_s"]:
            return {"offered_requests_per_s": float(rate), "ratio": round(ours["p99_s"] / stock["p99_s"], 3),
                    "at_least": ours["p99_at_least"] or stock["p99_at_least"]}
    return None


#: One GPU, stock vLLM: every layout of one GPU without AsyncEP (its default MoE backend, or one forced).
ONE_GPU_STOCK = tuple(name for name, layout in LAYOUTS.items() if not layout.is_asyncep and layout.gpus == 1)


def _throughput_2k(runs: list[dict], model: str, layout: str) -> float | None:
    """Closed-loop input tokens/s per GPU at 2,048 tokens per request (the one-GPU runs' context)."""
    return best_by_layout(runs, model, 2048).get(layout, {}).get("input_tokens_per_s_per_gpu")


def best_stock_layout(runs: list[dict], model: str) -> str | None:
    """The one-GPU stock layout with the highest closed-loop throughput at 2,048 tokens per
    request for ``model`` (a key, "name:layers"); None if none ran."""
    found = {layout: value for layout in ONE_GPU_STOCK if (value := _throughput_2k(runs, model, layout))}
    return max(found, key=found.__getitem__) if found else None


def _same_layers_ratio(runs: list[dict], ours: tuple[str, str], theirs: tuple[str, str | None],
                       value: Callable[[str, str], float | None]) -> tuple[float | None, str | None]:
    """``value(model_key, layout)`` of ``ours`` over ``theirs`` ((config name, layout) each), at
    the largest layer count both were measured with, and the layout of ``theirs`` compared.

    ``theirs``' layout None: the fastest one-GPU stock layout at that layer count
    (:func:`best_stock_layout`), so that every ratio against stock is against its best.
    """
    layer_counts = sorted({int(r["model"].rsplit(":", 1)[1]) for r in runs}, reverse=True)
    for layers in layer_counts:
        layout = theirs[1] or best_stock_layout(runs, f"{theirs[0]}:{layers}")
        if layout is None:
            continue
        a, b = value(f"{ours[0]}:{layers}", ours[1]), value(f"{theirs[0]}:{layers}", layout)
        if a and b:
            return round(a / b, 3), layout
    return None, None


def _kv_tokens(runs: list[dict], model: str, layout: str) -> int | None:
    """KV-cache tokens per engine (the smallest engine's) of the layout's first started run."""
    counts = [min(r["kv_cache_tokens"]) for r in runs
              if r["model"] == model and r["layout"] == layout and r.get("started") and r.get("kv_cache_tokens")]
    return counts[0] if counts else None


def summarize(runs: list[dict], vllm_version: str) -> dict:
    summary: dict = {"vllm_version": vllm_version, "comparisons": {}}
    for model in sorted({r["model"] for r in runs}):
        contexts = sorted({e["context"] for r in runs if r["model"] == model for e in r.get("measurements", [])})
        for context in contexts:
            best = best_by_layout(runs, model, context)
            stock = {k: v for k, v in best.items() if not is_asyncep_layout(k)}
            ours = {k: v for k, v in best.items() if is_asyncep_layout(k)}
            if not stock or not ours:
                continue
            best_stock = max(stock, key=lambda k: stock[k]["input_tokens_per_s_per_gpu"])
            best_ours = max(ours, key=lambda k: ours[k]["input_tokens_per_s_per_gpu"])
            ratio = ours[best_ours]["input_tokens_per_s_per_gpu"] / stock[best_stock]["input_tokens_per_s_per_gpu"]
            key = f"{model.split(':')[0]}_{context}"
            summary["comparisons"][key] = {
                "best_stock_layout": best_stock, "best_asyncep_layout": best_ours,
                "asyncep_vs_best_stock": round(ratio, 3),
                # each side's window: the median SM clock of its slowest GPU, and the mean share of
                # time its least busy GPU ran a kernel (nvidia-smi; None if not recorded)
                "best_stock_sm_clock_mhz": lowest_over_gpus(stock[best_stock].get("gpu_telemetry"),
                                                            "sm_clock_mhz_median"),
                "best_asyncep_sm_clock_mhz": lowest_over_gpus(ours[best_ours].get("gpu_telemetry"),
                                                              "sm_clock_mhz_median"),
                "best_stock_gpu_busy_pct": lowest_over_gpus(stock[best_stock].get("gpu_telemetry"),
                                                            "utilization_pct_mean"),
                "best_asyncep_gpu_busy_pct": lowest_over_gpus(ours[best_ours].get("gpu_telemetry"),
                                                              "utilization_pct_mean"),
                "best_stock": stock[best_stock], "best_asyncep": ours[best_ours],
                "p99_s_at_offered_requests_per_s": open_loop_p99(runs, model, context),
            }
    # Two GPUs: AsyncEP's best layout against stock's best.
    for short, model_prefix, context in (("235b_512", "qwen3-235b-a22b", 512), ("235b_4k", "qwen3-235b-a22b", 4096),
                                          ("30b_4k", "qwen3-30b-a3b", 4096)):
        found = summary["comparisons"].get(f"{model_prefix}_{context}")
        summary[f"asyncep_vs_best_stock_{short}"] = found["asyncep_vs_best_stock"] if found else None
        summary[f"best_stock_layout_{short}"] = found["best_stock_layout"] if found else None
    # Two GPUs, light load: p99 at the lowest offered rate both sides ran (0.3x stock's peak in the runbook).
    found = summary["comparisons"].get("qwen3-235b-a22b_512")
    summary["p99_light_asyncep_vs_stock"] = light_load_p99_ratio(found["p99_s_at_offered_requests_per_s"]) if found else None
    # One GPU: closed-loop input tokens/s per GPU at 2,048 tokens per request, and KV capacity,
    # against the fastest stock layout that ran (stock's default MoE backend, or one forced),
    # recorded as best_stock_layout_*; the KV ratio compares with that same stock server.
    def throughput(model: str, layout: str) -> float | None:
        return _throughput_2k(runs, model, layout)

    def kv_tokens(model: str, layout: str) -> int | None:
        return _kv_tokens(runs, model, layout)

    bf16, fp8 = "qwen3-30b-a3b", "qwen3-30b-a3b-fp8"
    for key, ours, theirs, value, stock_key in (
        ("asyncep_vs_stock_30b_2k", (bf16, "asyncep"), (bf16, None), throughput, "best_stock_layout_30b_2k"),
        ("kv_tokens_asyncep_vs_stock", (bf16, "asyncep"), (bf16, None), kv_tokens, None),
        ("asyncep_fp8_vs_stock_fp8", (fp8, "asyncep"), (fp8, None), throughput, "best_stock_layout_fp8"),
        ("asyncep_fp8_vs_asyncep_bf16", (fp8, "asyncep"), (bf16, "asyncep"), throughput, None),
        ("asyncep_fp8_vs_asyncep_fp8_psum", (fp8, "asyncep"), (fp8, "asyncep-fp8-psum"), throughput, None),
        ("kv_tokens_asyncep_fp8_vs_stock_fp8", (fp8, "asyncep"), (fp8, None), kv_tokens, None),
    ):
        summary[key], layout = _same_layers_ratio(runs, ours, theirs, value)
        if stock_key:
            summary[stock_key] = layout
    entries = [entry for run in runs for entry in run.get("measurements", [])]
    points = [point for entry in entries for point in (entry["closed_loop"], *entry["open_loop"])]
    summary["late_requests"] = sum(point.get("late", 0) for point in points)
    summary["unanswered_requests"] = sum(point.get("unanswered", 0) for point in points)
    summary["jit_events_during_measurement"] = sum(len(e.get("jit_events", {}).get("measured", [])) for e in entries)
    return summary


def print_table(runs: list[dict]) -> None:
    print(f"{'model':<22}{'layout':<34}{'tokens':>8}{'ctx':>7}{'tok/s/GPU':>12}{'req/s':>9}{'p50 s':>9}{'p99 s':>9}"
          f"{'late':>6}{'MFU':>7}  KV tokens")
    for run in runs:
        if not run.get("started"):
            print(f"{run['model']:<22}{run['layout']:<34}{run['max_num_batched_tokens']:>8}  did not start")
            continue
        for entry in run.get("measurements", []):
            c = entry["closed_loop"]
            p50, p99 = (("" if not c.get(f"{k}_at_least") else ">=") + (f"{c[f'{k}_s']:.2f}" if c[f"{k}_s"] is not None else "-")
                        for k in ("p50", "p99"))
            mfu = f"{c['mfu']:.1%}" if c.get("mfu") is not None else "-"
            late = c.get("late", 0) + c.get("unanswered", 0)
            kv = ",".join(f"{n:,}" for n in run.get("kv_cache_tokens", [])) or "-"
            print(f"{run['model']:<22}{run['layout']:<34}{run['max_num_batched_tokens']:>8}{entry['context']:>7}"
                  f"{c['input_tokens_per_s_per_gpu']:>12,.0f}{c['requests_per_s']:>9.1f}{p50:>9}{p99:>9}{late:>6}{mfu:>7}  {kv}")


def plot(runs: list[dict], path: Path) -> None:
    """Per model: peak throughput per context (bars), then per context throughput and p99
    against offered load (open-loop points, and the closed loop at the rate it reached)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs})
    contexts_of = {m: sorted({e["context"] for r in runs if r["model"] == m for e in r.get("measurements", [])})
                   for m in models}
    columns = 1 + max((len(c) for c in contexts_of.values()), default=0)
    fig, axes = plt.subplots(len(models), columns, figsize=(5.2 * columns, 4.2 * len(models)), squeeze=False)
    layouts = sorted({r["layout"] for r in runs if r.get("started")})
    colors = {layout: f"C{i}" for i, layout in enumerate(layouts)}
    for row, model in zip(axes, models):
        contexts = contexts_of[model]
        ax = row[0]
        width = 0.8 / max(1, len(layouts))
        for i, layout in enumerate(layouts):
            values = [best_by_layout(runs, model, c).get(layout, {}).get("input_tokens_per_s_per_gpu", 0) / 1e3
                      for c in contexts]
            ax.bar([x + i * width for x in range(len(contexts))], values, width, label=layout, color=colors[layout])
        ax.set_xticks([x + width * (len(layouts) - 1) / 2 for x in range(len(contexts))], [str(c) for c in contexts])
        ax.set_xlabel("tokens per request")
        ax.set_ylabel("peak input K tokens/s per GPU")
        ax.set_title(f"{model} layers: peak (best --max-num-batched-tokens)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        for ax, context in zip(row[1:], contexts):
            latency = ax.twinx()
            for run in runs:
                if run["model"] != model or not run.get("started"):
                    continue
                for entry in run.get("measurements", []):
                    if entry["context"] != context:
                        continue
                    closed = entry["closed_loop"]
                    points = sorted([(p["offered_requests_per_s"], p) for p in entry["open_loop"]]
                                    + [(closed["requests_per_s"], closed)], key=lambda item: item[0])
                    offered = [x for x, _ in points]
                    color = colors[run["layout"]]
                    ax.plot(offered, [p["input_tokens_per_s_per_gpu"] / 1e3 for _, p in points], "o-", color=color,
                            label=f"{run['layout']}@{run['max_num_batched_tokens']}")
                    p99 = [math.nan if p["p99_s"] is None else p["p99_s"] for _, p in points]
                    latency.plot(offered, p99, "s--", color=color, alpha=0.6)
            ax.set_xlabel("offered requests/s (last point: closed loop)")
            ax.set_ylabel("achieved K tokens/s per GPU (solid)")
            latency.set_ylabel("p99 latency, s (dashed; a lower bound where marked in the JSON)")
            ax.set_title(f"{context} tokens per request", fontsize=9)
            ax.grid(alpha=0.3)
        for ax in row[1 + len(contexts):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: How this script's timed windows open (``window`` in every run): on a server already under the
#: window's load, for ``--warmup-s``; with ``--warmup-s 0``, and in runs without the key, on an
#: idle server, which cost a closed loop up to a fifth of its throughput on one H100
#: (docs/gpu.md). The two are never merged or compared.
WINDOW = "after a lead-in of the same load"
IDLE_START = "on an idle server"


def window_of(run: dict) -> str:
    """How a run's timed windows opened (:data:`WINDOW`, or :data:`IDLE_START` for runs before it)."""
    return run.get("window", IDLE_START)


def windows_opened(lead_s: float) -> str:
    """How windows with a lead-in of ``lead_s`` open: none is an idle start."""
    return WINDOW if lead_s > 0 else IDLE_START


def other_window(runs: list[dict], window: str) -> str | None:
    """How some of ``runs`` opened their windows, where that is not ``window`` (None: all as it)."""
    return min({window_of(run) for run in runs} - {window}, default=None)


def frontend(api_servers: int | None, discriminated_requests: bool) -> str:
    """A server's HTTP frontend in words: its API server processes (``--api-servers``; None:
    vLLM's default) and how it validates ``/v1/embeddings`` bodies."""
    processes = ("vLLM's default API servers (one per data-parallel rank)" if api_servers is None else
                 f"{api_servers} API server{'s' if api_servers > 1 else ''}")
    validation = "the plugin's discriminated" if discriminated_requests else "vLLM's undiscriminated"
    return f"{processes}, {validation} EmbeddingRequest validation"


def frontend_of(run: dict) -> str:
    """How a run's servers took requests (runs from before these keys: vLLM's default API servers
    and its own validation, which the plugin did not yet replace)."""
    return frontend(run.get("api_servers"), run.get("discriminated_requests", False))


def other_frontend(runs: list[dict], served_with: str) -> str | None:
    """The frontends of ``runs`` other than ``served_with``, in words (None: all as it). A
    frontend can bound a throughput, so runs served with different ones are not compared."""
    return " and ".join(sorted({frontend_of(run) for run in runs} - {served_with})) or None


def incomparable(runs: list[dict], window: str, served_with: str) -> str | None:
    """Why ``runs`` are not compared with this invocation's, whose windows open as ``window``
    and whose servers' frontends are ``served_with`` (None: they are); for ``--merge`` and
    ``--import-runs`` alike."""
    other = other_window(runs, window)
    if other:
        return f"its windows opened {other}, this run's open {window}"
    other = other_frontend(runs, served_with)
    if other:
        return f"served with {other}, this run with {served_with}"
    return None


METHOD = {
    "timing": "after start-up (compile, CUDA-graph capture) and the warm-up, each window opens on its own load, "
              "started --warmup-s before it (lead); throughput counts the answers inside the window of "
              "--duration-s, those to lead-in requests included (answers_by_second: per second of the window)",
    "late": "late: sent in the window, answered after it (latency counted); unanswered: still open --drain-s after "
            "the window, cut off (the client disconnects); a percentile they can move is their lower bound "
            "(p50_at_least / p99_at_least true); percentiles cover the requests sent in the window",
    "warmup": "per context: one request of every power-of-two length up to the context (one per DP rank), the "
              "context at doubling concurrency up to the timed runs' largest, then the closed loop's lead-in; "
              "jit_events: vLLM's kernel-JIT warnings logged outside (warmup) and inside (measured) the timed "
              "windows",
    "per_gpu": "divided by the layout's GPUs (data-parallel x tensor-parallel size)",
    "mfu": "true FLOPs of the served layers (linear + causal attention) over the GPU's dense datasheet peak for the "
           "checkpoint's format (peak_tflops, peak_source per run)",
    "memory": "kv_cache_tokens per engine and kv_cache_gib / weights_gib per worker from the server log; "
              "gpu_memory_peak_mib from nvidia-smi, start-up to end",
    "gpu_telemetry": "per timed window (closed loop, each open-loop point; not the warm-up, lead-in or drain), per GPU "
                     "index: nvidia-smi every 0.5 s: SM clock median / min against max_sm_clock_mhz, power mean / "
                     "max against power_limit_w, temperature max, utilization mean, clock_event_reasons (fraction of "
                     "samples each was active); {unavailable: reason} without nvidia-smi",
    "engine_metrics": "per timed window, from vLLM's /metrics read at its start and end (the queue every "
                      "metrics_interval_s, a run's --metrics-interval-s, 0.5 s by default; 0: not between): "
                      "engine steps reported, tokens per step, tokens_per_s (all engines), step_ms (window x engines / steps: in a closed loop "
                      "that keeps the engines busy, the served time per step, to set against a profile's GPU time "
                      "per step), requests waiting after a step, summed over the engines (mean, fewest); timeline: "
                      "every reading from the load's start, [s from the window's opening, steps, tokens, waiting]; "
                      "{unavailable: reason} where the server has no such metrics",
    "cpu": "per timed window, per process of the server (its descendants) and the load generator: CPU seconds per "
           "second of window (busy_cores) and its busiest thread's (busiest_thread_cores: near 1.0, that thread "
           "bounds the process), from /proc at the window's opening and closing; processes under "
           f"{CPU_LISTED_CORES} cores counted (quiet_processes)",
    "frontend": "per run: api_servers, --api-servers, vLLM API server processes (--api-server-count) of every "
                "layout (null: vLLM's default, one per data-parallel rank); discriminated_requests, whether the API "
                "server validated /v1/embeddings bodies with the plugin's discriminated EmbeddingRequest (every "
                "layout, stock included, where the plugin is installed; runs without the key used vLLM's union). "
                "Runs served with different frontends are not merged or imported together. With more than one API "
                "server, vLLM's /metrics sums what each recorded: engine_metrics' tokens_per_s against the window's "
                "own rate says whether that counted each step once",
    "step_budget": "step_budget_policy per run: stock fills --max-num-batched-tokens; token_budget_steps layouts set "
                   f"AsyncEP's FLOPs budget to {UNREACHABLE_FLOPS_BUDGET:.0e} (never reached), so the token budget "
                   "is the only per-step limit on both sides",
}


def tiny_record(data: dict, source: str) -> dict:
    """A results file's tiny correctness record (``tiny``, which the GPU tests write, and their
    summary keys) without its runs or anything made from them, to start a new file from;
    ``tiny_from`` says which file it came from first."""
    if "tiny" not in data:
        raise ValueError(f"{source} holds no tiny record (the GPU tests' 'tiny' key)")
    made_from_runs = set(summarize([], ""))
    return {"tiny": data["tiny"], "tiny_from": data.get("tiny_from", source),
            "summary": {k: v for k, v in data.get("summary", {}).items() if k not in made_from_runs}}


def import_runs(paths: list[Path], runs: list[dict], gpu: str | None, vllm_version: str, window: str,
                served_with: str) -> list[dict]:
    """Add the runs of other results files measured on this GPU with this vLLM, their windows
    opened as ``window`` says, their servers' frontends as ``served_with`` (:func:`frontend`)
    says (marked ``imported_from``); what was imported or skipped, and why."""
    record = []
    for path in paths:
        if not path.exists():
            record.append({"file": str(path), "skipped": "no such file"})
            continue
        data = json.loads(path.read_text())
        theirs = (data.get("gpu"), data.get("summary", {}).get("vllm_version"))
        if theirs != (gpu, vllm_version):
            record.append({"file": str(path), "skipped": f"measured on {theirs[0]} with vLLM {theirs[1]}, "
                                                         f"this run is {gpu} with vLLM {vllm_version}"})
            continue
        why_not = incomparable(data.get("runs", []), window, served_with)
        if why_not:
            record.append({"file": str(path), "skipped": why_not})
            continue
        have = {(r["model"], r["layout"], r["max_num_batched_tokens"]) for r in runs}
        new = [r | {"imported_from": str(path)} for r in data.get("runs", [])
               if (r["model"], r["layout"], r["max_num_batched_tokens"]) not in have]
        runs.extend(new)
        record.append({"file": str(path), "runs": [f"{r['model']} {r['layout']}" for r in new]})
    return record
