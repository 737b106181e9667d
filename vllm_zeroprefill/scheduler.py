"""A prefill-only scheduler for vLLM v1: each step's batch is sized in true FLOPs, not tokens.

Prefill-only requests (embeddings, scores, classification) are known in full when they
arrive, so their cost is computable before any work: ``request_flops`` from our cost model,
with the prefix-cache hit the engine would give the request right now. Each step the
scheduler admits waiting requests until the step's true FLOPs reach a budget (the saturation
budget of docs/design.md: enough work to hide one layer's weight gather, no more), instead of
filling a token count. Two prompts with equal token counts can differ several-fold in cost
(attention is quadratic, a prefix hit removes compute but not tokens); the budget sees it.

Prefix grouping: waiting requests whose first KV block is the same share a prefix.

- *warm* group (the prefix is already cached): all its members are admitted together, ahead
  of later groups, so they all hit the cache while its blocks are resident;
- *cold* group (nothing cached yet): only the first member is admitted; the others wait one
  step and then hit the blocks it has just cached, instead of computing the prefix again in
  the same step.

Nothing is held back for decoding: a pooling request finishes at the end of its prefill,
so the whole budget goes to prefills (vLLM's own token budget and KV-cache checks still
apply on top, in the base scheduler). Offering stops, too, once the offered prompt tokens
cover vLLM's token budget: vLLM would take no more, and the rest of the queue then needs no
pricing (a prefix-cache lookup and the cost model each), which a step's host time pays.

Budget (FLOPs per step per data-parallel rank), the first that applies:

1. ``--additional-config '{"zeroprefill": {"step_flops_budget": 3e12}}'``, then the
   ``ZEROPREFILL_STEP_FLOPS_BUDGET`` environment variable (the setting both engine plugins
   read: :func:`zeroprefill.common.saturation.configured_step_flops_budget`);
2. on GPUs with a shipped hardware profile (H100, H200) under ``--moe-backend asyncep`` with
   2+ DP ranks in one node: the planner's saturation budget,
   :func:`zeroprefill.common.saturation.step_flops_budget_on_gpus` of the deployment (bf16, or
   fp8 for a block-FP8 checkpoint; the transport AsyncEP gathers with, from
   ``ZEROPREFILL_ASYNCEP_TRANSPORT``; prompts of ``min(max_model_len, 2048)`` tokens): enough
   work to hide one layer's weight gather, plus 10%;
3. otherwise (CPU, other GPUs, one rank, no AsyncEP): the linear FLOPs of a full token budget
   (``2 * max_num_batched_tokens * matmul params per token``): equal to vLLM's token budget
   for short prompts, and tighter for long-context ones, whose attention FLOPs it also counts.

What a request costs includes the LM head only where the engine runs it
(:func:`zeroprefill.common.cost_model.lm_head_tokens` of the runner: none for pooling).

:func:`plan_prefill_step` is the whole policy as a pure function; the scheduler classes
only translate vLLM's queue into it and back.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_zeroprefill.compat import prefix_cache_lookup_enabled
from vllm_zeroprefill.moe_backend import ASYNCEP
from zeroprefill.common.cost_model import lm_head_tokens, matmul_params_per_token, request_flops
from zeroprefill.common.hardware import HardwareProfileError
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.saturation import (DEFAULT_CONTEXT_TOKENS, STEP_FLOPS_BUDGET_ENV, PlanError,
                                           configured_step_flops_budget, parse_step_flops_budget,
                                           step_flops_budget_on_gpus)

logger = init_logger(f"vllm.{__name__}")  # vLLM's handlers: the line reaches the server log

#: The environment setting of the budget, common to both engine plugins.
BUDGET_ENV = STEP_FLOPS_BUDGET_ENV
ADDITIONAL_CONFIG_KEY = "zeroprefill"
# A budget worth more tokens than any step holds (benchmarks set 1e30 FLOPs to leave the token budget alone)
UNBOUNDED_STEP_TOKENS = 1e12


class Candidate(Protocol):
    """A waiting request as the policy sees it."""

    request_id: str
    prefix_key: Hashable | None  # the first full KV block's hash; None if shorter than a block
    cached_tokens: int  # prompt tokens the prefix cache would serve now
    flops: int  # true FLOPs of its prefill given those cached tokens
    tokens: int  # prompt tokens its prefill would compute (not cached)


@dataclass(frozen=True)
class PrefillCandidate:
    """A :class:`Candidate` priced up front."""

    request_id: str
    prefix_key: Hashable | None
    cached_tokens: int
    flops: int
    tokens: int


@dataclass(frozen=True)
class StepPlan:
    """Which waiting requests to offer the step, in order, and which to keep waiting."""

    admitted: tuple[str, ...]
    deferred: tuple[str, ...]
    admitted_flops: int


def plan_prefill_step(
    candidates: Sequence[Candidate], flops_budget: float, in_flight_flops: int = 0,
    token_budget: int | None = None,
) -> StepPlan:
    """Admit waiting requests, prefix group by prefix group, up to ``flops_budget``.

    Args:
        candidates: waiting requests in queue (arrival) order.
        flops_budget: true FLOPs one step may hold.
        in_flight_flops: FLOPs already committed to the step (running, chunked prefills).
        token_budget: prompt tokens the engine will schedule this step at most (None: no
            limit here).

    Groups are taken in the order of their first member. A cold group (its first member
    has no cache hit) offers only that member; a warm group offers all members. Admission
    stops at the first offered request that would exceed the budget, except that a step
    with nothing else in it always takes one request, however large, and once the admitted
    requests' tokens reach ``token_budget`` (the last one admitted may pass it: the engine
    may chunk it). A candidate's ``cached_tokens``, ``flops`` and ``tokens`` are read only
    if it is offered, its ``prefix_key`` always.
    """
    if flops_budget <= 0:
        raise ValueError(f"flops_budget must be positive, got {flops_budget}")
    groups: dict[Hashable, list[Candidate]] = {}
    for candidate in candidates:
        key = candidate.prefix_key if candidate.prefix_key is not None else ("request", candidate.request_id)
        groups.setdefault(key, []).append(candidate)

    admitted: list[str] = []
    total = in_flight_flops
    tokens = 0

    def takes(candidate: Candidate) -> bool:
        if total == 0 and not admitted:  # an empty step takes one request, however large
            return True
        if token_budget is not None and tokens >= token_budget:
            return False  # before pricing it: the engine would not take it
        return total + candidate.flops <= flops_budget

    full = False
    for members in groups.values():
        if not takes(members[0]):  # before reading its cache hit
            break
        offered = members if members[0].cached_tokens > 0 else members[:1]
        for candidate in offered:
            if not takes(candidate):
                full = True
                break
            admitted.append(candidate.request_id)
            total += candidate.flops
            tokens += candidate.tokens
        if full:
            break
    chosen = set(admitted)
    deferred = tuple(c.request_id for c in candidates if c.request_id not in chosen)
    return StepPlan(tuple(admitted), deferred, total - in_flight_flops)


def resolve_step_flops_budget(vllm_config, spec: MoEModelSpec) -> float:
    """The step budget that applies to this engine (module docstring: override, planner, tokens)."""
    budget, source = _step_flops_budget_and_source(vllm_config, spec)
    tokens = budget / (2 * matmul_params_per_token(spec))
    in_tokens = (f"{tokens:.0f} tokens of linear work" if tokens < UNBOUNDED_STEP_TOKENS
                 else "no bound in practice: the engine's token budget alone limits a step")
    logger.info("zeroprefill: step budget %.3g FLOPs per rank (%s; %s)", budget, source, in_tokens)
    return budget


def _step_flops_budget_and_source(vllm_config, spec: MoEModelSpec) -> tuple[float, str]:
    configured = _configured_budget(vllm_config)
    if configured is not None:
        return configured, "configured"
    planned = planned_step_flops_budget(vllm_config, spec)
    if planned:
        return planned, "planner saturation budget"
    max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
    return float(2 * max_tokens * matmul_params_per_token(spec)), "--max-num-batched-tokens"


def planned_step_flops_budget(vllm_config, spec: MoEModelSpec) -> float:
    """The planner's saturation budget of this AsyncEP deployment; 0 where none applies.

    The GPU is what vLLM's platform reports (through NVML on CUDA, so the engine core creates
    no CUDA context); the group is the data-parallel ranks, one GPU each, in one node.
    """
    from vllm.platforms import current_platform

    if vllm_config.kernel_config.moe_backend != ASYNCEP or not current_platform.is_cuda():
        return 0.0  # no weight gather to hide, or no GPU a profile describes
    from vllm_zeroprefill.validation import expert_weight_dtype

    device_name = current_platform.get_device_name()
    num_ranks = vllm_config.parallel_config.data_parallel_size
    context = min(vllm_config.model_config.max_model_len, DEFAULT_CONTEXT_TOKENS)
    try:
        budget = step_flops_budget_on_gpus(spec, device_name, num_ranks, context, dtype=expert_weight_dtype(vllm_config))
    except (HardwareProfileError, PlanError) as exc:
        logger.warning("zeroprefill: no saturation budget for %d x %s (%s); the step budget is a full "
                       "token budget's FLOPs, set %s to change it", num_ranks, device_name, exc, BUDGET_ENV)
        return 0.0
    return budget or 0.0


def _configured_budget(vllm_config) -> float | None:
    """The user's budget (additional config, then the environment), validated; None if unset."""
    additional = vllm_config.additional_config or {}
    configured = additional.get(ADDITIONAL_CONFIG_KEY, {}).get("step_flops_budget") if isinstance(additional, dict) else None
    if configured is None:
        return configured_step_flops_budget()
    return parse_step_flops_budget(configured, f"--additional-config {ADDITIONAL_CONFIG_KEY}.step_flops_budget")


