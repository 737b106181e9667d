"""``zeroprefill simulate``: discrete-event simulation of routing policies over N replicas.

Each replica is an AsyncEP group (DESIGN.md section 1) modelled by its forward-pass time::

    step_s = max(batch_true_flops / effective_flops_per_s, forward_floor_s)

``forward_floor_s`` is the time to stream every MoE layer's experts (``num_moe_layers x
W_layer x (G-1)/G / B_allgather``): below the saturation threshold
(``forward_floor_s x effective_flops_per_s`` FLOPs per forward) a replica waits on the wire.
A replica runs continuous batching: when idle it takes its waiting requests first-come
first-served up to ``max_batch_tokens`` uncached tokens (cached ones are not computed, as in
vLLM's scheduler budget) and runs one forward; all of them finish at its end. When a forward
ends the replica starts the next one with what it holds *before* the router hears of the
completions (an engine does not wait for the router): what a router sends in reply to a
completion waits for the forward after.
Its prefix cache is a capacity-bounded LRU of chained block hashes (the engine's ground
truth, separate from any router's belief). As in vLLM v1 (``KVCacheManager.allocate_slots``
caches a request's full blocks when it is scheduled), a request's blocks enter the cache when
it is scheduled into a forward, so a later request of the *same* forward already hits them
(its KV is written layer by layer before attention reads it). Each run counts the full blocks
computed rather than hit, by why: the first time on any replica (every policy computes these),
copied (computed before on another replica only) or recomputed (evicted from this one).

Policies, side by side on the same requests:

- ``round_robin``; ``least_requests`` (fewest in-flight requests);
- ``sglang_cache_aware``: sgl-router's cache-aware policy re-implemented
  (``sgl-router/src/policies/cache_aware.rs`` and ``tree.rs``): per-worker approximate radix
  tree of request text (here: token ids as characters), in-flight request counts as load; if
  ``max - min > balance_abs_threshold`` and ``max > min x balance_rel_threshold`` -> least
  loaded; else the deepest prefix match's most recent worker if the match rate exceeds
  ``cache_threshold``, otherwise the worker with the smallest tree; LRU leaf eviction to
  ``max_tree_size`` every ``eviction_interval_s``. Defaults are the Python CLI's: 0.3, 64, 1.5,
  120 s, 2^26.
- ``zeroprefill``: :class:`~zeroprefill.common.router_policy.RouterPolicy` (true FLOPs, prefix
  index, bound = saturation threshold x ``bound_factor``, queue by home replica, SJF with aging;
  given the replica rate and the engine's token budget).

Workloads (token ids drawn from a seeded generator; segment lengths uniform in the ranges):

- ``rerank``: shared system prompt (256) + a query (64-512) chosen Zipf(``zipf_a``) among
  ``num_queries`` + a unique document (128-1024).
- ``classify``: one of ``num_instructions`` instructions (1024-2048), Zipf, + unique text (32-256).
- ``long_context``: one of ``num_documents`` documents (4096-16384), Zipf, + a unique question
  (32-128).
- ``no_sharing``: unique prompts, log-normal lengths (median 1024, sigma 0.8, 64-8192).

Arrivals are a gamma renewal process with coefficient of variation ``arrival_cv`` (1.0 is
Poisson; >1 is bursty). Each workload is run twice per policy: a *latency run* at
``load`` x the no-cache capacity of the replicas (p50/p99 latency, busy fraction), and a
*throughput run* (requests completed per second of makespan) with Poisson arrivals at
``overload`` x the *ceiling capacity*: the replicas' capacity if every request hit as much as
:func:`ceiling_hits` allows (one unbounded cache, arrival order), which no policy exceeds, so
every workload is overloaded whatever the policy's hit rate (at ``overload`` x the no-cache
capacity, workloads with 90 %+ hits would only measure the arrival rate). Deterministic for a given ``--seed``; ``--seeds N`` runs N
seeds and reports each ratio's mean and worst seed (where the popular prefixes first land
moves a pinning policy's throughput by several percent from one seed to the next).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from zeroprefill.common.cost_model import request_flops
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.prefix_index import PrefixIndex, block_hashes, leading_blocks_in
from zeroprefill.common.router_policy import PromptShape, RoutedRequest, RouterPolicy

REFERENCE_MODEL = Path(__file__).resolve().parent.parent / "common" / "model_configs" / "qwen3-235b-a22b.json"
WORKLOADS = ("rerank", "classify", "long_context", "no_sharing")
PREFIX_SHARING_WORKLOADS = ("rerank", "classify", "long_context")
POLICIES = ("round_robin", "least_requests", "sglang_cache_aware", "zeroprefill")
_VOCAB = 150_000


# ----------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class ReplicaHardware:
    """One replica = ``gpus`` GPUs running AsyncEP. Defaults: DESIGN.md's 4xH200 anchors."""

    gpus: int = 4
    gemm_tflops_per_gpu: float = 613.0  # torch._grouped_mm at Qwen3-235B MoE shapes
    comm_slowdown: float = 0.12  # GEMM slowdown under concurrent NCCL AllGathers
    allgather_gbps: float = 339.0  # NCCL AllGather bus bandwidth
    weight_dtype: str = "bf16"
    cache_capacity_tokens: int = 400_000  # prefix-cache (KV) room per replica
    max_batch_tokens: int = 131_072  # uncached tokens one forward may compute

    def effective_flops_per_s(self) -> float:
        return self.gpus * self.gemm_tflops_per_gpu * 1e12 * (1.0 - self.comm_slowdown)

    def forward_floor_s(self, spec: MoEModelSpec) -> float:
        gathered_bytes = spec.expert_bytes_per_layer(self.weight_dtype) * (self.gpus - 1) / self.gpus
        return spec.num_moe_layers * gathered_bytes / (self.allgather_gbps * 1e9)

    def saturation_flops(self, spec: MoEModelSpec) -> float:
        return self.forward_floor_s(spec) * self.effective_flops_per_s()


