"""The receiver's sliding replay window and the sender's crash-safe sequence counter."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from meshd.core.replay import SEQ_LIMIT, ReplayGuard, SequenceCounter

A = b"\xaa" * 32
B = b"\xbb" * 32
C = b"\xcc" * 32


def accept(guard: ReplayGuard, sender: bytes, seq: int) -> bool:
    ok = guard.check(sender, seq)
    if ok:
        guard.commit(sender, seq)
    return ok


def test_fresh_sender_accepts_any_valid_seq() -> None:
    g = ReplayGuard()
    assert g.check(A, 1) and g.check(A, 10**12) and g.check(A, SEQ_LIMIT - 1)
    assert not g.check(A, 0) and not g.check(A, -1) and not g.check(A, SEQ_LIMIT)
    assert not g.dirty


def test_reorder_within_window() -> None:
    g = ReplayGuard(window=64)
    assert accept(g, A, 5)
    assert accept(g, A, 3)
    assert not accept(g, A, 3)
    assert not accept(g, A, 5)
    assert accept(g, A, 4)
    assert accept(g, A, 1)
    assert g.high_water(A) == 5


def test_far_below_window_is_rejected() -> None:
    g = ReplayGuard(window=64)
    assert accept(g, A, 1000)
    assert not g.check(A, 1000 - 64)  # hw - window: out
    assert g.check(A, 1000 - 63)  # oldest slot still inside
    assert not g.check(A, 1)


def test_big_jump_clears_the_bitmap() -> None:
    g = ReplayGuard(window=8)
    for s in range(1, 9):
        assert accept(g, A, s)
    assert accept(g, A, 1000)
    assert all(g.check(A, s) for s in range(993, 1000))
    assert not g.check(A, 992) and not g.check(A, 1000)


def test_senders_are_independent() -> None:
    g = ReplayGuard()
    assert accept(g, A, 7)
    assert accept(g, B, 7)
    assert not accept(g, A, 7)


def test_matches_a_reference_model() -> None:
    rnd = random.Random(1234)
    window = 16
    g = ReplayGuard(window=window)
    seen: set[int] = set()
    hw = 0
    for _ in range(5000):
        seq = max(1, hw + rnd.randint(-30, 5))
        expected = seq not in seen and seq > hw - window
        assert g.check(A, seq) == expected, (seq, hw)
        if expected:
            g.commit(A, seq)
            seen.add(seq)
            hw = max(hw, seq)


def test_dirty_flag() -> None:
    g = ReplayGuard()
    g.check(A, 1)
    assert not g.dirty
    g.commit(A, 1)
    assert g.dirty
    g.dirty = False
    g.forget(B)
    assert not g.dirty
    g.forget(A)
    assert g.dirty and g.check(A, 1)


def test_bounded_senders_evict_least_recently_committed() -> None:
    g = ReplayGuard(max_senders=3)
    peers = [bytes([i]) * 32 for i in range(4)]
    for p in peers[:3]:
        g.commit(p, 1)
    g.commit(peers[0], 2)  # peers[0] is now the most recent
    g.commit(peers[3], 1)
    assert len(g) == 3
    assert g.high_water(peers[1]) == 0  # evicted
    assert g.high_water(peers[0]) == 2 and g.high_water(peers[3]) == 1


def test_a_dropped_window_raises_the_timestamp_floor_past_everything_its_sender_sent() -> None:
    """Issue #10 item 3: after its window is evicted (or forgotten), nothing a sender had sent passes again."""
    g = ReplayGuard(max_senders=2)
    g.commit(A, 5, 1_000)
    g.commit(A, 6, 1_200)
    g.commit(B, 1, 1_500)
    assert g.not_before_ms == 0
    g.commit(C, 1, 1_600)  # A, the least recently committed, is evicted
    assert g.high_water(A) == 0 and g.not_before_ms == 1_201
    g.forget(B)
    assert g.not_before_ms == 1_501
    g.forget(B)  # unknown now: nothing changes
    assert g.not_before_ms == 1_501


