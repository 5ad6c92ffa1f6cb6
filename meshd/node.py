"""The gossip node: the async shell around the pure core (wire, replay guard, peer table, push-sum).

It receives envelopes from the peer transport, runs the gossip, membership, training, evaluation,
checkpoint and discovery loops (owned by the daemon's TaskGroup), and performs what the pure core
decides. Wire work (signing, sealing, opening, replay state) runs on one dedicated worker thread, so
the loop never does crypto over megabytes and the replay guard is never touched by two threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog
import torch

from meshd import codec as codecmod
from meshd import config as configmod
from meshd import discovery as disc
from meshd import store, wire
from meshd.averaging import RejectedUpdate, Share
from meshd.config import Config
from meshd.engine import Engine
from meshd.errors import MeshdError, ModelError, WireError
from meshd.identity import Identity, parse_peer_id, peer_id_of
from meshd.logs import QuietLog
from meshd.membership import PeerState, PeerTable, Ping, StateChanged, Timing
from meshd.replay import ReplayGuard, SequenceCounter
from meshd.stats import GossipStats
from meshd.transport import ClientLimits, PeerClient, PeerServer, Reply, SendError, ServerLimits

log = structlog.get_logger("meshd.node")
T = TypeVar("T")

TICK_S = 0.25
IDLE_S = 0.5  # the training loop's poll while training is off or impossible
GOSSIP_WAIT_S = 2.0  # longest a training part waits for the exchange it asked for
PACE_WAIT_S = 0.05  # a domain ahead of its peers re-checks this often
PACE_SLACK_EPOCHS = 0.5  # how far (in passes over its own data) a domain may run ahead of its peers' median
PACE_HORIZON_S = 30.0  # peers' epoch counts older than this (or than 2 x dead_after_s) are not waited for
MAX_CONCURRENT_PINGS = 32
REPLAY_FILE = "replay.json"
SEQ_FILE = "sequence.json"


class Node:
    def __init__(self, cfg: Config, identity: Identity, stats: GossipStats) -> None:
        self.cfg = cfg
        self.identity = identity
        self.stats = stats
        self.listen_host, self.listen_port = configmod.split_host_port(cfg.listen.peer)
        self._quiet = QuietLog(60.0)
        self._rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        self._state_dir = cfg.node.state_dir
        self._wire_exec = ThreadPoolExecutor(1, thread_name_prefix="meshd-wire")
        self._wire = wire.Wire(identity, self._wire_limits(cfg))
        self._replay = ReplayGuard(cfg.limits.replay_window)
        self._seq = SequenceCounter(1)
        self.table = PeerTable(identity.public_key, self._timing(cfg))
        self._trusted: frozenset[bytes] = frozenset()
        self.engine = Engine(cfg)
        self._server: PeerServer | None = None
        self._client: PeerClient | None = None
        self._static: disc.StaticDiscovery | None = None
        self._mdns: disc.MdnsDiscovery | None = None
        self._joined = asyncio.Event()  # set once the first model is settled (pulled, or none to pull)
        self._mesh_changed = asyncio.Event()
        self._pull_wanted = asyncio.Event()
        self._closed = False
        self._pinging: set[bytes] = set()
        self._gossip_round = 0
        self._gossip_now = asyncio.Event()  # set by training after each part of a round
        self._gossip_done = asyncio.Event()  # set by gossip after each round
        self._peer_epochs: dict[bytes, tuple[float, float]] = {}  # peer -> (epochs it trained, when heard)

    # --- construction ----------------------------------------------------------------------------------

    @staticmethod
    def _wire_limits(cfg: Config) -> wire.Limits:
        return wire.Limits(
            max_message_bytes=int(cfg.limits.max_message_mib * 2**20),
            max_skew_ms=int(cfg.limits.max_skew_s * 1000),
        )

    @staticmethod
    def _timing(cfg: Config) -> Timing:
        m = cfg.membership
        return Timing(suspect_after_s=m.suspect_after_s, dead_after_s=m.dead_after_s, ping_after_s=m.ping_after_s)

    async def open(self) -> None:
        """Load persistent protocol state, the data product, the model and its checkpoint."""
        replay_state = await asyncio.to_thread(store.read_json, self._state_dir / REPLAY_FILE, None)
        if replay_state is not None:
            try:
                self._replay = ReplayGuard.from_state(replay_state, self.cfg.limits.replay_window)
            except ValueError as exc:
                raise MeshdError(f"{self._state_dir / REPLAY_FILE} is corrupt ({exc}); "
                                 "move it away to start with an empty replay state") from None
        seq_state = await asyncio.to_thread(store.read_json, self._state_dir / SEQ_FILE, None)
        start = 1
        if isinstance(seq_state, dict) and isinstance(seq_state.get("reserved"), int):
            start = max(1, int(seq_state["reserved"]))
        self._seq = SequenceCounter(start)
        for warning in await asyncio.to_thread(self.engine.load):
            log.warning("engine_warning", detail=warning)
        await self._apply_trust(self.cfg)
        if self.engine.pushsum is None or not self.engine.fresh or not self.cfg.gossip.pull_on_join:
            self._joined.set()

    async def start_listening(self) -> None:
        limits = ServerLimits(
            max_body_bytes=int(self.cfg.limits.max_message_mib * 2**20),
            read_timeout_s=self.cfg.limits.read_timeout_s,
            max_connections_per_ip=self.cfg.limits.max_connections_per_ip,
        )
        self._server = PeerServer(self.listen_host, self.listen_port, limits, self._handle, self._transport_reject)
        await self._server.start()
        self.listen_port = self._server.port
        g = self.cfg.gossip
        self._client = PeerClient(
            ClientLimits(g.connect_timeout_s, g.request_timeout_s, g.retries, limits.max_body_bytes), self._rng
        )
        await self._client.start()

    def loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {
            "join": self._join_loop(),
            "gossip": self._gossip_loop(),
            "membership": self._membership_loop(),
            "train": self._train_loop(),
            "evaluate": self._evaluate_loop(),
            "checkpoint": self._checkpoint_loop(),
            "discovery": self._discovery_loop(),
        }

    async def close(self) -> None:
        """Leave before closing: announce departure, stop advertising, checkpoint, close sockets."""
        if self._closed:
            return
        self._closed = True
        if self.cfg.mesh.enabled:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send_leave("shutdown"), timeout=2.0)
        await self._stop_discovery()
        if self.engine.pushsum is not None:
            self.engine.pushsum.abandon_all()
            try:
                await self._save_checkpoint()
            except Exception as exc:
                log.error("checkpoint_failed", error=str(exc))
        with contextlib.suppress(Exception):
            await self._persist_protocol_state(fsync=True)
        if self._server is not None:
            await self._server.stop()
        if self._client is not None:
            await self._client.stop()
        self._wire_exec.shutdown(wait=True)

    # --- config reload -----------------------------------------------------------------------------------

    async def apply_config(self, new: Config) -> None:
        old = self.cfg
        trusted, registry = await asyncio.to_thread(self._load_trust, new)  # ConfigError: nothing changes
        self.cfg = new
        self.table.timing = self._timing(new)
        await self._apply_trust(new, trusted, registry)
        if old.mesh.enabled and not new.mesh.enabled:
            log.info("mesh_leaving")
            await self._send_leave("config")
            await self._stop_discovery()
        elif not old.mesh.enabled and new.mesh.enabled:
            log.info("mesh_joining")
            await self._announce()
        elif old.discovery != new.discovery and new.mesh.enabled:
            await self._stop_discovery()
        self._mesh_changed.set()

    def _load_trust(self, cfg: Config) -> tuple[frozenset[bytes], list[disc.StaticPeer]]:
        keys = {parse_peer_id(p) for p in cfg.trust.peers}
        registry: list[disc.StaticPeer] = []
        if cfg.trust.registry is not None:
            registry = disc.load_registry(cfg.trust.registry)
            keys |= {p.peer_id for p in registry}
        return frozenset(keys), registry

    async def _apply_trust(
        self, cfg: Config, trusted: frozenset[bytes] | None = None, registry: list[disc.StaticPeer] | None = None
    ) -> None:
        if trusted is None or registry is None:
            loaded = await asyncio.to_thread(self._load_trust, cfg)  # reads the registry file
            trusted, registry = loaded
        removed = self._trusted - trusted
        self._trusted = trusted
        self.table.set_trusted(trusted)
        for key in removed:
            self._wire.forget_peer(key)
            log.info("peer_distrusted", peer_id=peer_id_of(key))
        entries = [
            disc.StaticPeer(domain=p.domain, address=p.address, peer_id=parse_peer_id(p.peer_id), source="static")
            for p in cfg.peers
        ] + [p for p in registry if p.address]
        if self._static is None:
            self._static = disc.StaticDiscovery(entries, self._on_discovery)
            await self._static.start()
        else:
            self._static.update(entries)

    def _is_trusted(self, key: bytes) -> bool:
        return key in self._trusted

    # --- discovery -----------------------------------------------------------------------------------------

    def _on_discovery(self, event: disc.DiscoveryEvent) -> None:
        now = time.monotonic()
        if isinstance(event, disc.PeerSeen):
            self.table.discovered(event.peer_id, event.address, event.domain, event.source, now, event.model_fp)
            self.table.advertised(event.peer_id, None, event.schema_fp)
        else:
            self.table.gone(event.peer_id, event.source, now)

    async def _discovery_loop(self) -> None:
        """Keeps mDNS registered while the mesh is enabled; stops it (goodbye packets) otherwise."""
        try:
            while True:
                want = self.cfg.mesh.enabled and self.cfg.discovery.mdns.enabled
                if want and self._mdns is None:
                    await self._start_mdns()
                elif not want and self._mdns is not None:
                    await self._stop_discovery()
                self._mesh_changed.clear()
                # Not asyncio.wait_for: on 3.11 it swallows a cancel that lands as the event is set
                # (CPython gh-86296), and this loop then never ends (a reload racing SIGTERM hung stop).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await self._mesh_changed.wait()
        finally:
            await self._stop_discovery()

    async def _start_mdns(self) -> None:
        ifaces = list(self.cfg.discovery.mdns.interfaces)
        advertise_ips = ifaces or ([self.listen_host] if self.listen_host not in ("0.0.0.0", "::") else [])
        adv = self.cfg.listen.advertise
        if adv:
            advertise_ips = [configmod.split_host_port(adv)[0]]
        mdns = disc.MdnsDiscovery(
            domain=self.cfg.node.domain, peer_id=self.identity.public_key, port=self.listen_port,
            advertise_ips=advertise_ips, interfaces=ifaces or None, model_fp=self.engine.fingerprint or None,
            schema_fp=self.engine.schema or None,
            protocol_version=wire.PROTOCOL_VERSION, on_event=self._on_discovery,
        )
        try:
            await mdns.start()
        except (OSError, MeshdError) as exc:
            if self._quiet.should_log(("mdns_start_failed",))[0]:
                log.error("mdns_start_failed", error=str(exc))
            with contextlib.suppress(Exception):
                await mdns.stop()
            return
        self._mdns = mdns
        log.info("mdns_started", interfaces=ifaces or "all")

    async def _stop_discovery(self) -> None:
        mdns, self._mdns = self._mdns, None
        if mdns is not None:
            with contextlib.suppress(Exception):
                await mdns.stop()
            log.info("mdns_stopped")

    # --- receiving ---------------------------------------------------------------------------------------

    async def _in_wire(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._wire_exec, fn, *args)

    def _open_and_persist(self, data: bytes, now_ms: int) -> wire.Opened:
        """Wire thread: verify and open; persist the replay state before the message takes effect, so
        a kill -9 right after cannot make the same envelope acceptable again."""
        opened = self._wire.open(data, now_ms, self._is_trusted, self._replay)
        self._write_replay_state(fsync=False)
        return opened

    def _write_replay_state(self, fsync: bool) -> None:
        store.write_json_atomic(self._state_dir / REPLAY_FILE, self._replay.to_state(), fsync=fsync)

    async def _handle(self, data: bytes, remote: str) -> Reply:
        now_ms = int(time.time() * 1000)
        try:
            opened = await self._in_wire(self._open_and_persist, data, now_ms)
            body = wire.decode_body(opened.body, self._wire_limits(self.cfg))
        except WireError as exc:
            self._reject(exc.reason, remote, exc.detail)
            return Reply.error(exc.status, exc.reason, exc.detail)
        except OSError as exc:  # persisting replay state failed: refuse rather than risk a replay later
            log.error("replay_state_write_failed", error=str(exc))
            return Reply.error(503, "unavailable", "cannot persist replay state")
        self.stats.received += 1
        self.stats.bytes_received += len(data)
        sender = opened.sender
        addr = body.get("addr")
        addr = addr if isinstance(addr, str) and disc.check_address(addr) is None else None
        self.table.heard_from(sender, time.monotonic(), address=addr)
        try:
            return await self._dispatch(opened, body)
        except WireError as exc:
            self._reject(exc.reason, remote, exc.detail, sender)
            return Reply.error(exc.status, exc.reason, exc.detail)

    async def _dispatch(self, opened: wire.Opened, body: dict[str, Any]) -> Reply:
        kind, sender = opened.kind, opened.sender
        if kind == "ping":
            if not self.cfg.mesh.enabled:
                return Reply.error(503, "not_joined", "this domain has left the mesh")
            return Reply(200, await self._seal(sender, "pong", {**self._hello_body(), **self._model_ids()}))
        if kind == "leave":
            self.table.left(sender, time.monotonic())
            log.info("peer_left", peer_id=peer_id_of(sender), reason=str(body.get("reason", ""))[:64])
            return Reply(204)
        if kind == "share":
            return self._receive_share(sender, body)
        if kind == "pull":
            return await self._answer_pull(sender, body)
        raise WireError("unknown_kind", 400, f"kind {kind!r} is not served")

    def _check_compatible(self, sender: bytes, body: dict[str, Any]) -> None:
        """Same model and same data schema, or a 409 with its own reason (and the peer marked in /status)."""
        why: WireError | None = None
        reason = self._incompatibility(body.get("fp"), body.get("schema"))
        if self.engine.pushsum is None:
            why = WireError("incompatible", 409, "this domain has no model")
        elif reason == "incompatible":
            why = WireError("incompatible", 409, "model fingerprint differs")
        elif reason == "schema_mismatch":
            # Averaging models trained on different column meanings is silent corruption: refused.
            detail = f"data schema differs (ours {self.engine.schema}, yours {str(body.get('schema'))[:32]})"
            if body.get("schema_set") == self.engine.schema_set:
                detail = ("same feature columns in a different order: list data.features in the mesh's order "
                          "on one side")
            why = WireError("schema_mismatch", 409, detail)
        now = time.monotonic()
        if why is not None:
            if self.engine.pushsum is not None:
                self.table.set_incompatible(sender, why.reason, now)
            raise why
        self.table.advertised(sender, self.engine.fingerprint, self.engine.schema)
        self.table.set_incompatible(sender, None, now)

    def _model_fields(self, sender: bytes, body: dict[str, Any]) -> tuple[torch.Tensor, float, int, float | None]:
        self._check_compatible(sender, body)
        ps = self.engine.pushsum
        assert ps is not None
        codec, count, weight, version = body.get("codec"), body.get("count"), body.get("weight"), body.get("version")
        values = body.get("values")
        if (codec not in codecmod.CODECS or not isinstance(values, bytes) or count != ps.dim
                or not isinstance(weight, float | int) or isinstance(weight, bool)
                or not isinstance(version, int) or isinstance(version, bool)):
            raise WireError("bad_body", 400, "share fields missing or of the wrong type")
        # Honest push-sum weights never exceed the mesh's total mass: one per domain that started. A larger
        # one (a buggy or hostile trusted peer) would take over every model it reached, so it is refused.
        max_weight = float(len(self._trusted) + 1)
        if not 0.0 < float(weight) <= max_weight:
            raise WireError("bad_values", 400, f"weight {float(weight)!r} outside (0, {max_weight:g}]")
        rows, epochs = body.get("rows"), body.get("epochs")
        for name, x in (("rows", rows), ("epochs", epochs)):
            if x is not None and (not isinstance(x, float | int) or isinstance(x, bool) or not 0 <= x <= 1e12):
                raise WireError("bad_body", 400, f"{name} must be a number in [0, 1e12]")
        if epochs is not None:
            self._peer_epochs[sender] = (float(epochs), time.monotonic())
        elif sender in self._peer_epochs:
            del self._peer_epochs[sender]  # it stopped training: nobody waits for it
        try:
            vec = codecmod.decode(values, count, codec)
        except codecmod.CodecError as exc:
            raise WireError("bad_values", 400, str(exc)) from None
        return vec, float(weight), version, None if rows is None else float(rows)

    def _receive_share(self, sender: bytes, body: dict[str, Any]) -> Reply:
        ps = self.engine.pushsum
        if not self.cfg.mesh.enabled or self._closed:
            # Leaving or shutting down: a merge now could land after the final checkpoint and be lost;
            # refused, the sender keeps the mass.
            return Reply.error(503, "not_joined", "this domain has left the mesh")
        vec, weight, version, rows = self._model_fields(sender, body)
        assert ps is not None
        if self.engine.fresh and not self._joined.is_set():
            # Still joining: merging now would be discarded by adopt(); refuse, the sender keeps its mass.
            return Reply.error(503, "not_ready", "joining the mesh")
        far = self.cfg.gossip.far_behind_versions
        try:
            ps.merge(vec, weight, version, rows)
        except RejectedUpdate as exc:
            raise WireError("bad_values", 400, exc.detail or exc.reason) from None
        self.engine.served.observe(vec)
        self.stats.merged += 1
        if far and version - ps.version > far:
            self._pull_wanted.set()
        return Reply(204)

    async def _answer_pull(self, sender: bytes, body: dict[str, Any]) -> Reply:
        self._check_compatible(sender, body)
        ps = self.engine.pushsum
        assert ps is not None
        if not self.cfg.mesh.enabled or self._closed:
            return Reply.error(503, "not_joined", "this domain has left the mesh")
        if self.engine.fresh and not self._joined.is_set():
            return Reply.error(503, "not_ready", "joining the mesh too")
        share = ps.split_for_pull()
        self.stats.pulls += 1
        log.info("pull_answered", peer_id=peer_id_of(sender), weight=share.weight, version=share.version)
        body = await asyncio.to_thread(self._share_body, share)
        return Reply(200, await self._seal(sender, "model", body))

    # --- sending -----------------------------------------------------------------------------------------

    def _hello_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"domain": self.cfg.node.domain}
        addr = self._advertised_address()
        if addr:
            body["addr"] = addr
        return body

    def _advertised_address(self) -> str | None:
        if self.cfg.listen.advertise:
            return self.cfg.listen.advertise
        if self.listen_host not in ("0.0.0.0", "::", ""):
            return f"{self.listen_host}:{self.listen_port}"
        return None

    def _model_ids(self) -> dict[str, Any]:
        """What a peer checks before combining models with ours: model and data schema fingerprints."""
        return {"fp": self.engine.fingerprint, "schema": self.engine.schema, "schema_set": self.engine.schema_set}

    def _share_body(self, share: Share) -> dict[str, Any]:
        codec = self.engine.pushsum.codec if self.engine.pushsum is not None else self.cfg.gossip.codec
        return {
            **self._hello_body(),
            **self._model_ids(),
            "version": int(share.version),
            "weight": float(share.weight),
            "rows": float(share.rows),
            **({"epochs": self.engine.epochs} if self._training_active() else {}),
            "codec": codec,
            "count": int(share.values.shape[0]),
            "values": codecmod.encode(share.values, codec),  # type: ignore[arg-type]
        }

    async def _next_seq(self) -> int:
        seq, reservation = self._seq.next()
        if reservation is not None:
            # Persist the reservation before any number from it goes out: no reuse after kill -9.
            await asyncio.to_thread(store.write_json_atomic, self._state_dir / SEQ_FILE, {"reserved": reservation})
        return seq

    async def _seal(self, recipient: bytes, kind: str, body: dict[str, Any]) -> bytes:
        seq = await self._next_seq()
        now_ms = int(time.time() * 1000)
        return await self._in_wire(lambda: self._wire.seal(recipient, kind, wire.encode_body(body), seq, now_ms))

    async def _exchange(self, peer_id: bytes, address: str, kind: str, body: dict[str, Any]) -> tuple[int, bytes, int]:
        """Seal, send, account. Returns (status, body, attempts); raises SendError if nobody answered."""
        assert self._client is not None
        envelope = await self._seal(peer_id, kind, body)
        try:
            status, reply, attempts = await self._client.post(address, envelope)
        except SendError:
            self.stats.send_failures += 1
            self.table.send_failed(peer_id, time.monotonic())
            raise
        self.stats.sent += 1
        self.stats.bytes_sent += len(envelope)
        if status == 503 and b"not_joined" in reply:
            self.table.left(peer_id, time.monotonic())  # it answered: it is there, but out of the mesh
        elif 200 <= status < 300 or status in (409, 503):
            # Accepted, or refused by a meshd that read our envelope (replayed/incompatible, busy). Any other
            # 4xx is no sign of life: some other server at that address (404), or a peer refusing us (403).
            self.table.heard_from(peer_id, time.monotonic())
        quiet_key = ("send_refused", peer_id_of(peer_id), str(status))
        if status >= 400 and status != 503 and self._quiet.should_log(quiet_key)[0]:
            log.warning("send_refused", peer_id=peer_id_of(peer_id), kind=kind, status=status,
                        reply=reply[:200].decode(errors="replace"))
        return status, reply, attempts

    async def _open_reply(self, peer_id: bytes, reply: bytes, want_kind: str) -> dict[str, Any] | None:
        try:
            opened = await self._in_wire(self._open_and_persist, reply, int(time.time() * 1000))
            if opened.sender != peer_id or opened.kind != want_kind:
                raise WireError("bad_reply", 400, "unexpected reply")
            return wire.decode_body(opened.body, self._wire_limits(self.cfg))
        except WireError as exc:
            self._reject("reply_" + exc.reason, peer_id_of(peer_id)[:16], exc.detail, peer_id)
            return None

    async def _send_leave(self, reason: str) -> None:
        targets = [p for p in self.table.peers() if p.address and p.state != PeerState.LEFT]
        async with asyncio.TaskGroup() as tg:
            for p in targets:
                tg.create_task(self._quietly(self._exchange(p.peer_id, p.address or "", "leave", {"reason": reason})))
        log.info("leave_sent", peers=len(targets), reason=reason)

    async def _announce(self) -> None:
        """Ping every known peer now: after a leave, our own table aged them to dead, and they marked us
        left; a signed ping makes both sides alive again without waiting for the dead-peer probe."""
        targets = [p for p in self.table.peers() if p.address]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cfg.gossip.request_timeout_s), asyncio.TaskGroup() as tg:
                for p in targets:
                    tg.create_task(self._ping(p.peer_id, p.address or ""))
        log.info("join_announced", peers=len(targets))

    def _training_active(self) -> bool:
        tr = self.cfg.training
        return tr.enabled and self.engine.learner is not None and tr.steps_per_round != 0

    def _note_advertised(self, peer_id: bytes, body: dict[str, Any]) -> None:
        """A pong says which model and schema the peer runs: flag a mismatch before any share is sent."""
        fp, schema = body.get("fp"), body.get("schema")
        fp = fp if isinstance(fp, str) and len(fp) <= 64 else None
        schema = schema if isinstance(schema, str) and len(schema) <= 64 else None
        self.table.advertised(peer_id, fp, schema)
        if self.engine.pushsum is None or fp is None:
            return
        # A pong without a schema (an older or minimal client) is judged by its model alone.
        self.table.set_incompatible(peer_id, self._incompatibility(fp, schema or self.engine.schema),
                                    time.monotonic())

    def _incompatibility(self, fp: object, schema: object) -> str | None:
        """Why a peer running model ``fp`` on data schema ``schema`` cannot merge with us, or None."""
        if fp != self.engine.fingerprint:
            return "incompatible"
        if schema != self.engine.schema:
            return "schema_mismatch"
        return None

    @staticmethod
    async def _quietly(coro: Coroutine[Any, Any, Any]) -> None:
        with contextlib.suppress(SendError, MeshdError):
            await coro

    # --- loops -------------------------------------------------------------------------------------------

    async def _join_loop(self) -> None:
        """A fresh domain pulls the mesh model before it trains or gossips; a straggler pulls on demand."""
        if not self._joined.is_set():
            await self._initial_pull()
            self._joined.set()
        while True:
            await self._pull_wanted.wait()
            self._pull_wanted.clear()
            if self.cfg.mesh.enabled:
                await self._pull_once(adopt=False)
            await asyncio.sleep(self.cfg.gossip.interval_s * 5)  # at most one catch-up pull per 5 rounds

    async def _initial_pull(self) -> None:
        if not self._trusted:
            log.info("join_alone", detail="no trusted peers configured")
            return
        deadline = time.monotonic() + max(5.0, 3 * self.cfg.gossip.interval_s)
        while time.monotonic() < deadline:
            outcome = await self._pull_once(adopt=True)
            if outcome in ("adopted", "everyone_new"):
                return
            await asyncio.sleep(min(0.5, self.cfg.gossip.interval_s))
        log.info("join_alone", detail="no peer answered a pull; starting from this domain's own model")

    async def _pull_once(self, adopt: bool) -> str:
        ps = self.engine.pushsum
        candidates = [p for p in self.table.peers()
                      if p.address and p.state in (PeerState.ALIVE, PeerState.UNKNOWN, PeerState.SUSPECT)]
        if ps is None or not candidates or not self.cfg.mesh.enabled:
            return "no_candidates"
        self._rng.shuffle(candidates)
        not_ready = 0
        for p in candidates[:4]:
            try:
                status, reply, _ = await self._exchange(p.peer_id, p.address or "", "pull", self._model_ids())
            except SendError:
                continue
            if status == 503:
                not_ready += 1
                continue
            if status != 200:
                continue
            body = await self._open_reply(p.peer_id, reply, "model")
            if body is None:
                continue
            try:
                vec, weight, version, rows = self._model_fields(p.peer_id, body)
                if adopt:
                    # Keep this domain's own weight (now carrying the mesh's model): the mesh's total weight
                    # keeps counting every domain, which the mean-rows estimate of data weighting needs.
                    ps.adopt(vec, weight, version, rows, keep_own_weight=True)
                    self.engine.served.reset()
                else:
                    ps.merge(vec, weight, version, rows)
                    self.engine.served.observe(vec)
            except (WireError, RejectedUpdate) as exc:
                self._reject("bad_pull_reply", p.address or "?", str(exc), p.peer_id)
                continue
            self.engine.fresh = False
            log.info("model_pulled", peer_id=peer_id_of(p.peer_id), version=version, weight=weight,
                     mode="adopt" if adopt else "merge")
            return "adopted"
        if not_ready and not_ready == min(4, len(candidates)):
            log.info("join_everyone_new", peers=not_ready)
            return "everyone_new"
        return "nobody_answered"

    async def _gossip_loop(self) -> None:
        await self._joined.wait()
        while True:
            g = self.cfg.gossip
            # A round every interval_s (jittered), or sooner when training finished a part of its round.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(g.interval_s * (1 + g.jitter * (2 * self._rng.random() - 1))):
                    await self._gossip_now.wait()
            self._gossip_now.clear()
            try:
                await self._gossip_round_once(g)
            finally:
                self._gossip_done.set()

    async def _gossip_round_once(self, g: configmod.GossipConfig) -> None:
        ps = self.engine.pushsum
        if ps is None or not self.cfg.mesh.enabled:
            return
        targets = self.table.gossip_targets(self._rng, g.fanout, time.monotonic(), topology=g.topology,
                                            round_no=self._gossip_round)
        self._gossip_round += 1
        if not targets:
            return
        shares = ps.prepare(len(targets))
        self.stats.rounds += 1
        async with asyncio.TaskGroup() as tg:
            for peer, share in zip(targets, shares, strict=False):
                tg.create_task(self._send_share(peer.peer_id, peer.address or "", share))

    async def _send_share(self, peer_id: bytes, address: str, share: Share) -> None:
        ps = self.engine.pushsum
        assert ps is not None
        delivered = False
        try:
            body = await asyncio.to_thread(self._share_body, share)
            status, reply, attempts = await self._exchange(peer_id, address, "share", body)
            if status == 409 and (b'"schema_mismatch"' in reply or b'"incompatible"' in reply):
                reason = "schema_mismatch" if b'"schema_mismatch"' in reply else "incompatible"
                self.table.set_incompatible(peer_id, reason, time.monotonic())
            # A retry answered 'replayed' means an earlier attempt did arrive and was merged.
            delivered = status == 204 or (status == 409 and attempts > 1 and b'"replayed"' in reply)
        except (SendError, MeshdError):
            delivered = False
        finally:
            if delivered:
                ps.confirm(share.id)
            else:
                ps.abandon(share.id)

    async def _membership_loop(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                now = time.monotonic()
                for effect in self.table.tick(now):
                    if isinstance(effect, StateChanged):
                        log.info("peer_state", peer_id=peer_id_of(effect.peer_id),
                                 old=str(effect.old), new=str(effect.new))
                    elif (isinstance(effect, Ping) and self.cfg.mesh.enabled
                          and effect.peer_id not in self._pinging and len(self._pinging) < MAX_CONCURRENT_PINGS):
                        self._pinging.add(effect.peer_id)
                        tg.create_task(self._ping(effect.peer_id, effect.address))
                await asyncio.sleep(TICK_S)

    async def _ping(self, peer_id: bytes, address: str) -> None:
        try:
            status, reply, _ = await self._exchange(peer_id, address, "ping", self._hello_body())
            if status == 200:
                pong = await self._open_reply(peer_id, reply, "pong")
                if pong is not None:
                    self._note_advertised(peer_id, pong)
        except (SendError, MeshdError):
            pass
        finally:
            self._pinging.discard(peer_id)

    async def _train_loop(self) -> None:
        """Local training back to back in the worker thread: rounds of ``training.steps_per_round`` steps (one
        epoch by default), each trained in ``gossip.per_round`` parts with one exchange after each part.

        Each part's update is applied with the data weighting (``Engine.update_scale``). With
        ``training.pace = "mesh"`` a domain that is more than ``PACE_SLACK_EPOCHS`` epochs ahead of the
        median of its peers waits, so every domain makes about one pass over its own data per pass of the
        others: a domain's steps are proportional to its rows, as in FedAvg's one epoch per round.
        """
        await self._joined.wait()
        while True:
            ps = self.engine.pushsum
            if ps is None or not self._training_active():
                await asyncio.sleep(IDLE_S)
                continue
            steps = self._paced_steps(self.engine.chunk_steps, time.monotonic())
            if steps == 0:
                self.engine.stats.paced_waits += 1
                await asyncio.sleep(PACE_WAIT_S)
                continue
            start = ps.estimate()
            try:
                new, result = await asyncio.to_thread(self.engine.train, start, steps)
                ps.apply_update(new - start, self.engine.update_scale())
            except (RejectedUpdate, ModelError) as exc:
                # The model is kept as it was; a diverging step is dropped, never merged.
                self.engine.stats.steps_dropped += steps
                if self._quiet.should_log(("training_diverged",))[0]:
                    log.error("training_diverged", detail=str(exc), hint="lower training.lr")
                await asyncio.sleep(IDLE_S)
            else:
                st = self.engine.stats
                st.steps += result.steps
                st.samples_seen += result.samples
                st.loss = result.loss
                if self.cfg.gossip.per_round > 0 and self.cfg.mesh.enabled:
                    # gossip.per_round exchanges per training round: the next part waits for this exchange
                    # (bounded), so the steps between two exchanges do not depend on how fast this host is.
                    self._gossip_done.clear()
                    self._gossip_now.set()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(GOSSIP_WAIT_S):
                            await self._gossip_done.wait()
            await asyncio.sleep(0)  # let gossip and the status API in between two rounds

    def _paced_steps(self, wanted: int, now: float) -> int:
        """How many steps this domain may take now: ``wanted``, or fewer (0 = wait) when it is ahead."""
        if self.cfg.training.pace != "mesh":
            return wanted
        horizon = max(PACE_HORIZON_S, 2 * self.cfg.membership.dead_after_s)
        alive = {p.peer_id for p in self.table.peers() if p.state == PeerState.ALIVE}
        heard = [e for pid, (e, at) in self._peer_epochs.items() if pid in alive and now - at <= horizon]
        if not heard:
            return wanted  # alone, or nobody trains: nothing to keep pace with
        median = statistics.median(heard)
        spe = self.engine.steps_per_epoch
        allowed = (median + PACE_SLACK_EPOCHS - self.engine.epochs) * spe
        return max(0, min(wanted, math.ceil(allowed))) if allowed > 0 else 0

    async def _evaluate_loop(self) -> None:
        while True:
            ps = self.engine.pushsum
            if ps is not None:
                flat = self.engine.served_model()
                version, steps = ps.version, self.engine.stats.steps
                result = await asyncio.to_thread(self.engine.evaluate, flat)
                digest = await asyncio.to_thread(self.engine.digest, flat)
                st = self.engine.stats
                st.holdout_accuracy, st.local_only_accuracy = result["holdout"], result["local_only"]
                st.test_accuracy, st.local_only_test_accuracy = result["test"], result["local_only_test"]
                st.evaluated_at_version = version
                st.evaluated_at_steps = steps
                self.engine.sha256 = digest
            await asyncio.sleep(self.cfg.training.eval_interval_s)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.checkpoint.interval_s)
            try:
                await self._save_checkpoint()
                await self._persist_protocol_state(fsync=True)
            except (OSError, MeshdError) as exc:
                log.error("checkpoint_failed", error=str(exc))

    async def _save_checkpoint(self) -> None:
        if self.engine.pushsum is None:
            return
        ckpt = self.engine.checkpoint_now()
        name = await asyncio.to_thread(self.engine.save_checkpoint, ckpt)
        log.debug("checkpoint_saved", file=name, version=ckpt.version)

    async def _persist_protocol_state(self, fsync: bool) -> None:
        await self._in_wire(self._write_replay_state, fsync)

    # --- rejections and status -----------------------------------------------------------------------------

    def _transport_reject(self, reason: str, remote: str) -> None:
        self._reject(reason, remote, "")

    def _reject(self, reason: str, remote: str, detail: str, sender: bytes | None = None) -> None:
        self.stats.rejected[reason] += 1
        who = peer_id_of(sender) if sender else remote
        ok, suppressed = self._quiet.should_log(("rejected", reason, who))
        if ok:
            log.warning("message_rejected", reason=reason, remote=remote, detail=detail[:200],
                        **({"peer_id": peer_id_of(sender)} if sender else {}), suppressed=suppressed)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        model, training = self.engine.snapshot() if self.engine.fingerprint else ({}, {})
        ps = self.engine.pushsum
        gossip: dict[str, Any] = {}
        if ps is not None:
            gossip = {"weight": ps.weight, "consensus_distance": ps.mean_distance, "pending_shares": ps.pending}
        return {
            "listen": {"peer": f"{self.listen_host}:{self.listen_port}", "advertise": self._advertised_address()},
            "mesh": {
                "joined": self.cfg.mesh.enabled and self._joined.is_set(),
                "enabled": self.cfg.mesh.enabled,
                "peers": self.table.snapshot(now),
                "counts": self.table.counts(),
                "untrusted_seen": self.table.untrusted_snapshot(),
                "trusted": len(self._trusted),
                "mdns": self._mdns is not None,
            },
            "model": model,
            "training": training,
            "gossip": gossip,
        }

