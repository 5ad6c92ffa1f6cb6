"""Issue #10 items 5, 7 and 8 against a real `meshd run` daemon: what an unauthenticated client can make it
hold (body bytes, inflated bytes, connections) and what one trusted but hostile message can make its event
loop do.

The daemon B runs with the default limits (64 MiB messages, so a 128 MiB budget of unauthenticated bytes, 512
connections). The test client holds identity C, which B trusts, and speaks from its own loopback addresses.
Memory is B's peak RSS (``VmHWM`` of /proc/PID/status, reset through /proc/PID/clear_refs before each
attack), so a short spike between two polls is not missed. Every sending loop is bounded in bytes and time.
"""

from __future__ import annotations

import http.client
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from meshd import config as configmod
from meshd.core.wire import Limits, decode_body
from meshd.errors import ConfigError, WireError
from tests.budget_client import MIB, Peak, Upload, gzip_bomb, read_answer, stream
from tests.helpers import DaemonProc, http_get, init_domain, set_toml, wait_for
from tests.test_wire_daemons import (
    ENVELOPE_CT,
    Client,
    Counters,
    Node,
    assert_rejected,
    connect,
    http_head,
    now_ms,
    post,
)

BUDGET = 128 * MIB  # B's limits.max_pending_mib default: 2 x max_message_mib (64)
MAX_MESSAGE = 64 * MIB


# --- the daemon ----------------------------------------------------------------------------------------------------


@dataclass
class Rig:
    b: Node
    c: Client


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("budget")
    cfg, b_id, b_peer, b_status = init_domain(root / "b", "beta")
    c = Client()
    set_toml(cfg, "log", "format", '"json"')
    set_toml(cfg, "trust", "peers", f'["{c.ident.peer_id}"]')
    b = Node(DaemonProc(cfg, b_status), cfg, b_id, b_peer, b_status)
    try:
        b.proc.wait_ready(60)
        yield Rig(b, c)
    finally:
        b.proc.stop()
        assert "BlockingError" not in b.proc.logs(), b.proc.logs()[-4000:]


def trusted_ping(rig: Rig, source: str) -> None:
    """C's ping on a fresh connection from ``source`` is answered with a pong."""
    answer = post(rig.b.peer_port, rig.c.seal(rig.b.pk), source=source, timeout=30)
    assert answer.status == 200 and answer.content_type == ENVELOPE_CT, answer
    rig.c.open_pong(answer.body, rig.b.pk)


# --- item 5: a global budget of unauthenticated bytes ------------------------------------------------------------


def test_100_concurrent_60mib_uploads_hold_less_than_3x_the_budget(rig: Rig) -> None:
    b, c = rig.b, rig.c
    counters = Counters(b)
    size = 60 * MIB
    # A trusted peer's keep-alive connection, authenticated by a first ping before the uploads start.
    kept = http.client.HTTPConnection("127.0.0.1", b.peer_port, timeout=30, source_address=("127.0.6.7", 0))
    kept.request("POST", "/v1/envelope", body=c.seal(b.pk), headers={"Content-Type": ENVELOPE_CT})
    resp = kept.getresponse()
    assert resp.status == 200, resp.status
    c.open_pong(resp.read(), b.pk)
    uploads = []
    for i in range(100):
        s = connect(b.peer_port, f"127.0.5.{1 + i % 4}")  # 25 per address: under the per-address cap
        s.sendall(http_head(size))
        uploads.append(Upload(s, size))
    peak = Peak(b.pid)
    pinged: list[bool] = []
    big_ping = c.seal(b.pk, body={"pad": b"\0" * (10 * MIB)})  # 10 MiB: more than the budget has left

    def ping_midway(sent: int) -> None:
        if pinged or sent <= size:
            return
        # Two admitted uploads hold 120 of the 128 MiB (their whole Content-Length, until they are handled):
        # a trusted exchange still goes through: a small one on a fresh connection, a big one on the
        # authenticated keep-alive connection; the same big one on a fresh connection is refused unread.
        trusted_ping(rig, "127.0.6.1")
        kept.request("POST", "/v1/envelope", body=big_ping, headers={"Content-Type": ENVELOPE_CT})
        resp = kept.getresponse()
        assert resp.status == 200, (resp.status, resp.read()[:200])
        c.open_pong(resp.read(), b.pk)
        fresh = connect(b.peer_port, "127.0.6.8")
        fresh.sendall(http_head(len(big_ping)))
        assert read_answer(fresh) == ("503", "busy")
        fresh.close()
        pinged.append(True)

    try:
        worst = stream(uploads, limit_growth=3 * BUDGET, peak=peak, deadline_s=60, on_progress=ping_midway)
    finally:
        kept.close()
    print(f"100 x 60 MiB uploads: B's peak RSS grew {worst / MIB:.0f} MiB")
    assert worst < 3 * BUDGET, f"B's RSS grew {worst / MIB:.0f} MiB, more than 3x the {BUDGET / MIB:.0f} MiB budget"
    assert pinged, "the uploads ended before the trusted exchanges were tried"
    answers = [u.answer for u in uploads]
    assert all(a is not None for a in answers), answers
    assert {a for a in answers if a is not None} <= {("503", "busy"), ("400", "malformed"), ("reset", "")}, answers
    # The daemon's own count: at most 2 uploads of 60 MiB fit in 128 MiB at once, so nearly all were refused
    # unread; the admitted ones were junk (malformed).
    after = b.rejected()["status"]
    busy = after.get("busy", 0) - counters.before["status"].get("busy", 0)
    assert busy >= 90, after
    counters.assert_delta("busy", busy)  # /metrics agrees
    assert ("503", "busy") in answers  # and the 503 is readable before the body is sent
    trusted_ping(rig, "127.0.6.2")


