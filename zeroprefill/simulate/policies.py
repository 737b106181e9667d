"""Routing policies as the simulator drives them, and the simple ones.

A policy is told about arrivals and completions and answers with dispatches
``(request, replica)``; it may hold requests back and dispatch them on a later completion.

- ``round_robin``; ``least_requests`` (fewest in-flight requests);
- ``zeroprefill``: :class:`~zeroprefill.common.router_policy.RouterPolicy` (true FLOPs, prefix
  index, bound = saturation threshold x ``bound_factor``, queue by home replica, SJF with aging;
  given the replica rate and the engine's token budget), driven with simulated time.

sgl-router's cache-aware policy lives in :mod:`zeroprefill.simulate.sglang_cache_aware`.
"""

from __future__ import annotations

import itertools

from zeroprefill.common.router_policy import PromptShape, RoutedRequest, RouterPolicy
from zeroprefill.simulate.workloads import SimRequest

Dispatches = list[tuple[SimRequest, int]]


class SimPolicy:
    """A router in the simulation: told about arrivals and completions, returns dispatches."""

    name = "base"

    def arrive(self, request: SimRequest, now_s: float) -> Dispatches:
        raise NotImplementedError

    def complete(self, request: SimRequest, replica: int, now_s: float) -> Dispatches:
        return []


class RoundRobin(SimPolicy):
    """Replicas in turn."""

    name = "round_robin"

    def __init__(self, num_replicas: int) -> None:
        self._next = itertools.cycle(range(num_replicas))

    def arrive(self, request: SimRequest, now_s: float) -> Dispatches:
        return [(request, next(self._next))]


class LeastRequests(SimPolicy):
    """The replica with the fewest in-flight requests (the lowest index on a tie)."""

    name = "least_requests"

    def __init__(self, num_replicas: int) -> None:
        self.in_flight = [0] * num_replicas

    def arrive(self, request: SimRequest, now_s: float) -> Dispatches:
        replica = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        self.in_flight[replica] += 1
        return [(request, replica)]

    def complete(self, request: SimRequest, replica: int, now_s: float) -> Dispatches:
        self.in_flight[replica] -= 1
        return []


class ZeroPrefill(SimPolicy):
    """The project's :class:`RouterPolicy`, driven with simulated time."""

    name = "zeroprefill"

    def __init__(self, policy: RouterPolicy, block_size: int) -> None:
        self.policy = policy
        self.block_size = block_size
        self._requests: dict[str, SimRequest] = {}

    def arrive(self, request: SimRequest, now_s: float) -> Dispatches:
        routed = RoutedRequest(str(request.request_id),
                               [PromptShape(len(request.tokens), request.hashes)], now_s)
        self._requests[routed.request_id] = request
        return [(self._requests[r.request_id], p.replica) for r, p in self.policy.submit(routed, now_s=now_s)]

    def complete(self, request: SimRequest, replica: int, now_s: float) -> Dispatches:
        dispatched = self.policy.complete(str(request.request_id), now_s)
        return [(self._requests[r.request_id], p.replica) for r, p in dispatched]
