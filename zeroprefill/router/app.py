"""The gateway: places each prefill-only request with the policy and relays it to a replica.

Per routed request (``/v1/embeddings``, ``/pooling``, ``/classify``, ``/score``, ``/rerank``
and their ``/v1`` forms)::

    [parse JSON (orjson), check model]  -> 400/404 without forwarding
    [tokenise: prompts.py]              -> 400 if a prompt is over the model's length
    [RouterPolicy.submit]               -> Placement now, or wait in the global queue
    [forward the raw body (unchanged) over the backend's keep-alive pool]
       ok / 4xx / 500 -> relay it; RouterPolicy.complete -> wake queued requests
       connection error or 502/503/504 -> backend marked unhealthy, RouterPolicy.fail,
                                  resubmit elsewhere (prefill-only requests are idempotent)
    [request timeout]                   -> 504

``/v1/models`` is passed to any healthy backend; ``/health`` is the router's own (200 while a
backend is healthy); ``/metrics`` is the router's Prometheus text (``metrics.py``). The HTTP
layer on both sides is ``http.py`` (asyncio protocols on ``httptools``), not a framework: at
a few thousand requests per second per core a framework's per-request objects were the cost.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import orjson

from zeroprefill.common.cost_model import endpoint_runner, lm_head_tokens
from zeroprefill.common.model_spec import MoEModelSpec
from zeroprefill.common.prefix_index import block_hashes
from zeroprefill.common.router_policy import Placement, PromptShape, RoutedRequest, RouterPolicy
from zeroprefill.router import http
from zeroprefill.router.backends import Backend, BackendPool
from zeroprefill.router.kv_events import KVEventFeed, KVEventIndexer
from zeroprefill.router.metrics import RouterMetrics
from zeroprefill.router.prompts import (
    ROUTED_PATHS,
    BadRequest,
    PromptTokenizer,
    request_prompts,
)

logger = logging.getLogger(__name__)

#: Backend answers that mean "this replica cannot serve now": retried on another one.
RETRY_STATUSES = frozenset({502, 503, 504})
_JSON_CONTENT_TYPE = b"content-type: application/json\r\n"


@dataclass(frozen=True)
class RouterConfig:
    """What the gateway needs besides the backends."""

    spec: MoEModelSpec
    tokenizer: PromptTokenizer
    max_model_len: int
    bound_flops: float
    saturation_flops: float = 0.0
    flops_per_s: float = 0.0  # a replica's effective compute rate; 0: rank by FLOPs alone
    block_size: int = 16
    cache_capacity_blocks: int = 1 << 16
    max_batch_tokens: int | None = None  # the engines' --max-num-batched-tokens
    request_timeout_s: float = 300.0
    max_retries: int = 3
    served_model_names: tuple[str, ...] = ()
    kv_event_endpoints: tuple[tuple[str, ...], ...] = ()  # per backend, its DP ranks' ZMQ endpoints


class _NoBackend(Exception):
    """Every replica is unhealthy or has failed this request."""


class RouterApp:
    """Holds the policy, the backend pool and the metrics; serves HTTP with :meth:`handle`."""

    def __init__(self, config: RouterConfig, pool: BackendPool) -> None:
        self.config = config
        self.pool = pool
        self.policy = RouterPolicy(
            config.spec,
            [config.bound_flops] * len(pool.backends),
            [config.saturation_flops] * len(pool.backends),
            block_size=config.block_size,
            cache_capacity_blocks=config.cache_capacity_blocks,
            flops_per_s=[config.flops_per_s] * len(pool.backends) if config.flops_per_s else (),
            max_batch_tokens=config.max_batch_tokens,
        )
        for backend in pool.backends:
            self.policy.set_healthy(backend.index, backend.healthy)
        pool.on_health_change = self._on_health_change
        self.metrics = RouterMetrics()
        self.kv_events: KVEventFeed | None = None
        if config.kv_event_endpoints:
            indexer = KVEventIndexer(self.policy.index, config.block_size)
            self.kv_events = KVEventFeed(indexer, config.kv_event_endpoints)
        self._waiters: dict[str, asyncio.Future[Placement]] = {}
        self._ids = itertools.count()
        self._expired: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None
        self._connections: set[http.ServerConnection] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Probe the backends, then listen on ``host:port`` (0: a free port); returns the port."""
        await self.pool.start()
        try:
            if self.kv_events is not None:
                await self.kv_events.start()
            self._server, self._connections = await http.serve(self.handle, host, port)
        except BaseException:
            await self.close()
            raise
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.close()
            await self._server.wait_closed()
        if self.kv_events is not None:
            await self.kv_events.close()
        await self.pool.close()

    async def handle(self, method: bytes, path: str, headers: dict[bytes, bytes], body: bytes) -> http.Response:
        """Every HTTP request the gateway receives."""
        if path in ROUTED_PATHS:
            if method != b"POST":
                return _error(405, f"{path} takes POST", "MethodNotAllowed")
            return await self.handle_routed(path, headers, body)
        if method != b"GET":
            return _error(405 if path in _GET_PATHS else 404, f"no {method.decode()} {path}", "NotFoundError")
        if path == "/health":
            return self.handle_health()
        if path == "/metrics":
            kv_stats = self.kv_events.indexer.stats if self.kv_events is not None else None
            return http.Response(200, self.metrics.render(self.policy, self.pool, kv_stats).encode(), b"text/plain")
        if path == "/v1/models":
            return await self.handle_models()
        return _error(404, f"no route {path}", "NotFoundError")

    # --------------------------------------------------------------------------- handlers

    def handle_health(self) -> http.Response:
        healthy = sum(b.healthy for b in self.pool.backends)
        return http.Response(200 if healthy else 503, orjson.dumps(
            {"healthy_backends": healthy, "backends": len(self.pool.backends)}))

    async def handle_models(self) -> http.Response:
        backend = self.pool.any_healthy()
        if backend is None:
            return _error(503, "no healthy backend")
        try:
            response = await backend.upstream.request(b"GET", "/v1/models")
        except OSError as exc:  # ConnectionError included
            self.pool.mark(backend, False, f"{type(exc).__name__}: {exc}")
            return _error(502, f"backend {backend.url} failed: {exc}")
        return _relay(response)

    async def handle_routed(self, path: str, headers: dict[bytes, bytes], body: bytes) -> http.Response:
        arrival_s = time.perf_counter()
        try:
            routed = self._parse(path, body, arrival_s)
        except BadRequest as exc:
            return self._answer(path, arrival_s, _error(400, str(exc)))
        except _UnknownModel as exc:
            return self._answer(path, arrival_s, _error(404, str(exc), "NotFoundError"))
        task = asyncio.current_task()
        assert task is not None
        timer = asyncio.get_running_loop().call_later(self.config.request_timeout_s, self._expire, task)
        try:
            response = await self._dispatch_and_forward(routed, path, body, headers)
        except asyncio.CancelledError:
            self._abandon(routed.request_id)
            if task not in self._expired:
                raise  # the client went away
            self._expired.discard(task)
            response = _error(504, f"request timed out after {self.config.request_timeout_s} s "
                                   "(raise --request-timeout-s)", "TimeoutError")
        except _NoBackend as exc:
            response = _error(503, str(exc), "ServiceUnavailableError")
        except BadRequest as exc:
            response = _error(400, str(exc))
        finally:
            timer.cancel()
        return self._answer(path, arrival_s, response)

    # --------------------------------------------------------------------------- internals

    def _expire(self, task: asyncio.Task) -> None:
        self._expired.add(task)
        task.cancel()

    def _answer(self, path: str, arrival_s: float, response: http.Response) -> http.Response:
        self.metrics.requests[(path, response.status)] += 1
        self.metrics.latency_s.observe(time.perf_counter() - arrival_s)
        return response

    def _parse(self, path: str, body: bytes, arrival_s: float) -> RoutedRequest:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
        model = payload.get("model")
        known = self.pool.model_ids | set(self.config.served_model_names)
        if model is not None and known and model not in known:
            raise _UnknownModel(f"The model `{model}` does not exist; served: {sorted(known)}")
        prompts = request_prompts(path, payload, self.config.tokenizer)
        truncate = payload.get("truncate_prompt_tokens")
        head_tokens = lm_head_tokens(endpoint_runner(path))
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
        self, routed: RoutedRequest, path: str, body: bytes, headers: dict[bytes, bytes]
    ) -> http.Response:
        excluded: frozenset[int] = frozenset()
        forward_headers = _JSON_CONTENT_TYPE
        authorization = headers.get(b"authorization")
        if authorization is not None:
            forward_headers += b"authorization: " + authorization + b"\r\n"
        for attempt in range(self.config.max_retries + 1):
            placement = await self._place(routed, excluded)
            backend = self.pool.backends[placement.replica]
            backend_path = backend.path_for(path)
            if backend_path is None:
                self._finish(routed.request_id, failed=True)
                raise BadRequest(f"{backend.kind} backends have no {path} endpoint; use /v1/embeddings")
            try:
                response = await backend.upstream.request(b"POST", backend_path, body, forward_headers)
                if response.status in RETRY_STATUSES:
                    raise _BackendUnavailable(f"{backend_path} answered {response.status}")
            except (OSError, _BackendUnavailable) as exc:  # ConnectionError included
                self.pool.mark(backend, False, f"{type(exc).__name__}: {exc}")
                self._finish(routed.request_id, failed=True)
                excluded = excluded | {placement.replica}
                self.metrics.retries_total += attempt < self.config.max_retries
                continue
            except asyncio.CancelledError:
                self._finish(routed.request_id, failed=True)
                raise
            self._finish(routed.request_id, failed=False)
            return _relay(response)
        raise _NoBackend(f"every attempt failed ({self.config.max_retries + 1} tries)")

    async def _place(self, routed: RoutedRequest, excluded: frozenset[int]) -> Placement:
        healthy = {b.index for b in self.pool.backends if b.healthy}
        if not healthy:
            raise _NoBackend("no healthy backend")
        if healthy <= excluded:
            excluded = frozenset()  # every healthy replica failed it once: let any try again
        dispatched = self.policy.submit(routed, excluded)
        if dispatched and dispatched[0][0] is routed:  # placed at once: no need to wait
            self._wake(dispatched[1:])
            self.metrics.queue_wait_s.observe(time.perf_counter() - routed.arrival_s)
            return dispatched[0][1]
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[routed.request_id] = waiter
        try:
            self._wake(dispatched)
            placement = await waiter
        finally:
            self._waiters.pop(routed.request_id, None)
        self.metrics.queue_wait_s.observe(time.perf_counter() - routed.arrival_s)
        return placement

    def _finish(self, request_id: str, failed: bool) -> None:
        now_s = time.perf_counter()  # the clock the policy's step estimates run on
        finish = self.policy.fail if failed else self.policy.complete
        self._wake(finish(request_id, now_s))

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
                self._wake(self.policy.fail(routed.request_id, time.perf_counter()))

    def _on_health_change(self, backend: Backend) -> None:
        self._wake(self.policy.set_healthy(backend.index, backend.healthy, time.perf_counter()))


class _UnknownModel(Exception):
    pass


class _BackendUnavailable(Exception):
    pass


_GET_PATHS = frozenset({"/health", "/metrics", "/v1/models"})


def _relay(response: http.UpstreamResponse) -> http.Response:
    """The backend's answer as the client will get it: status, body and headers unchanged."""
    content_type = b"application/json"
    headers = []
    for name, value in response.headers:
        if name == b"content-type":
            content_type = value
        elif name not in http.HOP_BY_HOP:
            headers.append((name, value))
    return http.Response(response.status, response.body, content_type, tuple(headers))


def _error(status: int, message: str, kind: str = "BadRequestError") -> http.Response:
    return http.Response(status, orjson.dumps(
        {"error": {"message": message, "type": kind, "code": status}, "object": "error"}))
