"""``zeroprefill simulate``: discrete-event simulation of routing policies over N replicas.

Policies, side by side on the same requests, drive the same engine and cache model; each
replica is an AsyncEP group modelled by its forward-pass time (docs/router.md, Simulator).
One module per part:

- :mod:`~zeroprefill.simulate.hardware`: a replica's step time, forward floor and saturation
  threshold;
- :mod:`~zeroprefill.simulate.workloads`: the four workloads' prompts, their arrivals, and the
  prefix hits no policy can beat;
- :mod:`~zeroprefill.simulate.policies` and :mod:`~zeroprefill.simulate.sglang_cache_aware`:
  ``round_robin``, ``least_requests``, ``zeroprefill``, and sgl-router's ``cache_aware``;
- :mod:`~zeroprefill.simulate.engine`: the event loop (continuous batching, an LRU prefix
  cache per replica) and what one run measured;
- :mod:`~zeroprefill.simulate.comparison`: every policy on every workload, a latency run and a
  throughput run each;
- :mod:`~zeroprefill.simulate.summary`: ours vs the best other policy, over one or many seeds;
- :mod:`~zeroprefill.simulate.report`: the console table and the PNG;
- :mod:`~zeroprefill.simulate.cli`: the command line (``add_arguments``/``run``).

Deterministic for a given ``--seed``; ``--seeds N`` runs N seeds and reports each ratio's mean
and worst seed.
"""

from zeroprefill.simulate.cli import REFERENCE_MODEL, add_arguments, run
from zeroprefill.simulate.comparison import POLICIES, make_policy, run_comparison
from zeroprefill.simulate.engine import RunResult, simulate
from zeroprefill.simulate.hardware import ReplicaHardware
from zeroprefill.simulate.policies import LeastRequests, RoundRobin, SimPolicy, ZeroPrefill
from zeroprefill.simulate.report import HEADER, plot, table_row
from zeroprefill.simulate.sglang_cache_aware import ApproximateTree, CacheAwareConfig, SGLangCacheAware
from zeroprefill.simulate.summary import mean_results, summarize, summarize_seeds
from zeroprefill.simulate.workloads import (
    PREFIX_SHARING_WORKLOADS,
    WORKLOADS,
    SimRequest,
    WorkloadParams,
    ceiling_hits,
    gamma_arrivals,
    generate_prompts,
)

__all__ = [
    "HEADER",
    "POLICIES",
    "PREFIX_SHARING_WORKLOADS",
    "REFERENCE_MODEL",
    "WORKLOADS",
    "ApproximateTree",
    "CacheAwareConfig",
    "LeastRequests",
    "ReplicaHardware",
    "RoundRobin",
    "RunResult",
    "SGLangCacheAware",
    "SimPolicy",
    "SimRequest",
    "WorkloadParams",
    "ZeroPrefill",
    "add_arguments",
    "ceiling_hits",
    "gamma_arrivals",
    "generate_prompts",
    "make_policy",
    "mean_results",
    "plot",
    "run",
    "run_comparison",
    "simulate",
    "summarize",
    "summarize_seeds",
    "table_row",
]
