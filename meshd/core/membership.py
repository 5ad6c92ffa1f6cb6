"""The peer table: which trusted peers exist, where they are, and whether they are alive.

Pure: no I/O and no clock. Every method takes ``now`` (seconds, any monotonic origin) and
:meth:`PeerTable.tick` *returns* what the shell should do (ping a peer, report a state change).

Addresses. Discovery (mDNS, static list, registry) and a peer's own signed ``addr`` only *propose*
addresses: each peer keeps up to ``MAX_CANDIDATES`` candidate addresses, and gossip goes to its *verified*
address only, the last one a signed pong from that peer's key came from (:meth:`PeerTable.verified`). A new
candidate is probed (pinged) at once, then with exponential backoff while it does not answer with a signed
pong; the verified address is kept until another one is verified. An mDNS goodbye only withdraws that
proposal: a verified address is kept and re-verified by an immediate ping (a forged goodbye costs one ping).

Liveness rules (all bounds are inclusive: "after X s" means ``now - t >= X``):

- ``UNKNOWN``: proposed but never heard from. Its candidates are probed; becomes ``DEAD`` after
  ``dead_after_s`` without contact.
- ``ALIVE`` -> ``SUSPECT`` after ``suspect_after_s`` of silence (or at once on a failed send).
- ``SUSPECT`` -> ``DEAD`` after ``dead_after_s`` of silence (measured from the last contact).
- ``DEAD`` peers are re-probed with backoff: ``dead_after_s`` after death, then twice as long each time, at
  most ``probe_max_s`` apart, so a restarted peer comes back.
- ``LEFT`` peers (signed leave) are never pinged.
- A ``DEAD`` or ``LEFT`` peer is removed from the table (reaped) after ``reap_after_s`` in that state,
  unless a list source (static, registry) names it: those are kept and probed at most every ``probe_max_s``.
- Any valid message (:meth:`PeerTable.heard_from`) makes a peer ``ALIVE`` from any state; a fresh
  proposal of a new address for a ``DEAD``/``LEFT`` peer makes it ``UNKNOWN`` again (discovery is not
  authenticated, so it does not prove liveness: the immediate probe does).

State changes made by event methods (``heard_from``, ``left``...) are queued and returned by the
next :meth:`PeerTable.tick`, so the caller sees every transition in one place.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "DISCOVERY_SOURCES",
    "MAX_CANDIDATES",
    "AddressChanged",
    "Candidate",
    "Effect",
    "Peer",
    "PeerState",
    "PeerTable",
    "Ping",
    "Reaped",
    "RefusedSenders",
    "StateChanged",
    "Timing",
    "UntrustedSighting",
    "exponential_targets",
    "ring_key",
]

#: Sources that report addresses of other peers (``inbound`` is the address a peer told us itself).
DISCOVERY_SOURCES = frozenset({"static", "mdns", "registry"})
_INBOUND = "inbound"
_LIST_SOURCES = frozenset({"static", "registry"})  # lists of peers; their "gone" means "delisted"
MAX_TASKS_PER_PEER = 32  # advertised tasks kept per peer (mDNS TXT and pongs are bounded too)
#: Candidate addresses kept per peer: the verified one, the list sources' and a few proposals (a LAN attacker
#: advertising a trusted id at many addresses only turns the unverified ones over).
MAX_CANDIDATES = 8
PING_DEFER = 1.5  # the larger id of a silent pair pings after ping_after_s x this: one ping per pair, not two


def exponential_targets(ids: list[bytes], me: bytes, round_no: int, count: int) -> list[bytes]:
    """Up to ``count`` distinct peers ``me`` sends to in round ``round_no`` of the one-peer exponential graph
    over ``ids`` (``me`` among them) on the ring of the round's cycle: ``2**((round_no + j) mod hops)`` places
    after ``me`` for ``j = 0, 1, ...``, with ``hops = ceil(log2 len(ids))`` rounds a cycle (see
    :meth:`PeerTable.gossip_targets`). The benches' simulations call it too, so they walk the daemons' graph."""
    n = len(ids)
    hops = max(1, math.ceil(math.log2(n)))
    cycle = round_no // hops
    ring = sorted(ids, key=lambda k: ring_key(cycle, k))
    at = ring.index(me)
    out: list[bytes] = []
    for j in range(hops):
        peer = ring[(at + 2 ** ((round_no + j) % hops)) % n]
        if peer != me and peer not in out:
            out.append(peer)
        if len(out) >= count:
            break
    return out


def ring_key(cycle: int, peer_id: bytes) -> bytes:
    """Where ``peer_id`` sits on the exponential topology's ring in ``cycle``: every node computes the same
    order for the same cycle from the ids alone (BLAKE2b of the cycle and the id), and a new one each cycle."""
    return hashlib.blake2b(cycle.to_bytes(8, "big", signed=True) + peer_id, digest_size=16).digest()


class PeerState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"
    UNKNOWN = "unknown"  # proposed by a source, never heard from


@dataclass(frozen=True)
class Timing:
    """Liveness timers, in seconds of silence (time since the last valid message from a peer)."""

    suspect_after_s: float = 5.0  # ALIVE -> SUSPECT
    dead_after_s: float = 15.0  # SUSPECT (or UNKNOWN) -> DEAD; also the first re-probe delay of a DEAD peer
    ping_after_s: float = 2.0  # silence before a ping is due; also the first retry of an unanswered probe
    probe_max_s: float = 300.0  # longest backoff between probes of an unanswering address or a DEAD peer
    reap_after_s: float = 3600.0  # DEAD or LEFT this long: removed from the table (unless a list names it)

    def __post_init__(self) -> None:
        if self.ping_after_s <= 0:
            raise ValueError(f"ping_after_s must be > 0, got {self.ping_after_s}")
        if not 0 < self.suspect_after_s < self.dead_after_s:
            raise ValueError(
                f"need 0 < suspect_after_s < dead_after_s, got {self.suspect_after_s} and {self.dead_after_s}"
            )
        if self.probe_max_s < self.ping_after_s:
            raise ValueError(f"probe_max_s must be >= ping_after_s, got {self.probe_max_s}")
        if self.reap_after_s <= 0:
            raise ValueError(f"reap_after_s must be > 0, got {self.reap_after_s}")


@dataclass
class Candidate:
    """An address proposed for a peer. Gossip goes to it only once a signed pong came from it."""

    address: str
    sources: list[str]  # who proposes it (static, registry, mdns, inbound), newest last; may become empty
    proposed_at: float
    verified_at: float | None = None  # the last signed pong from the peer's key at this address
    recheck: bool = False  # a goodbye withdrew it: ping it again now (it stays in use meanwhile)
    failures: int = 0  # probes in a row without a signed pong
    probe_due_at: float | None = None  # next probe (None: at the next tick)


@dataclass
class Peer:
    """One trusted peer. Mutated only by :class:`PeerTable`; callers get it read-only by convention."""

    peer_id: bytes
    domain: str
    address: str | None  # the verified address gossip goes to; None until a signed pong came from one
    source: str  # who proposed the address in use (or the newest candidate): static|mdns|registry|inbound
    state: PeerState
    last_seen: float | None  # last valid message or ack
    failures: int = 0  # failed sends since the last contact
    # The learning tasks it advertises (mDNS TXT, signed pongs): name -> (model fp, data schema fp).
    tasks: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    # Bookkeeping (not part of the status contract):
    since: float | None = None  # when the current state began (None: set by the next tick)
    ping_due_at: float | None = None  # next liveness ping to ``address`` (one outstanding ping at a time)
    dead_probes: int = 0  # liveness pings sent while DEAD (the backoff exponent)
    candidates: dict[str, Candidate] = field(default_factory=dict)  # address -> candidate, oldest first
    touched: float = 0.0  # last time anything updated this entry (eviction order)
    left_seq: int | None = None  # the sequence number of its signed leave, while LEFT


@dataclass(frozen=True)
class UntrustedSighting:
    """A key that discovery reported but governance does not trust: shown, never contacted."""

    peer_id: bytes
    domain: str
    address: str
    source: str
    seen_at: float


@dataclass(frozen=True)
class Ping:
    """Send a signed ping to ``peer_id`` at ``address``; report the answer with ``verified``/``probe_failed``."""

    peer_id: bytes
    address: str


@dataclass(frozen=True)
class StateChanged:
    peer_id: bytes
    old: PeerState
    new: PeerState


@dataclass(frozen=True)
class AddressChanged:
    """A signed pong came from a new address: gossip goes there from now on."""

    peer_id: bytes
    old: str | None
    new: str


@dataclass(frozen=True)
class Reaped:
    """A peer ``DEAD`` or ``LEFT`` for ``reap_after_s`` was removed from the table."""

    peer_id: bytes
    state: PeerState


Effect = Ping | StateChanged | AddressChanged | Reaped


class PeerTable:
    """Trusted keys, candidate and verified addresses, and liveness of the peers of one domain."""

    def __init__(self, self_id: bytes, timing: Timing, max_peers: int = 1024, max_untrusted: int = 256) -> None:
        if max_peers < 1 or max_untrusted < 1:
            raise ValueError("max_peers and max_untrusted must be >= 1")
        self.self_id = self_id
        self.timing = timing
        self.max_peers = max_peers
        self.max_untrusted = max_untrusted
        self._trusted: frozenset[bytes] = frozenset()
        self._peers: dict[bytes, Peer] = {}
        # Insertion order = age: the first entry is the oldest sighting.
        self._untrusted: dict[bytes, UntrustedSighting] = {}
        self._pending: list[Effect] = []

    # ----------------------------------------------------------------- queries

    def get(self, peer_id: bytes) -> Peer | None:
        return self._peers.get(peer_id)

    def is_trusted(self, peer_id: bytes) -> bool:
        return peer_id in self._trusted

    @property
    def trusted(self) -> frozenset[bytes]:
        return self._trusted

    def peers(self) -> list[Peer]:
        """All known trusted peers, ordered by peer id."""
        return [self._peers[k] for k in sorted(self._peers)]

    def __len__(self) -> int:
        return len(self._peers)

    # ----------------------------------------------------------------- trust

    def set_trusted(self, keys: Iterable[bytes]) -> None:
        """Replace the trusted set.

        Peers no longer trusted are dropped at once (they stop being gossip or ping targets); if a
        discovery source had reported them they move to the untrusted sightings. Sightings whose key
        becomes trusted are promoted to ``UNKNOWN`` peers, so they are probed on the next tick.
        """
        new = frozenset(k for k in keys if k != self.self_id)
        for pid in [p for p in self._peers if p not in new]:
            peer = self._peers.pop(pid)
            found = [(s, c.address) for c in peer.candidates.values() for s in c.sources if s != _INBOUND]
            if found:
                source, address = found[-1]
                self._add_untrusted(UntrustedSighting(pid, peer.domain, address, source, peer.touched))
        self._trusted = new
        for pid in [p for p in self._untrusted if p in new]:
            s = self._untrusted.pop(pid)
            peer = self._new_peer(pid, s.domain, PeerState.UNKNOWN, s.seen_at)
            peer.since = None  # the UNKNOWN -> DEAD timer starts at the next tick
            self._propose(peer, s.source, s.address, s.seen_at)

    # ----------------------------------------------------------------- events

    def discovered(
        self,
        peer_id: bytes,
        address: str,
        domain: str,
        source: str,
        now: float,
        tasks: dict[str, tuple[str | None, str | None]] | None = None,
    ) -> None:
        """A discovery source proposes ``peer_id`` at ``address`` (probed before any gossip goes there)."""
        if peer_id == self.self_id:
            return
        if peer_id not in self._trusted:
            self._untrusted.pop(peer_id, None)  # re-insert at the end: newest
            self._add_untrusted(UntrustedSighting(peer_id, domain, address, source, now))
            return
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._new_peer(peer_id, domain, PeerState.UNKNOWN, now)
        peer.domain = domain
        if tasks:
            self._set_tasks(peer, tasks)
        peer.touched = now
        news = self._propose(peer, source, address, now)
        if news and peer.state in (PeerState.DEAD, PeerState.LEFT):
            self._change(peer, PeerState.UNKNOWN, now)

    def advertised(self, peer_id: bytes, tasks: dict[str, tuple[str | None, str | None]]) -> None:
        """The peer told us (signed, in a pong) which tasks it runs: name -> (model fp, data schema fp)."""
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.tasks = {}
            self._set_tasks(peer, tasks)

    @staticmethod
    def _set_tasks(peer: Peer, tasks: dict[str, tuple[str | None, str | None]]) -> None:
        for name, ids in list(tasks.items())[:MAX_TASKS_PER_PEER]:
            if name in peer.tasks or len(peer.tasks) < MAX_TASKS_PER_PEER:
                peer.tasks[name] = ids

    def gone(self, peer_id: bytes, source: str, now: float, address: str | None = None) -> None:
        """A source withdraws what it proposed for the peer (``address``, or all it proposed if None).

        mDNS (a goodbye, which anyone on the LAN can forge): the proposal is withdrawn; an unverified
        address nobody else proposes is forgotten, but the verified address stays in use and is pinged
        again at once (re-verification): only a failed send or silence demotes the peer, and a signed
        leave makes it ``LEFT``. A list source (``static``/``registry``) that no longer lists the peer is
        :meth:`forget_source` for this one peer.
        """
        sighting = self._untrusted.get(peer_id)
        if sighting is not None and sighting.source == source and address in (None, sighting.address):
            del self._untrusted[peer_id]
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if source in _LIST_SOURCES:
            self._forget(peer, source)
            return
        for cand in list(peer.candidates.values()):
            if (address is not None and cand.address != address) or source not in cand.sources:
                continue
            cand.sources.remove(source)
            peer.touched = now
            if cand.address == peer.address:
                # Pinged at the next tick, or (goodbyes in a row) ping_after_s after the last re-check ping.
                cand.recheck = True
            elif not cand.sources:
                del peer.candidates[cand.address]
        self._refresh_source(peer)

    def heard_from(self, peer_id: bytes, now: float, address: str | None = None, *, seq: int | None = None,
                   asked_at: float | None = None) -> None:
        """A valid message or ack arrived from ``peer_id``: it is ``ALIVE``.

        Except for a ``LEFT`` peer, when the evidence is older than its leave: a message it sealed before
        (``seq`` not above the leave's), or the answer to a request sent before the leave arrived
        (``asked_at``). Those were in flight when it left; they used to bring it back ``ALIVE``, and an
        operator then saw it ``DEAD`` instead of ``LEFT``.

        ``address`` is the peer's own listening address if its signed message carried one: a candidate
        like any other (probed before gossip goes there). Untrusted senders are ignored (the wire layer
        rejects them first anyway).
        """
        if peer_id == self.self_id or peer_id not in self._trusted:
            return
        peer = self._peers.get(peer_id)
        if peer is not None and peer.state == PeerState.LEFT and (
                (seq is not None and peer.left_seq is not None and seq <= peer.left_seq)
                or (asked_at is not None and peer.since is not None and asked_at <= peer.since)):
            return
        if peer is None:
            peer = self._new_peer(peer_id, "", PeerState.ALIVE, now)
        elif peer.state != PeerState.ALIVE:
            self._change(peer, PeerState.ALIVE, now)
        peer.last_seen = now
        peer.failures = 0
        peer.ping_due_at = None
        peer.dead_probes = 0
        peer.touched = now
        if address is not None:
            self._propose(peer, _INBOUND, address, now)

    def verified(self, peer_id: bytes, address: str, now: float, asked_at: float | None = None) -> None:
        """A signed pong from ``peer_id`` answered a ping sent to ``address`` (at ``asked_at``): gossip goes
        there now."""
        peer = self._peers.get(peer_id)
        if peer is None or peer_id not in self._trusted:
            return
        cand = peer.candidates.get(address)
        if cand is None:  # turned over while the ping was out: it proved itself, keep it
            cand = self._add_candidate(peer, address, now)
        cand.verified_at, cand.recheck, cand.failures = now, False, 0
        if peer.address != address:
            self._pending.append(AddressChanged(peer_id, peer.address, address))
            peer.address = address
        self._refresh_source(peer)
        self.heard_from(peer_id, now, asked_at=asked_at)

    def probe_failed(self, peer_id: bytes, address: str, now: float) -> None:
        """A ping to ``address`` got no signed pong from ``peer_id``: that address is retried with backoff."""
        peer = self._peers.get(peer_id)
        cand = peer.candidates.get(address) if peer is not None else None
        if cand is not None:
            cand.failures += 1

    def send_failed(self, peer_id: bytes, now: float, address: str | None = None) -> None:
        """A send (gossip or ping) to ``peer_id`` failed.

        At its verified address (or ``address`` None): an ``ALIVE`` peer becomes ``SUSPECT``. At another
        candidate address: only that candidate's probe backoff grows.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        peer.touched = now
        if address is not None:
            self.probe_failed(peer_id, address, now)
            if address != peer.address:
                return
        peer.failures += 1
        if peer.state == PeerState.ALIVE:
            self._change(peer, PeerState.SUSPECT, now)

    def left(self, peer_id: bytes, now: float, seq: int | None = None) -> None:
        """A signed leave message (sequence number ``seq``) arrived: ``LEFT`` at once, no more pings."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        peer.touched = now
        peer.ping_due_at = None
        peer.left_seq = seq
        if peer.state != PeerState.LEFT:
            self._change(peer, PeerState.LEFT, now)

    def forget_source(self, source: str, keep: set[bytes]) -> None:
        """After a static/registry reload: forget what ``source`` said about peers not in ``keep``.

        An entry that no other source reports and that was never heard from is removed; otherwise
        only that source's proposal is dropped (a verified address stays in use).
        """
        for pid in [p for p, s in self._untrusted.items() if s.source == source and p not in keep]:
            del self._untrusted[pid]
        for pid in [p for p, peer in self._peers.items() if p not in keep and _proposes(peer, source)]:
            self._forget(self._peers[pid], source)

    # ----------------------------------------------------------------- time

    def tick(self, now: float) -> list[Effect]:
        """Advance timers to ``now``; return queued effects, state changes, reaped peers and due pings."""
        t = self.timing
        effects, self._pending = self._pending, []
        for pid in sorted(self._peers):
            peer = self._peers[pid]
            if peer.since is None:
                peer.since = now
            last = peer.last_seen if peer.last_seen is not None else peer.since
            if peer.state == PeerState.ALIVE and now - last >= t.suspect_after_s:
                effects.append(self._transition(peer, PeerState.SUSPECT, now))
            if peer.state == PeerState.SUSPECT:
                if now - last >= t.dead_after_s:
                    effects.append(self._transition(peer, PeerState.DEAD, now))
            elif peer.state == PeerState.UNKNOWN and now - peer.since >= t.dead_after_s:
                # Proposed (or re-proposed) but no answer since: counted from the proposal.
                effects.append(self._transition(peer, PeerState.DEAD, now))
            if (peer.state in (PeerState.DEAD, PeerState.LEFT) and now - peer.since >= t.reap_after_s
                    and not any(_proposes(peer, s) for s in _LIST_SOURCES)):
                del self._peers[pid]
                effects.append(Reaped(pid, peer.state))
                continue
            if peer.state == PeerState.LEFT:
                continue
            effects.extend(self._due_pings(peer, now))
        return effects

    def _due_pings(self, peer: Peer, now: float) -> list[Ping]:
        t = self.timing
        out: list[Ping] = []
        current = peer.candidates.get(peer.address) if peer.address is not None else None
        if peer.address is not None:
            recheck = current is not None and current.recheck and (
                current.probe_due_at is None or now >= current.probe_due_at)
            if peer.state == PeerState.DEAD:
                due = peer.ping_due_at is not None and now >= peer.ping_due_at
                if due or recheck:
                    peer.ping_due_at = now + min(t.probe_max_s, t.dead_after_s * 2.0 ** (peer.dead_probes + 1))
                    peer.dead_probes += 1
            else:
                # Of two peers silent towards each other, the one with the larger id waits half as long again:
                # the other's ping reaches it first (any signed message refreshes both ends), so a quiet pair
                # exchanges one ping per period instead of two.
                after = t.ping_after_s * (PING_DEFER if self.self_id > peer.peer_id else 1.0)
                idle = peer.last_seen is None or now - peer.last_seen >= after
                due = idle and (peer.ping_due_at is None or now >= peer.ping_due_at)
                if due or recheck:
                    peer.ping_due_at = now + t.ping_after_s
            if due or recheck:
                if current is not None and current.recheck:
                    current.probe_due_at = now + t.ping_after_s
                out.append(Ping(peer.peer_id, peer.address))
        for cand in peer.candidates.values():
            if cand.address == peer.address:
                continue
            # Unverified addresses are probed; a peer not ALIVE is looked for at every address it had.
            if cand.verified_at is not None and not cand.recheck and peer.state == PeerState.ALIVE:
                continue
            if cand.probe_due_at is None or now >= cand.probe_due_at:
                cand.probe_due_at = now + min(t.probe_max_s, t.ping_after_s * 2.0 ** min(cand.failures, 30))
                out.append(Ping(peer.peer_id, cand.address))
        return out

    # ----------------------------------------------------------------- choices

    def gossip_targets(
        self, rng: random.Random, fanout: int, *, topology: str = "random",
        round_no: int = 0, among: set[bytes] | None = None,
    ) -> list[Peer]:
        """Up to ``fanout`` distinct ALIVE peers with a verified address.

        Never UNKNOWN (not verified yet: a discovery proposal alone gets no gossip), DEAD, LEFT, SUSPECT or
        self; given ``among`` (a learning task's eligible peers: its cohort, minus those that cannot take its
        shares), only peers in it.

        ``topology="random"``: chosen uniformly. ``topology="exponential"``: the one-peer exponential graph
        (Ying et al. 2021) on a ring drawn afresh every cycle: the eligible peers and this node, ordered by
        ``ring_key(cycle, id)`` with ``cycle = r // ceil(log2 n)``, form a ring of ``n``; in round ``r`` this
        node sends to the peers ``2**((r + j) mod ceil(log2 n))`` places after it (``j < fanout``). When every
        node runs it in step, each cycle of ``ceil(log2 n)`` rounds averages exactly (``n`` a power of two);
        out of step it still mixes far faster than random choices at the same bytes. The ring changes every
        cycle (the same ring at every node for a given cycle, no coordination) so that over a few cycles a
        node exchanges with every peer, not only with the ``2 log2 n`` fixed neighbours of one ring: the model
        a node serves blends in the models its peers sent, and peers that lean the same way would bias it.
        """
        pool = [
            self._peers[k]
            for k in sorted(self._peers)
            if self._peers[k].state == PeerState.ALIVE and self._peers[k].address
            and (among is None or k in among)
        ]
        if fanout <= 0 or not pool:
            return []
        if topology != "exponential":
            return rng.sample(pool, min(fanout, len(pool)))
        by_id = {p.peer_id: p for p in pool}
        ids = exponential_targets([self.self_id, *by_id], self.self_id, round_no, min(fanout, len(pool)))
        return [by_id[k] for k in ids]

    # ----------------------------------------------------------------- reports

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Rows for ``/status`` ``mesh.peers``, ordered by domain then peer id."""
        rows: list[dict[str, object]] = []
        for p in sorted(self._peers.values(), key=lambda p: (p.domain, p.peer_id)):
            rows.append(
                {
                    "domain": p.domain,
                    "peer_id": p.peer_id.hex(),
                    "address": p.address,
                    "state": p.state.value,
                    "source": p.source,
                    "last_seen_s": None if p.last_seen is None else max(0.0, now - p.last_seen),
                    "tasks": {name: {"fp": fp, "schema": schema} for name, (fp, schema) in sorted(p.tasks.items())},
                    "candidates": [
                        {"address": c.address, "sources": list(c.sources), "verified": c.verified_at is not None,
                         "recheck": c.recheck, "failures": c.failures}
                        for c in p.candidates.values()
                    ],
                }
            )
        return rows

    def untrusted_snapshot(self) -> list[dict[str, object]]:
        """Keys seen by discovery that are not trusted, oldest sighting first."""
        return [
            {"peer_id": s.peer_id.hex(), "domain": s.domain, "address": s.address, "source": s.source}
            for s in self._untrusted.values()
        ]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in PeerState}
        for p in self._peers.values():
            out[p.state.value] += 1
        return out

    # ----------------------------------------------------------------- helpers

    def _new_peer(self, peer_id: bytes, domain: str, state: PeerState, now: float) -> Peer:
        if len(self._peers) >= self.max_peers:
            self._evict_one()
        peer = Peer(peer_id, domain, None, _INBOUND, state, None, since=now, touched=now)
        self._peers[peer_id] = peer
        return peer

    def _forget(self, peer: Peer, source: str) -> None:
        for cand in list(peer.candidates.values()):
            if source in cand.sources:
                cand.sources.remove(source)
                if not cand.sources and cand.address != peer.address:
                    del peer.candidates[cand.address]
        self._refresh_source(peer)
        if not peer.candidates and peer.last_seen is None:
            del self._peers[peer.peer_id]

    def _evict_one(self) -> None:
        # The least recently touched entry, preferring ones that are gone (DEAD, LEFT) anyway.
        def age(p: Peer) -> tuple[int, float, bytes]:
            gone = p.state in (PeerState.DEAD, PeerState.LEFT)
            return (0 if gone else 1, p.touched, p.peer_id)

        victim = min(self._peers.values(), key=age)
        del self._peers[victim.peer_id]

    def _add_untrusted(self, sighting: UntrustedSighting) -> None:
        self._untrusted.pop(sighting.peer_id, None)
        while len(self._untrusted) >= self.max_untrusted:
            del self._untrusted[next(iter(self._untrusted))]
        self._untrusted[sighting.peer_id] = sighting

    def _propose(self, peer: Peer, source: str, address: str, now: float) -> bool:
        """``source`` proposes ``address`` for the peer; True if that is news (a new address or proposer)."""
        if source in _LIST_SOURCES:  # a list names one address per peer: its older proposal is withdrawn
            for other in list(peer.candidates.values()):
                if other.address != address and source in other.sources:
                    other.sources.remove(source)
                    if not other.sources and other.address != peer.address:
                        del peer.candidates[other.address]
        cand = peer.candidates.get(address)
        news = cand is None or source not in cand.sources
        if cand is None:
            cand = self._add_candidate(peer, address, now)
        elif news and cand.verified_at is None:
            cand.probe_due_at = None  # proposed by one more source: probe it now, not at the end of its backoff
        if source in cand.sources:
            cand.sources.remove(source)
        cand.sources.append(source)
        cand.proposed_at = now
        self._refresh_source(peer)
        return news

    def _add_candidate(self, peer: Peer, address: str, now: float) -> Candidate:
        if len(peer.candidates) >= MAX_CANDIDATES:
            # Turn over the least valuable: never the address in use; unverified before verified, proposals
            # nobody lists before listed ones, then the oldest proposal.
            def value(c: Candidate) -> tuple[int, int, float]:
                listed = any(s in _LIST_SOURCES for s in c.sources)
                return (1 if c.verified_at is not None else 0, 1 if listed else 0, c.proposed_at)

            victim = min((c for c in peer.candidates.values() if c.address != peer.address), key=value)
            del peer.candidates[victim.address]
        cand = Candidate(address, [], now)
        peer.candidates[address] = cand
        return cand

    @staticmethod
    def _refresh_source(peer: Peer) -> None:
        # Who proposed the address in use (discovery before the peer's own word), else the newest candidate.
        cand: Candidate | None = None
        if peer.address is not None:
            cand = peer.candidates.get(peer.address)
        elif peer.candidates:
            cand = list(peer.candidates.values())[-1]
        if cand is not None and cand.sources:
            found = [s for s in cand.sources if s != _INBOUND]
            peer.source = found[-1] if found else _INBOUND

    def _change(self, peer: Peer, new: PeerState, now: float) -> None:
        self._pending.append(self._transition(peer, new, now))

    def _transition(self, peer: Peer, new: PeerState, now: float) -> StateChanged:
        old = peer.state
        peer.state = new
        peer.since = now
        if new == PeerState.DEAD:
            peer.ping_due_at = now + self.timing.dead_after_s
            peer.dead_probes = 0
        elif new == PeerState.UNKNOWN:
            peer.ping_due_at = None  # ping at once
            for cand in peer.candidates.values():
                cand.probe_due_at = None
        return StateChanged(peer.peer_id, old, new)


