"""Ours vs the best other policy, per workload and over seeds.

The input is :func:`~zeroprefill.simulate.comparison.run_comparison`'s results.

With ``--seeds N`` each ratio is reported as its mean and its worst seed: where the popular
prefixes first land moves a pinning policy's throughput by several percent from one seed to
the next.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zeroprefill.simulate.workloads import PREFIX_SHARING_WORKLOADS


def summarize(results: dict, ours: str = "zeroprefill") -> dict:
    """Ours vs the best other policy: p99 ratio (lower is better), throughput ratio (higher)."""
    per_workload = {}
    for workload, entry in results.items():
        policies = entry["policies"]
        if ours not in policies or len(policies) < 2:
            continue
        others = {k: v for k, v in policies.items() if k != ours}
        best_p99 = min(v["latency"]["latency_p99_s"] for v in others.values())
        best_tput = max(v["throughput"]["throughput_rps"] for v in others.values())
        per_workload[workload] = {
            "p99_ratio_vs_best_other": policies[ours]["latency"]["latency_p99_s"] / best_p99,
            "throughput_ratio_vs_best_other": policies[ours]["throughput"]["throughput_rps"] / best_tput,
            # What each policy's throughput reaches of the most any policy could (every request
            # hitting its ceiling, replicas never idle): the headroom left.
            "throughput_vs_ceiling_capacity": {
                name: runs["throughput"]["throughput_rps"] / entry["ceiling_capacity_rps"]
                for name, runs in policies.items()},
        }
    summary: dict = {"per_workload": per_workload}
    _worst_over_sharing(summary)
    if "no_sharing" in results and {ours, "least_requests"} <= set(results["no_sharing"]["policies"]):
        p = results["no_sharing"]["policies"]
        summary["no_sharing_p99_ratio_vs_least_requests"] = (
            p[ours]["latency"]["latency_p99_s"] / p["least_requests"]["latency"]["latency_p99_s"])
        summary["no_sharing_throughput_ratio_vs_least_requests"] = (
            p[ours]["throughput"]["throughput_rps"] / p["least_requests"]["throughput"]["throughput_rps"])
    return summary


def _worst_over_sharing(summary: dict, suffix: str = "") -> None:
    """Top-level ratios of ``summary``: the worst prefix-sharing workload's (``suffix`` picks the
    per-workload figure: the value, or ``_worst_seed``)."""
    sharing = [summary["per_workload"][w] for w in PREFIX_SHARING_WORKLOADS if w in summary["per_workload"]]
    if sharing:
        summary[f"p99_ratio_vs_best_other{suffix}"] = max(s[f"p99_ratio_vs_best_other{suffix}"] for s in sharing)
        summary[f"throughput_ratio_vs_best_other{suffix}"] = min(
            s[f"throughput_ratio_vs_best_other{suffix}"] for s in sharing)


def summarize_seeds(summaries: Sequence[dict]) -> dict:
    """:func:`summarize` over several seeds: each ratio's mean, worst seed and values per seed.

    The top-level ratios are the worst workload's *mean* over seeds (``..._worst_seed``: the
    worst workload and seed). One seed decides where the popular prefixes first land, which
    moves pinning policies' throughput by several percent.
    """
    per_workload: dict = {}
    for workload in summaries[0]["per_workload"]:
        entry = {}
        for key, worst in (("p99_ratio_vs_best_other", max), ("throughput_ratio_vs_best_other", min)):
            values = [s["per_workload"][workload][key] for s in summaries]
            entry[key] = float(np.mean(values))
            entry[f"{key}_worst_seed"] = worst(values)
            entry[f"{key}_per_seed"] = values
        entry["throughput_vs_ceiling_capacity"] = mean_results(
            [s["per_workload"][workload]["throughput_vs_ceiling_capacity"] for s in summaries])
        per_workload[workload] = entry
    summary: dict = {"seeds": len(summaries), "per_workload": per_workload}
    _worst_over_sharing(summary)
    _worst_over_sharing(summary, "_worst_seed")
    for key in ("no_sharing_p99_ratio_vs_least_requests", "no_sharing_throughput_ratio_vs_least_requests"):
        if all(key in s for s in summaries):
            summary[key] = float(np.mean([s[key] for s in summaries]))
    return summary


def mean_results(per_seed: Sequence[dict]) -> dict:
    """:func:`~zeroprefill.simulate.comparison.run_comparison` results averaged over seeds, number by number."""

    def average(values: list):
        if isinstance(values[0], dict):
            return {key: average([v[key] for v in values]) for key in values[0]}
        return float(np.mean(values))

    return average(list(per_seed))
