"""Every policy on every workload: the latency run and the throughput run of each.

Each workload is run twice per policy, on the same requests: a *latency run* at ``load`` x the
no-cache capacity of the replicas (p50/p99 latency, busy fraction), and a *throughput run*
(requests completed per second of makespan) with Poisson arrivals at ``overload`` x the
*ceiling capacity*: the replicas' capacity if every request hit as much as
:func:`~zeroprefill.simulate.workloads.ceiling_hits` allows (one unbounded cache, arrival
order), which no policy exceeds, so every workload is overloaded whatever the policy's hit
rate (at ``overload`` x the no-cache capacity, workloads with 90 %+ hits would only measure
the arrival rate). Deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np

from zeroprefill.common.cost_model import request_flops
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.prefix_index import block_hashes
from zeroprefill.common.router_policy import RouterPolicy
from zeroprefill.simulate.engine import simulate
from zeroprefill.simulate.hardware import ReplicaHardware
from zeroprefill.simulate.policies import LeastRequests, RoundRobin, SimPolicy, ZeroPrefill
from zeroprefill.simulate.report import table_row
from zeroprefill.simulate.sglang_cache_aware import SGLangCacheAware
from zeroprefill.simulate.workloads import (
    SimRequest,
    WorkloadParams,
    ceiling_hits,
    gamma_arrivals,
    generate_prompts,
)

POLICIES = ("round_robin", "least_requests", "sglang_cache_aware", "zeroprefill")


def make_policy(
    name: str, spec: MoEModelSpec, hardware: ReplicaHardware, num_replicas: int, block_size: int,
    bound_factor: float,
) -> SimPolicy:
    """A fresh policy called ``name`` (one of :data:`POLICIES`) for one run."""
    if name == "round_robin":
        return RoundRobin(num_replicas)
    if name == "least_requests":
        return LeastRequests(num_replicas)
    if name == "sglang_cache_aware":
        return SGLangCacheAware(num_replicas)
    if name == "zeroprefill":
        bound = hardware.saturation_flops(spec) * bound_factor
        saturation = hardware.saturation_flops(spec)
        policy = RouterPolicy(spec, [bound] * num_replicas, [saturation] * num_replicas, block_size=block_size,
                              cache_capacity_blocks=hardware.cache_capacity_tokens // block_size,
                              flops_per_s=[hardware.effective_flops_per_s(spec)] * num_replicas,
                              max_batch_tokens=hardware.max_batch_tokens)
        return ZeroPrefill(policy, block_size)
    raise ValueError(f"unknown policy {name!r}; choose from {POLICIES}")


def run_comparison(
    spec: MoEModelSpec,
    hardware: ReplicaHardware,
    workloads: Sequence[str],
    policies: Sequence[str],
    params: WorkloadParams,
    num_replicas: int = 4,
    block_size: int = 16,
    bound_factor: float = 1.25,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every policy on every workload, latency and throughput runs; a JSON-ready dict."""
    results: dict = {}
    for w_index, workload in enumerate(workloads):
        prompts = generate_prompts(workload, params, seed + 1000 * w_index)
        shapes = [(p, tuple(block_hashes(p, block_size)), request_flops(spec, len(p))) for p in prompts]
        rate = num_replicas * hardware.effective_flops_per_s(spec)
        capacity_rps = rate / float(np.mean([f for _, _, f in shapes]))
        lengths_and_hashes = [(len(p), h) for p, h, _ in shapes]
        hits = ceiling_hits(lengths_and_hashes, block_size)
        ceiling_capacity_rps = rate / float(np.mean([request_flops(spec, len(p), hit)
                                                     for (p, _, _), hit in zip(shapes, hits)]))
        rng = np.random.default_rng(seed + 1000 * w_index + 1)
        runs = {
            "latency": gamma_arrivals(rng, len(prompts), params.load * capacity_rps, params.arrival_cv),
            "throughput": gamma_arrivals(rng, len(prompts), params.overload * ceiling_capacity_rps, 1.0),
        }
        results[workload] = {"no_cache_capacity_rps": capacity_rps, "ceiling_capacity_rps": ceiling_capacity_rps,
                             "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])),
                             "prefix_hit_ceiling": sum(hits) / sum(length for length, _ in lengths_and_hashes),
                             "policies": {}}
        for policy_name in policies:
            entry = {}
            for run_name, arrivals in runs.items():
                requests = [SimRequest(i, float(t), p, h, f) for i, (t, (p, h, f)) in enumerate(zip(arrivals, shapes))]
                policy = make_policy(policy_name, spec, hardware, num_replicas, block_size, bound_factor)
                entry[run_name] = asdict(simulate(spec, hardware, requests, policy, num_replicas, block_size))
            results[workload]["policies"][policy_name] = entry
            if progress is not None:
                progress(table_row(workload, policy_name, entry))
    return results