# ----------------------------------------------------------------------------- workloads


@dataclass
class SimRequest:
    request_id: int
    arrival_s: float
    tokens: tuple[int, ...]
    hashes: tuple[int, ...] = ()
    uncached_flops: int = 0


@dataclass(frozen=True)
class WorkloadParams:
    """Knobs of the workload generators (see the module docstring)."""

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


# ----------------------------------------------------------------------------- policies


class SimPolicy:
    """A router in the simulation: told about arrivals and completions, returns dispatches."""

    name = "base"

    def arrive(self, request: SimRequest, now_s: float) -> list[tuple[SimRequest, int]]:
        raise NotImplementedError

    def complete(self, request: SimRequest, replica: int, now_s: float) -> list[tuple[SimRequest, int]]:
        return []


class RoundRobin(SimPolicy):
    name = "round_robin"

    def __init__(self, num_replicas: int) -> None:
        self._next = itertools.cycle(range(num_replicas))

    def arrive(self, request, now_s):
        return [(request, next(self._next))]


class LeastRequests(SimPolicy):
    name = "least_requests"

    def __init__(self, num_replicas: int) -> None:
        self.in_flight = [0] * num_replicas

    def arrive(self, request, now_s):
        replica = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        self.in_flight[replica] += 1
        return [(request, replica)]

    def complete(self, request, replica, now_s):
        self.in_flight[replica] -= 1
        return []


class _TreeNode:
    __slots__ = ("text", "children", "tenants", "parent")

    def __init__(self, text: tuple[int, ...], parent: _TreeNode | None) -> None:
        self.text = text
        self.children: dict[int, _TreeNode] = {}
        self.tenants: dict[int, float] = {}  # tenant -> last access time
        self.parent = parent


def _shared_prefix_length(text: tuple[int, ...], start: int, node_text: tuple[int, ...]) -> int:
    n = min(len(text) - start, len(node_text))
    if text[start : start + n] == node_text[:n]:
        return n
    low, high = 0, n  # text[start:start+low] matches, text[start:start+high] does not
    while high - low > 1:
        mid = (low + high) // 2
        if text[start : start + mid] == node_text[:mid]:
            low = mid
        else:
            high = mid
    return low