def _proposes(peer: Peer, source: str) -> bool:
    return any(source in c.sources for c in peer.candidates.values())


@dataclass
class RefusedSender:
    """A key whose envelopes were refused because it is not trusted: often a peer id with a typo."""

    peer_id: bytes
    domain: str | None  # the domain its signed body claims, when it could be read (see RefusedSenders)
    remote: str  # the address the last one came from
    count: int
    first_seen: float
    last_seen: float


class RefusedSenders:
    """The last ``max_entries`` untrusted keys that sent us envelopes, newest last; never grows beyond that.

    A flood of fresh keys only turns the table over: the oldest entry goes first. The domain a sender claims
    is only read from a signed body (the caller decides when it can afford to), never from a header.
    """

    def __init__(self, max_entries: int = 32) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._senders: dict[bytes, RefusedSender] = {}

    def __len__(self) -> int:
        return len(self._senders)

    def get(self, peer_id: bytes) -> RefusedSender | None:
        return self._senders.get(peer_id)

    def record(self, peer_id: bytes, now: float, remote: str, domain: str | None = None) -> RefusedSender:
        """One more refused envelope from ``peer_id``; a known ``domain`` is kept until a new one is read."""
        entry = self._senders.pop(peer_id, None)
        if entry is None:
            while len(self._senders) >= self.max_entries:
                del self._senders[next(iter(self._senders))]
            entry = RefusedSender(peer_id, domain, remote, 0, now, now)
        entry.count += 1
        entry.last_seen = now
        entry.remote = remote
        if domain is not None:
            entry.domain = domain
        self._senders[peer_id] = entry  # re-inserted at the end: newest
        return entry

    def forget(self, keys: Iterable[bytes]) -> None:
        """Drop the keys that became trusted."""
        for key in keys:
            self._senders.pop(key, None)

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Newest first: peer id, claimed domain, count, seconds since the last one, remote address."""
        return [
            {"peer_id": s.peer_id.hex(), "domain": s.domain, "count": s.count,
             "last_seen_s": max(0.0, now - s.last_seen), "remote": s.remote}
            for s in reversed(self._senders.values())
        ]