def test_state_round_trip_through_json() -> None:
    g = ReplayGuard()
    for s in (100, 98, 60, 2**62):
        accept(g, A, s)
    g.commit(B, 3, 1_700)
    state = json.loads(json.dumps(g.to_state()))
    assert set(state) == {A.hex(), B.hex()}
    assert state[B.hex()] == {"hw": 3, "bits": 1, "ts": 1_700}
    assert ReplayGuard.from_state({B.hex(): {"hw": 3, "bits": 1}}).high_water(B) == 3  # files before "ts"
    r = ReplayGuard.from_state(state)
    assert not r.dirty
    for s in (2**62, 2**62 - 1, 100, 3):
        assert r.check(A, s) == g.check(A, s)
        assert r.check(B, s) == g.check(B, s)
    assert r.to_state() == g.to_state()


def test_from_state_narrower_window_and_sender_bound() -> None:
    g = ReplayGuard(window=64)
    for s in (1, 2, 40, 64):
        g.commit(A, s)
    for i in range(10):
        g.commit(bytes([i]) * 32, 1)
    r = ReplayGuard.from_state(g.to_state(), window=8, max_senders=5)
    assert len(r) == 5
    assert r.high_water(bytes([9]) * 32) == 1 and r.high_water(A) == 0  # oldest dropped first
    r2 = ReplayGuard.from_state(g.to_state(), window=8)
    assert not r2.check(A, 64) and r2.check(A, 63) and not r2.check(A, 40)


@pytest.mark.parametrize(
    "state",
    [
        None,
        [],
        "x",
        {"ab": {"hw": 1, "bits": 1}},
        {1: {"hw": 1, "bits": 1}},
        {"zz" * 32: {"hw": 1, "bits": 1}},
        {"aa" * 32: {"hw": 1}},
        {"aa" * 32: {"hw": 1, "bits": 1, "x": 0}},
        {"aa" * 32: {"hw": -1, "bits": 0}},
        {"aa" * 32: {"hw": 2**63, "bits": 0}},
        {"aa" * 32: {"hw": "1", "bits": 0}},
        {"aa" * 32: {"hw": True, "bits": 0}},
        {"aa" * 32: {"hw": 1, "bits": -1}},
        {"aa" * 32: {"hw": 1, "bits": 1.0}},
        {"aa" * 32: {"hw": 1, "bits": 2**5000}},
        {"aa" * 32: {"hw": 0, "bits": 1}},
        {"aa" * 32: [1, 1]},
    ],
)
def test_from_state_rejects_garbage(state: Any) -> None:
    with pytest.raises(ValueError):
        ReplayGuard.from_state(state)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"max_senders": 0}])
def test_guard_argument_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ReplayGuard(**kwargs)


def test_commit_refuses_out_of_range_seq() -> None:
    with pytest.raises(ValueError):
        ReplayGuard().commit(A, 0)


# --- SequenceCounter ---------------------------------------------------------------------------------


def test_counter_reserves_before_the_first_send_and_every_block() -> None:
    c = SequenceCounter(start=1, reserve_block=4)
    assert c.reserved == 1
    out = [c.next() for _ in range(9)]
    assert out == [(1, 5), (2, None), (3, None), (4, None), (5, 9), (6, None), (7, None), (8, None), (9, 13)]
    assert c.reserved == 13


def test_counter_never_repeats_across_simulated_crashes() -> None:
    rnd = random.Random(7)
    persisted = 1  # what the daemon's state file holds
    used: set[int] = set()
    last = 0
    for _ in range(50):  # run, then kill -9 at a random point
        c = SequenceCounter(start=persisted, reserve_block=16)
        for _ in range(rnd.randint(0, 40)):
            seq, reservation = c.next()
            if reservation is not None:
                if rnd.random() < 0.2:
                    break  # crashed before persisting: this seq was never sent
                persisted = reservation  # persisted BEFORE the send
            assert seq not in used and seq > last
            assert seq < persisted
            used.add(seq)
            last = seq


def test_counter_validation_and_exhaustion() -> None:
    for bad in (0, -1, SEQ_LIMIT):
        with pytest.raises(ValueError):
            SequenceCounter(bad)
    with pytest.raises(ValueError):
        SequenceCounter(1, reserve_block=0)
    c = SequenceCounter(SEQ_LIMIT - 2, reserve_block=1024)
    assert c.next() == (SEQ_LIMIT - 2, SEQ_LIMIT)
    assert c.next() == (SEQ_LIMIT - 1, None)
    with pytest.raises(OverflowError):
        c.next()
