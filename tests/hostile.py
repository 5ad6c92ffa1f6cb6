"""A hostile trusted domain for tests and bench/robustness.py: meshd's own wire and codec, lying in its shares.

``HostileDomain`` holds a real identity (trusted by the honest domains' registry), listens on a loopback
port with aiohttp, answers pings with valid pongs (so the honest domains see it alive and gossip with it),
acknowledges every share sent to it (204: the honest sender gives that mass away; while attacking it answers no
push-pull request with a share, a sink) and keeps the latest model of each honest sender as its view of the
mesh. Every ``interval_s`` it sends each honest domain a ``share``
built by its attack, sealed and encrypted with ``meshd.core.wire`` exactly as a daemon would. Attacks
(``ATTACKS``), after the epfml byzantine-robust decentralized optimizer repository and the issue's list:

- ``none``: behaves: forwards the mean of its view (what a lagging honest domain would send), and answers
  push-pull requests with it;
- ``scaled``: the mean of its view times ``-1e3`` (``scale``), clamped to ``limits.max_param_abs``;
- ``signflip``: minus the mean of its view;
- ``alie``: a little is enough (Baruch et al. 2019): mean - ``z_max`` x the per-coordinate std of its view;
- ``ipm``: inner-product manipulation (Xie et al. 2020): ``-epsilon`` x the mean (``epsilon`` 0.5);
- ``dissensus``: per target, the target's own model pushed away from the mean of its view
  (``x_j + eps (x_j - mean)``, eps 1.5), which drives honest domains apart;
- ``weight``: the mean of its view with the largest weight a receiver accepts (trusted + 1);
- ``version``: the mean of its view with version ``2**53`` (the largest accepted);
- ``pull``: sends a ``pull`` to every honest domain every round and throws the answer (and its mass) away;
- ``replay``: re-sends its own first model (the view mean at its first round), with that round's version, in
  fresh envelopes.

Every other attack's share carries the newest version the attacker has seen (what an honest domain would
send), so a receiver cannot tell it from an honest share by its version; ``version`` lies about it.

The harness runs its own event loop in one thread (``start`` / ``stop``: stop joins it); counters of what it
sent and how it was answered are in ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import torch
from aiohttp import web

from meshd import identity as identitymod
from meshd.core import codec as codecmod
from meshd.core.replay import ReplayGuard
from meshd.core.wire import Limits, Wire, decode_body, encode_body
from meshd.errors import WireError

ATTACKS = ("none", "scaled", "signflip", "alie", "ipm", "dissensus", "weight", "version", "pull", "replay")


@dataclass
class HonestPeer:
    peer_id: bytes
    port: int


@dataclass
class HostileStats:
    sent: Counter[str] = field(default_factory=Counter)  # kind -> envelopes sent
    answers: Counter[str] = field(default_factory=Counter)  # "kind status reason" -> count
    received: int = 0


class HostileDomain:
    """A trusted domain that attacks (see the module docstring); ``attack`` may be changed while it runs."""

    def __init__(self, ident: identitymod.Identity, port: int, domain: str, peers: list[HonestPeer], *,
                 fp: str, schema: str, count: int, attack: str = "scaled", interval_s: float = 0.5,
                 task: str = "default", codec: codecmod.CodecName = "f32", max_param_abs: float = 1e6,
                 scale: float = -1e3) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r} (one of {', '.join(ATTACKS)})")
        self.ident, self.port, self.domain, self.peers = ident, port, domain, peers
        self.fp, self.schema, self.count, self.task, self.codec = fp, schema, count, task, codec
        self.attack, self.interval_s, self.max_param_abs, self.scale = attack, interval_s, max_param_abs, scale
        self.stats = HostileStats()
        self.view: dict[bytes, torch.Tensor] = {}
        self.newest_version = 0  # the highest version seen in honest shares
        self._first: tuple[torch.Tensor, int] | None = None
        self._wire = Wire(ident, Limits())
        self._guard = ReplayGuard()
        self._seq = int(time.time() * 1000)  # above anything a previous run of this identity used
        self._trusted = {p.peer_id for p in peers}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run_thread, name=f"hostile-{self.domain}")
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("hostile domain did not start")
        if self._error is not None:
            raise RuntimeError(f"hostile domain failed: {self._error}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _run_thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start() or by the caller's checks
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/envelope", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                self._ready.set()
                while not self._stop.is_set():
                    await self._round(session)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.interval_s)
        finally:
            await runner.cleanup()

    # --- receiving ----------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        data = await request.read()
        try:
            opened = self._wire.open(data, int(time.time() * 1000), lambda pk: pk in self._trusted, self._guard)
            body = decode_body(opened.body, Limits())
        except WireError as exc:
            return web.json_response({"error": exc.reason, "detail": exc.detail}, status=exc.status)
        if opened.kind == "ping":
            pong = {"domain": self.domain, "tasks": [{"name": self.task, "fp": self.fp, "schema": self.schema}],
                    "fp": self.fp, "schema": self.schema}
            env = self._seal(opened.sender, "pong", pong)
            return web.Response(status=200, body=env, content_type="application/x-meshd-envelope")
        if opened.kind == "share" and body.get("count") == self.count and body.get("codec") in codecmod.CODECS:
            with contextlib.suppress(codecmod.CodecError, TypeError):
                self.view[opened.sender] = codecmod.decode(body["values"], self.count, body["codec"])
                self.stats.received += 1
                if type(body.get("version")) is int:
                    self.newest_version = max(self.newest_version, body["version"])
            weight = body.get("weight")
            if self.attack == "none" and body.get("reply") is True and isinstance(weight, float | int):
                # Behaving: a push-pull answer, as an honest domain's (the mean of its view, at most the
                # weight that came in).
                answer = self._share_body(self._mean_of_view(), min(float(weight), 0.5), self.newest_version)
                env = self._seal(opened.sender, "model", answer)
                return web.Response(status=200, body=env, content_type="application/x-meshd-envelope")
            return web.Response(status=204)  # acknowledged: the honest sender gives this mass away, none back
        if opened.kind == "leave":
            return web.Response(status=204)
        return web.json_response({"error": "not_ready", "detail": "hostile"}, status=503)

    # --- sending ------------------------------------------------------------------------------------------

    def _seal(self, to: bytes, kind: str, body: dict[str, Any]) -> bytes:
        self._seq += 1
        return self._wire.seal(to, kind, encode_body(body), self._seq, int(time.time() * 1000))

    def _mean_of_view(self) -> torch.Tensor:
        return torch.stack(list(self.view.values())).mean(0).to(torch.float64)

    def _share_body(self, vals: torch.Tensor, weight: float, version: int) -> dict[str, Any]:
        return {"task": self.task, "fp": self.fp, "schema": self.schema, "version": version, "weight": weight,
                "codec": self.codec, "count": self.count, "values": codecmod.encode(vals, self.codec),
                "domain": self.domain}

    def craft(self, target: bytes) -> tuple[torch.Tensor, float, int] | None:
        """(values, weight, version) of the share the attack sends to ``target``; None before any view."""
        if not self.view:
            return None
        if self._first is None:
            self._first = torch.stack(list(self.view.values())).mean(0), self.newest_version
        return craft(self.attack, list(self.view.values()), self.view.get(target), self._first,
                     receivers_trusted=len(self.peers) + 1, version=self.newest_version, scale=self.scale,
                     max_abs=self.max_param_abs)

    async def _round(self, session: aiohttp.ClientSession) -> None:
        if self.attack == "pull":
            await asyncio.gather(*(self._send(session, p, "pull", {"task": self.task, "fp": self.fp,
                                                                  "schema": self.schema}) for p in self.peers))
            return
        jobs = []
        for p in self.peers:
            crafted = self.craft(p.peer_id)
            if crafted is None:
                continue
            jobs.append(self._send(session, p, "share", self._share_body(*crafted)))
        await asyncio.gather(*jobs)

    async def _send(self, session: aiohttp.ClientSession, peer: HonestPeer, kind: str, body: dict[str, Any]) -> None:
        env = self._seal(peer.peer_id, kind, body)
        self.stats.sent[kind] += 1
        try:
            async with session.post(f"http://127.0.0.1:{peer.port}/v1/envelope", data=env,
                                    headers={"Content-Type": "application/x-meshd-envelope"}) as resp:
                text = await resp.read()
                reason = ""
                if resp.status >= 400:
                    with contextlib.suppress(ValueError, AttributeError):
                        reason = str(json.loads(text).get("error", ""))
                self.stats.answers[f"{kind} {resp.status} {reason}".strip()] += 1
        except (aiohttp.ClientError, TimeoutError, OSError):
            self.stats.answers[f"{kind} error"] += 1


def craft(attack: str, view: list[torch.Tensor], target_model: torch.Tensor | None,
          first: tuple[torch.Tensor, int] | None, *, receivers_trusted: int, version: int = 1, scale: float = -1e3,
          max_abs: float = 1e6) -> tuple[torch.Tensor, float, int]:
    """The share an attack sends: (values, weight, version). ``view``: the honest models the attacker has seen
    (at least one); ``target_model``: the receiver's own model if seen; ``first``: the attacker's first model and
    its version; ``receivers_trusted``: how many peers the receiver trusts (its weight cap is that + 1);
    ``version``: the newest version seen in honest shares."""
    models = torch.stack(view)
    mean = models.mean(0)
    weight = 0.5
    vals = mean
    if attack == "scaled":
        vals = mean * scale
    elif attack == "signflip":
        vals = -mean
    elif attack == "alie":
        std = models.std(0, unbiased=False) if len(view) > 1 else torch.zeros_like(mean)
        vals = mean - 1.0 * std  # z_max ~ 1 for n = 8, f = 2 (Baruch et al.'s table)
    elif attack == "ipm":
        vals = -0.5 * mean
    elif attack == "dissensus":
        own = mean if target_model is None else target_model
        vals = own + 1.5 * (own - mean)
    elif attack == "weight":
        weight = float(receivers_trusted + 1)  # the largest weight a receiver accepts
    elif attack == "version":
        version = 2**53
    elif attack == "replay" and first is not None:
        vals, version = first
    elif attack not in ("none", "pull", "replay"):
        raise ValueError(f"unknown attack {attack!r}")
    return vals.clamp(-max_abs, max_abs).to(torch.float64), weight, version


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def norm(x: torch.Tensor) -> float:
    return math.sqrt(float((x.to(torch.float64) ** 2).sum()))
