"""The peer table, driven by a fake clock (plain floats) and a seeded random.Random."""

from __future__ import annotations

import itertools
import random

import pytest

from meshd.core.membership import (
    MAX_CANDIDATES,
    PING_DEFER,
    AddressChanged,
    Effect,
    PeerState,
    PeerTable,
    Ping,
    Reaped,
    StateChanged,
    Timing,
    ring_key,
)

T = Timing(suspect_after_s=5.0, dead_after_s=15.0, ping_after_s=2.0)
SELF = b"\x00" * 32
A, B, C, D = (bytes([i]) * 32 for i in (1, 2, 3, 4))
ADDR = {A: "10.0.0.1:7452", B: "10.0.0.2:7452", C: "10.0.0.3:7452", D: "10.0.0.4:7452"}


def table(*trusted: bytes, **kw: int) -> PeerTable:
    t = PeerTable(SELF, T, **kw)
    t.set_trusted(trusted)
    return t


def disc(t: PeerTable, pid: bytes, now: float, source: str = "mdns", address: str | None = None) -> None:
    t.discovered(pid, address or ADDR[pid], f"dom-{pid[0]}", source, now)


def state(t: PeerTable, pid: bytes) -> PeerState:
    p = t.get(pid)
    assert p is not None
    return p.state


def pings(effects: list[Effect]) -> list[bytes]:
    return [e.peer_id for e in effects if isinstance(e, Ping)]


def changes(effects: list[Effect]) -> list[tuple[bytes, PeerState, PeerState]]:
    return [(e.peer_id, e.old, e.new) for e in effects if isinstance(e, StateChanged)]


def alive(t: PeerTable, pid: bytes, now: float) -> None:
    """Make ``pid`` an ALIVE peer at its verified address ``ADDR[pid]``, with its queued effects drained."""
    disc(t, pid, now)
    t.verified(pid, ADDR[pid], now)
    t.tick(now)


def test_timing_validation() -> None:
    with pytest.raises(ValueError):
        Timing(suspect_after_s=15.0, dead_after_s=5.0)
    with pytest.raises(ValueError):
        Timing(ping_after_s=0)
    with pytest.raises(ValueError):
        PeerTable(SELF, T, max_peers=0)


# ------------------------------------------------------------------ discovery and trust


def test_discovered_trusted_peer_is_unknown_with_address() -> None:
    t = table(A)
    t.discovered(A, "10.0.0.1:7452", "sales", "mdns", 100.0, tasks={"fraud": ("fp1", "s1")})
    p = t.get(A)
    assert p is not None
    # A proposal, not an address in use: nothing is gossiped there before a signed pong came from it.
    assert (p.state, p.address, p.domain, p.source, p.tasks) == (
        PeerState.UNKNOWN,
        None,
        "sales",
        "mdns",
        {"fraud": ("fp1", "s1")},
    )
    assert list(p.candidates) == ["10.0.0.1:7452"] and p.candidates["10.0.0.1:7452"].sources == ["mdns"]
    assert p.last_seen is None and p.failures == 0
    assert t.tick(100.0) == [Ping(A, "10.0.0.1:7452")]  # probed at once
    assert t.gossip_targets(random.Random(0), 5) == []
    t.verified(A, "10.0.0.1:7452", 100.5)
    assert (p.state, p.address) == (PeerState.ALIVE, "10.0.0.1:7452")
    assert t.tick(100.5) == [AddressChanged(A, None, "10.0.0.1:7452"),
                             StateChanged(A, PeerState.UNKNOWN, PeerState.ALIVE)]
    assert t.untrusted_snapshot() == []


def test_discovered_untrusted_goes_to_untrusted_seen_never_to_peers() -> None:
    t = table(A)
    t.discovered(B, "10.0.0.2:1", "ops", "mdns", 1.0)
    assert t.get(B) is None
    assert t.untrusted_snapshot() == [{"peer_id": B.hex(), "domain": "ops", "address": "10.0.0.2:1", "source": "mdns"}]
    assert t.gossip_targets(random.Random(0), 10) == []
    assert pings(t.tick(2.0)) == []
    # Heard-from of an untrusted key is ignored too.
    t.heard_from(B, 3.0)
    assert t.get(B) is None


def test_self_is_never_a_peer() -> None:
    t = table(SELF, A)
    assert SELF not in t.trusted
    t.discovered(SELF, "10.0.0.9:1", "me", "mdns", 1.0)
    t.heard_from(SELF, 1.0)
    assert t.get(SELF) is None
    assert t.untrusted_snapshot() == []


