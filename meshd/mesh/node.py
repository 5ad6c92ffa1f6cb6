"""The mesh: one per daemon. Identity, trust, discovery, the peer table and liveness, the transport and
replay protection, around the pure core (wire, replay guard, peer table).

It receives envelopes from the peer transport, answers pings and leaves itself, and routes ``share`` and
``pull`` envelopes to the learning task they name (:mod:`meshd.mesh.link` is the whole interface; the mesh
never imports a task's model code, nor torch). Wire work (signing, sealing, opening, replay state) runs on
one dedicated worker thread, so the loop never does crypto over megabytes and the replay guard is never
touched by two threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from meshd import config as configmod
from meshd import store
from meshd.config import DEFAULT_TASK, Config
from meshd.core import wire
from meshd.core.membership import (
    AddressChanged,
    Peer,
    PeerState,
    PeerTable,
    Ping,
    Reaped,
    RefusedSenders,
    StateChanged,
    Timing,
)
from meshd.core.replay import SEQ_LIMIT, ReplayGuard, SequenceCounter
from meshd.core.stats import GossipStats, smoothed
from meshd.errors import MeshdError, StoreError, WireError
from meshd.identity import Identity, parse_peer_id, peer_id_of
from meshd.logs import QuietLog
from meshd.mesh import discovery as disc
from meshd.mesh.link import TaskEndpoint
from meshd.mesh.transport import ClientLimits, PeerClient, PeerServer, Reply, SendError, ServerLimits

log = structlog.get_logger("meshd.mesh")
T = TypeVar("T")

TICK_S = 0.25
#: Bodies up to this size are decoded on the loop (tens of microseconds); larger ones on the wire thread, whose
#: hand-over costs more than decoding a small body and, with many daemons on few cores, waits for a core.
INLINE_BYTES = 256 * 1024
LEASE_STEP_MS = 1_000  # the timestamp lease is extended this far past the envelope that needed it
MAX_CONCURRENT_PINGS = 32
MAX_PONG_TASKS = 32  # tasks listed in a pong; a domain runs at most config.MAX_TASKS
REPLAY_FILE = "replay.json"
REPLAY_FORMAT = 2  # {"format": 2, "clean": true, "peers": {...}}; format 1 was the bare peers map
LEASE_FILE = "replay-lease.json"  # {"lease_ms": L}: no envelope with ts > L was ever accepted
SEQ_FILE = "sequence.json"
MAX_REFUSED_SENDERS = 32  # untrusted keys shown in /status and `meshd peers` (a typo'd peer id shows up there)
# The domain an untrusted sender claims is read from its signed body: verify and decrypt, work the receiver
# otherwise saves for trusted keys. So only for small envelopes (pings), once per key per CLAIM_EVERY_S, and
# at most one per CLAIM_GAP_S in all: a flood of fresh keys costs at most 4 small opens a second.
CLAIM_MAX_BYTES = 64 * 1024
CLAIM_EVERY_S = 30.0
CLAIM_GAP_S = 0.25
# A body decodes to at most one value per KiB of the message-size limit (65,536 at 64 MiB), and at least 4,096:
# a model's values travel as one bin, so real bodies hold a few hundred (docs/protocol.md section 6).
BYTES_PER_BODY_ELEMENT = 1024
MIN_BODY_ELEMENTS = 4096
# An envelope from an untrusted key and one that does not authenticate (its body does not decrypt, or its
# signature does not verify) are answered alike (403 `untrusted`, one detail): a prober that claims a key it does
# not hold learns nothing about whether this domain trusts that key. Replay and freshness are checked only
# after authentication (meshd.core.wire). The counters and the log keep the real reason for operators.
UNAUTHENTICATED = ("untrusted", "bad_signature", "bad_ciphertext")
UNAUTHENTICATED_DETAIL = "not signed by a key this domain trusts (the key is not trusted, or the signature is bad)"


class Mesh:
    """The part of a daemon that exists once: who we are, whom we trust, who is there, and the wire."""

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
        self._lease_ms = 0  # wire thread: no envelope with a higher ts has been accepted (LEASE_FILE)
        self._inflight: set[tuple[bytes, int]] = set()  # wire thread: (sender, seq) being handled
        self._seq = SequenceCounter(1)
        self.table = PeerTable(identity.public_key, self._timing(cfg))
        self.refused = RefusedSenders(MAX_REFUSED_SENDERS)
        self._claims: OrderedDict[bytes, float] = OrderedDict()  # wire thread only: when a claim was last read
        self._claim_last = -CLAIM_GAP_S
        self._trusted: frozenset[bytes] = frozenset()
        self._tasks: dict[str, TaskEndpoint] = {}
        self._server: PeerServer | None = None
        self._client: PeerClient | None = None
        self._static: disc.StaticDiscovery | None = None
        self._mdns: disc.MdnsDiscovery | None = None
        self._mesh_changed = asyncio.Event()
        self._closed = False
        self._pinging: set[tuple[bytes, str]] = set()  # (peer, address) with a ping out
        self._routes: OrderedDict[str, str | None] = OrderedDict()  # peer host -> our address on the route to it
        self._rtt: dict[bytes, float] = {}  # trusted peer -> smoothed seconds from send to answer
        self._announce_wanted = False  # the set of tasks changed: ping every peer, the ping lists them

    # --- construction ----------------------------------------------------------------------------------

    @staticmethod
    def _wire_limits(cfg: Config) -> wire.Limits:
        max_message = int(cfg.limits.max_message_mib * 2**20)
        return wire.Limits(
            max_message_bytes=max_message,
            max_skew_ms=int(cfg.limits.max_skew_s * 1000),
            max_elements=max(MIN_BODY_ELEMENTS, max_message // BYTES_PER_BODY_ELEMENT),
        )

    @staticmethod
    def _timing(cfg: Config) -> Timing:
        m = cfg.membership
        return Timing(suspect_after_s=m.suspect_after_s, dead_after_s=m.dead_after_s, ping_after_s=m.ping_after_s,
                      probe_max_s=m.probe_max_s, reap_after_s=m.reap_after_s)

    async def open(self) -> None:
        """Load persistent protocol state (replay window, sequence reservation) and the trust list."""
        seq_state = await asyncio.to_thread(store.read_json, self._state_dir / SEQ_FILE, None)
        await self._load_replay_state(had_state=seq_state is not None)
        reserved = 1
        if isinstance(seq_state, dict) and isinstance(seq_state.get("reserved"), int):
            reserved = max(1, int(seq_state["reserved"]))
        # Each start continues from the persisted reservation, or from the clock (microseconds since the epoch)
        # if that is higher: a state directory restored from a backup (an older reservation) never reuses a
        # sequence number its peers have seen, so it is accepted at once instead of being refused as replayed
        # until it catches up. (A run would need 1,000 envelopes per millisecond to outrun the clock.)
        start = min(max(reserved, time.time_ns() // 1000), SEQ_LIMIT - 1)
        if start > reserved + 1024:
            log.info("sequence_from_clock", reserved=reserved, start=start)
        self._seq = SequenceCounter(start)
        await self._apply_trust(self.cfg)

    async def _load_replay_state(self, *, had_state: bool) -> None:
        """Replay protection across restarts, at O(1) disk cost per message.

        The windows are written once, at a graceful stop (``replay.json``, ``"clean": true``), and the file is
        removed at start before anything is accepted: only a clean stop leaves windows that are exact. What
        holds across any other stop (kill -9, a crash, a power cut) is the timestamp lease
        (``replay-lease.json``, fsynced): no envelope with ``ts`` above it was ever accepted, because the
        lease is extended (and fsynced) before one is. After an unclean stop, envelopes sealed at or before
        the lease are refused as stale (``ReplayGuard.not_before_ms``); peers' fresh ones pass, at most
        ``LEASE_STEP_MS`` after the last accepted one (plus however far a peer's clock is behind ours)."""
        path, lease_path = self._state_dir / REPLAY_FILE, self._state_dir / LEASE_FILE
        window = self.cfg.limits.replay_window
        problems: list[str] = []

        def read(p: Path) -> Any:
            try:
                return store.read_json(p, None)
            except StoreError as exc:
                problems.append(str(exc))
                return None

        state, lease = await asyncio.to_thread(read, path), await asyncio.to_thread(read, lease_path)
        exact = False
        if isinstance(state, dict) and state.get("format") == REPLAY_FORMAT:
            exact, state = state.get("clean") is True, state.get("peers")
        elif state is not None:
            exact = True  # format 1 (meshd <= 0.1.0) was written before every accepted message took effect
        if state is not None:
            try:
                self._replay = ReplayGuard.from_state(state, window)
            except ValueError as exc:
                problems.append(f"{path} is corrupt ({exc})")
                self._replay, exact = ReplayGuard(window), False
        lease_ms = lease.get("lease_ms") if isinstance(lease, dict) else None
        self._lease_ms = lease_ms if type(lease_ms) is int and lease_ms >= 0 else 0
        if problems:
            log.warning("replay_state_lost", error="; ".join(problems)[:500])
        if not exact and (had_state or state is not None or lease is not None):
            if type(lease_ms) is int and lease_ms >= 0:
                floor = lease_ms + 1
            else:  # the lease itself was lost: nothing accepted before can be younger than now + the skew bound
                floor = int(time.time() * 1000 + self.cfg.limits.max_skew_s * 1000)
            self._replay.not_before_ms = max(self._replay.not_before_ms, floor)
            log.info("replay_after_unclean_stop", not_before_ms=floor,
                     refused_for_ms=max(0, floor - int(time.time() * 1000)),
                     detail="envelopes sealed before the floor are refused as stale")
        await asyncio.to_thread(_remove_durably, path)  # says nothing about this run: gone before it runs

    async def start_listening(self) -> None:
        lim = self.cfg.limits
        limits = ServerLimits(
            max_body_bytes=int(lim.max_message_mib * 2**20),
            read_timeout_s=lim.read_timeout_s,
            max_connections_per_ip=lim.max_connections_per_ip,
            max_connections=lim.max_connections,
            max_pending_bytes=int(lim.max_pending_mib * 2**20),
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
            "membership": self._membership_loop(),
            "discovery": self._discovery_loop(),
        }

    async def leave(self) -> None:
        """First step of a stop: refuse model traffic from now on, announce departure, stop advertising.

        The daemon writes the tasks' final checkpoints after this (no merge can land after them), then closes.
        """
        if self._closed:
            return
        self._closed = True
        if self.cfg.mesh.enabled:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._send_leave("shutdown"), timeout=2.0)
        await self._stop_discovery()

    async def close(self) -> None:
        """Persist protocol state and close the sockets (after :meth:`leave`)."""
        await self.leave()
        if self._server is None and self._client is None:
            return
        server, client, self._server, self._client = self._server, self._client, None, None
        if server is not None:
            await server.stop()
        with contextlib.suppress(Exception):  # after the server: nothing is accepted after this write
            await self._in_wire(self._write_clean_replay_state)
        if client is not None:
            await client.stop()
        self._wire_exec.shutdown(wait=True)

    # --- tasks -------------------------------------------------------------------------------------------

    def attach(self, task: TaskEndpoint) -> None:
        """Route the envelopes naming ``task.name`` to it, and advertise it (pongs, mDNS)."""
        self._tasks[task.name] = task
        self._mesh_changed.set()
        self._announce_wanted = True

    def detach(self, name: str) -> None:
        """Stop routing to a task: its envelopes are refused as ``unknown_task`` from now on."""
        self._tasks.pop(name, None)
        self._mesh_changed.set()
        self._announce_wanted = True

    def task_ids(self) -> dict[str, tuple[str, str]]:
        """What this domain advertises: task name -> (model fingerprint, data schema fingerprint)."""
        out: dict[str, tuple[str, str]] = {}
        for name, task in sorted(self._tasks.items()):
            ids = task.advertised()
            if ids is not None:
                out[name] = ids
        return out

    # --- what a task may use (meshd.mesh.link.MeshLink) -----------------------------------------------------

    @property
    def joined(self) -> bool:
        return self.cfg.mesh.enabled and not self._closed

    @property
    def trusted_count(self) -> int:
        return len(self._trusted)

    @property
    def rng(self) -> random.Random:
        return self._rng

    @property
    def dead_after_s(self) -> float:
        return self.cfg.membership.dead_after_s

    def peers(self) -> list[Peer]:
        return self.table.peers()

    def gossip_targets(self, fanout: int, *, topology: str, round_no: int, among: set[bytes]) -> list[Peer]:
        return self.table.gossip_targets(self._rng, fanout, topology=topology, round_no=round_no, among=among)

    def hello_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"domain": self.cfg.node.domain}
        addr = self._advertised_address()
        if addr:
            body["addr"] = addr
        return body

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
        # A window per trusted key (only trusted senders are ever recorded); were one dropped anyway, its
        # sender's highest timestamp becomes the guard's floor, so nothing is accepted twice.
        self._replay.max_senders = max(4096, 2 * len(trusted))
        self.table.set_trusted(trusted)
        self.refused.forget(trusted)
        for key in removed:
            self._wire.forget_peer(key)
            self._rtt.pop(key, None)
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
            self.table.discovered(event.peer_id, event.address, event.domain, event.source, now, event.tasks)
        else:
            self.table.gone(event.peer_id, event.source, now, event.address)
            peer = self.table.get(event.peer_id)
            cand = peer.candidates.get(peer.address) if peer is not None and peer.address else None
            if (cand is not None and cand.recheck and cand.address == event.address
                    and self._quiet.should_log(("peer_address_recheck", peer_id_of(event.peer_id)))[0]):
                # Anyone on the LAN can send a goodbye: the verified address stays in use and is pinged now.
                log.info("peer_address_recheck", peer_id=peer_id_of(event.peer_id), address=event.address,
                         source=event.source)

    async def _discovery_loop(self) -> None:
        """Keeps mDNS registered while the mesh is enabled (stops it, with goodbye packets, otherwise), and
        its TXT record listing the tasks this domain runs."""
        try:
            while True:
                want = self.cfg.mesh.enabled and self.cfg.discovery.mdns.enabled
                if want and self._mdns is None:
                    await self._start_mdns()
                elif not want and self._mdns is not None:
                    await self._stop_discovery()
                elif self._mdns is not None:
                    ids = self.task_ids()
                    await self._mdns.set_tasks(ids, *_default_ids(ids))
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
        ids = self.task_ids()
        fp, schema = _default_ids(ids)
        mdns = disc.MdnsDiscovery(
            domain=self.cfg.node.domain, peer_id=self.identity.public_key, port=self.listen_port,
            advertise_ips=advertise_ips, interfaces=ifaces or None, model_fp=fp, schema_fp=schema,
            tasks=ids, protocol_version=wire.PROTOCOL_VERSION, on_event=self._on_discovery,
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

    async def _decode(self, body: bytes) -> dict[str, Any]:
        """An opened body as a map: on the loop when small, on the wire thread (decoding megabytes) when not."""
        if len(body) <= INLINE_BYTES:
            return wire.decode_body(body, self._wire_limits(self.cfg))
        return await self._in_wire(wire.decode_body, body, self._wire_limits(self.cfg))

    def _open_checked(self, data: bytes, now_ms: int) -> wire.Opened:
        """Wire thread: verify and open an envelope, not yet recorded as seen: :meth:`_settle` records it once
        it took effect, so a refused one (503 busy...) can be retried with the same bytes. Two copies of one
        envelope are never handled at once: the second is answered 503 while the first is in hand. The lease
        covers its ``ts`` before anything happens."""
        refused: list[bytes] = []

        def trusted(key: bytes) -> bool:
            if self._is_trusted(key):
                return True
            refused.append(key)
            return False

        try:
            opened = self._wire.open(data, now_ms, trusted, self._replay, commit=False)
        except WireError as exc:
            if exc.reason == "untrusted" and refused:
                raise _UntrustedSender(exc, refused[0], self._claimed_domain(data, now_ms, refused[0])) from None
            raise
        key = (opened.sender, opened.seq)
        if key in self._inflight:  # not "replayed": the first copy may still fail, and then this one must count
            raise WireError("unavailable", 503, f"seq {opened.seq} is being handled; retry")
        self._extend_lease(opened.ts_ms, now_ms)
        self._inflight.add(key)
        return opened

    def _settle(self, opened: wire.Opened, took_effect: bool) -> None:
        """Wire thread: the envelope was handled; record it as seen if it took effect."""
        self._inflight.discard((opened.sender, opened.seq))
        if took_effect:
            self._replay.commit(opened.sender, opened.seq, opened.ts_ms)

    def _open_reply_checked(self, data: bytes, now_ms: int) -> wire.Opened:
        """Wire thread: a reply takes effect by being read: recorded at once."""
        opened = self._wire.open(data, now_ms, self._is_trusted, self._replay, commit=False)
        self._extend_lease(opened.ts_ms, now_ms)
        self._replay.commit(opened.sender, opened.seq, opened.ts_ms)
        return opened

    def _extend_lease(self, ts_ms: int, now_ms: int) -> None:
        """Wire thread: before an envelope with ``ts`` above the lease is accepted, the lease moves past it
        (fsynced): a tiny write at most every ``LEASE_STEP_MS`` of traffic, whatever the number of senders."""
        if ts_ms <= self._lease_ms:
            return
        lease = max(ts_ms, now_ms) + LEASE_STEP_MS
        store.write_json_atomic(self._state_dir / LEASE_FILE, {"lease_ms": lease}, fsync=True)
        self._lease_ms = lease

    def _write_clean_replay_state(self) -> None:
        """Wire thread, last thing of a graceful stop: the exact windows, for the next start."""
        state = {"format": REPLAY_FORMAT, "clean": True, "peers": self._replay.to_state()}
        store.write_json_atomic(self._state_dir / REPLAY_FILE, state, fsync=True)

    def _claimed_domain(self, data: bytes, now_ms: int, sender: bytes) -> str | None:
        """Wire thread: the ``domain`` in an untrusted sender's signed body, within the CLAIM_* budget."""
        t = time.monotonic()
        last = self._claims.get(sender)
        if (len(data) > CLAIM_MAX_BYTES or t - self._claim_last < CLAIM_GAP_S
                or (last is not None and t - last < CLAIM_EVERY_S)):
            return None
        self._claim_last = t
        self._claims[sender] = t
        self._claims.move_to_end(sender)
        while len(self._claims) > MAX_REFUSED_SENDERS * 2:
            self._claims.popitem(last=False)
        try:
            # A throwaway replay guard: the real one never hears of untrusted keys.
            opened = self._wire.open(data, now_ms, lambda _key: True, ReplayGuard(1, 1))
            domain = wire.decode_body(opened.body, self._wire_limits(self.cfg)).get("domain")
        except WireError:
            return None
        finally:
            self._wire.forget_peer(sender)
        return domain if isinstance(domain, str) and configmod._domain(domain) is None else None

    async def _handle(self, data: bytes, remote: str) -> Reply:
        now_ms = int(time.time() * 1000)
        try:
            opened = await self._in_wire(self._open_checked, data, now_ms)
        except WireError as exc:
            if isinstance(exc, _UntrustedSender):
                self.refused.record(exc.sender, time.monotonic(), remote, exc.domain)
            self.reject(exc.reason, remote, exc.detail)
            if exc.reason in UNAUTHENTICATED:
                return Reply.error(403, "untrusted", UNAUTHENTICATED_DETAIL)
            return Reply.error(exc.status, exc.reason, exc.detail)
        except (OSError, StoreError) as exc:  # extending the replay lease failed (disk full...): refuse rather
            # than risk a replay later; the sender keeps its mass and retries.
            if self._quiet.should_log(("replay_state_write_failed",))[0]:
                log.error("replay_state_write_failed", error=str(exc))
            self.stats.rejected["unavailable"] += 1
            return Reply.error(503, "unavailable", "cannot persist replay state")
        took_effect = False
        try:
            reply = await self._handle_opened(opened, data, remote)
            took_effect = reply.status < 300
            return dataclasses.replace(reply, authenticated=True)  # signed by a trusted key, not a replay
        finally:  # submitted, not awaited: runs (in order, on the wire thread) even if this task is cancelled
            self._wire_exec.submit(self._settle, opened, took_effect)

    async def _handle_opened(self, opened: wire.Opened, data: bytes, remote: str) -> Reply:
        try:
            body = await self._decode(opened.body)
        except WireError as exc:
            self.reject(exc.reason, remote, exc.detail, opened.sender)
            return Reply.error(exc.status, exc.reason, exc.detail)
        sender = opened.sender
        addr = body.get("addr")
        addr = addr if isinstance(addr, str) and disc.check_address(addr) is None else None
        self.table.heard_from(sender, time.monotonic(), address=addr, seq=opened.seq)
        try:
            reply = await self._dispatch(opened, body, remote)
        except WireError as exc:
            self.reject(exc.reason, remote, exc.detail, sender)
            return Reply.error(exc.status, exc.reason, exc.detail)
        except (OSError, StoreError) as exc:  # sealing the answer needs the sequence file: disk full...
            self.stats.rejected["unavailable"] += 1
            if self._quiet.should_log(("reply_failed", type(exc).__name__))[0]:
                log.error("reply_failed", error=str(exc))
            return Reply.error(503, "unavailable", "cannot persist protocol state")
        except Exception as exc:  # one message never takes the daemon down
            self.stats.rejected["internal"] += 1
            if self._quiet.should_log(("request_failed", type(exc).__name__))[0]:
                log.exception("request_failed", kind=opened.kind, peer_id=peer_id_of(sender))
            return Reply.error(500, "internal", "the receiver failed on this message")
        # `received` counts what took effect; every refusal is counted once, under its reason, in `rejected`.
        if reply.status < 300:
            self.stats.received += 1
            self.stats.bytes_received += len(data)
        return reply

    async def _dispatch(self, opened: wire.Opened, body: dict[str, Any], remote: str = "") -> Reply:
        kind, sender = opened.kind, opened.sender
        if kind == "ping":
            if not self.cfg.mesh.enabled:
                raise WireError("not_joined", 503, "this domain has left the mesh")
            if "tasks" in body:  # a ping lists the sender's tasks too: a task it just added is known at once
                self._note_tasks(sender, body)
            return Reply(200, await self._seal(sender, "pong", self._pong_body(toward=remote)))
        if kind == "leave":
            self.table.left(sender, time.monotonic(), seq=opened.seq)
            log.info("peer_left", peer_id=peer_id_of(sender), reason=str(body.get("reason", ""))[:64])
            return Reply(204)
        if kind in ("share", "pull"):
            if not self.cfg.mesh.enabled or self._closed:
                # Leaving or shutting down: refused, the sender keeps the mass.
                raise WireError("not_joined", 503, "this domain has left the mesh")
            task = self._route(sender, body)
            answer = await task.receive(kind, sender, body)
            if answer.error is not None:
                raise WireError(answer.error, answer.status, answer.detail)
            if answer.kind is None or answer.body is None:
                return Reply(answer.status)
            return Reply(answer.status, await self._seal(sender, answer.kind, answer.body))
        raise WireError("unknown_kind", 400, f"kind {kind!r} is not served")

    def _route(self, sender: bytes, body: dict[str, Any]) -> TaskEndpoint:
        """The task an envelope names (``task``; absent = the default task), if the sender is in its cohort."""
        name = body.get("task", DEFAULT_TASK)
        if not isinstance(name, str) or len(name) > 64:
            raise WireError("bad_body", 400, "task must be a task name")
        task = self._tasks.get(name)
        if task is None:
            raise WireError("unknown_task", 409, f"this domain runs no task {name!r}")
        peer = self.table.get(sender)
        domain = body.get("domain") if isinstance(body.get("domain"), str) else (peer.domain if peer else None)
        if not task.admits(sender, domain):
            raise WireError("not_in_cohort", 409, f"task {name!r} here does not learn with domain {domain!r}")
        return task

    # --- sending -----------------------------------------------------------------------------------------

    def _pong_body(self, toward: str = "") -> dict[str, Any]:
        """A ping or a pong: who we are, where we listen (as seen from ``toward``, a "host:port" or a host),
        and the tasks we run (name, model and data schema fingerprints)."""
        ids = self.task_ids()
        fp, schema = _default_ids(ids)
        body: dict[str, Any] = {
            **self.hello_body(),
            **self._addr_field(toward),
            "tasks": [{"name": n, "fp": f, "schema": s} for n, (f, s) in list(ids.items())[:MAX_PONG_TASKS]],
        }
        if fp is not None:
            body |= {"fp": fp, "schema": schema}
        return body

    def _advertised_address(self) -> str | None:
        """Our dialable address when it does not depend on the peer: ``listen.advertise``, the peer listener's
        own address, or with a wildcard listener the first mDNS interface."""
        if self.cfg.listen.advertise:
            return self.cfg.listen.advertise
        if self.listen_host not in ("0.0.0.0", "::", ""):
            return f"{self.listen_host}:{self.listen_port}"
        ifaces = self.cfg.discovery.mdns.interfaces
        if ifaces:
            return _join_host_port(ifaces[0], self.listen_port)
        return None

    def _addr_field(self, toward: str) -> dict[str, str]:
        """``{"addr": ...}`` for a body sent to (or answering) ``toward``: with a wildcard listener and nothing
        configured, the local address of the route to that peer (what it can dial back); {} if unknown."""
        addr = self._advertised_address()
        if addr is None and toward:
            host = _route_source(self._routes, toward)
            addr = _join_host_port(host, self.listen_port) if host else None
        return {"addr": addr} if addr else {}

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

    async def exchange(self, peer_id: bytes, address: str, kind: str, body: dict[str, Any]) -> tuple[int, bytes, int]:
        """Seal, send, account. Returns (status, body, attempts); raises SendError if nobody answered."""
        assert self._client is not None
        if "addr" not in body:  # every signed body says where we listen, even behind a wildcard listener
            body = {**body, **self._addr_field(address)}
        try:
            envelope = await self._seal(peer_id, kind, body)
        except ValueError as exc:  # e.g. a registry key that no envelope can be sealed to: this send fails alone
            self.stats.send_failures += 1
            raise SendError(f"cannot seal to {peer_id_of(peer_id)[:16]}: {exc}") from None
        started = time.monotonic()
        try:
            status, reply, attempts = await self._client.post(address, envelope)
        except SendError:
            self.stats.send_failures += 1
            self.table.send_failed(peer_id, time.monotonic(), address)
            raise
        elapsed = time.monotonic() - started
        self.stats.sent += 1
        self.stats.bytes_sent += len(envelope)
        self.stats.observe_exchange(kind, elapsed)
        peer = self.table.get(peer_id)
        if peer is None or peer.address != address:
            pass  # an address not verified yet: an unsigned status from it says nothing about the peer
        elif status == 503 and b'"not_joined"' in reply:
            self.table.left(peer_id, time.monotonic())  # it answered: it is there, but out of the mesh
        elif 200 <= status < 300 or status in (409, 503):
            # Accepted, or refused by a meshd that read our envelope (replayed/incompatible, busy). Any other
            # 4xx is no sign of life: some other server at that address (404), or a peer refusing us (403).
            self.table.heard_from(peer_id, time.monotonic(), asked_at=started)
            if peer_id in self._trusted:
                self._rtt[peer_id] = smoothed(self._rtt.get(peer_id), elapsed)
        quiet_key = ("send_refused", peer_id_of(peer_id), str(status))
        if status >= 400 and status != 503 and self._quiet.should_log(quiet_key)[0]:
            log.warning("send_refused", peer_id=peer_id_of(peer_id), kind=kind, status=status,
                        task=body.get("task"), reply=reply[:200].decode(errors="replace"))
        return status, reply, attempts

    async def open_reply(self, peer_id: bytes, reply: bytes, want_kind: str) -> dict[str, Any] | None:
        try:
            opened = await self._in_wire(self._open_reply_checked, reply, int(time.time() * 1000))
            if opened.sender != peer_id or opened.kind != want_kind:
                raise WireError("bad_reply", 400, "unexpected reply")
            return await self._decode(opened.body)
        except WireError as exc:
            self.reject("reply_" + exc.reason, peer_id_of(peer_id)[:16], exc.detail, peer_id)
            return None

    async def _send_leave(self, reason: str) -> None:
        targets = [p for p in self.table.peers() if p.address and p.state != PeerState.LEFT]
        async with asyncio.TaskGroup() as tg:
            for p in targets:
                tg.create_task(self._quietly(self.exchange(p.peer_id, p.address or "", "leave", {"reason": reason})))
        log.info("leave_sent", peers=len(targets), reason=reason)

    async def _announce(self) -> None:
        """Ping every known peer now: after a leave, our own table aged them to dead, and they marked us
        left; a signed ping makes both sides alive again without waiting for the dead-peer probe."""
        targets = [p for p in self.table.peers() if p.address]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cfg.gossip.request_timeout_s), asyncio.TaskGroup() as tg:
                for p in targets:
                    key = (p.peer_id, p.address or "")
                    if key not in self._pinging:
                        self._pinging.add(key)
                        tg.create_task(self._ping(*key))
        log.info("join_announced", peers=len(targets))

    def _note_tasks(self, peer_id: bytes, body: dict[str, Any]) -> None:
        """A ping or pong lists the tasks the peer runs: the table shows them, each task of ours learns whether
        the peer runs it too (and with which model and schema) before any share is sent."""
        ids = _pong_tasks(body)
        self.table.advertised(peer_id, ids)
        now = time.monotonic()
        for name, task in self._tasks.items():
            task.peer_advertised(peer_id, ids.get(name), now)

    @staticmethod
    async def _quietly(coro: Coroutine[Any, Any, Any]) -> None:
        with contextlib.suppress(SendError, MeshdError):
            await coro

    # --- loops -------------------------------------------------------------------------------------------

    async def _membership_loop(self) -> None:
        async with asyncio.TaskGroup() as tg:
            while True:
                now = time.monotonic()
                if self._announce_wanted and self.cfg.mesh.enabled:
                    self._announce_wanted = False
                    for p in self.table.peers():
                        if p.address and p.state != PeerState.LEFT and (p.peer_id, p.address) not in self._pinging:
                            self._pinging.add((p.peer_id, p.address))
                            tg.create_task(self._ping(p.peer_id, p.address))
                for effect in self.table.tick(now):
                    if isinstance(effect, StateChanged):
                        log.info("peer_state", peer_id=peer_id_of(effect.peer_id),
                                 old=str(effect.old), new=str(effect.new))
                    elif isinstance(effect, AddressChanged):
                        log.info("peer_address", peer_id=peer_id_of(effect.peer_id), old=effect.old, new=effect.new)
                    elif isinstance(effect, Reaped):
                        self._rtt.pop(effect.peer_id, None)
                        log.info("peer_reaped", peer_id=peer_id_of(effect.peer_id), state=str(effect.state))
                    elif (isinstance(effect, Ping) and self.cfg.mesh.enabled
                          and (key := (effect.peer_id, effect.address)) not in self._pinging
                          and len(self._pinging) < MAX_CONCURRENT_PINGS):
                        self._pinging.add(key)
                        tg.create_task(self._ping(effect.peer_id, effect.address))
                await asyncio.sleep(TICK_S)

    async def _ping(self, peer_id: bytes, address: str) -> None:
        """Ping ``peer_id`` at ``address``: a signed pong from its key verifies that address (gossip may go
        there); anything else (no answer, an unsigned status, a pong from another key) does not."""
        asked = time.monotonic()
        try:
            status, reply, _ = await self.exchange(peer_id, address, "ping", self._pong_body(toward=address))
            pong = await self.open_reply(peer_id, reply, "pong") if status == 200 else None
            now = time.monotonic()
            if pong is None:
                self.table.probe_failed(peer_id, address, now)
                return
            self.table.verified(peer_id, address, now, asked_at=asked)
            addr = pong.get("addr")
            if isinstance(addr, str) and disc.check_address(addr) is None:
                self.table.heard_from(peer_id, now, address=addr, asked_at=asked)
            self._note_tasks(peer_id, pong)
        except (SendError, MeshdError):
            pass
        finally:
            self._pinging.discard((peer_id, address))

    # --- rejections and status -----------------------------------------------------------------------------

    def _transport_reject(self, reason: str, remote: str) -> None:
        self.reject(reason, remote, "")

    def reject(self, reason: str, remote: str, detail: str, sender: bytes | None = None) -> None:
        self.stats.rejected[reason] += 1
        who = peer_id_of(sender) if sender else remote
        ok, suppressed = self._quiet.should_log(("rejected", reason, who))
        if ok:
            log.warning("message_rejected", reason=reason, remote=remote, detail=detail[:200],
                        **({"peer_id": peer_id_of(sender)} if sender else {}), suppressed=suppressed)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "listen": {"peer": f"{self.listen_host}:{self.listen_port}", "advertise": self._advertised_address()},
            "mesh": {
                "joined": self.cfg.mesh.enabled,
                "enabled": self.cfg.mesh.enabled,
                "peers": [{**row, "rtt_s": self._rtt.get(bytes.fromhex(str(row["peer_id"])))}
                          for row in self.table.snapshot(now)],
                "counts": self.table.counts(),
                "untrusted_seen": self.table.untrusted_snapshot(),
                "untrusted_senders": self.refused.snapshot(now),
                "trusted": len(self._trusted),
                "mdns": self._mdns is not None,
            },
        }


