"""The simulator's results for people: the console table and the PNG bar charts."""

from __future__ import annotations

from pathlib import Path

HEADER = (f"{'workload':<13} {'policy':<19} {'tput rps':>9} {'hit %':>6} {'p50 s':>7} {'p99 s':>7} "
          f"{'hit %':>6} {'busy %':>6} {'util %':>6}\n{'':<33} {'(throughput run)':>16} {'(latency run)':>37}")


def table_row(workload: str, policy: str, entry: dict) -> str:
    """One policy's line of the table under :data:`HEADER`."""
    lat, tput = entry["latency"], entry["throughput"]
    return (f"{workload:<13} {policy:<19} {tput['throughput_rps']:>9.2f} {100 * tput['prefix_hit_rate']:>6.1f} "
            f"{lat['latency_p50_s']:>7.2f} {lat['latency_p99_s']:>7.2f} {100 * lat['prefix_hit_rate']:>6.1f} "
            f"{100 * lat['busy_fraction']:>6.1f} {100 * lat['flops_utilization']:>6.1f}")


def plot(results: dict, path: Path) -> None:
    """Bar charts: p99 latency (latency run) and throughput (throughput run) per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results)
    policies = list(next(iter(results.values()))["policies"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(policies)
    for k, policy in enumerate(policies):
        xs = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(workloads))]
        p99 = [results[w]["policies"][policy]["latency"]["latency_p99_s"] for w in workloads]
        tput = [results[w]["policies"][policy]["throughput"]["throughput_rps"] for w in workloads]
        axes[0].bar(xs, p99, width, label=policy)
        axes[1].bar(xs, tput, width, label=policy)
    for ax, title in zip(axes, ("p99 latency, latency run (s, lower is better)",
                                "throughput, overload run (req/s, higher is better)")):
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
