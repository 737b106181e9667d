"""The engine replicas behind the router: one keep-alive HTTP pool, health checks, dialects.

Each :class:`Backend` is one engine replica (a vLLM or SGLang server, itself possibly a DP /
AsyncEP group). :class:`BackendPool` owns one keep-alive connection pool per backend
(:class:`~zeroprefill.router.http.UpstreamPool`) and a background loop that probes every backend's
``/health``; a failed probe or a connection error on a forwarded request marks a backend
unhealthy, and the next successful probe brings it back. Probing ``/v1/models`` on the first
success learns the served model names and the engine kind (``owned_by``: ``vllm`` or
``sglang``) when ``--backend-kind auto``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from zeroprefill.router.http import UpstreamPool, UpstreamResponse

logger = logging.getLogger(__name__)

BACKEND_KINDS = ("auto", "vllm", "sglang")

#: Client paths whose SGLang equivalent has another name (SGLang serves score/rerank
#: under /v1 only); ``None``: SGLang has no such endpoint.
_SGLANG_PATHS: dict[str, str | None] = {
    "/score": "/v1/score",
    "/rerank": "/v1/rerank",
    "/pooling": None,
}


@dataclass
class Backend:
    """One replica: where it is, what it speaks, whether it is serving."""

    index: int
    url: str
    kind: str = "auto"
    upstream: UpstreamPool = field(init=False, repr=False)
    healthy: bool = False
    model_ids: tuple[str, ...] = ()
    consecutive_failures: int = 0
    last_error: str = ""
    health_transitions: int = 0

    def __post_init__(self) -> None:
        self.upstream = UpstreamPool(self.url)

    def path_for(self, path: str) -> str | None:
        """The backend's path for a client path, or ``None`` if its engine has none."""
        if self.kind == "sglang":
            return _SGLANG_PATHS.get(path, path)
        return path


class BackendPool:
    """Backends (each with its keep-alive connection pool) and the health-check loop.

    ``on_health_change(backend)`` is called whenever a backend turns healthy or unhealthy.
    """

    def __init__(
        self,
        urls: list[str],
        kind: str = "auto",
        health_interval_s: float = 1.0,
        health_timeout_s: float = 2.0,
        on_health_change: Callable[[Backend], None] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("give at least one --backend URL")
        if kind not in BACKEND_KINDS:
            raise ValueError(f"unknown backend kind {kind!r}; choose one of {BACKEND_KINDS}")
        self.backends = [Backend(i, url.rstrip("/"), kind) for i, url in enumerate(urls)]
        self.auto_kind = kind == "auto"
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.on_health_change = on_health_change
        self._health_task: asyncio.Task[None] | None = None
        self._next_passthrough = 0

    async def start(self) -> None:
        await self.check_all()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
        for backend in self.backends:
            backend.upstream.close()

    @property
    def model_ids(self) -> set[str]:
        return {m for b in self.backends for m in b.model_ids}

    def any_healthy(self) -> Backend | None:
        """A healthy backend, rotating, for pass-through requests that need no placement."""
        n = len(self.backends)
        for step in range(n):
            backend = self.backends[(self._next_passthrough + step) % n]
            if backend.healthy:
                self._next_passthrough = (backend.index + 1) % n
                return backend
        return None

    def mark(self, backend: Backend, healthy: bool, error: str = "") -> None:
        if healthy:
            backend.consecutive_failures = 0
        else:
            backend.consecutive_failures += 1
            backend.last_error = error
        if backend.healthy != healthy:
            backend.healthy = healthy
            backend.health_transitions += 1
            logger.log(logging.INFO if healthy else logging.WARNING, "backend %s is now %s%s",
                       backend.url, "healthy" if healthy else "UNHEALTHY", f" ({error})" if error else "")
            if self.on_health_change is not None:
                self.on_health_change(backend)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def check(self, backend: Backend) -> None:
        transitions_at_start = backend.health_transitions
        try:
            response = await self._get(backend, "/health")
            ok = response.status == 200
            error = "" if ok else f"/health answered {response.status}"
            if ok and not backend.model_ids:
                await self._describe(backend)
        except (ConnectionError, asyncio.TimeoutError, OSError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if ok and backend.health_transitions != transitions_at_start:
            # The backend changed state while this probe was in flight (e.g. a forwarded
            # request failed on it): a 200 sent before that is stale evidence, not recovery.
            return
        self.mark(backend, ok, error)

    async def _get(self, backend: Backend, path: str) -> UpstreamResponse:
        return await asyncio.wait_for(backend.upstream.request(b"GET", path), self.health_timeout_s)

    async def _describe(self, backend: Backend) -> None:
        """Learn served model names and, with ``auto``, the engine kind from ``/v1/models``."""
        response = await self._get(backend, "/v1/models")
        if response.status != 200:
            return
        try:
            payload = json.loads(response.body)
        except ValueError:
            return
        models = payload.get("data", []) if isinstance(payload, dict) else []
        backend.model_ids = tuple(str(m["id"]) for m in models if isinstance(m, dict) and "id" in m)
        if self.auto_kind:
            owners = {str(m.get("owned_by", "")).lower() for m in models if isinstance(m, dict)}
            backend.kind = "sglang" if "sglang" in owners else "vllm"

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_all()
