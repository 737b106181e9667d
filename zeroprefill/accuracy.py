"""Is a served implementation as close to a float32 reference as stock is? The one rule the GPU
checks of both engines apply to the plugin (vLLM: ``tests/vllm_servers.py``; SGLang:
``benchmarks/sglang_gpu_check.py``).

Errors are measured against the same float32 reference on both sides (1 - cosine per vector;
absolute difference per score, probability or prompt log-probability). On random-weight
models in bf16 or FP8 they have a heavy tail: near-tied router logits send a token to another
expert, and an FP8 activation group rounds to another step, so one correct implementation's
worst value lies far from another's while their distributions agree. (On one H100, stock
SGLang and the plugin in bf16, over the same 3,596 prompt tokens, were 0.0185 and 0.0192 nats
from float32 at the median and 2.066 and 2.063 at the worst token, yet 1.19 nats from each
other at theirs.) So two points of the distribution are judged, each against stock's:

- the typical value: the plugin's median error at most :data:`MEDIAN_ERROR_RATIO` x stock's
  (with at least :data:`MEDIAN_MIN_SAMPLES` values; fewer say little about a median);
- the tail: the plugin's at most stock's plus a margin in the error's own unit. The tail is the
  worst value, or, from :data:`TAIL_PERCENTILE_MIN_SAMPLES` values up, the
  :data:`TAIL_PERCENTILE` th percentile: one value of thousands is one token, not the
  implementation. The worst value is always recorded beside the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MEDIAN_ERROR_RATIO = 2.0
MEDIAN_MIN_SAMPLES = 100
TAIL_PERCENTILE = 99.0
TAIL_PERCENTILE_MIN_SAMPLES = 1000
RULE = {"median_error_ratio": MEDIAN_ERROR_RATIO, "median_min_samples": MEDIAN_MIN_SAMPLES,
        "tail_percentile": TAIL_PERCENTILE, "tail_percentile_min_samples": TAIL_PERCENTILE_MIN_SAMPLES}


def error_summary(errors: Sequence[float]) -> dict[str, float]:
    """``count``, the median, 90th and 99th percentiles (nearest rank) and the worst of ``errors``."""
    if not errors:
        raise ValueError("no errors to summarise")
    ordered = sorted(errors)

    def at(percent: float) -> float:
        return ordered[min(len(ordered), max(1, math.ceil(percent / 100 * len(ordered)))) - 1]

    return {"count": len(ordered), "50%": at(50), "90%": at(90), "99%": at(99), "max": ordered[-1]}


def tail(summary: dict[str, float]) -> tuple[str, float]:
    """The tail point the rule judges in an :func:`error_summary`: its name and value."""
    if summary["count"] >= TAIL_PERCENTILE_MIN_SAMPLES:
        return f"{TAIL_PERCENTILE:g}th-percentile", summary[f"{TAIL_PERCENTILE:g}%"]
    return "worst", summary["max"]


def compare(what: str, ours: dict[str, float], theirs: dict[str, float], margin: float,
            us: str = "the plugin", them: str = "stock") -> list[str]:
    """What is wrong with ``ours`` against ``theirs`` (two :func:`error_summary` records of
    ``what``) under the rule; empty when nothing is."""
    problems = []
    if min(ours["count"], theirs["count"]) >= MEDIAN_MIN_SAMPLES and ours["50%"] > MEDIAN_ERROR_RATIO * theirs["50%"] + 1e-9:
        problems.append(f"{us}'s median {what} {ours['50%']:.3g} > {MEDIAN_ERROR_RATIO:g} x {them}'s {theirs['50%']:.3g}")
    (point, our_tail), (_, their_tail) = tail(ours), tail(theirs)
    if our_tail > their_tail + margin:
        problems.append(f"{us}'s {point} {what} {our_tail:.4g} > {them}'s {their_tail:.4g} + {margin:g}")
    return problems
