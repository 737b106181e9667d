"""Minimal HTTP/1.1 for the gateway's hot path: an asyncio server and a keep-alive client pool.

The router only moves small JSON bodies between a client and a replica, so a framework's
per-request machinery (request/response objects, middleware, header multidicts, stream
readers) dominates its cost. This module is the lean replacement, on ``httptools`` (the
llhttp parser uvicorn uses) and raw ``asyncio.Protocol``\\ s::

    client --TCP--> ServerConnection (httptools request parser)
                      -> handler(method, path, headers, body) -> Response   (one task each)
                      <- status line + headers + body in one write (keep-alive, in order)
    UpstreamPool (per backend: idle keep-alive connections, opened on demand)
        request(method, path, body, headers) -> UpstreamResponse(status, headers, body)

Server: HTTP/1.1 and 1.0, keep-alive, chunked request bodies (decoded by the parser),
``Expect: 100-continue``, pipelined requests answered in order. Client: one request per connection at a time;
responses with ``Content-Length``, chunked or close-delimited bodies; a request that fails on a
*reused* idle connection before any answer arrived (the peer closed it meanwhile) is sent once
more on a fresh connection — safe here because prefill-only requests are idempotent. No TLS.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

import httptools

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
#: Backend headers not relayed as extra headers: the gateway frames the message itself
#: (content type and length are written by :func:`encode_response`).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
                        b"content-type", b"date", b"server"})


@dataclass(slots=True)
class Response:
    """What a handler answers: status, body, content type, extra headers (name, value)."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


Handler = Callable[[bytes, str, dict[bytes, bytes], bytes], Awaitable[Response]]


class ServerConnection(asyncio.Protocol):
    """One client connection of the gateway's server."""

    def __init__(self, handler: Handler, connections: set[ServerConnection]) -> None:
        self._handler = handler
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._pending: deque[tuple[bytes, bytes, dict[bytes, bytes], bytes, bool]] = deque()
        self._task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()  # the client is gone: the handler releases what it holds

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(b"protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(f"malformed HTTP request: {exc}".encode())

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ----------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        # curl sends bodies over 1 KiB only after "100 Continue" (or a 1 s wait).
        if self._headers.get(b"expect", b"").lower() == b"100-continue" and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = (self._parser.get_method(), self._url, self._headers, body, self._parser.should_keep_alive())
        if self._task is None:
            self._start(request)
        else:  # pipelined behind a request still being answered
            self._pending.append(request)

    # ----------------------------------------------------------------- internals

    def _start(self, request: tuple[bytes, bytes, dict[bytes, bytes], bytes, bool]) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(*request))

    async def _serve(self, method: bytes, url: bytes, headers: dict[bytes, bytes], body: bytes,
                     keep_alive: bool) -> None:
        path = url.split(b"?", 1)[0].decode("latin-1")
        response = await self._handler(method, path, headers, body)
        self._task = None
        if self._transport is None:
            return
        self._transport.write(encode_response(response, keep_alive))
        if not keep_alive:
            self._transport.close()
        elif self._pending:
            self._start(self._pending.popleft())

    def _fail(self, message: bytes) -> None:
        if self._transport is not None:
            self._transport.write(encode_response(Response(400, message, b"text/plain"), False))
            self._transport.close()


def encode_response(response: Response, keep_alive: bool = True) -> bytes:
    """The response's bytes: status line, headers, ``Content-Length`` framing, body."""
    parts = [b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
        response.status, _REASONS.get(response.status, b"Unknown"), response.content_type, len(response.body))]
    for name, value in response.headers:
        parts.append(b"%s: %s\r\n" % (name, value))
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(response.body)
    return b"".join(parts)


async def serve(handler: Handler, host: str, port: int) -> tuple[asyncio.Server, set[ServerConnection]]:
    """Listen on ``host:port`` (0: any free port); returns the server and its live connections."""
    connections: set[ServerConnection] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: ServerConnection(handler, connections), host, port, reuse_address=True, backlog=2048)
    return server, connections


# ------------------------------------------------------------------------------- client


@dataclass(slots=True)
class UpstreamResponse:
    """A backend's answer: status, headers as (lower-case name, value), body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class UpstreamClosed(ConnectionError):
    """The backend closed (or reset) the connection before answering."""


class _UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a backend, one request at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.received_any = False
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            try:  # a close-delimited body ends here
                self._parser.feed_data(b"")
            except httptools.HttpParserError:
                pass
            if not waiter.done():
                waiter.set_exception(UpstreamClosed(f"connection closed before the answer ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(UpstreamClosed(f"malformed answer: {exc}"))
            self.close()

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        if not self._parser.should_keep_alive():
            self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(UpstreamResponse(self._parser.get_status_code(), self._headers, body))
        if self.closed:
            self.close()

    def send(self, data: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None and self._waiter is None
        self.received_any = False
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections to one backend (``http://host:port``), opened on demand.

    Up to ``max_idle`` idle connections are kept for reuse; more may be open at once under
    load (one per request in flight).
    """

    def __init__(self, url: str, max_idle: int = 256) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"backend URL {url!r} is not http://HOST[:PORT]; the router speaks plain HTTP")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.base_path = parts.path.rstrip("/").encode()
        self.max_idle = max_idle
        self._host_header = f"host: {parts.netloc}\r\n".encode()
        self._idle: list[_UpstreamConnection] = []

    async def request(self, method: bytes, path: str, body: bytes = b"",
                      headers: bytes = b"") -> UpstreamResponse:
        """Send one request; ``headers`` are extra ``name: value\\r\\n`` lines."""
        data = b"%s %s%s HTTP/1.1\r\n%scontent-length: %d\r\n%s\r\n%s" % (
            method, self.base_path, path.encode(), self._host_header, len(body), headers, body)
        while self._idle:
            connection = self._idle.pop()
            if connection.closed:
                continue
            try:
                return await self._exchange(connection, data)
            except UpstreamClosed:
                if connection.received_any:
                    raise
                # A stale idle connection (closed by the backend meanwhile): try a fresh one.
                break
        connection = await self._connect()
        return await self._exchange(connection, data)

    async def _connect(self) -> _UpstreamConnection:
        _, connection = await asyncio.get_running_loop().create_connection(
            _UpstreamConnection, self.host, self.port)
        return connection

    async def _exchange(self, connection: _UpstreamConnection, data: bytes) -> UpstreamResponse:
        try:
            response = await connection.send(data)
        except BaseException:
            connection.close()  # an answer may still come: the connection is unusable
            raise
        if not connection.closed and len(self._idle) < self.max_idle:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