class ApproximateTree:
    """sgl-router's ``tree.rs``: a radix tree whose nodes remember which tenants sent them."""

    def __init__(self, tenants: Sequence[int]) -> None:
        self.root = _TreeNode((), None)
        self.char_count = {t: 0 for t in tenants}
        for tenant in tenants:
            self.root.tenants[tenant] = 0.0

    def insert(self, text: tuple[int, ...], tenant: int, now_s: float) -> None:
        node = self.root
        node.tenants[tenant] = now_s
        index = 0
        while index < len(text):
            child = node.children.get(text[index])
            if child is None:
                leaf = _TreeNode(text[index:], node)
                leaf.tenants[tenant] = now_s
                node.children[text[index]] = leaf
                self.char_count[tenant] += len(leaf.text)
                return
            shared = _shared_prefix_length(text, index, child.text)
            if shared < len(child.text):  # split child into child.text[:shared] + rest
                upper = _TreeNode(child.text[:shared], node)
                upper.tenants = dict(child.tenants)
                child.text = child.text[shared:]
                child.parent = upper
                upper.children[child.text[0]] = child
                node.children[upper.text[0]] = upper
                child = upper
            if tenant not in child.tenants:
                self.char_count[tenant] += len(child.text)
            child.tenants[tenant] = now_s
            node = child
            index += shared

    def prefix_match(self, text: tuple[int, ...], now_s: float) -> tuple[int, int | None]:
        """(matched length, most recent tenant of the deepest matched node)."""
        node, index = self.root, 0
        while index < len(text):
            child = node.children.get(text[index])
            if child is None:
                break
            shared = _shared_prefix_length(text, index, child.text)
            index += shared
            node = child
            if shared < len(child.text):
                break
        if not node.tenants:
            return index, None
        tenant = max(node.tenants, key=node.tenants.__getitem__)
        walk: _TreeNode | None = node
        while walk is not None:
            walk.tenants[tenant] = now_s
            walk = walk.parent
        return index, tenant

    def smallest_tenant(self) -> int:
        return min(self.char_count, key=lambda t: (self.char_count[t], t))

    def evict_by_size(self, max_size: int) -> None:
        """LRU leaf eviction per tenant until each tenant's char count is ``<= max_size``."""
        if all(count <= max_size for count in self.char_count.values()):
            return
        heap: list[tuple[float, int, int, _TreeNode]] = []
        order = itertools.count()
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            for tenant in self._leaf_tenants(node):
                heapq.heappush(heap, (node.tenants[tenant], next(order), tenant, node))
        while heap:
            _, _, tenant, node = heapq.heappop(heap)
            if self.char_count[tenant] <= max_size or tenant not in node.tenants or node is self.root:
                continue
            self.char_count[tenant] -= len(node.text)
            del node.tenants[tenant]
            parent = node.parent
            if not node.children and not node.tenants and parent is not None:
                del parent.children[node.text[0]]
            if parent is not None and parent is not self.root and tenant in self._leaf_tenants(parent):
                heapq.heappush(heap, (parent.tenants[tenant], next(order), tenant, parent))

    @staticmethod
    def _leaf_tenants(node: _TreeNode) -> set[int]:
        below = set().union(*(child.tenants.keys() for child in node.children.values())) if node.children else set()
        return set(node.tenants) - below


