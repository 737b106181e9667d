"""A zero-latency fake engine replica: the minimal HTTP/1.1 server the router can front.

For the router's tests and its overhead benchmark (``benchmarks/router_overhead.py``): it
answers in microseconds, so whatever latency a client sees through the router is the router's.
Raw asyncio protocol, keep-alive, no framework:

- ``GET /health`` -> 200 (503 while ``healthy`` is False); ``GET /v1/models`` -> one model,
  ``owned_by`` the configured kind;
- ``POST`` to any other path -> a canned OpenAI-style embedding response whose numbers are a
  function of the request body and path (so pass-through can be checked byte for byte), after
  ``delay_s`` if set.

    python -m zeroprefill.router.fake_backend --port 9001 [--kind vllm|sglang] [--delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import zlib


def canned_response(path: str, body: bytes, model: str) -> bytes:
    """The answer to a POST: deterministic in (path, body), independent of the backend."""
    checksum = zlib.crc32(path.encode() + body)
    payload = {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": 0, "embedding": [checksum % 997 / 997.0, len(body) / 1e4]}],
        "usage": {"prompt_tokens": len(body), "total_tokens": len(body)},
    }
    return json.dumps(payload, separators=(",", ":")).encode()


class FakeBackend:
    """State shared by the connections of one fake replica."""

    def __init__(self, model: str = "fake-model", kind: str = "vllm", delay_s: float = 0.0) -> None:
        self.model = model
        self.kind = kind
        self.delay_s = delay_s
        self.healthy = True
        self.requests_served = 0
        self.paths_seen: dict[str, int] = {}
        self.transports: set[asyncio.Transport] = set()
        self.server: asyncio.Server | None = None
        models = {"object": "list", "data": [{"id": model, "object": "model", "owned_by": kind}]}
        self._models_body = json.dumps(models).encode()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def kill(self) -> None:
        """Die like a crashed process: stop listening and reset every open connection."""
        assert self.server is not None
        self.server.close()
        for transport in list(self.transports):
            transport.abort()
        await self.server.wait_closed()

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if method == "GET" and path == "/health":
            return (200, b"") if self.healthy else (503, b'{"error":"unhealthy"}')
        if method == "GET" and path == "/v1/models":
            return 200, self._models_body
        if method == "POST":
            self.requests_served += 1
            self.paths_seen[path] = self.paths_seen.get(path, 0) + 1
            return 200, canned_response(path, body, self.model)
        return 404, b'{"error":"not found"}'


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection (Content-Length bodies, no chunking, no pipelining)."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.transports.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(self.buffer[:head_end]).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < head_end + 4 + length:
                return
            body = bytes(self.buffer[head_end + 4 : head_end + 4 + length])
            del self.buffer[: head_end + 4 + length]
            status, payload = self.backend.answer(method, path.split("?", 1)[0], body)
            if self.backend.delay_s and method == "POST":
                asyncio.get_running_loop().call_later(self.backend.delay_s, self._send, status, payload)
            else:
                self._send(status, payload)

    def _send(self, status: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "Error")
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )


async def _serve(args: argparse.Namespace) -> None:
    backend = FakeBackend(args.model, args.kind, args.delay_ms / 1000.0)
    port = await backend.start(args.host, args.port)
    print(f"fake backend on http://{args.host}:{port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--kind", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
