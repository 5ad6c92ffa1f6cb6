"""The peer transport: an aiohttp server for `POST /v1/envelope` and one shared client session for sending.

The server enforces the limits that must hold before a byte of an envelope is looked at: body size
(413 before reading), a deadline for reading a request, caps on concurrent connections per remote
address and in total, and an idle deadline for connections that never send a request (slow-loris).
What an envelope means is the caller's business: the server hands the bytes to an `EnvelopeHandler`.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

CONTENT_TYPE = "application/x-meshd-envelope"
ENVELOPE_PATH = "/v1/envelope"


@dataclass(frozen=True)
class Reply:
    """What a handler answers: a status, and an envelope (200), nothing (204) or a JSON error."""

    status: int
    body: bytes = b""
    content_type: str = CONTENT_TYPE

    @classmethod
    def error(cls, status: int, reason: str, detail: str = "") -> Reply:
        return cls(status, json.dumps({"error": reason, "detail": detail}).encode(), "application/json")


EnvelopeHandler = Callable[[bytes, str], Awaitable[Reply]]
RejectHook = Callable[[str, str], None]  # (reason, remote address) for transport-level rejections


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int
    read_timeout_s: float
    max_connections_per_ip: int
    max_connections: int = 512
    keepalive_s: float = 15.0


class PeerServer:
    """Owns the peer listener; `start()` binds, `stop()` closes every connection."""

    def __init__(
        self, host: str, port: int, limits: ServerLimits, handler: EnvelopeHandler, on_reject: RejectHook
    ) -> None:
        self._host, self._port = host, port
        self._limits = limits
        self._handler = handler
        self._on_reject = on_reject
        self._runner: web.AppRunner | None = None
        self._site: _GuardedSite | None = None

    @property
    def port(self) -> int:
        return self._site.port if self._site else self._port

    async def start(self) -> None:
        app = web.Application(client_max_size=self._limits.max_body_bytes, handler_args={"max_field_size": 8190})
        app.router.add_post(ENVELOPE_PATH, self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, keepalive_timeout=self._limits.keepalive_s
        )
        await self._runner.setup()
        self._site = _GuardedSite(self._runner, self._host, self._port, self._limits, self._on_reject)
        await self._site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _not_found(self, request: web.Request) -> web.Response:
        return _as_response(Reply.error(404, "not_found", f"use POST {ENVELOPE_PATH}"))

    async def _handle(self, request: web.Request) -> web.Response:
        remote = request.remote or "?"
        if self._site is not None:
            self._site.mark_served(request.transport)
        declared = request.content_length
        if declared is not None and declared > self._limits.max_body_bytes:
            self._on_reject("too_large", remote)
            return _as_response(Reply.error(413, "too_large", f"limit is {self._limits.max_body_bytes} bytes"))
        try:
            async with asyncio.timeout(self._limits.read_timeout_s):
                data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._on_reject("too_large", remote)
            return _as_response(Reply.error(413, "too_large", f"limit is {self._limits.max_body_bytes} bytes"))
        except TimeoutError:
            self._on_reject("read_timeout", remote)
            return _as_response(Reply.error(408, "read_timeout", "request body too slow"))
        except (aiohttp.ClientError, ConnectionError, ValueError):
            self._on_reject("malformed", remote)
            return _as_response(Reply.error(400, "malformed", "could not read request body"))
        reply = await self._handler(data, remote)
        return _as_response(reply)


def _as_response(reply: Reply) -> web.Response:
    if reply.status == 204:
        return web.Response(status=204)
    return web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)


class _GuardedSite(web.TCPSite):
    """A TCPSite whose protocol factory enforces connection caps and a first-request deadline."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        limits: ServerLimits,
        on_reject: RejectHook,
    ) -> None:
        super().__init__(runner, host, port, shutdown_timeout=2.0, reuse_address=True)
        self._limits = limits
        self._on_reject = on_reject
        self._per_ip: defaultdict[str, int] = defaultdict(int)
        self._total = 0
        self._guards: dict[int, _GuardProtocol] = {}

    async def start(self) -> None:
        # Same as TCPSite.start, with the protocol factory wrapped.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = await loop.create_server(
            lambda: self._wrap(server()),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    def _wrap(self, proto: Any) -> asyncio.Protocol:
        return _GuardProtocol(self, proto)

    def admit(self, ip: str) -> bool:
        if self._per_ip[ip] >= self._limits.max_connections_per_ip or self._total >= self._limits.max_connections:
            self._on_reject("too_many_connections", ip)
            return False
        self._per_ip[ip] += 1
        self._total += 1
        return True

    def release(self, ip: str) -> None:
        self._per_ip[ip] -= 1
        self._total -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    def mark_served(self, transport: Any) -> None:
        guard = self._guards.get(id(transport))
        if guard is not None:
            guard.served()


