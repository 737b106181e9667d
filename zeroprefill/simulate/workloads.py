"""The simulated workloads: prompts (token ids from a seeded generator) and their arrivals.

Segment lengths are uniform in the ranges given:

- ``rerank``: shared system prompt (256) + a query (64-512) chosen Zipf(``zipf_a``) among
  ``num_queries`` + a unique document (128-1024).
- ``classify``: one of ``num_instructions`` instructions (1024-2048), Zipf, + unique text (32-256).
- ``long_context``: one of ``num_documents`` documents (4096-16384), Zipf, + a unique question
  (32-128).
- ``no_sharing``: unique prompts, log-normal lengths (median 1024, sigma 0.8, 64-8192).

Arrivals are a gamma renewal process with coefficient of variation ``arrival_cv`` (1.0 is
Poisson; >1 is bursty).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zeroprefill.common.prefix_index import leading_blocks_in

WORKLOADS = ("rerank", "classify", "long_context", "no_sharing")
PREFIX_SHARING_WORKLOADS = ("rerank", "classify", "long_context")
_VOCAB = 150_000


@dataclass
class SimRequest:
    """One simulated request: its prompt, block hashes and the FLOPs it costs with no cache hit."""

    request_id: int
    arrival_s: float
    tokens: tuple[int, ...]
    hashes: tuple[int, ...] = ()
    uncached_flops: int = 0


@dataclass(frozen=True)
class WorkloadParams:
    """Knobs of the workload generators and the offered load (see the module docstring)."""

    num_requests: int = 4000
    zipf_a: float = 1.1
    num_queries: int = 200
    num_instructions: int = 8
    num_documents: int = 120
    arrival_cv: float = 2.0
    load: float = 0.7
    overload: float = 3.0


def _segment(rng: np.random.Generator, low: int, high: int) -> tuple[int, ...]:
    return tuple(rng.integers(0, _VOCAB, int(rng.integers(low, high + 1))).tolist())


def _zipf_choice(rng: np.random.Generator, n: int, a: float, size: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** a
    return rng.choice(n, size=size, p=weights / weights.sum())


def generate_prompts(workload: str, params: WorkloadParams, seed: int) -> list[tuple[int, ...]]:
    """The prompts (token ids) of ``workload``, in arrival order."""
    rng = np.random.default_rng(seed)
    n = params.num_requests
    if workload == "rerank":
        system = _segment(rng, 256, 256)
        queries = [_segment(rng, 64, 512) for _ in range(params.num_queries)]
        picks = _zipf_choice(rng, params.num_queries, params.zipf_a, n)
        return [system + queries[q] + _segment(rng, 128, 1024) for q in picks]
    if workload == "classify":
        instructions = [_segment(rng, 1024, 2048) for _ in range(params.num_instructions)]
        picks = _zipf_choice(rng, params.num_instructions, params.zipf_a, n)
        return [instructions[i] + _segment(rng, 32, 256) for i in picks]
    if workload == "long_context":
        documents = [_segment(rng, 4096, 16384) for _ in range(params.num_documents)]
        picks = _zipf_choice(rng, params.num_documents, params.zipf_a, n)
        return [documents[d] + _segment(rng, 32, 128) for d in picks]
    if workload == "no_sharing":
        lengths = np.clip(rng.lognormal(math.log(1024), 0.8, n), 64, 8192).astype(int)
        return [tuple(rng.integers(0, _VOCAB, int(length)).tolist()) for length in lengths]
    raise ValueError(f"unknown workload {workload!r}; choose one of {WORKLOADS}")


def gamma_arrivals(rng: np.random.Generator, n: int, rate_per_s: float, cv: float) -> np.ndarray:
    """Arrival times of a gamma renewal process with mean rate ``rate_per_s`` and CV ``cv``."""
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (shape * rate_per_s), n)
    return np.cumsum(gaps) - gaps[0]


def ceiling_hits(prompts: Sequence[tuple[int, Sequence[int]]], block_size: int) -> list[int]:
    """Per prompt, the tokens one unbounded cache that sees every request in arrival order hits.

    ``prompts`` are ``(num_tokens, block_hashes)``. Each request hits the longest prefix that
    any earlier request had (at most ``num_tokens - 1``, as the engines recompute the last
    token): every distinct block is computed at least once wherever it runs, so no routing
    policy over any number of replicas computes less.
    """
    seen: set[int] = set()
    hits = []
    for num_tokens, hashes in prompts:
        hits.append(min(leading_blocks_in(hashes, seen) * block_size, max(num_tokens - 1, 0)))
        seen.update(hashes)
    return hits