@dataclass(frozen=True)
class CacheAwareConfig:
    """sgl-router's cache-aware knobs, Python CLI defaults."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_s: float = 120.0
    max_tree_size: int = 1 << 26


class SGLangCacheAware(SimPolicy):
    """``CacheAwarePolicy::select_worker`` over an :class:`ApproximateTree` (see module doc)."""

    name = "sglang_cache_aware"

    def __init__(self, num_replicas: int, config: CacheAwareConfig = CacheAwareConfig()) -> None:
        self.config = config
        self.load = [0] * num_replicas
        self.tree = ApproximateTree(range(num_replicas))
        self._next_eviction_s = config.eviction_interval_s

    def arrive(self, request, now_s):
        while now_s >= self._next_eviction_s:
            self.tree.evict_by_size(self.config.max_tree_size)
            self._next_eviction_s += self.config.eviction_interval_s
        max_load, min_load = max(self.load), min(self.load)
        imbalanced = (max_load - min_load > self.config.balance_abs_threshold
                      and max_load > min_load * self.config.balance_rel_threshold)
        if imbalanced:
            replica = min(range(len(self.load)), key=self.load.__getitem__)
        else:
            matched, tenant = self.tree.prefix_match(request.tokens, now_s)
            rate = matched / len(request.tokens) if request.tokens else 0.0
            replica = tenant if rate > self.config.cache_threshold and tenant is not None else self.tree.smallest_tenant()
        self.tree.insert(request.tokens, replica, now_s)
        self.load[replica] += 1
        return [(request, replica)]

    def complete(self, request, replica, now_s):
        self.load[replica] -= 1
        return []


class ZeroPrefill(SimPolicy):
    """The project's :class:`RouterPolicy`, driven with simulated time."""

    name = "zeroprefill"

    def __init__(self, policy: RouterPolicy, block_size: int) -> None:
        self.policy = policy
        self.block_size = block_size
        self._requests: dict[str, SimRequest] = {}

    def arrive(self, request, now_s):
        routed = RoutedRequest(str(request.request_id),
                               [PromptShape(len(request.tokens), request.hashes)], now_s)
        self._requests[routed.request_id] = request
        return [(self._requests[r.request_id], p.replica) for r, p in self.policy.submit(routed, now_s=now_s)]

    def complete(self, request, replica, now_s):
        dispatched = self.policy.complete(str(request.request_id), now_s)
        return [(self._requests[r.request_id], p.replica) for r, p in dispatched]


# ----------------------------------------------------------------------------- simulation


@dataclass
class _Replica:
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
    rate = hardware.effective_flops_per_s()
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


def make_policy(
    name: str, spec: MoEModelSpec, hardware: ReplicaHardware, num_replicas: int, block_size: int,
    bound_factor: float,
) -> SimPolicy:
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
                              flops_per_s=[hardware.effective_flops_per_s()] * num_replicas,
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
        rate = num_replicas * hardware.effective_flops_per_s()
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
                progress(_row(workload, policy_name, entry))
    return results


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
    """:func:`run_comparison` results averaged over seeds, number by number."""

    def average(values: list):
        if isinstance(values[0], dict):
            return {key: average([v[key] for v in values]) for key in values[0]}
        return float(np.mean(values))

    return average(list(per_seed))


HEADER = (f"{'workload':<13} {'policy':<19} {'tput rps':>9} {'hit %':>6} {'p50 s':>7} {'p99 s':>7} "
          f"{'hit %':>6} {'busy %':>6} {'util %':>6}\n{'':<33} {'(throughput run)':>16} {'(latency run)':>37}")


def _row(workload: str, policy: str, entry: dict) -> str:
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


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults_hw, defaults_wl = ReplicaHardware(), WorkloadParams()
    parser.add_argument("--model", default=str(REFERENCE_MODEL),
                        help="config.json (or its directory) of the simulated model (default: Qwen3-235B-A22B)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--requests", type=int, default=defaults_wl.num_requests)
    parser.add_argument("--load", type=float, default=defaults_wl.load,
                        help="latency run's offered load, fraction of no-cache capacity")
    parser.add_argument("--overload", type=float, default=defaults_wl.overload,
                        help="throughput run's offered load, multiple of no-cache capacity")
    parser.add_argument("--arrival-cv", type=float, default=defaults_wl.arrival_cv,
                        help="coefficient of variation of inter-arrival gaps (1 = Poisson)")
    parser.add_argument("--zipf-a", type=float, default=defaults_wl.zipf_a)
    parser.add_argument("--gpus-per-replica", type=int, default=defaults_hw.gpus)
    parser.add_argument("--gemm-tflops", type=float, default=defaults_hw.gemm_tflops_per_gpu)
    parser.add_argument("--allgather-gbps", type=float, default=defaults_hw.allgather_gbps)
    parser.add_argument("--weight-dtype", choices=("bf16", "fp8"), default=defaults_hw.weight_dtype)
    parser.add_argument("--cache-capacity-tokens", type=int, default=defaults_hw.cache_capacity_tokens)
    parser.add_argument("--max-batch-tokens", type=int, default=defaults_hw.max_batch_tokens)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--bound-factor", type=float, default=1.25,
                        help="bound = saturation threshold x this factor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="run seeds --seed .. --seed + N - 1 and summarise mean and worst seed")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")