class _GuardProtocol(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler (which has __slots__, so it cannot be patched) and adds
    the per-address connection cap and a deadline for the first request (slow-loris)."""

    def __init__(self, site: _GuardedSite, inner: Any) -> None:
        self._site = site
        self._inner = inner
        self._ip: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        if not self._site.admit(ip):
            transport.close()
            return
        self._ip = ip
        self._transport = transport
        self._site._guards[id(transport)] = self
        self._timer = asyncio.get_running_loop().call_later(
            self._site._limits.read_timeout_s, self._deadline
        )
        self._inner.connection_made(transport)

    def served(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline(self) -> None:
        # No complete request within the deadline: close. Later idle periods are bounded by
        # aiohttp's keep-alive timeout, which closes a connection that has not started a new request.
        self._timer = None
        if self._transport is not None:
            self._site._on_reject("read_timeout", self._ip or "?")
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.served()
        if self._ip is None:
            return
        self._site.release(self._ip)
        self._site._guards.pop(id(self._transport), None)
        self._ip = None
        self._transport = None
        self._inner.connection_lost(exc)


@dataclass(frozen=True)
class ClientLimits:
    connect_timeout_s: float
    request_timeout_s: float
    retries: int
    max_response_bytes: int


class SendError(Exception):
    """A send failed at the transport level after every retry (no HTTP answer)."""


class PeerClient:
    """One shared aiohttp session for every outgoing envelope; bounded retries with jittered backoff."""

    def __init__(self, limits: ClientLimits, rng: random.Random | None = None) -> None:
        self._limits = limits
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=self._limits.request_timeout_s, sock_connect=self._limits.connect_timeout_s
        )
        # At most 2 connections per peer: receivers cap connections per source address, and peers behind
        # one NAT (or one host) share an address.
        connector = aiohttp.TCPConnector(limit=64, limit_per_host=2, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, raise_for_status=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, address: str, envelope: bytes) -> tuple[int, bytes, int]:
        """POST one envelope; returns (status, response body, attempts). Raises SendError if nothing answered.

        Retries resend the *same* bytes: if an earlier attempt did arrive, the receiver's replay guard
        answers 409 'replayed', which the caller reads as "delivered".
        """
        if self._session is None:
            raise SendError("client not started")
        url = f"http://{address}{ENVELOPE_PATH}"
        last: Exception | None = None
        for attempt in range(1, self._limits.retries + 2):
            try:
                async with self._session.post(
                    url, data=envelope, headers={"Content-Type": CONTENT_TYPE}
                ) as resp:
                    if resp.content_length is not None and resp.content_length > self._limits.max_response_bytes:
                        return 413, b"", attempt
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        body += chunk
                        if len(body) > self._limits.max_response_bytes:
                            return 413, b"", attempt
                    return resp.status, bytes(body), attempt
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = exc
                if attempt <= self._limits.retries:
                    await asyncio.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + self._rng.random()))
        raise SendError(f"{type(last).__name__}: {last}" if last else "send failed")
