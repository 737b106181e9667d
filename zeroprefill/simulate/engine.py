"""The simulator's event loop: requests through a policy and N replicas, and what it measured.

Each replica runs continuous batching: when idle it takes its waiting requests first-come
first-served up to ``max_batch_tokens`` uncached tokens (cached ones are not computed, as in
vLLM's scheduler budget) and runs one forward of :class:`ReplicaHardware`'s step time; all of
them finish at its end. When a forward ends the replica starts the next one with what it holds
*before* the router hears of the completions (an engine does not wait for the router): what a
router sends in reply to a completion waits for the forward after.

Its prefix cache is a capacity-bounded LRU of chained block hashes (the engine's ground
truth, separate from any router's belief). As in vLLM v1 (``KVCacheManager.allocate_slots``
caches a request's full blocks when it is scheduled), a request's blocks enter the cache when
it is scheduled into a forward, so a later request of the *same* forward already hits them
(its KV is written layer by layer before attention reads it). Each run counts the full blocks
computed rather than hit, by why: the first time on any replica (every policy computes these),
copied (computed before on another replica only) or recomputed (evicted from this one).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from zeroprefill.common.cost_model import request_flops
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.prefix_index import PrefixIndex
from zeroprefill.simulate.hardware import ReplicaHardware
from zeroprefill.simulate.policies import SimPolicy
from zeroprefill.simulate.workloads import SimRequest


@dataclass
class _Replica:
    """One replica's engine state: its prefix cache, its queue and what it has done."""

    cache: PrefixIndex
    computed: set[int] = field(default_factory=set)  # every block it ever computed
    waiting: deque[SimRequest] = field(default_factory=deque)
    busy: bool = False
    busy_s: float = 0.0
    flops_done: int = 0


@dataclass
class RunResult:
    """What one (workload, policy, arrival pattern) run measured."""

    completed: int
    makespan_s: float
    throughput_rps: float
    latency_p50_s: float
    latency_p99_s: float
    latency_mean_s: float
    prefix_hit_rate: float
    busy_fraction: float
    flops_utilization: float
    # Full prompt blocks computed (not hit), by why: first time on any replica (unavoidable),
    # copied (computed before on another replica only), recomputed (evicted from this one).
    blocks_first: int = 0
    blocks_copied: int = 0
    blocks_recomputed: int = 0


def simulate(
    spec: MoEModelSpec,
    hardware: ReplicaHardware,
    requests: Sequence[SimRequest],
    policy: SimPolicy,
    num_replicas: int,
    block_size: int,
) -> RunResult:
    """Run ``requests`` (sorted by arrival) through ``policy`` and ``num_replicas`` replicas."""
    rate = hardware.effective_flops_per_s(spec)
    floor_s = hardware.forward_floor_s(spec)
    replicas = [_Replica(PrefixIndex(1, hardware.cache_capacity_tokens // block_size)) for _ in range(num_replicas)]
    events: list[tuple[float, int, int, object]] = []  # (time, seq, kind, payload)
    sequence = itertools.count()
    arrive_kind, step_done_kind = 0, 1
    for request in requests:
        heapq.heappush(events, (request.arrival_s, next(sequence), arrive_kind, request))
    latencies: list[float] = []
    prompt_tokens = cached_tokens = 0
    last_done_s = 0.0
    computed_anywhere: set[int] = set()
    blocks = {"first": 0, "copied": 0, "recomputed": 0}

    def start_step(index: int, now_s: float) -> None:
        nonlocal prompt_tokens, cached_tokens
        replica = replicas[index]
        batch: list[SimRequest] = []
        new_tokens = flops = 0
        while replica.waiting:
            request = replica.waiting[0]
            hit_blocks = replica.cache.match(request.hashes, 0)
            hit = min(hit_blocks * block_size, len(request.tokens) - 1)
            if batch and new_tokens + len(request.tokens) - hit > hardware.max_batch_tokens:
                break
            replica.waiting.popleft()
            replica.cache.insert(request.hashes, 0)
            for block_hash in request.hashes[hit_blocks:]:
                why = ("recomputed" if block_hash in replica.computed
                       else "copied" if block_hash in computed_anywhere else "first")
                blocks[why] += 1
                replica.computed.add(block_hash)
                computed_anywhere.add(block_hash)
            batch.append(request)
            new_tokens += len(request.tokens) - hit
            flops += request_flops(spec, len(request.tokens), hit)
            prompt_tokens += len(request.tokens)
            cached_tokens += hit
        step_s = max(flops / rate, floor_s)
        replica.busy = True
        replica.busy_s += step_s
        replica.flops_done += flops
        heapq.heappush(events, (now_s + step_s, next(sequence), step_done_kind, (index, batch)))

    def dispatch(pairs: list[tuple[SimRequest, int]], now_s: float) -> None:
        for request, index in pairs:
            replicas[index].waiting.append(request)
        for index in {index for _, index in pairs}:
            if not replicas[index].busy:
                start_step(index, now_s)

    while events:
        now_s, _, kind, payload = heapq.heappop(events)
        if kind == arrive_kind:
            dispatch(policy.arrive(payload, now_s), now_s)
            continue
        index, batch = payload
        replica = replicas[index]
        replica.busy = False
        last_done_s = now_s
        # The engine starts its next forward with what it holds before the router hears of
        # the completions: what a router dispatches in reply waits for the forward after.
        if replica.waiting:
            start_step(index, now_s)
        released: list[tuple[SimRequest, int]] = []
        for request in batch:
            latencies.append(now_s - request.arrival_s)
            released += policy.complete(request, index, now_s)
        dispatch(released, now_s)
    makespan_s = last_done_s - requests[0].arrival_s
    lat = np.asarray(latencies)
    return RunResult(
        completed=len(latencies),
        makespan_s=makespan_s,
        throughput_rps=len(latencies) / makespan_s,
        latency_p50_s=float(np.percentile(lat, 50)),
        latency_p99_s=float(np.percentile(lat, 99)),
        latency_mean_s=float(lat.mean()),
        prefix_hit_rate=cached_tokens / prompt_tokens,
        busy_fraction=sum(r.busy_s for r in replicas) / (num_replicas * makespan_s),
        flops_utilization=sum(r.flops_done for r in replicas) / (num_replicas * makespan_s * rate),
        blocks_first=blocks["first"],
        blocks_copied=blocks["copied"],
        blocks_recomputed=blocks["recomputed"],
    )