def test_advertised_tasks_kept_when_a_source_does_not_know_them() -> None:
    t = table(A)
    t.discovered(A, ADDR[A], "d", "mdns", 1.0, tasks={"default": ("fp1", None)})
    t.discovered(A, ADDR[A], "d", "static", 2.0)
    p = t.get(A)
    assert p is not None and p.tasks == {"default": ("fp1", None)}
    t.discovered(A, ADDR[A], "d", "mdns", 3.0, tasks={"default": ("fp2", None)})
    assert p.tasks == {"default": ("fp2", None)}
    t.advertised(A, {"churn": ("fp3", "s3")})  # a signed pong replaces what discovery guessed
    assert p.tasks == {"churn": ("fp3", "s3")}
    assert next(r for r in t.snapshot(3.0) if r["peer_id"] == A.hex())["tasks"] == {
        "churn": {"fp": "fp3", "schema": "s3"}}


def test_advertised_tasks_are_bounded() -> None:
    t = table(A)
    t.discovered(A, ADDR[A], "d", "mdns", 1.0)
    t.advertised(A, {f"t{i}": ("fp", "s") for i in range(100)})
    p = t.get(A)
    assert p is not None and len(p.tasks) == 32


def test_untrusting_a_peer_drops_it_and_keeps_the_sighting() -> None:
    t = table(A, B)
    alive(t, A, 1.0)
    t.heard_from(B, 1.0)  # B known only from its own messages: no discovery address
    t.set_trusted([B])
    assert t.get(A) is None
    assert [r["peer_id"] for r in t.untrusted_snapshot()] == [A.hex()]
    assert t.untrusted_snapshot()[0]["source"] == "mdns"
    t.set_trusted([])
    assert t.get(B) is None
    assert [r["peer_id"] for r in t.untrusted_snapshot()] == [A.hex()]  # B was never advertised
    assert all(p.peer_id != A for p in t.gossip_targets(random.Random(1), 10))


def test_trusting_a_sighted_key_promotes_it_and_pings_it() -> None:
    t = table()
    t.discovered(A, ADDR[A], "sales", "mdns", 1.0)
    assert t.get(A) is None
    t.set_trusted([A])
    assert t.untrusted_snapshot() == []
    assert state(t, A) == PeerState.UNKNOWN
    effects = t.tick(50.0)
    assert effects == [Ping(A, ADDR[A])]
    # The UNKNOWN -> DEAD timer started at that tick, not at the old sighting.
    assert changes(t.tick(64.9)) == []
    assert changes(t.tick(65.0)) == [(A, PeerState.UNKNOWN, PeerState.DEAD)]


def test_untrusted_seen_is_bounded_oldest_evicted() -> None:
    t = table(max_untrusted=3)
    keys = [bytes([10 + i]) * 32 for i in range(5)]
    for i, k in enumerate(keys):
        t.discovered(k, f"10.0.1.{i}:1", "x", "mdns", float(i))
    assert [r["peer_id"] for r in t.untrusted_snapshot()] == [k.hex() for k in keys[2:]]
    # A fresh sighting of an old key makes it the newest.
    t.discovered(keys[2], "10.0.1.2:1", "x", "mdns", 9.0)
    t.discovered(bytes([99]) * 32, "10.0.1.99:1", "x", "mdns", 10.0)
    assert [r["peer_id"] for r in t.untrusted_snapshot()] == [
        keys[4].hex(),
        keys[2].hex(),
        (bytes([99]) * 32).hex(),
    ]


def test_max_peers_evicts_oldest_preferring_gone_peers() -> None:
    keys = [bytes([10 + i]) * 32 for i in range(4)]
    t = PeerTable(SELF, T, max_peers=3)
    t.set_trusted(keys)
    for i, k in enumerate(keys[:3]):
        t.discovered(k, f"10.0.2.{i}:1", "x", "mdns", float(i))
        t.heard_from(k, float(i))
    t.left(keys[2], 5.0)  # newest activity but LEFT: evicted first
    t.discovered(keys[3], "10.0.2.3:1", "x", "mdns", 6.0)
    assert len(t) == 3
    assert t.get(keys[2]) is None
    assert {p.peer_id for p in t.peers()} == {keys[0], keys[1], keys[3]}
    # With nothing gone, the least recently touched goes.
    t.set_trusted([*keys, bytes([50]) * 32])
    t.discovered(bytes([50]) * 32, "10.0.2.50:1", "x", "mdns", 7.0)
    assert t.get(keys[0]) is None and len(t) == 3


# ------------------------------------------------------------------ liveness transitions at bounds