class PrefillOnlySchedulerMixin:
    """Offers vLLM's scheduling scan only the requests :func:`plan_prefill_step` admits."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm_zeroprefill.validation import model_spec_of

        self.model_spec = model_spec_of(self.vllm_config)
        self.step_flops_budget = resolve_step_flops_budget(self.vllm_config, self.model_spec)
        self.head_tokens = lm_head_tokens(self.vllm_config.model_config.runner_type)
        self.last_plan: StepPlan | None = None

    def schedule(self, *args, **kwargs):
        waiting = list(self.waiting)
        if not waiting:
            return super().schedule(*args, **kwargs)
        by_id = {request.request_id: request for request in waiting}
        plan = plan_prefill_step([_WaitingRequest(self, r) for r in waiting], self.step_flops_budget,
                                 self._in_flight_flops(), self._token_budget())
        self.last_plan = plan
        self.waiting.remove_requests(waiting)
        for request_id in plan.admitted:
            self.waiting.add_request(by_id[request_id])
        try:
            return super().schedule(*args, **kwargs)
        finally:
            for request_id in plan.deferred:
                self.waiting.add_request(by_id[request_id])

    def _in_flight_flops(self) -> int:
        """FLOPs of the rest of every running (partially prefilled) request."""
        return sum(
            request_flops(self.model_spec, r.num_tokens, r.num_computed_tokens, self.head_tokens)
            for r in self.running
            if r.num_computed_tokens < r.num_tokens
        )

    def _token_budget(self) -> int:
        """Prompt tokens this step can give waiting requests: vLLM's token budget less the rest
        of every running (partially prefilled) request, which vLLM schedules first."""
        budget = getattr(self, "max_num_scheduled_tokens", None) or self.scheduler_config.max_num_batched_tokens
        return max(0, budget - sum(r.num_tokens - r.num_computed_tokens for r in self.running
                                   if r.num_computed_tokens < r.num_tokens))


class _WaitingRequest:
    """A waiting request as :func:`plan_prefill_step` sees it, priced (a prefix-cache lookup
    and the cost model) only when the policy offers it."""

    def __init__(self, scheduler: PrefillOnlySchedulerMixin, request: Request) -> None:
        self._scheduler = scheduler
        self._request = request
        self.request_id = request.request_id
        self.prefix_key = request.block_hashes[0] if request.block_hashes else None

    @cached_property
    def cached_tokens(self) -> int:
        request, manager = self._request, self._scheduler.kv_cache_manager
        cached = request.num_computed_tokens
        if request.block_hashes and prefix_cache_lookup_enabled(manager, request):
            _, hit_tokens, _ = manager.coordinator.find_longest_cache_hit(request.block_hashes, request.num_tokens - 1)
            cached = max(cached, hit_tokens)
        return cached

    @cached_property
    def flops(self) -> int:
        scheduler = self._scheduler
        return request_flops(scheduler.model_spec, self._request.num_tokens, self.cached_tokens, scheduler.head_tokens)

    @cached_property
    def tokens(self) -> int:
        return self._request.num_tokens - self.cached_tokens


class PrefillOnlyScheduler(PrefillOnlySchedulerMixin, Scheduler):
    """``--scheduler-cls vllm_zeroprefill.scheduler.PrefillOnlyScheduler``."""


class AsyncPrefillOnlyScheduler(PrefillOnlySchedulerMixin, AsyncScheduler):
    """The same policy over vLLM's asynchronous scheduler (``--async-scheduling``)."""
