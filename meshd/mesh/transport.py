"""The peer transport: an aiohttp server for `POST /v1/envelope` and one shared client session for sending.

The server enforces the limits that must hold before a byte of an envelope is looked at: body size
(413 before reading), no content encoding (415, never inflated), a deadline for reading a request, a
global budget of body bytes held for connections that have not yet carried an authenticated envelope
(503 ``busy`` beyond it, before the body is read), caps on concurrent connections per remote address and in
total (at the total cap the oldest idle unauthenticated connection is closed to make room; connections that
carried an authenticated envelope are kept), and an idle deadline for connections that never send a
request (slow-loris). What an envelope means is the caller's business: the server hands the bytes to an
`EnvelopeHandler`, whose `Reply` says whether the envelope was authenticated.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

CONTENT_TYPE = "application/x-meshd-envelope"
ENVELOPE_PATH = "/v1/envelope"
# Bodies up to this size are not counted against the unauthenticated budget: pings, pulls and leaves stay
# possible when it is used up, and what they hold is bounded by the connection cap (512 x 64 KiB = 32 MiB).
SMALL_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Reply:
    """What a handler answers: a status, and an envelope (200), nothing (204) or a JSON error."""

    status: int
    body: bytes = b""
    content_type: str = CONTENT_TYPE
    # The envelope passed the sender's signature and the replay check: its connection is a trusted peer's
    # from now on (bodies on it are not counted against the unauthenticated budget, and it is never evicted).
    authenticated: bool = False

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
    max_connections: int = 512  # in total; at the cap the oldest idle unauthenticated connection is closed
    keepalive_s: float = 15.0
    max_pending_bytes: int = 0  # body bytes held for unauthenticated connections at once; 0: 2 x max_body_bytes

    @property
    def pending_budget(self) -> int:
        return self.max_pending_bytes or 2 * self.max_body_bytes


class PeerServer:
    """Owns the peer listener; `start()` binds, `stop()` closes every connection."""

    def __init__(
        self, host: str, port: int, limits: ServerLimits, handler: EnvelopeHandler, on_reject: RejectHook
    ) -> None:
        self._host, self._port = host, port
        self._limits = limits
        self._handler = handler
        self._on_reject = on_reject
        self._budget = _Budget(limits.pending_budget)
        self._runner: web.AppRunner | None = None
        self._site: _GuardedSite | None = None

    @property
    def port(self) -> int:
        return self._site.port if self._site else self._port

    async def start(self) -> None:
        app = web.Application(client_max_size=self._limits.max_body_bytes, handler_args={"max_field_size": 8190})
        app.router.add_post(ENVELOPE_PATH, self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # auto_decompress=False: a Content-Encoding body is refused (415) as it came, never inflated (a gzip
        # bomb of 0.25 MiB inflates to 256 MiB before any handler could look at it).
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, keepalive_timeout=self._limits.keepalive_s,
            auto_decompress=False,
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

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        guard = self._site.guard_of(request.transport) if self._site is not None else None
        if guard is not None:
            guard.request_started()
        try:
            return await self._serve(request, request.remote or "?", guard)
        finally:
            if guard is not None:
                guard.request_finished()

    async def _serve(self, request: web.Request, remote: str, guard: _GuardProtocol | None) -> web.StreamResponse:
        limits = self._limits
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            self._on_reject("unsupported_encoding", remote)
            return _as_response(Reply.error(415, "unsupported_encoding",
                                            "send the envelope as it is: no Content-Encoding"))
        declared = request.content_length
        if declared is not None and declared > limits.max_body_bytes:
            self._on_reject("too_large", remote)
            return _as_response(Reply.error(413, "too_large", f"limit is {limits.max_body_bytes} bytes"))
        trusted = guard is not None and guard.authenticated
        held = _Hold(None if trusted else self._budget)
        try:
            if declared is not None and not held.grow_to(declared):
                return await self._refuse_busy(request, remote)
            try:
                async with asyncio.timeout(limits.read_timeout_s):
                    data = await self._read_body(request, declared, held)
            except _OverBudget:
                return await self._refuse_busy(request, remote)
            except _TooLarge:
                self._on_reject("too_large", remote)
                return _as_response(Reply.error(413, "too_large", f"limit is {limits.max_body_bytes} bytes"))
            except TimeoutError:
                self._on_reject("read_timeout", remote)
                return _as_response(Reply.error(408, "read_timeout", "request body too slow"))
            except (aiohttp.ClientError, RequestPayloadError, ConnectionError, ValueError):
                self._on_reject("malformed", remote)
                return _as_response(Reply.error(400, "malformed", "could not read request body"))
            reply = await self._handler(data, remote)
            del data
            if reply.authenticated and guard is not None:
                guard.authenticate()
            return _as_response(reply)
        finally:
            held.release()

    async def _read_body(self, request: web.Request, declared: int | None, held: _Hold) -> bytes:
        """The whole body, never more than the limit, every byte beyond ``SMALL_BODY_BYTES`` held in the budget
        before it is kept (a chunked body grows its hold as it arrives)."""
        limit = self._limits.max_body_bytes
        if declared is not None:  # already held in full; aiohttp never delivers more than Content-Length
            buf = bytearray(declared)
            pos = 0
            while pos < declared:
                chunk = await request.content.readany()
                if not chunk:
                    raise ValueError("body shorter than its Content-Length")
                buf[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
            return bytes(buf)
        chunks: list[bytes] = []
        total = 0
        while chunk := await request.content.readany():
            total += len(chunk)
            if total > limit:
                raise _TooLarge
            if not held.grow_to(total):
                raise _OverBudget
            chunks.append(chunk)
        return b"".join(chunks)

    async def _refuse_busy(self, request: web.Request, remote: str) -> web.StreamResponse:
        """503 ``busy`` now, then close the connection: the body is not read (nor drained, as aiohttp would)."""
        self._on_reject("busy", remote)
        resp = _as_response(Reply.error(503, "busy", "too many unauthenticated bytes in flight here; retry later"))
        resp.force_close()
        await resp.prepare(request)
        await resp.write_eof()
        if request.transport is not None:
            request.transport.close()  # after the answer is flushed; the unread body is dropped
        return resp


def _as_response(reply: Reply) -> web.Response:
    if reply.status == 204:
        return web.Response(status=204)
    return web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)


class _TooLarge(Exception):
    pass


class _OverBudget(Exception):
    pass


class _Budget:
    """Body bytes held at once for unauthenticated connections, across all of them (loop thread only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class _Hold:
    """One request's share of the budget: its body size beyond ``SMALL_BODY_BYTES`` is counted in full
    (``budget=None``: a trusted connection, nothing is counted)."""

    def __init__(self, budget: _Budget | None) -> None:
        self._budget = budget
        self._bytes = 0

    def grow_to(self, size: int) -> bool:
        if self._budget is None or size <= SMALL_BODY_BYTES or size <= self._bytes:
            return True
        if not self._budget.take(size - self._bytes):
            return False
        self._bytes = size
        return True

    def release(self) -> None:
        if self._budget is not None:
            self._budget.give(self._bytes)
        self._bytes = 0


class _GuardedSite(web.TCPSite):
    """A TCPSite whose protocol factory enforces connection caps and a first-request deadline.

    At the total cap a new connection is not refused: the oldest unauthenticated connection that is between
    requests (or, if none is, the oldest unauthenticated one) is closed to make room, so an address flood
    cannot lock trusted peers out. Connections that carried an authenticated envelope are never closed here.
    """

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
        # Unauthenticated connections, least recently active first (moved to the end when a request ends).
        self._unauthenticated: OrderedDict[_GuardProtocol, None] = OrderedDict()

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

    def admit(self, guard: _GuardProtocol, ip: str) -> bool:
        if self._per_ip[ip] >= self._limits.max_connections_per_ip:
            self._on_reject("too_many_connections", ip)
            return False
        if self._total >= self._limits.max_connections:
            victim = self._victim()
            if victim is None:  # every connection is a trusted peer's
                self._on_reject("too_many_connections", ip)
                return False
            self._on_reject("evicted", victim.ip or "?")
            victim.evict()
        self._per_ip[ip] += 1
        self._total += 1
        self._unauthenticated[guard] = None
        return True

    def _victim(self) -> _GuardProtocol | None:
        for guard in self._unauthenticated:
            if not guard.busy:
                return guard
        return next(iter(self._unauthenticated), None)

    def release(self, guard: _GuardProtocol, ip: str) -> None:
        self._per_ip[ip] -= 1
        self._total -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        self._unauthenticated.pop(guard, None)

    def authenticated(self, guard: _GuardProtocol) -> None:
        self._unauthenticated.pop(guard, None)

    def active(self, guard: _GuardProtocol) -> None:
        if guard in self._unauthenticated:
            self._unauthenticated.move_to_end(guard)

    def guard_of(self, transport: Any) -> _GuardProtocol | None:
        return self._guards.get(id(transport))


class _GuardProtocol(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler (which has __slots__, so it cannot be patched) and adds
    the connection caps, a deadline for the first request (slow-loris), and what the site needs to pick
    a connection to close at the cap (is a request in progress, did it carry an authenticated envelope)."""

    def __init__(self, site: _GuardedSite, inner: Any) -> None:
        self._site = site
        self._inner = inner
        self.ip: str | None = None  # set while the connection holds a slot
        self.busy = False
        self.authenticated = False
        self._admitted = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        if not self._site.admit(self, ip):
            transport.close()
            return
        self.ip = ip
        self._admitted = True
        self._transport = transport
        self._site._guards[id(transport)] = self
        self._timer = asyncio.get_running_loop().call_later(
            self._site._limits.read_timeout_s, self._deadline
        )
        self._inner.connection_made(transport)

    def request_started(self) -> None:
        self.busy = True
        self._cancel_timer()

    def request_finished(self) -> None:
        self.busy = False
        self._site.active(self)

    def authenticate(self) -> None:
        self.authenticated = True
        self._site.authenticated(self)

    def evict(self) -> None:
        """Give the slot back now (the site admits a new connection in it) and close."""
        transport = self._transport
        self._release()
        if transport is not None:
            transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline(self) -> None:
        # No complete request within the deadline: close. Later idle periods are bounded by
        # aiohttp's keep-alive timeout, which closes a connection that has not started a new request.
        self._timer = None
        if self._transport is not None:
            self._site._on_reject("read_timeout", self.ip or "?")
            self._transport.close()

    def _release(self) -> None:
        self._cancel_timer()
        if self.ip is not None:
            self._site.release(self, self.ip)
            self.ip = None

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._release()
        if not self._admitted:
            return
        self._admitted = False
        self._site._guards.pop(id(self._transport), None)
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