def test_alive_to_suspect_exactly_at_bound() -> None:
    t = table(A)
    alive(t, A, 100.0)
    assert changes(t.tick(104.999)) == []
    assert state(t, A) == PeerState.ALIVE
    assert changes(t.tick(105.0)) == [(A, PeerState.ALIVE, PeerState.SUSPECT)]
    assert state(t, A) == PeerState.SUSPECT


def test_suspect_to_dead_exactly_at_bound_from_last_contact() -> None:
    t = table(A)
    alive(t, A, 100.0)
    t.tick(105.0)
    assert changes(t.tick(114.999)) == []
    assert state(t, A) == PeerState.SUSPECT
    assert changes(t.tick(115.0)) == [(A, PeerState.SUSPECT, PeerState.DEAD)]
    assert state(t, A) == PeerState.DEAD


def test_long_gap_reports_both_transitions_in_order() -> None:
    t = table(A)
    alive(t, A, 0.0)
    assert changes(t.tick(1000.0)) == [
        (A, PeerState.ALIVE, PeerState.SUSPECT),
        (A, PeerState.SUSPECT, PeerState.DEAD),
    ]


def test_unknown_becomes_dead_after_dead_after_s_without_contact() -> None:
    t = table(A)
    disc(t, A, 10.0)
    assert changes(t.tick(24.999)) == []
    assert state(t, A) == PeerState.UNKNOWN
    assert changes(t.tick(25.0)) == [(A, PeerState.UNKNOWN, PeerState.DEAD)]


def test_heard_from_revives_from_every_state() -> None:
    for setup in ("suspect", "dead", "left", "unknown"):
        t = table(A)
        disc(t, A, 0.0)
        if setup != "unknown":
            t.heard_from(A, 0.0)
        if setup == "suspect":
            t.tick(5.0)
        elif setup == "dead":
            t.tick(15.0)
        elif setup == "left":
            t.left(A, 1.0)
        t.tick(20.0)
        old = state(t, A)
        t.heard_from(A, 30.0)
        assert state(t, A) == PeerState.ALIVE, setup
        assert changes(t.tick(30.0)) == [(A, old, PeerState.ALIVE)], setup
        p = t.get(A)
        assert p is not None and p.last_seen == 30.0 and p.failures == 0


def test_heard_from_unknown_peer_creates_it_inbound_and_its_own_address_is_a_candidate() -> None:
    t = table(A)
    t.heard_from(A, 1.0)
    p = t.get(A)
    assert p is not None
    assert (p.state, p.address, p.source, p.domain) == (PeerState.ALIVE, None, "inbound", "")
    assert t.gossip_targets(random.Random(0), 5) == []  # no address: not a target
    t.heard_from(A, 2.0, address="10.9.9.9:7452")
    assert p.address is None and list(p.candidates) == ["10.9.9.9:7452"]
    assert t.tick(2.0) == [Ping(A, "10.9.9.9:7452")]
    t.verified(A, "10.9.9.9:7452", 2.1)
    assert (p.address, p.source) == ("10.9.9.9:7452", "inbound")
    disc(t, A, 3.0, address="10.9.9.9:7452")
    assert (p.address, p.source) == ("10.9.9.9:7452", "mdns")  # discovery named before the peer's own word
    t.heard_from(A, 4.0, address="10.9.9.8:7452")  # it says it moved: probed, not used yet
    assert (p.address, p.source) == ("10.9.9.9:7452", "mdns")
    assert pings(t.tick(4.0)) == [A] and p.candidates["10.9.9.8:7452"].probe_due_at == 6.0


def test_send_failed_makes_alive_suspect_and_counts() -> None:
    t = table(A)
    alive(t, A, 0.0)
    t.send_failed(A, 1.0)
    t.send_failed(A, 1.5)
    p = t.get(A)
    assert p is not None and p.failures == 2 and p.state == PeerState.SUSPECT
    assert changes(t.tick(1.5)) == [(A, PeerState.ALIVE, PeerState.SUSPECT)]
    # Death is still measured from the last contact.
    assert changes(t.tick(14.9)) == []
    assert changes(t.tick(15.0)) == [(A, PeerState.SUSPECT, PeerState.DEAD)]
    t.send_failed(bytes([77]) * 32, 2.0)  # unknown peer: ignored


def test_left_is_immediate_and_never_pinged() -> None:
    t = table(A)
    alive(t, A, 0.0)
    t.left(A, 1.0)
    assert state(t, A) == PeerState.LEFT
    assert changes(t.tick(1.0)) == [(A, PeerState.ALIVE, PeerState.LEFT)]
    for now in (3.0, 20.0, 100.0, 1000.0):
        assert t.tick(now) == []
    assert state(t, A) == PeerState.LEFT
    t.left(bytes([77]) * 32, 2.0)  # unknown peer: ignored


