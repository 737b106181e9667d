"""``--load-balance-method zeroprefill``: SGLang's DP controller dispatching with our policy.

SGLang's ``DataParallelController`` picks a DP rank per tokenized request through
``self.dispatching`` (built from ``LoadBalanceMethod`` in ``__init__``). An ``AFTER`` hook on
``__init__`` replaces it with :meth:`ZeroPrefillLoadBalancer.dispatch` when the zeroprefill
method was resolved (see :mod:`sglang_zeroprefill.args`)::

    [TokenizedEmbeddingReqInput / TokenizedGenerateReqInput: rid, input_ids]
        -> routed_dp_rank set?  -> that rank (SGLang's external-routing contract)
        -> [observe: retire finished requests from the schedulers' load snapshots]
        -> [RouterPolicy.submit: true FLOPs per rank (prefix hits predicted by the block
            index), earliest finish above the saturation threshold, prefix affinity below it]
        -> sock_send(worker of that rank)

The policy (``zeroprefill.common.router_policy.RouterPolicy``) is the same object the gateway
drives; this module only translates SGLang's objects into its terms.

What differs from the gateway: SGLang's controller never sees a request finish (outputs go
scheduler -> detokenizer -> tokenizer manager), so completions are inferred from the load
snapshots every scheduler publishes (``num_running_reqs + num_waiting_reqs``): on a rank that
reports ``n`` requests in its system at time ``t``, all but the ``n`` most recent requests we
sent it before ``t`` have finished (prefill-only requests leave roughly in arrival order; a
scheduler that reorders them makes this an approximation of *which* finished, never of how
many). And the controller has no timer of its own to release held-back work, so the policy
runs with an unbounded outstanding-FLOPs bound: every request is dispatched at once and waits,
if it must, in its rank's scheduler queue. The saturation threshold still shapes placement.

Per-rank saturation threshold: ``ZEROPREFILL_SATURATION_FLOPS`` when set; else, under
``--moe-a2a-backend asyncep`` on GPUs with a shipped hardware profile (H100, H200, named by
NVML), the planner's (:func:`zeroprefill.common.saturation.step_flops_budget` at headroom 1 for
the DP ranks, one GPU each: the checkpoint's expert format, bf16 or block FP8, the transport the
runtime picks, 2048-token prompts); else 0 (no tie zone). A request's cost includes the LM head as
:func:`zeroprefill.common.cost_model.lm_head_tokens` decides: embedding requests none,
generate requests (SGLang's ``/v1/score``) their last position. Other knob:
``ZEROPREFILL_PREFIX_BLOCK_TOKENS`` (prefix-index granularity, default ``max(page_size, 16)``).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from zeroprefill.common.cost_model import lm_head_tokens
from zeroprefill.common.hardware import HardwareProfileError
from zeroprefill.common.model_spec import MoEModelSpec, read_hf_config, stored_weight_dtype
from zeroprefill.common.saturation import DEFAULT_CONTEXT_TOKENS, PlanError, step_flops_budget_on_gpus
from zeroprefill.common.prefix_index import block_hashes
from zeroprefill.common.router_policy import PromptShape, RoutedRequest, RouterPolicy

from sglang_zeroprefill.args import asyncep_enabled, zeroprefill_load_balance_enabled

logger = logging.getLogger(__name__)

SATURATION_ENV = "ZEROPREFILL_SATURATION_FLOPS"
BLOCK_TOKENS_ENV = "ZEROPREFILL_PREFIX_BLOCK_TOKENS"
#: Least time between two reads of the load snapshots (SGLang's own balancer uses 20 ms).
SNAPSHOT_REFRESH_S = 0.02


class ZeroPrefillLoadBalancer:
    """Chooses a DP rank per request with :class:`RouterPolicy`; infers completions.

    Args:
        spec: the served model.
        num_ranks: DP ranks the controller dispatches to.
        block_tokens: prefix-index block size in tokens.
        saturation_flops: per-rank saturation threshold (FLOPs of outstanding work that hides
            the expert-weight stream; :func:`planned_saturation_flops`); 0 disables the tie zone.
        clock: wall-clock seconds, comparable with the snapshots' ``timestamp``.
    """

    def __init__(
        self,
        spec: MoEModelSpec,
        num_ranks: int,
        block_tokens: int,
        saturation_flops: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = RouterPolicy(
            spec,
            bound_flops=[math.inf] * num_ranks,
            saturation_flops=[saturation_flops] * num_ranks,
            block_size=block_tokens,
        )
        self.block_tokens = block_tokens
        self.clock = clock
        # Per rank, (request id, dispatch time) of requests not yet seen finished, oldest first.
        self._sent: list[collections.deque[tuple[str, float]]] = [collections.deque() for _ in range(num_ranks)]
        self._last_snapshot_s = [0.0] * num_ranks

    @property
    def num_ranks(self) -> int:
        return self.policy.num_replicas

    def choose(
        self,
        request_id: str,
        input_ids: Sequence[int],
        active_ranks: Iterable[int] | None = None,
        runner: str = "generate",
    ) -> int:
        """The rank for one request; records it as outstanding there.

        ``runner``: what answers the request, ``"generate"`` (SGLang's default request) or
        ``"pooling"`` (an embedding request); it decides whether the LM head is charged.
        """
        now = self.clock()
        active = set(range(self.num_ranks) if active_ranks is None else active_ranks)
        for rank in range(self.num_ranks):
            self.policy.set_healthy(rank, rank in active)
        tokens = list(input_ids)
        prompt = PromptShape(len(tokens), tuple(block_hashes(tokens, self.block_tokens)), lm_head_tokens(runner))
        routed = RoutedRequest(request_id, [prompt], arrival_s=now)
        dispatched = self.policy.submit(routed)
        placement = next(p for r, p in dispatched if r.request_id == request_id)
        self._sent[placement.replica].append((request_id, now))
        return placement.replica

    def observe(self, snapshots: Iterable[Any]) -> int:
        """Retire requests the ranks' load snapshots show finished; returns how many."""
        retired = 0
        for snapshot in snapshots:
            rank = snapshot.dp_rank
            if not 0 <= rank < self.num_ranks or snapshot.timestamp <= self._last_snapshot_s[rank]:
                continue
            self._last_snapshot_s[rank] = snapshot.timestamp
            sent = self._sent[rank]
            sent_before = sum(1 for _, sent_s in sent if sent_s <= snapshot.timestamp)
            in_system = snapshot.num_running_reqs + snapshot.num_waiting_reqs
            for _ in range(max(sent_before - in_system, 0)):
                request_id, _ = sent.popleft()
                self.policy.complete(request_id)
                retired += 1
        return retired

    def outstanding_flops(self) -> list[int]:
        return [load.outstanding_flops for load in self.policy.replicas]


def model_for_planning(model_path: str) -> tuple[MoEModelSpec, str]:
    """The served model's spec and its experts' stored format (``"fp8"`` for a block-FP8
    checkpoint, else ``"bf16"``), from a local checkpoint folder or a Hugging Face model id."""
    if Path(model_path).exists():
        config = read_hf_config(model_path)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path).to_dict()
    return MoEModelSpec.from_hf_config(config), stored_weight_dtype(config) or "bf16"