# --- item 7a: no content encoding ----------------------------------------------------------------------------------


def test_gzip_bombs_are_refused_415_without_inflating(rig: Rig) -> None:
    b = rig.b
    bomb = gzip_bomb(256 * MIB)
    assert len(bomb) < MIB // 2
    counters = Counters(b)
    peak = Peak(b.pid)
    socks = []
    for i in range(4):  # four in parallel
        s = connect(b.peer_port, f"127.0.5.{10 + i}")
        head = http_head(len(bomb)).replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
        s.sendall(head + bomb)
        socks.append(s)
    for s in socks:
        answer = read_answer(s)
        s.close()
        assert answer == ("415", "unsupported_encoding"), answer
    counters.assert_delta("unsupported_encoding", 4)
    print(f"4 gzip bombs: B's peak RSS grew {peak.growth() / MIB:.1f} MiB")
    assert peak.growth() < 32 * MIB, f"B's RSS grew {peak.growth() / MIB:.0f} MiB for 1 MiB of gzip"
    trusted_ping(rig, "127.0.6.3")


# --- item 7b: chunked bodies count against the same budget ------------------------------------------------------


def test_chunked_bodies_over_the_limit_are_cut_within_the_budget(rig: Rig) -> None:
    b = rig.b
    counters = Counters(b)
    uploads = []
    for i in range(8):  # eight chunked junk bodies just over the 64 MiB limit, at once
        s = connect(b.peer_port, f"127.0.5.{20 + i}")
        s.sendall(f"POST /v1/envelope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ENVELOPE_CT}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        uploads.append(Upload(s, MAX_MESSAGE + MIB, chunked=True))
    peak = Peak(b.pid)
    worst = stream(uploads, limit_growth=3 * BUDGET, peak=peak, deadline_s=60)
    print(f"8 chunked 65 MiB bodies: B's peak RSS grew {worst / MIB:.0f} MiB; answers {[u.answer for u in uploads]}")
    assert worst < 3 * BUDGET, f"B's RSS grew {worst / MIB:.0f} MiB, more than 3x the {BUDGET / MIB:.0f} MiB budget"
    answers = [u.answer for u in uploads]
    assert {a for a in answers if a is not None} <= {("413", "too_large"), ("503", "busy"), ("reset", "")}, answers
    after = b.rejected()["status"]

    def grew(reason: str) -> int:
        return after.get(reason, 0) - counters.before["status"].get(reason, 0)

    assert grew("too_large") + grew("busy") == 8, after  # each refused once, none read past the limit
    trusted_ping(rig, "127.0.6.4")


# --- item 7c: a connection budget that keeps room for trusted peers ----------------------------------------------


def test_connection_flood_keeps_trusted_connections_and_admits_new_ones(rig: Rig) -> None:
    b, c = rig.b, rig.c
    counters = Counters(b)
    # A trusted keep-alive connection that carried an authenticated envelope before the flood.
    kept = http.client.HTTPConnection("127.0.0.1", b.peer_port, timeout=30, source_address=("127.0.0.9", 0))
    flood: list[socket.socket] = []

    def ping_kept() -> None:
        kept.request("POST", "/v1/envelope", body=c.seal(b.pk), headers={"Content-Type": ENVELOPE_CT})
        resp = kept.getresponse()
        assert resp.status == 200, resp.status
        c.open_pong(resp.read(), b.pk)

    try:
        ping_kept()
        local = kept.sock.getsockname()
        # 2,000 connections from 40 addresses (50 each, under the per-address cap of 64), held open, in 8 waves.
        # After each wave the trusted peer's new connection succeeds, and its keep-alive connection is still
        # the same socket (used between waves, so aiohttp's 15 s keep-alive deadline never closes it).
        for wave in range(8):
            for i in range(250 * wave, 250 * (wave + 1)):
                flood.append(connect(b.peer_port, f"127.0.7.{1 + i % 40}"))
            trusted_ping(rig, f"127.0.8.{1 + wave}")
            ping_kept()
            assert kept.sock.getsockname() == local, "the trusted keep-alive connection was closed"
        for i in range(12):  # the flood's connections stay open: still room for new trusted connections
            trusted_ping(rig, f"127.0.8.{10 + i}")
        evicted = b.rejected()["status"].get("evicted", 0) - counters.before["status"].get("evicted", 0)
        assert evicted >= 2000 - 512, b.rejected()
        counters.assert_delta("evicted", evicted)
    finally:
        kept.close()
        for s in flood:
            s.close()
    assert http_get(b.proc.url + "/healthz") == (200, b"ok\n")


# --- item 8: a hostile trusted body never stalls the loop ------------------------------------------------------


def _max_lag(node: Node) -> float:
    return float(node.status()["loop"]["max_lag_s"])


def test_60mib_body_of_nested_ints_is_refused_without_stalling_the_loop(rig: Rig) -> None:
    b, c = rig.b, rig.c
    # 960 arrays of 65,536 small ints: every container within the per-container cap, 63 million values.
    plaintext = msgpack.packb({"task": "default", "x": [[0] * 65536] * 960}, use_bin_type=True)
    assert 59 * MIB < len(plaintext) < 61 * MIB
    envelope = c.wire.seal(b.pk, "share", plaintext, next(c.seqs), now_ms())
    # Start from a quiet loop: whatever start-up cost has left the 60 s window of max_lag_s.
    wait_for(lambda: b.status().get("loop", {}).get("max_lag_s", 0.0) < 1.0, timeout=40,
             what="B's loop lag to settle below 1 s")
    counters = Counters(b)
    answer = post(b.peer_port, envelope, source="127.0.6.5", timeout=120)
    assert_rejected(answer, 400, "bad_body")
    assert b"more than 65536 values" in answer.body, answer.body  # 1 per KiB of the 64 MiB limit
    counters.assert_delta("bad_body", 1)
    lag = _max_lag(b)
    print(f"60 MiB of nested ints: B's max loop lag {lag:.3f} s")
    assert lag < 2.0, f"B's event loop stalled {lag:.1f} s on one message"
    trusted_ping(rig, "127.0.6.6")


# --- the pieces, without a daemon ----------------------------------------------------------------------------------


def test_decode_body_counts_every_value_and_stops_at_the_bound() -> None:
    limits = Limits(max_elements=100)
    # The body map counts 1 + 1 entry, the array 1 + 97: 100 values.
    assert decode_body(msgpack.packb({"a": [1] * 97}), limits) == {"a": [1] * 97}
    with pytest.raises(WireError) as err:
        decode_body(msgpack.packb({"a": [1] * 98}), limits)
    assert (err.value.reason, err.value.status) == ("bad_body", 400)
    with pytest.raises(WireError):  # many small containers count too
        decode_body(msgpack.packb({"a": [[]] * 60}), limits)
    # A model share's values are one bin: any size is a single value.
    assert decode_body(msgpack.packb({"values": b"\0" * MIB}), limits)["values"] == b"\0" * MIB


def test_budget_keys_have_documented_defaults_and_are_checked(tmp_path: Path) -> None:
    cfg = configmod.from_dict({"node": {"domain": "d"}}, base_dir=tmp_path)
    assert (cfg.limits.max_connections, cfg.limits.max_pending_mib) == (512, 0.0)
    example = (Path(__file__).resolve().parent.parent / "config" / "meshd.example.toml").read_text()
    assert re.search(r"^max_connections = 512 ", example, re.M)
    assert re.search(r"^max_pending_mib = 0\.0 ", example, re.M)
    with pytest.raises(ConfigError, match=r"limits\.max_pending_mib"):
        configmod.from_dict({"node": {"domain": "d"}, "limits": {"max_pending_mib": 8.0}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"limits\.max_connections"):
        configmod.from_dict({"node": {"domain": "d"}, "limits": {"max_connections": 4}}, base_dir=tmp_path)