def test_what_a_peer_sent_or_answered_before_its_leave_does_not_bring_it_back() -> None:
    t = table(A)
    alive(t, A, 0.0)
    t.heard_from(A, 0.5, seq=10)
    t.left(A, 1.0, seq=12)
    t.heard_from(A, 1.1, seq=11)  # sealed before the leave, handled after it
    t.verified(A, ADDR[A], 1.2, asked_at=0.9)  # the pong to a ping sent before the leave arrived
    t.heard_from(A, 1.2, asked_at=0.9)  # a share's acknowledgement, likewise
    assert state(t, A) == PeerState.LEFT
    assert changes(t.tick(1.3)) == [(A, PeerState.ALIVE, PeerState.LEFT)]
    t.heard_from(A, 5.0, seq=13)  # back (a restart seals from the clock, above any earlier sequence number)
    assert state(t, A) == PeerState.ALIVE


def test_rediscovery_of_left_or_dead_peer_makes_it_unknown_and_pinged() -> None:
    for how in ("left", "dead"):
        t = table(A)
        alive(t, A, 0.0)
        if how == "left":
            t.left(A, 1.0)
        t.tick(20.0)
        disc(t, A, 21.0, source="static")  # a new proposal (a refresh of a known one changes nothing)
        assert state(t, A) == PeerState.UNKNOWN
        effects = t.tick(21.0)
        assert changes(effects)[-1] == (A, PeerState.DEAD if how == "dead" else PeerState.LEFT, PeerState.UNKNOWN)
        assert pings(effects) == [A]
        # ...and its UNKNOWN timer runs from the re-discovery, not from the old last_seen.
        assert changes(t.tick(35.9)) == []
        assert changes(t.tick(36.0)) == [(A, PeerState.UNKNOWN, PeerState.DEAD)]


def test_rediscovery_of_a_live_peer_keeps_its_state_and_address_until_verified() -> None:
    t = table(A)
    alive(t, A, 0.0)
    disc(t, A, 1.0, address="10.0.0.100:7452")
    p = t.get(A)
    assert p is not None and p.state == PeerState.ALIVE and p.address == ADDR[A]
    assert t.tick(1.0) == [Ping(A, "10.0.0.100:7452")]  # the proposal is probed
    t.verified(A, "10.0.0.100:7452", 1.2)  # the peer's key answered there: it moved
    assert p.address == "10.0.0.100:7452"
    assert t.tick(1.2) == [AddressChanged(A, ADDR[A], "10.0.0.100:7452")]


# ------------------------------------------------------------------ pings


def test_unknown_is_pinged_at_once_then_every_ping_after_s() -> None:
    t = table(A)
    disc(t, A, 0.0)
    assert t.tick(0.0) == [Ping(A, ADDR[A])]
    assert t.tick(1.999) == []  # one outstanding ping
    assert pings(t.tick(2.0)) == [A]  # unanswered: retried
    assert t.tick(3.0) == []
    assert pings(t.tick(4.0)) == [A]


def test_alive_peer_pinged_only_when_idle_at_exact_bound() -> None:
    t = table(A)
    alive(t, A, 10.0)
    assert t.tick(11.999) == []
    assert t.tick(12.0) == [Ping(A, ADDR[A])]
    assert t.tick(13.0) == []  # outstanding
    t.heard_from(A, 13.5)  # the ack
    assert t.tick(15.4) == []
    assert pings(t.tick(15.5)) == [A]


def test_busy_peer_is_never_pinged() -> None:
    t = table(A)
    alive(t, A, 0.0)
    for i in range(1, 50):
        t.heard_from(A, i * 1.5)
        assert t.tick(i * 1.5 + 1.0) == []


def test_suspect_peer_keeps_being_pinged() -> None:
    t = table(A)
    alive(t, A, 0.0)
    assert pings(t.tick(2.0)) == [A]
    effects = t.tick(5.0)
    assert changes(effects) == [(A, PeerState.ALIVE, PeerState.SUSPECT)]
    assert pings(effects) == [A]  # 2.0 + 2.0 <= 5.0
    assert t.tick(6.9) == []
    assert pings(t.tick(7.0)) == [A]