def run(args: argparse.Namespace) -> int:
    from zeroprefill.common.model_spec import ModelSpecError

    for name in ("replicas", "requests", "gpus_per_replica", "block_size", "cache_capacity_tokens",
                 "max_batch_tokens", "seeds"):
        if getattr(args, name) <= 0:
            print(f"zeroprefill simulate: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    for name in ("load", "overload", "arrival_cv", "zipf_a", "bound_factor", "gemm_tflops", "allgather_gbps"):
        if not getattr(args, name) > 0:
            print(f"zeroprefill simulate: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    try:
        spec = MoEModelSpec.from_pretrained(args.model)
    except (ModelSpecError, FileNotFoundError) as exc:
        print(f"zeroprefill simulate: {exc}", file=sys.stderr)
        return 2
    hardware = ReplicaHardware(gpus=args.gpus_per_replica, gemm_tflops_per_gpu=args.gemm_tflops,
                               allgather_gbps=args.allgather_gbps, weight_dtype=args.weight_dtype,
                               cache_capacity_tokens=args.cache_capacity_tokens,
                               max_batch_tokens=args.max_batch_tokens)
    params = WorkloadParams(num_requests=args.requests, zipf_a=args.zipf_a, arrival_cv=args.arrival_cv,
                            load=args.load, overload=args.overload)
    print(f"{args.replicas} replicas x {hardware.gpus} GPUs; forward floor "
          f"{hardware.forward_floor_s(spec) * 1e3:.0f} ms, saturation "
          f"{hardware.saturation_flops(spec):.3g} FLOPs, bound x{args.bound_factor}")
    seeds = list(range(args.seed, args.seed + args.seeds))
    per_seed = []
    for seed in seeds:
        if len(seeds) > 1:
            print(f"seed {seed}")
        print(HEADER)
        per_seed.append(run_comparison(spec, hardware, args.workloads, args.policies, params, args.replicas,
                                       args.block_size, args.bound_factor, seed, progress=print))
        print("prefix-hit ceiling (unbounded cache, any policy): " + ", ".join(
            f"{workload} {100 * entry['prefix_hit_ceiling']:.1f} %" for workload, entry in per_seed[-1].items()))
    summaries = [summarize(results) for results in per_seed]
    summary = summaries[0] if len(seeds) == 1 else summarize_seeds(summaries)
    results = per_seed[0] if len(seeds) == 1 else mean_results(per_seed)
    if len(seeds) > 1:
        print(f"mean over seeds {seeds[0]}..{seeds[-1]}")
        print(HEADER)
        for workload, entry in results.items():
            for policy_name, runs in entry["policies"].items():
                print(_row(workload, policy_name, runs))
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"{key}: {value:.3f}")
    print("throughput / ceiling capacity: " + "; ".join(
        f"{workload} " + ", ".join(f"{name} {100 * share:.1f} %" for name, share in
                                   entry["throughput_vs_ceiling_capacity"].items())
        for workload, entry in summary["per_workload"].items()))
    if args.json is not None:
        payload = {"summary": summary, "config": {"model": Path(args.model).name, "replicas": args.replicas,
                   "hardware": asdict(hardware), "workload": asdict(params), "block_size": args.block_size,
                   "bound_factor": args.bound_factor, "seeds": seeds,
                   "saturation_flops": hardware.saturation_flops(spec),
                   "forward_floor_s": hardware.forward_floor_s(spec)}, "results": results}
        if len(seeds) > 1:
            payload["per_seed"] = [{"seed": seed, "summary": one, "results": res}
                                   for seed, one, res in zip(seeds, summaries, per_seed)]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot is not None:
        plot(results, args.plot)
    return 0
