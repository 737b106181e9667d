"""The gateway: an aiohttp server that places each prefill-only request with the policy.

Per routed request (``/v1/embeddings``, ``/pooling``, ``/classify``, ``/score``, ``/rerank``
and their ``/v1`` forms)::

    [parse JSON, check model]  -> 400/404 without forwarding
    [tokenise: prompts.py]     -> 400 if a prompt is over the model's length
    [RouterPolicy.submit]      -> Placement now, or wait in the global queue
    [forward the raw body over the keep-alive pool to the chosen backend]
       ok / 4xx / 500 -> relay it; RouterPolicy.complete -> wake queued requests
       connection error or 503 -> backend marked unhealthy, RouterPolicy.fail,
                                  resubmit elsewhere (prefill-only requests are idempotent)
    [request timeout]          -> 504

``/v1/models`` is passed to any healthy backend; ``/health`` is the router's own (200 while a
backend is healthy); ``/metrics`` is the router's Prometheus text (``metrics.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.prefix_index import block_hashes
from zeroprefill.common.router_policy import Placement, PromptShape, RoutedRequest, RouterPolicy
from zeroprefill.router.backends import Backend, BackendPool
from zeroprefill.router.metrics import RouterMetrics
from zeroprefill.router.prompts import (
    EMBEDDING_LIKE_PATHS,
    ROUTED_PATHS,
    BadRequest,
    PromptTokenizer,
    request_prompts,
)

logger = logging.getLogger(__name__)

#: Backend answers that mean "this replica cannot serve now": retried on another one.
RETRY_STATUSES = frozenset({502, 503, 504})
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host",
                         "content-encoding"})


@dataclass(frozen=True)
class RouterConfig:
    """What the gateway needs besides the backends."""

    spec: MoEModelSpec
    tokenizer: PromptTokenizer
    max_model_len: int
    bound_flops: float
    saturation_flops: float = 0.0
    block_size: int = 16
    cache_capacity_blocks: int = 1 << 16
    request_timeout_s: float = 300.0
    max_retries: int = 3
    served_model_names: tuple[str, ...] = ()


class _NoBackend(Exception):
    """Every replica is unhealthy or has failed this request."""


class RouterApp:
    """Holds the policy, the backend pool and the metrics; builds the aiohttp application."""

    def __init__(self, config: RouterConfig, pool: BackendPool) -> None:
        self.config = config
        self.pool = pool
        self.policy = RouterPolicy(
            config.spec,
            [config.bound_flops] * len(pool.backends),
            [config.saturation_flops] * len(pool.backends),
            block_size=config.block_size,
            cache_capacity_blocks=config.cache_capacity_blocks,
        )
        for backend in pool.backends:
            self.policy.set_healthy(backend.index, backend.healthy)
        pool.on_health_change = self._on_health_change
        self.metrics = RouterMetrics()
        self._waiters: dict[str, asyncio.Future[Placement]] = {}
        self._ids = itertools.count()

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in sorted(ROUTED_PATHS):
            app.router.add_post(path, self.handle_routed)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        await self.pool.start()

    async def _stop(self, _: web.Application) -> None:
        await self.pool.close()

    # --------------------------------------------------------------------------- handlers

    async def handle_health(self, _: web.Request) -> web.Response:
        healthy = sum(b.healthy for b in self.pool.backends)
        return web.json_response(
            {"healthy_backends": healthy, "backends": len(self.pool.backends)},
            status=200 if healthy else 503,
        )

    async def handle_metrics(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(self.policy, self.pool), content_type="text/plain")

    async def handle_models(self, request: web.Request) -> web.Response:
        backend = self.pool.any_healthy()
        if backend is None:
            return _error(503, "no healthy backend")
        assert self.pool.session is not None
        try:
            async with self.pool.session.get(backend.url + "/v1/models") as response:
                return await _relay(response)
        except (aiohttp.ClientError, OSError) as exc:
            self.pool.mark(backend, False, f"{type(exc).__name__}: {exc}")
            return _error(502, f"backend {backend.url} failed: {exc}")

    async def handle_routed(self, request: web.Request) -> web.StreamResponse:
        arrival_s = time.perf_counter()
        path = request.path
        body = await request.read()
        try:
            routed = self._parse(path, body, arrival_s)
        except BadRequest as exc:
            return self._answer(path, arrival_s, _error(400, str(exc)))
        except _UnknownModel as exc:
            return self._answer(path, arrival_s, _error(404, str(exc), "NotFoundError"))
        try:
            response = await asyncio.wait_for(
                self._dispatch_and_forward(routed, path, body, request.headers),
                self.config.request_timeout_s,
            )
        except asyncio.TimeoutError:
            self._abandon(routed.request_id)
            response = _error(504, f"request timed out after {self.config.request_timeout_s} s "
                                   "(raise --request-timeout-s)", "TimeoutError")
        except _NoBackend as exc:
            response = _error(503, str(exc), "ServiceUnavailableError")
        except BadRequest as exc:
            response = _error(400, str(exc))
        except asyncio.CancelledError:  # the client went away
            self._abandon(routed.request_id)
            raise
        return self._answer(path, arrival_s, response)

    # --------------------------------------------------------------------------- internals

    def _answer(self, path: str, arrival_s: float, response: web.StreamResponse) -> web.StreamResponse:
        self.metrics.requests[(path, response.status)] += 1
        self.metrics.latency_s.observe(time.perf_counter() - arrival_s)
        return response

    def _parse(self, path: str, body: bytes, arrival_s: float) -> RoutedRequest:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
        model = payload.get("model")
        known = self.pool.model_ids | set(self.config.served_model_names)
        if model is not None and known and model not in known:
            raise _UnknownModel(f"The model `{model}` does not exist; served: {sorted(known)}")
        prompts = request_prompts(path, payload, self.config.tokenizer)
        truncate = payload.get("truncate_prompt_tokens")
        head_tokens = 0 if path in EMBEDDING_LIKE_PATHS and path != "/classify" else 1
        shapes = []
        for ids in prompts:
            if isinstance(truncate, int) and 0 < truncate < len(ids):
                ids = ids[-truncate:]
            elif len(ids) > self.config.max_model_len:
                raise BadRequest(
                    f"a prompt has {len(ids)} tokens, over the model's maximum of "
                    f"{self.config.max_model_len}; shorten it or set truncate_prompt_tokens"
                )
            shapes.append(PromptShape(len(ids), tuple(block_hashes(ids, self.config.block_size)), head_tokens))
        return RoutedRequest(f"r{next(self._ids)}", shapes, arrival_s)

    async def _dispatch_and_forward(
        self, routed: RoutedRequest, path: str, body: bytes, headers
    ) -> web.StreamResponse:
        excluded: frozenset[int] = frozenset()
        forward_headers = {"Content-Type": "application/json"}
        if "Authorization" in headers:
            forward_headers["Authorization"] = headers["Authorization"]
        for attempt in range(self.config.max_retries + 1):
            placement = await self._place(routed, excluded)
            backend = self.pool.backends[placement.replica]
            backend_path = backend.path_for(path)
            if backend_path is None:
                self._finish(routed.request_id, failed=True)
                raise BadRequest(f"{backend.kind} backends have no {path} endpoint; use /v1/embeddings")
            assert self.pool.session is not None
            try:
                async with self.pool.session.post(
                    backend.url + backend_path, data=body, headers=forward_headers
                ) as response:
                    if response.status in RETRY_STATUSES:
                        await response.read()
                        raise _BackendUnavailable(f"{backend_path} answered {response.status}")
                    relayed = await _relay(response)
            except (aiohttp.ClientError, OSError, _BackendUnavailable) as exc:
                self.pool.mark(backend, False, f"{type(exc).__name__}: {exc}")
                self._finish(routed.request_id, failed=True)
                excluded = excluded | {placement.replica}
                self.metrics.retries_total += attempt < self.config.max_retries
                continue
            except asyncio.CancelledError:
                self._finish(routed.request_id, failed=True)
                raise
            self._finish(routed.request_id, failed=False)
            return relayed
        raise _NoBackend(f"every attempt failed ({self.config.max_retries + 1} tries)")

    async def _place(self, routed: RoutedRequest, excluded: frozenset[int]) -> Placement:
        healthy = {b.index for b in self.pool.backends if b.healthy}
        if not healthy:
            raise _NoBackend("no healthy backend")
        if healthy <= excluded:
            excluded = frozenset()  # every healthy replica failed it once: let any try again
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[routed.request_id] = waiter
        try:
            self._wake(self.policy.submit(routed, excluded))
            placement = await waiter
        finally:
            self._waiters.pop(routed.request_id, None)
        self.metrics.queue_wait_s.observe(time.perf_counter() - routed.arrival_s)
        return placement

    def _finish(self, request_id: str, failed: bool) -> None:
        dispatched = self.policy.fail(request_id) if failed else self.policy.complete(request_id)
        self._wake(dispatched)

    def _abandon(self, request_id: str) -> None:
        """A timed-out request: take it out of the queue or release its FLOPs."""
        if not self.policy.cancel(request_id) and self.policy.placement_of(request_id) is not None:
            self._finish(request_id, failed=True)

    def _wake(self, dispatched: list[tuple[RoutedRequest, Placement]]) -> None:
        for routed, placement in dispatched:
            waiter = self._waiters.get(routed.request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(placement)
            else:  # its client is gone: give the slot back
                self._wake(self.policy.fail(routed.request_id))

    def _on_health_change(self, backend: Backend) -> None:
        self._wake(self.policy.set_healthy(backend.index, backend.healthy))


class _UnknownModel(Exception):
    pass


class _BackendUnavailable(Exception):
    pass


async def _relay(response: aiohttp.ClientResponse) -> web.Response:
    payload = await response.read()
    headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
    return web.Response(body=payload, status=response.status, headers=headers)


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}, "object": "error"}, status=status
    )