def test_dead_peer_is_reprobed_with_backoff_then_reaped() -> None:
    t = table(A)
    alive(t, A, 0.0)  # mDNS proposed it: no list names it
    assert changes(t.tick(15.0))[-1] == (A, PeerState.SUSPECT, PeerState.DEAD)
    sent = []
    now = 15.0
    while now < 15.0 + 3600.0 and t.get(A) is not None:
        for e in t.tick(now):
            if isinstance(e, Ping):
                assert e.address == ADDR[A]
                sent.append(now)
        now += 0.5
    # dead_after_s after death, then twice as long each time, capped at probe_max_s (300 s).
    assert sent[:7] == [30.0, 60.0, 120.0, 240.0, 480.0, 780.0, 1080.0]
    assert all(b - a == 300.0 for a, b in itertools.pairwise(sent[5:]))
    assert len(sent) == 15  # ~one ping per 5 minutes, not one per dead_after_s (240 an hour)
    # Reaped reap_after_s (3600 s) after it became DEAD, and reported once.
    t2 = table(A)
    alive(t2, A, 0.0)
    t2.tick(15.0)
    assert [e for e in t2.tick(3614.9) if isinstance(e, Reaped)] == []
    assert t2.get(A) is not None
    assert t2.tick(3615.0) == [Reaped(A, PeerState.DEAD)]
    assert t2.get(A) is None and t2.tick(4000.0) == [] and t2.counts()["dead"] == 0
    # It comes back: a message (or a new proposal) makes it a peer again.
    t2.heard_from(A, 4001.0, address=ADDR[A])
    assert state(t2, A) == PeerState.ALIVE and t2.tick(4001.0) == [Ping(A, ADDR[A])]


def test_a_listed_dead_peer_is_never_reaped_and_left_peers_are() -> None:
    t = PeerTable(SELF, Timing(suspect_after_s=5.0, dead_after_s=15.0, ping_after_s=2.0, probe_max_s=60.0,
                               reap_after_s=100.0))
    t.set_trusted([A, B])
    disc(t, A, 0.0, source="static")
    t.verified(A, ADDR[A], 0.0)
    alive(t, B, 0.0)
    t.left(B, 1.0)
    sent = [now for now in range(16, 2000) for e in t.tick(float(now)) if isinstance(e, Ping)]
    assert t.get(A) is not None and state(t, A) == PeerState.DEAD  # [[peers]] names it: kept, probed
    assert sent[-1] >= 1900 and all(b - a <= 60 for a, b in itertools.pairwise(sent))
    assert t.get(B) is None  # LEFT for reap_after_s and only mDNS knew it


def test_timing_of_probes_and_reaping_is_validated() -> None:
    with pytest.raises(ValueError):
        Timing(ping_after_s=2.0, probe_max_s=1.0)
    with pytest.raises(ValueError):
        Timing(reap_after_s=0.0)


def test_peer_without_address_is_not_pinged() -> None:
    t = table(A)
    t.heard_from(A, 0.0)
    assert t.tick(100.0) == [
        StateChanged(A, PeerState.ALIVE, PeerState.SUSPECT),
        StateChanged(A, PeerState.SUSPECT, PeerState.DEAD),
    ]
    assert t.tick(1000.0) == []


def test_tick_output_is_ordered_by_peer_id() -> None:
    t = table(A, B, C)
    for k in (C, A, B):
        disc(t, k, 0.0)
    assert pings(t.tick(0.0)) == [A, B, C]


# ------------------------------------------------------------------ mDNS goodbye and static reloads


def test_mdns_goodbye_only_rechecks_the_verified_address() -> None:
    t = table(A)
    alive(t, A, 0.0)
    t.heard_from(A, 0.5)
    t.gone(A, "mdns", 1.0, ADDR[A])  # anyone on the LAN can send this
    p = t.get(A)
    assert p is not None and (p.state, p.address) == (PeerState.ALIVE, ADDR[A])
    assert p.candidates[ADDR[A]].recheck and p.candidates[ADDR[A]].sources == []
    assert t.tick(1.0) == [Ping(A, ADDR[A])]  # re-verified at once, though it is not idle
    assert [p.peer_id for p in t.gossip_targets(random.Random(0), 5)] == [A]  # still gossiped to meanwhile
    assert t.tick(2.0) == []
    t.verified(A, ADDR[A], 2.5)
    assert not p.candidates[ADDR[A]].recheck and t.tick(2.5) == []
    # A peer that really went away does not answer the re-check: suspect, then dead, as any silent peer.
    disc(t, A, 2.6)
    t.gone(A, "mdns", 3.0, ADDR[A])
    assert pings(t.tick(3.0)) == [A]
    t.send_failed(A, 3.1, ADDR[A])
    assert state(t, A) == PeerState.SUSPECT