MAX_ROUTES = 256  # peer hosts whose route source address is cached


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _route_source(cache: OrderedDict[str, str | None], toward: str) -> str | None:
    """The local IP address the kernel would send from to reach ``toward`` (a "host:port" or a host): the
    address that peer can dial back when we listen on a wildcard address. Only IP literals (resolving a
    name could block); a UDP connect sends nothing. Cached, bounded."""
    host = toward.rpartition(":")[0] if toward.count(":") == 1 or toward.startswith("[") else toward
    host = host.strip("[]")
    if host in cache:
        cache.move_to_end(host)
        return cache[host]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    source: str | None = None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((str(ip), 9))  # no packet: a UDP connect only picks the route
            source = str(sock.getsockname()[0])
    except OSError:
        source = None
    if source is not None and ipaddress.ip_address(source.split("%")[0]).is_unspecified:
        source = None
    cache[host] = source
    while len(cache) > MAX_ROUTES:
        cache.popitem(last=False)
    return source


def _remove_durably(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    store.fsync_dir(path.parent)


class _UntrustedSender(WireError):
    """An envelope refused as ``untrusted``, with the key that sent it and the domain its body claims."""

    def __init__(self, exc: WireError, sender: bytes, domain: str | None) -> None:
        super().__init__(exc.reason, exc.status, exc.detail)
        self.sender = sender
        self.domain = domain


def _pong_tasks(body: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """The tasks a pong lists; a pong without ``tasks`` (a single-model or minimal peer) runs the default task."""
    tasks = body.get("tasks")
    out: dict[str, tuple[str | None, str | None]] = {}
    if not isinstance(tasks, list):
        fp, schema = body.get("fp"), body.get("schema")
        if isinstance(fp, str) and len(fp) <= 64:
            out[DEFAULT_TASK] = (fp, schema if isinstance(schema, str) and len(schema) <= 64 else None)
        return out
    for item in tasks[:MAX_PONG_TASKS]:
        if not isinstance(item, dict):
            continue
        name, fp, schema = item.get("name"), item.get("fp"), item.get("schema")
        if not isinstance(name, str) or len(name) > 64:
            continue
        out[name] = (fp if isinstance(fp, str) and len(fp) <= 64 else None,
                     schema if isinstance(schema, str) and len(schema) <= 64 else None)
    return out


def _default_ids(ids: dict[str, tuple[str, str]]) -> tuple[str | None, str | None]:
    """TXT/pong ``fp`` and ``schema``: the default task's, or the only task's (what a single-model peer reads)."""
    one = ids.get(DEFAULT_TASK) or (next(iter(ids.values())) if len(ids) == 1 else None)
    return (one[0], one[1]) if one else (None, None)
