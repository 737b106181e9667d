"""Prometheus text exposition of the router's state (no client library: a few counters).

Exposed at ``/metrics``:

- ``zeroprefill_router_queue_depth``: requests held in the global queue (all replicas at their
  FLOPs bound); ``..._queued{backend}``: those of them waiting at that backend as their home,
  ``..._queued_flops{backend}``: their true FLOPs as charged there.
- ``zeroprefill_router_outstanding_flops{backend}``, ``..._in_flight{backend}``,
  ``..._bound_flops{backend}``, ``..._backend_healthy{backend}``, ``..._dispatched_total{backend}``,
  ``..._failed_total{backend}``.
- ``zeroprefill_router_prefix_hit_rate``: predicted cached prompt tokens / dispatched prompt
  tokens; ``..._prompt_tokens_total``, ``..._cached_tokens_total``.
- ``zeroprefill_router_requests_total{endpoint,status}``, ``..._retries_total``.
- With ``--kv-events``: ``zeroprefill_router_kv_{batches,stored_blocks,confirmed_blocks,
  removed_blocks,skipped_blocks,gaps}_total{backend}`` (``kv_events.py``).
- Histograms ``zeroprefill_router_request_latency_seconds`` (arrival to response) and
  ``zeroprefill_router_queue_wait_seconds`` (arrival to dispatch).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence

from zeroprefill.common.router_policy import RouterPolicy
from zeroprefill.router.backends import BackendPool
from zeroprefill.router.kv_events import KVEventStats

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram in Prometheus' sense."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total}")
        lines.append(f"{name}_count {self.count}")
        return lines


_KV_EVENT_COUNTERS = (
    ("batches", "KV-event batches received from the backend's engine."),
    ("stored_blocks", "Blocks the engine reported cached, applied to the prefix index."),
    ("confirmed_blocks", "Stored blocks the router had already predicted there (same tokens, same hash)."),
    ("removed_blocks", "Blocks the engine reported evicted, removed from the prefix index."),
    ("skipped_blocks", "Stored blocks not applied: unknown parent, other block size, other medium, extra keys."),
    ("gaps", "Lost KV-event batches or engine restarts (that rank's blocks are forgotten)."),
)


class RouterMetrics:
    """Counters the gateway updates per request, rendered with the policy's live state."""

    def __init__(self) -> None:
        self.requests = Counter[tuple[str, int]]()
        self.retries_total = 0
        self.latency_s = Histogram()
        self.queue_wait_s = Histogram()

    def render(self, policy: RouterPolicy, pool: BackendPool,
               kv_events: Sequence[KVEventStats] | None = None) -> str:
        p = "zeroprefill_router"
        lines = [
            f"# HELP {p}_queue_depth Requests waiting in the global queue.",
            f"# TYPE {p}_queue_depth gauge",
            f"{p}_queue_depth {policy.queue_depth}",
            f"# HELP {p}_queued Requests in the global queue waiting at this backend as their home.",
            f"# TYPE {p}_queued gauge",
        ]
        for backend, queued in zip(pool.backends, policy.queued_per_replica):
            lines.append(f'{p}_queued{{backend="{backend.url}"}} {queued}')
        lines += [f"# HELP {p}_queued_flops True FLOPs waiting at this backend as their home.",
                  f"# TYPE {p}_queued_flops gauge"]
        for backend, flops in zip(pool.backends, policy.queued_flops_per_replica):
            lines.append(f'{p}_queued_flops{{backend="{backend.url}"}} {flops}')
        per_backend = (
            ("outstanding_flops", "gauge", "True FLOPs dispatched and not yet completed.",
             lambda r: r.outstanding_flops),
            ("in_flight", "gauge", "Requests dispatched and not yet completed.", lambda r: r.in_flight),
            ("bound_flops", "gauge", "Outstanding-FLOPs bound (saturation threshold x factor).",
             lambda r: r.bound_flops if math.isfinite(r.bound_flops) else "+Inf"),
            ("backend_healthy", "gauge", "1 if the backend passes health checks.", lambda r: int(r.healthy)),
            ("dispatched_total", "counter", "Requests dispatched to the backend.", lambda r: r.dispatched_total),
            ("failed_total", "counter", "Dispatches the backend failed.", lambda r: r.failed_total),
        )
        for name, kind, help_text, value in per_backend:
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}"]
            for backend, load in zip(pool.backends, policy.replicas):
                lines.append(f'{p}_{name}{{backend="{backend.url}"}} {value(load)}')
        if kv_events is not None:
            for name, help_text in _KV_EVENT_COUNTERS:
                lines += [f"# HELP {p}_kv_{name}_total {help_text}", f"# TYPE {p}_kv_{name}_total counter"]
                for backend, counters in zip(pool.backends, kv_events):
                    lines.append(f'{p}_kv_{name}_total{{backend="{backend.url}"}} {getattr(counters, name)}')
        stats = policy.stats
        lines += [
            f"# HELP {p}_prefix_hit_rate Predicted cached prompt tokens / dispatched prompt tokens.",
            f"# TYPE {p}_prefix_hit_rate gauge",
            f"{p}_prefix_hit_rate {stats.prefix_hit_rate}",
            f"# TYPE {p}_prompt_tokens_total counter",
            f"{p}_prompt_tokens_total {stats.prompt_tokens}",
            f"# TYPE {p}_cached_tokens_total counter",
            f"{p}_cached_tokens_total {stats.cached_tokens}",
            f"# HELP {p}_requests_total Requests answered, by endpoint and HTTP status.",
            f"# TYPE {p}_requests_total counter",
        ]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'{p}_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
        lines += [
            f"# HELP {p}_retries_total Requests re-dispatched after a backend failed them.",
            f"# TYPE {p}_retries_total counter",
            f"{p}_retries_total {self.retries_total}",
        ]
        lines += self.latency_s.render(f"{p}_request_latency_seconds", "Arrival to response.")
        lines += self.queue_wait_s.render(f"{p}_queue_wait_seconds", "Arrival to dispatch.")
        return "\n".join(lines) + "\n"