def test_mdns_goodbye_of_an_unverified_address_forgets_it() -> None:
    t = table(A)
    alive(t, A, 0.0)
    disc(t, A, 1.0, address="10.6.6.6:7452")  # an impersonator advertises A's id
    p = t.get(A)
    assert p is not None and set(p.candidates) == {ADDR[A], "10.6.6.6:7452"}
    t.gone(A, "mdns", 2.0, "10.6.6.6:7452")  # ...and withdraws it
    assert list(p.candidates) == [ADDR[A]] and p.address == ADDR[A]
    assert not p.candidates[ADDR[A]].recheck
    t.gone(A, "mdns", 3.0, "10.6.6.6:7452")  # repeated: no-op
    t.gone(bytes([77]) * 32, "mdns", 3.0)  # unknown: no-op
    assert p.state == PeerState.ALIVE and p.address == ADDR[A]


def test_an_unanswering_proposal_never_takes_over_and_is_probed_with_backoff() -> None:
    t = table(A)
    alive(t, A, 0.0)
    bad = "10.6.6.6:7452"
    sent = []
    for i in range(1, 1200):
        now = i * 0.5
        t.heard_from(A, now)  # the real peer keeps talking
        if now == 1.0:
            disc(t, A, now, address=bad)
        for e in t.tick(now):
            assert isinstance(e, Ping) and e.address == bad
            sent.append(now)
            t.send_failed(A, now + 0.1, bad)  # the impersonator cannot answer with a signed pong
        assert [p.address for p in t.gossip_targets(random.Random(i), 5)] == [ADDR[A]]
    assert state(t, A) == PeerState.ALIVE
    assert sent == [1.0, 3.0, 7.0, 15.0, 31.0, 63.0, 127.0, 255.0, 511.0]  # 2 s, doubling, at most 300 s
    p = t.get(A)
    assert p is not None and p.failures == 0 and p.candidates[bad].failures == len(sent)


def test_candidates_per_peer_are_bounded_and_keep_the_verified_address() -> None:
    t = table(A)
    alive(t, A, 0.0)
    for i in range(50):
        disc(t, A, 1.0 + i, address=f"10.6.6.{i}:7452")
    p = t.get(A)
    assert p is not None and len(p.candidates) == MAX_CANDIDATES
    assert ADDR[A] in p.candidates and p.address == ADDR[A]
    assert "10.6.6.49:7452" in p.candidates  # the newest proposals turn the unverified ones over


def test_a_pong_from_another_address_switches_and_keeps_the_old_as_fallback() -> None:
    t = table(A)
    alive(t, A, 0.0)
    disc(t, A, 1.0, source="static", address="10.0.0.50:1")
    t.verified(A, "10.0.0.50:1", 1.5)
    p = t.get(A)
    assert p is not None and (p.address, p.source) == ("10.0.0.50:1", "static")
    assert t.tick(1.5) == [AddressChanged(A, ADDR[A], "10.0.0.50:1")]
    # Alive: the old verified address is not probed; once the peer is silent, every address it had is.
    assert t.tick(3.0) == []
    t.send_failed(A, 4.0)
    assert sorted(e.address for e in t.tick(4.0) if isinstance(e, Ping)) == sorted(["10.0.0.50:1", ADDR[A]])


def test_gone_removes_untrusted_sighting_of_that_source() -> None:
    t = table()
    t.discovered(A, ADDR[A], "d", "mdns", 0.0)
    t.gone(A, "static", 1.0)
    assert len(t.untrusted_snapshot()) == 1
    t.gone(A, "mdns", 1.0)
    assert t.untrusted_snapshot() == []


def test_static_delisting_forgets_instead_of_leaving() -> None:
    t = table(A, B)
    disc(t, A, 0.0, source="static")
    alive(t, B, 0.0)
    disc(t, B, 0.0, source="static", address="10.0.0.60:1")
    t.gone(A, "static", 1.0)  # never heard from, no other source: removed
    assert t.get(A) is None
    t.gone(B, "static", 1.0)  # mdns still knows it: stays ALIVE with the mdns address
    p = t.get(B)
    assert p is not None and (p.state, p.address, p.source) == (PeerState.ALIVE, ADDR[B], "mdns")
    assert list(p.candidates) == [ADDR[B]]