def build_for_controller(controller: Any) -> ZeroPrefillLoadBalancer:
    """A balancer for ``controller``'s DP ranks and model (environment knobs applied)."""
    from sglang.srt.arg_groups.overrides import resolved_view

    view = resolved_view(controller.server_args)
    page_size = view.page_size or 1
    block_tokens = int(os.environ.get(BLOCK_TOKENS_ENV, max(page_size, 16)))
    spec, expert_dtype = model_for_planning(view.model_path)
    num_ranks = controller.max_dp_size
    if os.environ.get(SATURATION_ENV):
        saturation_flops = float(os.environ[SATURATION_ENV])
    else:
        saturation_flops = planned_saturation_flops(spec, num_ranks, local_gpu_name(), expert_dtype)
    logger.info("zeroprefill DP balancer: saturation threshold %.3g FLOPs per rank", saturation_flops)
    return ZeroPrefillLoadBalancer(spec, num_ranks=num_ranks, block_tokens=block_tokens, saturation_flops=saturation_flops)


def planned_saturation_flops(spec: MoEModelSpec, num_ranks: int, device_name: str | None,
                             expert_dtype: str = "bf16") -> float:
    """The planner's per-rank saturation threshold of this AsyncEP deployment with ``expert_dtype``
    experts (``"bf16"`` or ``"fp8"``: FP8 streams half the bytes); 0 where none applies (no
    AsyncEP, one rank, no GPU or one without a shipped profile)."""
    if not asyncep_enabled() or not device_name:
        return 0.0
    try:
        budget = step_flops_budget_on_gpus(spec, device_name, num_ranks, DEFAULT_CONTEXT_TOKENS, headroom=1.0,
                                           dtype=expert_dtype)
    except (HardwareProfileError, PlanError) as exc:
        logger.warning("zeroprefill DP balancer: no planned saturation threshold for %d x %s (%s); "
                       "set %s to give one", num_ranks, device_name, exc, SATURATION_ENV)
        return 0.0
    return budget or 0.0


def local_gpu_name() -> str | None:
    """The first GPU's name from NVML (no CUDA context in the controller), or None without one."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    finally:
        pynvml.nvmlShutdown()
    return name.decode() if isinstance(name, bytes) else name


def after_controller_init(result: Any, controller: Any, *args: Any, **kwargs: Any) -> Any:
    """``AFTER`` hook on ``DataParallelController.__init__``."""
    if zeroprefill_load_balance_enabled():
        install(controller, build_for_controller(controller))
    return result


def install(controller: Any, balancer: ZeroPrefillLoadBalancer) -> None:
    """Route ``controller``'s requests through ``balancer``."""
    from sglang.srt.managers.io_struct import TokenizedEmbeddingReqInput, sock_send

    last_refresh = [0.0]

    def dispatch(req: Any) -> None:
        if controller.maybe_external_dp_rank_routing(req):
            return
        now = time.perf_counter()
        if now - last_refresh[0] >= SNAPSHOT_REFRESH_S:
            last_refresh[0] = now
            balancer.observe(controller.load_snapshot_reader.read_all())
        runner = "pooling" if isinstance(req, TokenizedEmbeddingReqInput) else "generate"
        rank = balancer.choose(req.rid, req.input_ids, controller._active_workers, runner)
        sock_send(controller.workers[rank], req)

    controller.zeroprefill_balancer = balancer
    controller.dispatching = dispatch
    logger.info("DP load balancing: zeroprefill (true FLOPs, prefix-aware) over %d ranks", balancer.num_ranks)
