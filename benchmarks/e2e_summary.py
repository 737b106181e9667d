"""The report of ``e2e_prefill.py``: every point beside the planner, the issue targets, table and plot.

:func:`summarize` turns the raw records of a sweep (one per model, format, layout, routing,
context and tokens per GPU) into rows with throughput, MFU, exposed communication and the
speedup over the best baseline, each beside the planner's predicted threshold and step
(:mod:`zeroprefill.common.saturation`, :mod:`zeroprefill.common.layouts`), and into the
summary keys of issues 9 and 18 (:func:`headline`; null with a reason where a sweep did not
run the points a key needs). :func:`print_table` and :func:`plot` show the result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from _model import load_model

PEAK_TFLOPS = 989.0
BASELINES = ("a2a_ep", "a2a_tbo", "tp")
SKEW_TARGET = 1.5
#: The model the summary's headline keys are about (bf16).
HEADLINE_MODEL = "qwen3-235b-a22b"
SHORT_CONTEXT = 512
LONG_CONTEXT = 32768
#: Tokens per GPU from which issue 18's targets apply (exposed communication, fair speedup).
LARGE_BATCH_TOKENS = 16384
#: What result files written before back-to-back timing measured (no ``timing`` in meta).
LEGACY_TIMING = "per pass, barrier and synchronisation before each (prefetch across the gap untimed)"


def bytes_text(count: float) -> str:
    """``count`` bytes with a decimal unit and three significant digits (``"1.5 GB"``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"



def _gpu_kind(gpu_name: str) -> str | None:
    for kind in ("h200", "h100"):
        if kind in gpu_name.lower():
            return kind
    return None


def _shipped_profile(meta: dict):
    """The shipped hardware profile of the GPU kind and count the sweep ran on, or None."""
    from zeroprefill.common.hardware import HardwareProfileError, shipped_profile

    kind = _gpu_kind(meta["gpu"])
    try:
        return shipped_profile(kind, meta["world_size"]) if kind else None
    except HardwareProfileError:
        return None


def thresholds(raw: dict) -> dict[str, dict]:
    """Predicted saturation threshold (tokens/GPU) per model, dtype, context and transport."""
    from zeroprefill.common.saturation import Deployment, saturation_threshold_tokens

    meta = raw["meta"]
    out: dict[str, dict] = {}
    profile = _shipped_profile(meta)
    transports = sorted({r["transport"] for r in raw["records"] if r["family"] == "asyncep"} & {"nccl", "copy_engine"})
    for r in raw["records"]:
        key = f"{r['model']}/{r['dtype']}/{r['context']}"
        if key in out:
            continue
        if profile is None or not transports:
            out[key] = {"tokens_per_gpu": None, "reason": f"no shipped hardware profile for {meta['gpu']!r} "
                                                          f"x{meta['world_size']} or no NCCL/copy-engine AsyncEP run"}
            continue
        spec, _ = load_model(r["model"])
        per_transport = {tr: saturation_threshold_tokens(Deployment(spec, profile, meta["world_size"], r["dtype"], tr), r["context"])
                         for tr in transports}
        out[key] = {"tokens_per_gpu": max(per_transport.values()), "per_transport": per_transport,
                    "source": f"zeroprefill.common.saturation.saturation_threshold_tokens, shipped profile "
                              f"{profile.name}; the larger over transports"}
    return out


#: The planner layout each harness family is predicted as (``dp``: AsyncEP on one GPU, no gather).
PLANNER_LAYOUT = {"dp": "asyncep", "asyncep": "asyncep", "a2a_ep": "alltoall_ep", "a2a_tbo": "alltoall_ep_tbo",
                  "tp": "tp"}


def predictions(raw: dict) -> dict[str, float] | str:
    """The planner's ms per layer for every record (keyed by :func:`_record_key`), or why not.

    ``predict_step`` on the shipped profile of the GPU and GPU count the sweep ran on, for the
    same model, format, context and tokens per GPU, divided by the model's layer count (the
    harness's layers have the model's shapes). AsyncEP with the record's transport. EP layouts:
    under balanced routing a token's experts sit on one rank, so a token goes to
    ``(N - 1) / N`` other ranks on average; under skewed routing to as many as uniform routing
    sends it, at the EP-rank imbalance the sweep achieved (its ``dp`` record's routing
    balance), else the skew model's expectation.
    """
    from zeroprefill.common.layouts import predict_step
    from zeroprefill.common.saturation import Deployment
    from zeroprefill.common.routing_skew import expected_rank_imbalance

    meta = raw["meta"]
    profile = _shipped_profile(meta)
    if profile is None:
        return f"no shipped hardware profile for {meta['gpu']!r} x{meta['world_size']}"
    achieved = {(r["model"], r["dtype"], r["context"], r["tokens_per_gpu"]): r["routing_balance"]["ep_rank_max_over_mean"]
                for r in raw["records"] if r["family"] == "dp" and r["routing"] == "skewed" and "routing_balance" in r}
    out = {}
    for r in raw["records"]:
        if r["family"] == "asyncep" and r["transport"] not in ("nccl", "copy_engine"):
            continue
        spec, _ = load_model(r["model"])
        gpus = 1 if r["family"] == "dp" else meta["world_size"]
        transport = r["transport"] if r["family"] == "asyncep" else "nccl"
        deployment = Deployment(spec, profile, gpus, r["dtype"], transport, prefetch_depth=r["prefetch_depth"] or 1)
        imbalance, remote = 1.0, None
        if r["routing"] == "balanced":
            remote = (gpus - 1) / gpus
        elif r["family"] in ("a2a_ep", "a2a_tbo"):
            imbalance = achieved.get((r["model"], r["dtype"], r["context"], r["tokens_per_gpu"])) or \
                expected_rank_imbalance(spec.num_experts, spec.top_k, gpus, SKEW_TARGET)
        step = predict_step(deployment, PLANNER_LAYOUT[r["family"]], r["tokens_per_gpu"], r["context"],
                            rank_imbalance=max(imbalance, 1.0), remote_ranks=remote)
        out[_record_key(r)] = step.step_time_s * 1e3 / spec.num_layers
    return out


def _record_key(r: dict) -> str:
    return f"{r['model']}/{r['dtype']}/{r['layout']}/{r['routing']}/{r['context']}/{r['tokens_per_gpu']}"


def summarize(raw: dict, command: str) -> dict:
    meta = raw["meta"]
    world_size = meta["world_size"]
    threshold = thresholds(raw)
    predicted = predictions(raw)
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in raw["records"]:
        by_point.setdefault((r["model"], r["dtype"], r["context"], r["tokens_per_gpu"], r["routing"]), {})[r["layout"]] = r
    rows = []
    for (model, dtype, context, tokens, routing), layouts in sorted(by_point.items()):
        spec, _ = load_model(model)
        dp = next((r for r in layouts.values() if r["family"] == "dp"), None)
        baselines = [r for r in layouts.values() if r["family"] in BASELINES]
        best_baseline = min(baselines, key=lambda r: r["ms_per_layer"]) if world_size > 1 and baselines else None
        limit = threshold.get(f"{model}/{dtype}/{context}", {}).get("tokens_per_gpu")
        for name, r in layouts.items():
            row = dict(r)
            seconds = r["ms_per_layer"] * 1e-3
            row["tokens_per_s_per_gpu"] = tokens / (seconds * spec.num_layers)
            row["tflops_per_gpu"] = r["flops_per_gpu_per_layer"] / seconds / 1e12
            row["mfu"] = row["tflops_per_gpu"] / PEAK_TFLOPS
            row["exposed_comm"] = None if dp is None or r["family"] == "dp" else \
                max(r["ms_per_layer"] - dp["ms_per_layer"], 0.0) / r["ms_per_layer"]
            row["best_baseline"] = best_baseline["layout"] if best_baseline else None
            row["speedup_vs_best_baseline"] = best_baseline["ms_per_layer"] / r["ms_per_layer"] if best_baseline else None
            row["threshold_tokens_per_gpu"] = limit
            row["above_threshold"] = None if limit is None else tokens >= limit
            if dp is not None and "routing_balance" in dp:
                row["routing_balance"] = dp["routing_balance"]
            row["predicted_ms_per_layer"] = predicted.get(_record_key(r)) if isinstance(predicted, dict) else None
            row["planner_error"] = None if row["predicted_ms_per_layer"] is None else \
                row["predicted_ms_per_layer"] / r["ms_per_layer"] - 1.0
            rows.append(row)
    summary = headline(rows, meta, raw.get("skipped", []))
    summary.update(planner_errors(rows, predicted))
    summary.update(projection_8gpu(rows, meta))
    return {"summary": summary, "meta": meta, "thresholds": threshold,
            "points": rows, "skipped": raw.get("skipped", []), "records": raw["records"], "command": command}


def projection_8gpu(rows: list[dict], meta: dict) -> dict:
    """``projected_speedup_8gpu``: AsyncEP over the best fitting baseline on 8 GPUs of the
    sweep's kind, predicted (``project_scaling.py``: planner + skew model, balanced and skewed
    routing) at the Qwen3-235B bf16 contexts and token counts from 16K tokens/GPU the sweep ran:
    ``{"min": ..., "max": ...}``, a model, not a measurement."""
    from project_scaling import project

    model = HEADLINE_MODEL
    kind = _gpu_kind(meta["gpu"])
    chosen = [r for r in rows if r["model"] == model and r["dtype"] == "bf16" and r["tokens_per_gpu"] >= LARGE_BATCH_TOKENS]
    if kind is None or not chosen:
        return {"projected_speedup_8gpu": None,
                "projected_speedup_8gpu_reason": f"no shipped profile for {meta['gpu']!r}" if kind is None else
                f"no {model} bf16 point from {LARGE_BATCH_TOKENS} tokens/GPU was run"}
    points = project(model, kind, [8], ["bf16"], sorted({r["context"] for r in chosen}),
                     sorted({r["tokens_per_gpu"] for r in chosen}), [1.0, SKEW_TARGET])
    speedups = [p["speedup"] for p in points if p["speedup"] is not None]
    if not speedups:
        return {"projected_speedup_8gpu": None,
                "projected_speedup_8gpu_reason": "AsyncEP or every baseline does not fit 8 GPUs at these batches"}
    return {"projected_speedup_8gpu": {"min": min(speedups), "max": max(speedups)},
            "projected_speedup_8gpu_source": "model: benchmarks/project_scaling.py at this sweep's points"}


def planner_errors(rows: list[dict], predicted: dict[str, float] | str) -> dict:
    """``planner_max_error``: the largest ``|predicted / measured - 1|`` of the planner's step
    time over the Qwen3-235B bf16 points from 16K tokens/GPU, every layout (issue 18's ±10%
    target), with the signed range per layout (the planner is a GEMM-rate bound: negative
    means it predicts faster than measured)."""
    model = HEADLINE_MODEL
    chosen = [r for r in rows if r["model"] == model and r["dtype"] == "bf16"
              and r["tokens_per_gpu"] >= LARGE_BATCH_TOKENS and r["planner_error"] is not None]
    if not chosen:
        reason = predicted if isinstance(predicted, str) else \
            f"no {model} bf16 point from {LARGE_BATCH_TOKENS} tokens/GPU with a prediction was run"
        return {"planner_max_error": None, "planner_error_by_layout": None,
                "planner_error_reason": reason}
    by_layout: dict[str, list[float]] = {}
    for r in chosen:
        by_layout.setdefault(r["layout"], []).append(r["planner_error"])
    return {"planner_max_error": max(abs(r["planner_error"]) for r in chosen),
            "planner_error_by_layout": {k: [min(v), max(v)] for k, v in sorted(by_layout.items())},
            "planner_profile": "shipped (zeroprefill.common.hardware.shipped_profile)"}


def _best_asyncep(rows: list[dict], keep: Callable[[dict], bool]) -> list[dict]:
    """Per (routing, context, tokens) point among the rows ``keep`` accepts: the fastest AsyncEP row."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["family"] != "asyncep" or not keep(r):
            continue
        key = (r["routing"], r["context"], r["tokens_per_gpu"])
        if key not in best or r["ms_per_layer"] < best[key]["ms_per_layer"]:
            best[key] = r
    return [best[k] for k in sorted(best)]


def headline(rows: list[dict], meta: dict, skipped: list[dict]) -> dict:
    """The summary keys of issues 9 and 18 on Qwen3-235B-A22B bf16; null + reason if not run.

    Each value is the worst case over the qualifying points (min of MFU and speedups, max of
    exposed communication), so a target holds at every point iff the value meets it. The
    ``*_above_threshold`` and ``speedup_*_ctx*`` keys take the points at or above the predicted
    saturation threshold; the ``*_16k_plus`` keys (issue 18) those from 16K tokens/GPU, with
    the deduplicated-EP, two-batch-overlap and TP baselines.
    """
    model = HEADLINE_MODEL
    summary: dict = {"peak_tflops_used": PEAK_TFLOPS, "gpus": meta["world_size"], "gpu": meta["gpu"],
                     "layers_per_pass": meta["layers"], "timing": meta.get("timing", LEGACY_TIMING),
                     "skew_target_expert_max_over_mean": SKEW_TARGET, "reasons": {}}

    def above_threshold(context: int | None) -> tuple[str, Callable[[dict], bool]]:
        where = "at or above the saturation threshold" + (f" at context {context}" if context else "")
        return where, lambda r: r["above_threshold"] and (context is None or r["context"] == context)

    large_batch = (f"from {LARGE_BATCH_TOKENS} tokens/GPU", lambda r: r["tokens_per_gpu"] >= LARGE_BATCH_TOKENS)
    selections = {  # key: (routings, field, worst case, (which points, their test))
        "mfu_235b_bf16_above_threshold": (("balanced",), "mfu", min, above_threshold(None)),
        "exposed_comm_above_threshold": (("balanced",), "exposed_comm", max, above_threshold(None)),
        "speedup_short_ctx_balanced": (("balanced",), "speedup_vs_best_baseline", min, above_threshold(SHORT_CONTEXT)),
        "speedup_short_ctx_skewed": (("skewed",), "speedup_vs_best_baseline", min, above_threshold(SHORT_CONTEXT)),
        "speedup_32k_ctx": (("balanced",), "speedup_vs_best_baseline", min, above_threshold(LONG_CONTEXT)),
        "exposed_comm_16k_plus": (("balanced",), "exposed_comm", max, large_batch),
        "speedup_vs_fair_best_16k_plus": (("balanced", "skewed"), "speedup_vs_best_baseline", min, large_batch),
    }
    for key, (routings, field, reduce, (where, qualifies)) in selections.items():
        summary[key] = None
        if meta["world_size"] < 2:
            summary["reasons"][key] = ("ran on 1 GPU: nothing crosses a link (the gather is a local copy, "
                                       "no baseline communicates); needs >= 2 GPUs (nvidia-h200-x2)")
            continue
        chosen = _best_asyncep(rows, lambda r: r["model"] == model and r["dtype"] == "bf16"
                               and r["routing"] in routings and qualifies(r))
        values = [r[field] for r in chosen if r[field] is not None]
        if not values:
            summary["reasons"][key] = f"no {model} bf16 {'/'.join(routings)} AsyncEP point {where} was run"
            continue
        summary[key] = reduce(values)
        summary[f"{key}_points"] = [{"routing": r["routing"], "context": r["context"],
                                     "tokens_per_gpu": r["tokens_per_gpu"], "layout": r["layout"], field: r[field]}
                                    for r in chosen]
    summary["baseline_bytes_per_layer"] = _bytes_at_large_batch(rows, model)
    if summary["baseline_bytes_per_layer"] is None:
        summary["reasons"]["baseline_bytes_per_layer"] = (f"no {model} bf16 point at {LARGE_BATCH_TOKENS} "
                                                          "tokens/GPU with bytes per layer was run")
    skew = [r["routing_balance"] for r in rows if r["routing"] == "skewed" and r["family"] == "dp"
            and "routing_balance" in r]
    if skew:
        summary["skew_achieved_expert_max_over_mean"] = [min(s["expert_max_over_mean"] for s in skew),
                                                         max(s["expert_max_over_mean"] for s in skew)]
        summary["skew_achieved_ep_rank_max_over_mean"] = [min(s["ep_rank_max_over_mean"] for s in skew),
                                                          max(s["ep_rank_max_over_mean"] for s in skew)]
    best_mfu: dict[str, dict[str, float]] = {}
    for r in rows:
        entry = best_mfu.setdefault(f"{r['model']}/{r['dtype']}", {})
        entry[r["layout"]] = max(entry.get(r["layout"], 0.0), round(r["mfu"], 4))
    summary["best_mfu_per_layout"] = best_mfu
    summary["not_run"] = [s for s in skipped if s.get("layout") == "*"]
    return summary


def _bytes_at_large_batch(rows: list[dict], model: str) -> dict | None:
    """Bytes per layer per rank of every communicating layout at 16K tokens/GPU (``model``
    bf16, the shortest context run), moved and minimum, per ``layout/routing``."""
    at = [r for r in rows if r["model"] == model and r["dtype"] == "bf16" and r["family"] != "dp"
          and r["tokens_per_gpu"] == LARGE_BATCH_TOKENS and "bytes_per_layer" in r]
    if not at:
        return None
    context = min(r["context"] for r in at)
    return {"tokens_per_gpu": LARGE_BATCH_TOKENS, "context": context,
            "layouts": {f"{r['layout']}/{r['routing']}": r["bytes_per_layer"] for r in at if r["context"] == context}}


HEADLINE_KEYS = ("mfu_235b_bf16_above_threshold", "exposed_comm_above_threshold", "speedup_short_ctx_balanced",
                 "speedup_short_ctx_skewed", "speedup_32k_ctx", "exposed_comm_16k_plus",
                 "speedup_vs_fair_best_16k_plus")


def print_table(result: dict) -> None:
    header = ["model", "dtype", "routing", "ctx", "tok/GPU", "layout", "ms/layer", "tok/s/GPU", "MFU", "exposed",
              "vs best base", "moved/layer", "minimum"]
    widths = [16, 5, 8, 6, 7, 24, 9, 10, 6, 8, 12, 11, 10]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    previous = None
    for r in result["points"]:
        point = (r["model"], r["dtype"], r["routing"], r["context"], r["tokens_per_gpu"])
        traffic = r.get("bytes_per_layer")
        cells = [*(point if point != previous else [""] * 5), r["layout"], f"{r['ms_per_layer']:.3f}",
                 f"{r['tokens_per_s_per_gpu']:.0f}", f"{100 * r['mfu']:.1f}%",
                 "-" if r["exposed_comm"] is None else f"{100 * r['exposed_comm']:.1f}%",
                 "-" if r["speedup_vs_best_baseline"] is None else f"{r['speedup_vs_best_baseline']:.2f}x",
                 "-" if traffic is None else bytes_text(traffic["moved"]),
                 "-" if traffic is None else bytes_text(traffic["minimum"])]
        print(" ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths)))
        previous = point
        for k in r.get("profile", []):
            print(f"{'':>40} {100 * k['share']:5.1f}% {k['ms']:8.3f} ms  {k['name']}")
    s = result["summary"]
    print(f"peak used: {s['peak_tflops_used']} TFLOP/s (dense bf16) on {s['gpus']} x {s['gpu']}; "
          f"timing: {s['timing']}")
    for key in (*HEADLINE_KEYS, "baseline_bytes_per_layer"):
        print(f"{key}: {s[key]}" + (f"  ({s['reasons'][key]})" if key in s["reasons"] else ""))
    print(f"projected_speedup_8gpu (model): {s['projected_speedup_8gpu']}"
          + (f"  ({s['projected_speedup_8gpu_reason']})" if s.get("projected_speedup_8gpu_reason") else ""))
    print(f"planner_max_error: {s['planner_max_error']}"
          + (f"  ({s['planner_error_reason']})" if s.get("planner_error_reason") else
             f"  by layout {s['planner_error_by_layout']}"))
    for key in ("skew_achieved_expert_max_over_mean", "skew_achieved_ep_rank_max_over_mean"):
        if key in s:
            print(f"{key}: {s[key][0]:.2f} .. {s[key][1]:.2f}")
    for item in result["skipped"]:
        print(f"not run: {item}")


#: Panels side by side at most; more (routing, context) pairs wrap to one routing per row.
PLOT_PANELS_PER_ROW = 4


def plot(result: dict, path: Path) -> None:
    """Throughput vs tokens per GPU, one panel per (model, dtype, routing, context), in a grid.

    A row holds one (model, dtype)'s (routing, context) panels when there are at most
    :data:`PLOT_PANELS_PER_ROW` of them, else one (model, dtype, routing)'s contexts. One
    legend for the figure (a layout has one colour in every panel); the predicted saturation
    threshold is a dotted vertical line labelled with its value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = result["points"]
    panels = sorted({(r["model"], r["dtype"], r["routing"], r["context"]) for r in rows})
    if not panels:
        return
    columns = len({(routing, context) for _, _, routing, context in panels})
    if columns > PLOT_PANELS_PER_ROW:
        columns = min(len({context for *_, context in panels}), PLOT_PANELS_PER_ROW)
    grid_rows = (len(panels) + columns - 1) // columns
    layouts = sorted({r["layout"] for r in rows})
    palette = plt.get_cmap("tab10")
    styles = {layout: {"color": palette(k % palette.N), "linestyle": "--" if layout == "dp" else "-",
                       "marker": "o", "ms": 3} for k, layout in enumerate(layouts)}
    threshold_style = {"color": "grey", "linestyle": ":"}
    fig, axes = plt.subplots(grid_rows, columns, squeeze=False, layout="constrained",
                             figsize=(4.2 * columns, 3.0 * grid_rows + 1.2))
    any_threshold = False
    for index, (ax, (model, dtype, routing, context)) in enumerate(zip(axes.flat, panels)):
        panel = [r for r in rows if (r["model"], r["dtype"], r["routing"], r["context"]) ==
                 (model, dtype, routing, context)]
        for layout in sorted({r["layout"] for r in panel}):
            line = sorted((r["tokens_per_gpu"], r["tokens_per_s_per_gpu"]) for r in panel if r["layout"] == layout)
            ax.plot([x for x, _ in line], [y for _, y in line], **styles[layout])
        limit = result["thresholds"].get(f"{model}/{dtype}/{context}", {}).get("tokens_per_gpu")
        if limit:
            any_threshold = True
            ax.axvline(limit, **threshold_style)
            ax.annotate(f"threshold\n{limit:,} tok/GPU", xy=(limit, 0.02), xycoords=("data", "axes fraction"),
                        xytext=(3, 0), textcoords="offset points", fontsize=6, color="dimgrey")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {dtype}, {routing}, ctx {context}", fontsize=8)
        if index + columns >= len(panels):  # the lowest panel of its column
            ax.set_xlabel("tokens per GPU", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], **styles[layout]) for layout in layouts]
    labels = list(layouts)
    if any_threshold:
        handles.append(Line2D([], [], **threshold_style))
        labels.append("predicted saturation threshold")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=7, frameon=False)
    fig.supylabel("tokens/s per GPU (full model)", fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"e2e prefill, {meta['world_size']} x {meta['gpu']}, {meta['layers']} layers per pass", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