def test_forget_source_keeps_listed_heard_and_multi_source_peers() -> None:
    t = table(A, B, C, D)
    for k in (A, B, C, D):
        disc(t, k, 0.0, source="registry")
    t.heard_from(B, 1.0)  # heard from: kept (address gone)
    disc(t, C, 1.0, source="mdns", address="10.0.0.33:1")  # another source: kept
    t.verified(C, "10.0.0.33:1", 1.0)
    t.verified(D, ADDR[D], 1.0)
    t.discovered(bytes([9]) * 32, "10.0.0.9:1", "u", "registry", 1.0)  # untrusted registry entry
    t.forget_source("registry", keep={D})
    assert t.get(A) is None
    b, c, d = t.get(B), t.get(C), t.get(D)
    assert b is not None and b.address is None and b.state == PeerState.ALIVE and b.candidates == {}
    assert c is not None and (c.address, c.source) == ("10.0.0.33:1", "mdns")
    assert d is not None and (d.address, d.source) == (ADDR[D], "registry")
    assert t.untrusted_snapshot() == []


# ------------------------------------------------------------------ choices


def test_gossip_targets_exclude_dead_left_suspect_unverified_self_and_addressless() -> None:
    keys = [bytes([10 + i]) * 32 for i in range(8)]
    t = table(*keys)
    for i, k in enumerate(keys):
        t.discovered(k, f"10.0.3.{i}:1", "x", "mdns", 0.0)
        if i != 2:
            t.verified(k, f"10.0.3.{i}:1", 0.0)
    t.tick(0.0)
    t.left(keys[0], 1.0)
    t.send_failed(keys[1], 1.0)  # suspect
    t.heard_from(keys[2], 1.0)  # alive (it sent us a message) but its proposed address never answered a ping
    t.set_trusted([*keys, bytes([62]) * 32])
    t.heard_from(bytes([62]) * 32, 1.0)  # alive, no address at all
    dead = bytes([60]) * 32
    fresh = bytes([61]) * 32
    t.set_trusted([*keys, dead, fresh, SELF, bytes([62]) * 32])
    t.discovered(dead, "10.0.3.60:1", "x", "mdns", -100.0)
    t.verified(dead, "10.0.3.60:1", -100.0)
    t.tick(-85.0)  # ALIVE -> SUSPECT -> DEAD
    t.discovered(fresh, "10.0.3.61:1", "x", "mdns", 2.0)  # UNKNOWN: proposed, not verified
    assert state(t, dead) == PeerState.DEAD and state(t, fresh) == PeerState.UNKNOWN
    assert state(t, keys[2]) == PeerState.ALIVE
    allowed = set(keys[3:])
    rng = random.Random(1234)
    seen: set[bytes] = set()
    for _ in range(300):
        chosen = t.gossip_targets(rng, 2)
        ids = [p.peer_id for p in chosen]
        assert len(ids) == 2 == len(set(ids))
        assert set(ids) <= allowed
        seen.update(ids)
    assert seen == allowed  # every allowed peer gets chosen sometimes
    assert len(t.gossip_targets(rng, 100)) == len(allowed)
    assert t.gossip_targets(rng, 0) == []


def test_gossip_targets_are_deterministic_for_a_seed() -> None:
    def build(order: list[bytes]) -> PeerTable:
        t = table(A, B, C, D)
        for k in order:
            alive(t, k, 0.0)
        return t

    t1, t2 = build([A, B, C, D]), build([D, C, B, A])
    got1 = [p.peer_id for p in t1.gossip_targets(random.Random(7), 2)]
    got2 = [p.peer_id for p in t2.gossip_targets(random.Random(7), 2)]
    assert got1 == got2


def test_gossip_targets_roughly_uniform() -> None:
    t = table(A, B, C, D)
    for k in (A, B, C, D):
        alive(t, k, 0.0)
    rng = random.Random(99)
    counts = dict.fromkeys((A, B, C, D), 0)
    for _ in range(4000):
        (p,) = t.gossip_targets(rng, 1)
        counts[p.peer_id] += 1
    assert all(850 < n < 1150 for n in counts.values()), counts


def _alive_anywhere(t: PeerTable, pid: bytes) -> None:
    t.discovered(pid, f"10.0.1.{pid[0]}:7452", f"dom-{pid[0]}", "static", 0.0)
    t.verified(pid, f"10.0.1.{pid[0]}:7452", 0.0)
    t.tick(0.0)


def test_exponential_topology_walks_a_ring_drawn_each_cycle_by_powers_of_two() -> None:
    ids = [bytes([i]) * 32 for i in range(1, 9)]  # 8 nodes: self = ids[0]; a cycle is 3 rounds
    t = PeerTable(ids[0], Timing())
    t.set_trusted(ids[1:])
    for k in ids[1:]:
        _alive_anywhere(t, k)
    rng = random.Random(0)
    for cycle in range(3):
        ring = sorted(ids, key=lambda k, c=cycle: ring_key(c, k))
        me = ring.index(ids[0])
        got = [t.gossip_targets(rng, 1, topology="exponential", round_no=3 * cycle + r)[0].peer_id for r in range(3)]
        assert got == [ring[(me + 1) % 8], ring[(me + 2) % 8], ring[(me + 4) % 8]]  # +1, +2, +4 on this ring
    two = t.gossip_targets(rng, 2, topology="exponential", round_no=2)
    ring = sorted(ids, key=lambda k: ring_key(0, k))
    me = ring.index(ids[0])
    assert [p.peer_id for p in two] == [ring[(me + 4) % 8], ring[(me + 1) % 8]]
    # Over a few cycles a node reaches every peer, not only the three neighbours of one fixed ring.
    reached = {t.gossip_targets(rng, 1, topology="exponential", round_no=r)[0].peer_id for r in range(3 * 12)}
    assert reached == set(ids[1:])


def test_exponential_topology_averages_exactly_in_log2_n_rounds() -> None:
    """In step, the one-peer exponential graph with push-sum halves averages 2**k nodes in k rounds."""
    n = 8
    ids = [bytes([i]) * 32 for i in range(1, n + 1)]
    tables = []
    for me in ids:
        t = PeerTable(me, Timing())
        t.set_trusted([k for k in ids if k != me])
        for k in ids:
            if k != me:
                _alive_anywhere(t, k)
        tables.append(t)
    values = [float(i * i) for i in range(n)]
    s, w = values[:], [1.0] * n
    rng = random.Random(0)
    for r in range(3, 6):  # one whole cycle (any cycle: its ring is the same at every node)
        sent = []
        for i, t in enumerate(tables):
            (target,) = t.gossip_targets(rng, 1, topology="exponential", round_no=r)
            sent.append((ids.index(target.peer_id), s[i] / 2, w[i] / 2))
            s[i], w[i] = s[i] / 2, w[i] / 2
        for j, ds, dw in sent:
            s[j] += ds
            w[j] += dw
    mean = sum(values) / n
    assert all(abs(s[i] / w[i] - mean) < 1e-12 for i in range(n))


def test_gossip_targets_only_among_a_tasks_eligible_peers() -> None:
    t = table(A, B)
    alive(t, A, 0.0)
    alive(t, B, 0.0)
    rng = random.Random(1)
    assert {p.peer_id for _ in range(20) for p in t.gossip_targets(rng, 1, among={B})} == {B}
    assert t.gossip_targets(rng, 1, among=set()) == []
    assert {p.peer_id for _ in range(40) for p in t.gossip_targets(rng, 1)} == {A, B}


def test_goodbyes_in_a_row_cost_one_recheck_ping_per_ping_after_s() -> None:
    t = table(A)
    alive(t, A, 0.0)
    sent = []
    for i in range(1, 200):  # a goodbye and a re-announcement every 0.1 s, the peer answering every ping
        now = i * 0.1
        disc(t, A, now)
        t.gone(A, "mdns", now, ADDR[A])
        for e in t.tick(now):
            assert isinstance(e, Ping) and e.address == ADDR[A]
            sent.append(now)
            t.verified(A, ADDR[A], now)
    assert len(sent) <= 20 / T.ping_after_s + 1, sent
    p = t.get(A)
    assert p is not None and (p.state, p.address) == (PeerState.ALIVE, ADDR[A])


def test_of_a_silent_pair_only_the_smaller_id_pings_first() -> None:
    """Any signed message refreshes both ends, so the larger id waits PING_DEFER x longer: one ping per pair."""
    small, big = PeerTable(A, T), PeerTable(B, T)
    small.set_trusted([B])
    big.set_trusted([A])
    for t, other in ((small, B), (big, A)):
        disc(t, other, 0.0, address=ADDR[other])
        t.verified(other, ADDR[other], 0.0)
        t.heard_from(other, 0.0)
        t.tick(0.0)
    assert pings(small.tick(T.ping_after_s)) == [B]
    assert pings(big.tick(T.ping_after_s)) == []
    big.heard_from(A, T.ping_after_s + 0.01)  # the small one's ping arrived
    assert pings(big.tick(T.ping_after_s * PING_DEFER)) == []
    # Had it not arrived, the larger id pings in time, before the peer turns suspect.
    lone = PeerTable(B, T)
    lone.set_trusted([A])
    disc(lone, A, 0.0)
    lone.verified(A, ADDR[A], 0.0)
    lone.heard_from(A, 0.0)
    lone.tick(0.0)
    assert pings(lone.tick(T.ping_after_s * PING_DEFER)) == [A]
    assert T.ping_after_s * PING_DEFER < T.suspect_after_s
