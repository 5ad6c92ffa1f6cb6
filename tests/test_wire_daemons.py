"""Acceptance of the secure gossip wire over real sockets: real `meshd run` daemons, real NaCl, real msgpack.

Two daemons A and B trust each other and talk (static peers). A test client holds identity C, which B
trusts (so it never shares A's sequence counter), and X, which nobody trusts. Every rejection is checked
by its HTTP status, its reason in the JSON error body, and its counter in B's /status and /metrics; B must
keep serving afterwards. The client speaks from 127.0.0.2 and other loopback addresses (never 127.0.0.1,
which A uses), so B's per-address connection cap sees our connections apart from A's.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import msgpack
import nacl.bindings as sodium
import pytest

from meshd import identity
from meshd.core.replay import ReplayGuard
from meshd.core.wire import PROTOCOL_VERSION, Limits, Wire, encode_body, signed_header
from meshd.identity import Identity
from tests.helpers import DaemonProc, http_get, init_domain, set_toml, wait_for

MIB = 2**20
CLIENT_IP = "127.0.0.2"  # the test client's source address (A talks to B from 127.0.0.1)
ENVELOPE_CT = "application/x-meshd-envelope"
B_MAX_MESSAGE_MIB = 4
B_READ_TIMEOUT_S = 2
B_MAX_CONN_PER_IP = 2


def now_ms() -> int:
    return int(time.time() * 1000)


# --- a tiny synchronous HTTP client ----------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    @property
    def error(self) -> str | None:
        if not self.content_type.startswith("application/json"):
            return None
        return str(json.loads(self.body)["error"])


def _read_answer(conn: http.client.HTTPConnection) -> Answer:
    resp = conn.getresponse()
    body = resp.read()
    return Answer(resp.status, resp.getheader("Content-Type") or "", body)


def post(port: int, data: Any, *, source: str = CLIENT_IP, chunked: bool = False, timeout: float = 30) -> Answer:
    """One POST /v1/envelope on a fresh connection from `source`; `data` is bytes or (chunked) an iterable."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("POST", "/v1/envelope", body=data, headers={"Content-Type": ENVELOPE_CT},
                     encode_chunked=chunked)
        return _read_answer(conn)
    finally:
        conn.close()


def connect(port: int, source: str, timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def closed_by_peer(s: socket.socket, deadline_s: float) -> float | None:
    """Seconds until the peer closed `s` (EOF or reset), or None if it was still open at the deadline."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        s.settimeout(max(0.01, min(0.2, deadline_s - (time.monotonic() - t0))))
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - t0
        if not chunk:
            return time.monotonic() - t0
    return None


def http_head(content_length: int) -> bytes:
    return (f"POST /v1/envelope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ENVELOPE_CT}\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def read_all(s: socket.socket, deadline_s: float, until: bytes | None = None) -> bytes:
    """Read until EOF (or until the data ends with `until`), at most `deadline_s` seconds."""
    got = b""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        s.settimeout(max(0.01, min(0.5, deadline_s - (time.monotonic() - t0))))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        if not chunk:
            break
        got += chunk
        if until is not None and got.rstrip().endswith(until):
            break
    return got


def still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionError:
        return False
    finally:
        s.setblocking(True)


# --- envelopes built by hand -------------------------------------------------------------------------------


def craft(signer: Identity, sender_pk: bytes, to: bytes, *, seq: int, ts: int, v: int = PROTOCOL_VERSION,
          kind: str = "ping", plaintext: bytes = b"\x80", box: Identity | None = None) -> bytes:
    """An envelope built without meshd.core.wire.Wire: encrypted with the box key of `box` (default `signer`)
    for `to`, and signed by `signer` while claiming to come from `sender_pk` (a forgery when they differ).
    ``v=1`` signs the way version 1 did (header and Poly1305 tag); later versions sign header and BLAKE3."""
    nonce = os.urandom(24)
    k = sodium.crypto_box_beforenm(sodium.crypto_sign_ed25519_pk_to_curve25519(to), bytes((box or signer).box_private))
    body = sodium.crypto_box_easy_afternm(plaintext, nonce, k)
    header = signed_header(v, sender_pk, to, kind, seq, ts, nonce, len(body))
    if v == 1:
        message = hashlib.blake2b(header + body[:16], digest_size=32).digest()
    else:
        message = header + blake3.blake3(plaintext).digest()
    sig = signer.signing_key.sign(message).signature
    return msgpack.packb({"v": v, "from": sender_pk, "to": to, "kind": kind, "seq": seq, "ts": ts,
                          "nonce": nonce, "body": body, "sig": sig}, use_bin_type=True)


def body_offset(envelope: bytes) -> tuple[int, int]:
    """(offset, length) of the ciphertext inside the envelope bytes."""
    body = msgpack.unpackb(envelope, raw=False)["body"]
    off = envelope.index(body)
    return off, len(body)


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


# --- the mesh --------------------------------------------------------------------------------------------------


@dataclass
class Client:
    """Identity C (trusted by the receiver) with its own sequence counter."""

    ident: Identity = field(default_factory=identity.generate)
    seqs: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.wire = Wire(self.ident, Limits(max_message_bytes=64 * MIB))

    def seal(self, to: bytes, kind: str = "ping", body: dict[str, Any] | None = None, ts: int | None = None) -> bytes:
        return self.wire.seal(to, kind, encode_body(body or {}), next(self.seqs), now_ms() if ts is None else ts)

    def open_pong(self, data: bytes, responder: bytes) -> dict[str, Any]:
        opened = self.wire.open(data, now_ms(), lambda pk: pk == responder, ReplayGuard())
        assert opened.sender == responder and opened.kind == "pong"
        body = msgpack.unpackb(opened.body, raw=False)
        assert isinstance(body, dict)
        return body


@dataclass
class Node:
    proc: DaemonProc
    config: Path
    peer_id: str
    peer_port: int
    status_port: int

    @property
    def pk(self) -> bytes:
        return bytes.fromhex(self.peer_id)

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def status(self) -> Any:
        return self.proc.status()

    def rejected(self) -> dict[str, dict[str, int]]:
        """{"status": {reason: n}, "metrics": {reason: n}}: the counters from /status and from /metrics."""
        from_status = {k: int(v) for k, v in self.status()["gossip"]["rejected"].items()}
        status, text = http_get(self.proc.url + "/metrics")
        assert status == 200
        from_metrics = {m.group(1): int(float(m.group(2))) for m in re.finditer(
            r'^meshd_messages_rejected_total\{reason="([a-z_]+)"\} (\S+)$', text.decode(), re.M)}
        return {"status": from_status, "metrics": from_metrics}

    def rss_kib(self) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]

    def log_events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.proc.logs().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == event:
                    out.append(rec)
        return out


class Counters:
    """Snapshot of a node's rejection counters; `assert_delta` checks both /status and /metrics."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.before = node.rejected()

    def assert_delta(self, reason: str, n: int) -> None:
        after = self.node.rejected()
        for source in ("status", "metrics"):
            got = after[source].get(reason, 0) - self.before[source].get(reason, 0)
            assert got == n, f"{source} rejected[{reason}] grew by {got}, expected {n}: {after}"


def assert_rejected(answer: Answer, status: int, reason: str) -> None:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.content_type.startswith("application/json"), answer
    assert answer.error == reason, answer.body[:300]


def assert_still_serving(node: Node, client: Client) -> None:
    assert http_get(node.proc.url + "/healthz") == (200, b"ok\n")
    assert node.proc.proc.poll() is None
    answer = post(node.peer_port, client.seal(node.pk))
    assert answer.status == 200 and answer.content_type == ENVELOPE_CT, answer
    client.open_pong(answer.body, node.pk)


@dataclass
class Mesh:
    a: Node
    b: Node
    c: Client
    x: Identity


def _start(config: Path, peer_id: str, peer_port: int, status_port: int) -> Node:
    return Node(DaemonProc(config, status_port), config, peer_id, peer_port, status_port)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("wire-mesh")
    a_cfg, a_id, a_peer, a_status = init_domain(root / "a", "alpha")
    b_cfg, b_id, b_peer, b_status = init_domain(root / "b", "beta")
    c, x = Client(), identity.generate()
    identity.save(c.ident, root / "c.key")
    identity.save(x, root / "x.key")
    for cfg in (a_cfg, b_cfg):
        set_toml(cfg, "log", "format", '"json"')
        set_toml(cfg, "membership", "ping_after_s", "0.5")
    set_toml(a_cfg, "trust", "peers", f'["{b_id}"]')
    set_toml(b_cfg, "trust", "peers", f'["{a_id}", "{c.ident.peer_id}"]')
    set_toml(b_cfg, "limits", "max_message_mib", str(B_MAX_MESSAGE_MIB))
    set_toml(b_cfg, "limits", "read_timeout_s", str(B_READ_TIMEOUT_S))
    set_toml(b_cfg, "limits", "max_connections_per_ip", str(B_MAX_CONN_PER_IP))
    # Static peers go last: a [[peers]] table swallows whatever keys follow it.
    for cfg, (name, pid, port) in ((a_cfg, ("beta", b_id, b_peer)), (b_cfg, ("alpha", a_id, a_peer))):
        cfg.write_text(cfg.read_text() + f'\n[[peers]]\ndomain = "{name}"\naddress = "127.0.0.1:{port}"\n'
                                          f'peer_id = "{pid}"\n')
    nodes: list[Node] = []
    try:
        nodes.append(_start(a_cfg, a_id, a_peer, a_status))
        nodes.append(_start(b_cfg, b_id, b_peer, b_status))
        for n in nodes:
            n.proc.wait_ready(60)
        yield Mesh(nodes[0], nodes[1], c, x)
    finally:
        for n in nodes:
            n.proc.stop()


# --- acceptance -------------------------------------------------------------------------------------------------


def test_valid_ping_is_answered_with_a_pong_and_daemons_talk(mesh: Mesh) -> None:
    a, b, c = mesh.a, mesh.b, mesh.c

    def alive(node: Node, other: Node) -> bool:
        rows = node.status()["mesh"]["peers"]
        return any(r["peer_id"] == other.peer_id and r["state"] == "alive" for r in rows)

    # A and B ping each other over real sockets (a pong counts as hearing from a peer): each sees the
    # other alive, and the pings were accepted envelopes.
    wait_for(lambda: alive(a, b) and alive(b, a), timeout=45, what="A and B to see each other alive")
    sa, sb = a.status()["gossip"], b.status()["gossip"]
    assert sa["received"] + sb["received"] >= 1 and sa["sent"] + sb["sent"] >= 1, (sa, sb)
    counters = Counters(b)
    received = b.status()["gossip"]["received"]
    answer = post(b.peer_port, c.seal(b.pk))
    assert answer.status == 200 and answer.content_type == ENVELOPE_CT, answer
    pong = c.open_pong(answer.body, b.pk)
    assert pong.get("domain") == "beta"
    assert b.status()["gossip"]["received"] >= received + 1
    for reason in ("bad_signature", "malformed", "replayed"):
        counters.assert_delta(reason, 0)


def test_forged_signature_is_refused_as_untrusted(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    # Someone holding the pair key of C and B (a stolen key of B's) but not C's signing key:
    forged = craft(mesh.x, c.ident.public_key, b.pk, seq=next(c.seqs), ts=now_ms(), box=c.ident)
    assert_rejected(post(b.peer_port, forged), 403, "untrusted")  # answered as an untrusted key (item 9a)
    counters.assert_delta("bad_signature", 1)  # counted under its real reason
    # Someone holding neither: the body does not even decrypt under C's pair key.
    blind = craft(mesh.x, c.ident.public_key, b.pk, seq=next(c.seqs), ts=now_ms())
    assert_rejected(post(b.peer_port, blind), 403, "untrusted")
    counters.assert_delta("bad_ciphertext", 1)
    counters.assert_delta("untrusted", 0)
    assert_still_serving(b, c)


def test_answers_do_not_tell_which_keys_are_trusted(mesh: Mesh) -> None:
    """Issue #10 item 9a: a prober claiming a key it does not hold got 401 when B trusts the key and 403 when
    it does not. Both answers are now the same bytes; B's counters still tell its operator which it was."""
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    stranger = identity.generate().public_key  # trusted by nobody
    seen = next(c.seqs)
    assert post(b.peer_port, c.wire.seal(b.pk, "ping", encode_body({}), seen, now_ms())).status == 200
    # A fresh seq, a seq B has already accepted from C, a timestamp far outside the window: whatever the
    # forged envelope holds, nothing is revealed before it is authenticated (replay and freshness come after).
    for seq, ts in ((next(c.seqs), now_ms()), (seen, now_ms()), (next(c.seqs), now_ms() - 3_600_000)):
        answers = {}
        for name, claimed in (("trusted", c.ident.public_key), ("untrusted", stranger)):
            answers[name] = post(b.peer_port, craft(mesh.x, claimed, b.pk, seq=seq, ts=ts))
        assert answers["trusted"] == answers["untrusted"], (seq, ts, answers)
        assert_rejected(answers["trusted"], 403, "untrusted")
    counters.assert_delta("bad_ciphertext", 3)
    counters.assert_delta("untrusted", 3)
    counters.assert_delta("replayed", 0)
    counters.assert_delta("stale", 0)
    # A body too short to hold the Poly1305 tag is malformed whoever the envelope claims to be from.
    short = {}
    for name, claimed in (("trusted", c.ident.public_key), ("untrusted", stranger)):
        env = msgpack.packb({"v": PROTOCOL_VERSION, "from": claimed, "to": b.pk, "kind": "ping",
                             "seq": next(c.seqs), "ts": now_ms(), "nonce": os.urandom(24), "body": b"\x00" * 8,
                             "sig": bytes(64)}, use_bin_type=True)
        short[name] = post(b.peer_port, env)
    assert short["trusted"] == short["untrusted"], short
    assert_rejected(short["trusted"], 400, "malformed")
    assert_still_serving(b, c)


def test_flipped_bits_are_never_accepted(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    good = c.seal(b.pk)
    off, n = body_offset(good)
    tag_positions = [off, off + 7, off + 15]  # the Poly1305 tag
    ct_positions = [off + 16, off + n // 2, off + n - 1] if n > 17 else [off + 16]
    nonce_pos = good.index(msgpack.unpackb(good)["nonce"])  # in the signed header, and authenticated by the tag
    sig_pos = len(good) - 1
    for pos in [*tag_positions, nonce_pos, sig_pos]:
        assert_rejected(post(b.peer_port, flip(good, pos, pos % 8)), 403, "untrusted")  # does not authenticate
    # a bigger plaintext, so "later ciphertext bytes" are many
    big = c.seal(b.pk, body={"pad": os.urandom(4096)})
    boff, bn = body_offset(big)
    big_ct = [boff + 16, boff + 100, boff + bn // 2, boff + bn - 1]
    for pos in ct_positions:
        assert_rejected(post(b.peer_port, flip(good, pos, 7)), 403, "untrusted")  # counted as bad_ciphertext
    for pos in big_ct:
        assert_rejected(post(b.peer_port, flip(big, pos, 3)), 403, "untrusted")
    counters.assert_delta("bad_signature", 1)
    counters.assert_delta("bad_ciphertext", len(tag_positions) + 1 + len(ct_positions) + len(big_ct))
    # corrupted copies did not burn the sequence numbers: the originals are still accepted, once
    for env in (good, big):
        answer = post(b.peer_port, env)
        assert answer.status == 200, answer
        c.open_pong(answer.body, b.pk)
    assert_still_serving(b, c)


def test_same_message_twice_is_409_replayed(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    env = c.seal(b.pk)
    assert post(b.peer_port, env).status == 200
    assert_rejected(post(b.peer_port, env), 409, "replayed")
    assert_rejected(post(b.peer_port, env), 409, "replayed")
    counters.assert_delta("replayed", 2)
    assert_still_serving(b, c)


def test_wrong_recipient_is_421(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    assert_rejected(post(b.peer_port, c.seal(mesh.a.pk)), 421, "wrong_recipient")
    counters.assert_delta("wrong_recipient", 1)
    assert_still_serving(b, c)


def test_untrusted_sender_is_403(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    xw = Wire(mesh.x, Limits())
    assert_rejected(post(b.peer_port, xw.seal(b.pk, "ping", encode_body({}), 1, now_ms())), 403, "untrusted")
    counters.assert_delta("untrusted", 1)
    assert_still_serving(b, c)


def test_timestamp_outside_window_is_409_stale(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    skew_ms = int(Limits().max_skew_ms)  # B runs with the default limits.max_skew_s = 60
    for ts in (now_ms() + 2 * skew_ms, now_ms() - 2 * skew_ms):
        assert_rejected(post(b.peer_port, c.seal(b.pk, ts=ts)), 409, "stale")
    counters.assert_delta("stale", 2)
    assert_still_serving(b, c)


def test_unknown_protocol_version_is_400(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    # A version 1 envelope (its signature covers the Poly1305 tag, not the content), and a future version 3.
    for v in (1, 3):
        env = craft(c.ident, c.ident.public_key, b.pk, seq=next(c.seqs), ts=now_ms(), v=v, plaintext=encode_body({}))
        assert_rejected(post(b.peer_port, env), 400, "bad_version")
    counters.assert_delta("bad_version", 2)
    assert_still_serving(b, c)


def test_body_over_the_limit_is_413(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    big = os.urandom((B_MAX_MESSAGE_MIB + 1) * MIB)
    # declared Content-Length: refused before a byte of the body is read
    assert_rejected(post(b.peer_port, big), 413, "too_large")
    # chunked, no Content-Length: refused while reading, once past the limit
    chunks = (big[i:i + 256 * 1024] for i in range(0, len(big), 256 * 1024))
    assert_rejected(post(b.peer_port, chunks, chunked=True), 413, "too_large")
    counters.assert_delta("too_large", 2)
    assert_still_serving(b, c)


def test_large_valid_message_within_the_limit_passes(mesh: Mesh) -> None:
    """aiohttp's default client_max_size is 1 MiB; B's limit is 4 MiB, so 1.5 MiB must get through."""
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    env = c.seal(b.pk, body={"pad": os.urandom(3 * MIB // 2)})
    assert len(env) > 3 * MIB // 2
    answer = post(b.peer_port, env)
    assert answer.status == 200 and answer.content_type == ENVELOPE_CT, answer.body[:300]
    c.open_pong(answer.body, b.pk)
    # also chunked, and an unknown kind: refused for its kind, which proves it got past size and HTTP
    env = c.seal(b.pk, kind="nosuchkind", body={"pad": os.urandom(3 * MIB // 2)})
    chunks = (env[i:i + 100_000] for i in range(0, len(env), 100_000))
    assert_rejected(post(b.peer_port, chunks, chunked=True), 400, "unknown_kind")
    counters.assert_delta("too_large", 0)
    counters.assert_delta("unknown_kind", 1)
    assert_still_serving(b, c)


def test_malformed_bytes_are_400_without_allocating(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    good = c.seal(b.pk)
    huge = 0xFFFFFFF0
    claims = [
        b"\xc6" + huge.to_bytes(4, "big") + b"x" * 64,  # bin32 of ~4 GiB
        b"\xdb" + huge.to_bytes(4, "big") + b"x" * 64,  # str32
        b"\xdf" + huge.to_bytes(4, "big") + b"\xa1v\x01" * 8,  # map32
        b"\xdd" + huge.to_bytes(4, "big") + b"\x01" * 64,  # array32
        # inside an otherwise plausible envelope map
        b"\x89\xa1v\x01\xa4body\xc6" + huge.to_bytes(4, "big") + b"x" * 64,
        b"\x89\xa1v\x01\xa4kind\xdb" + huge.to_bytes(4, "big") + b"x" * 64,
        b"\x89\xa1v\xdd" + huge.to_bytes(4, "big") + b"\x01" * 64,
        b"\x89\xa1v\xdf" + huge.to_bytes(4, "big") + b"\x01\x01" * 32,
    ]
    bad = [good[: len(good) // 2], good[:-1], b"\xc1\xc1\xc1", b"not msgpack at all", good + b"\x00", *claims]
    rss_before = b.rss_kib()
    for data in bad:
        assert_rejected(post(b.peer_port, data), 400, "malformed")
    rss_after = b.rss_kib()
    counters.assert_delta("malformed", len(bad))
    assert rss_after - rss_before < 50 * 1024, f"RSS grew {rss_before} -> {rss_after} KiB"
    # an HTTP body cut short (Content-Length promises more, then EOF): B cannot answer a half-closed
    # connection, but it counts the request as malformed and never looks at the bytes
    s = connect(b.peer_port, CLIENT_IP)
    try:
        s.sendall(http_head(len(good)) + good[: len(good) // 2])
        s.shutdown(socket.SHUT_WR)
        got = read_all(s, deadline_s=10)
    finally:
        s.close()
    assert got == b"" or (got.startswith(b"HTTP/1.1 400") and b'"malformed"' in got), got
    wait_for(lambda: b.rejected()["status"].get("malformed", 0)
             == counters.before["status"].get("malformed", 0) + len(bad) + 1,
             timeout=10, what="the cut-short body to be counted")
    counters.assert_delta("malformed", len(bad) + 1)
    assert_still_serving(b, c)


def test_flood_is_counted_but_logged_at_most_twice(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    source = "127.0.0.6"  # a sender of its own, so its log lines can be told apart
    counters = Counters(b)
    forged = [craft(mesh.x, c.ident.public_key, b.pk, seq=s, ts=now_ms(), box=c.ident) for s in range(10_000, 10_200)]
    conn = http.client.HTTPConnection("127.0.0.1", b.peer_port, timeout=30, source_address=(source, 0))
    deadline = time.monotonic() + 60
    try:
        for env in forged:  # bounded: 200 requests, 60 s
            assert time.monotonic() < deadline, "flood took too long"
            conn.request("POST", "/v1/envelope", body=env, headers={"Content-Type": ENVELOPE_CT})
            assert_rejected(_read_answer(conn), 403, "untrusted")  # a bad signature, answered as untrusted
    finally:
        conn.close()
    counters.assert_delta("bad_signature", 200)

    def lines() -> list[dict[str, Any]]:
        return [r for r in b.log_events("message_rejected")
                if r.get("reason") == "bad_signature" and r.get("remote") == source]

    wait_for(lines, timeout=10, what="the flood's first message_rejected line")
    assert 1 <= len(lines()) <= 2, lines()
    assert_still_serving(b, c)


def test_slow_loris_is_closed_after_read_timeout(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    s = connect(b.peer_port, "127.0.0.4")
    try:
        s.sendall(b"POST /v1/enve")
        closed_after = closed_by_peer(s, deadline_s=B_READ_TIMEOUT_S + 20)
    finally:
        s.close()
    assert closed_after is not None, "B kept a half-sent request open"
    assert closed_after >= B_READ_TIMEOUT_S * 0.75, closed_after
    wait_for(lambda: b.rejected()["status"].get("read_timeout", 0)
             > counters.before["status"].get("read_timeout", 0),
             timeout=10, what="read_timeout to be counted")
    counters.assert_delta("read_timeout", 1)
    assert_still_serving(b, c)


def test_slow_body_is_refused_after_read_timeout(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    counters = Counters(b)
    env = c.seal(b.pk)
    s = connect(b.peer_port, "127.0.0.4")
    try:
        t0 = time.monotonic()
        s.sendall(http_head(len(env)) + env[:10])  # complete headers, then the body stalls
        got = read_all(s, deadline_s=B_READ_TIMEOUT_S + 20, until=b'"}')
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 408") and b'"read_timeout"' in got, got
    assert elapsed >= B_READ_TIMEOUT_S * 0.75, elapsed
    counters.assert_delta("read_timeout", 1)
    # the stalled envelope was never opened: sent whole, it is accepted
    answer = post(b.peer_port, env)
    assert answer.status == 200, answer
    assert_still_serving(b, c)


def test_connections_per_address_are_capped(mesh: Mesh) -> None:
    b, c = mesh.b, mesh.c
    source = "127.0.0.5"
    counters = Counters(b)
    request = http_head(1) + b"\xc1"
    held: list[socket.socket] = []
    try:
        # two connections that made one request each: served, so kept alive (no first-request deadline)
        for _ in range(B_MAX_CONN_PER_IP):
            s = connect(b.peer_port, source)
            held.append(s)
            s.sendall(request)
            got = read_all(s, deadline_s=20, until=b'"}')
            assert got.startswith(b"HTTP/1.1 400") and b'"malformed"' in got, got
        third = connect(b.peer_port, source)
        held.append(third)
        closed_after = closed_by_peer(third, deadline_s=10)
        assert closed_after is not None and closed_after < B_READ_TIMEOUT_S, closed_after
        assert all(still_open(s) for s in held[:B_MAX_CONN_PER_IP]), "B closed an admitted connection"
        counters.assert_delta("too_many_connections", 1)
        # a slot freed is a slot available again
        held.pop(0).close()

        def admitted() -> bool:
            answer = post(b.peer_port, c.seal(b.pk), source=source)
            assert answer.status == 200, answer
            return True

        wait_for(admitted, timeout=10, what="a new connection once one was closed")
    finally:
        for s in held:
            s.close()
    assert_still_serving(b, c)


# --- restarts (their own receiver) -------------------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path, daemons: Any) -> tuple[Path, str, int, int, Client, Any]:
    cfg, peer_id, peer_port, status_port = init_domain(tmp_path / "r", "receiver")
    c = Client()
    set_toml(cfg, "log", "format", '"json"')
    set_toml(cfg, "trust", "peers", f'["{c.ident.peer_id}"]')
    return cfg, peer_id, peer_port, status_port, c, daemons


def test_replay_refused_after_restart_and_after_kill9(receiver: Any) -> None:
    cfg, peer_id, peer_port, status_port, c, daemons = receiver
    r = Node(daemons(cfg, status_port), cfg, peer_id, peer_port, status_port)
    r.proc.wait_ready(60)
    first = c.seal(r.pk)
    answer = post(peer_port, first)
    assert answer.status == 200, answer
    c.open_pong(answer.body, r.pk)

    # graceful restart
    assert r.proc.stop() == 0
    r = Node(daemons(cfg, status_port), cfg, peer_id, peer_port, status_port)
    r.proc.wait_ready(60)
    counters = Counters(r)
    assert_rejected(post(peer_port, first), 409, "replayed")
    counters.assert_delta("replayed", 1)

    # kill -9 right after an accepted message: its windows are gone, but the timestamp lease was fsynced
    # before it was accepted, so everything sealed up to the lease is refused as stale
    second = c.seal(r.pk)
    assert post(peer_port, second).status == 200
    # Nothing per message but the lease (O(1)): the windows are only written at a graceful stop.
    assert [p.name for p in cfg.parent.rglob("replay*.json")] == ["replay-lease.json"]
    r.proc.kill9()
    r = Node(daemons(cfg, status_port), cfg, peer_id, peer_port, status_port)
    r.proc.wait_ready(60)
    counters = Counters(r)
    for env in (first, second):
        assert_rejected(post(peer_port, env), 409, "stale")
    counters.assert_delta("stale", 2)
    assert_still_serving(r, c)


def test_a_refused_envelope_is_not_recorded_so_its_retry_is_handled(receiver: Any) -> None:
    """Issue #10 item 9b: only an envelope that took effect burns its seq. A ping to a domain that has left
    the mesh is refused (503 not_joined); once it rejoins (reload), the very same bytes are answered, and only
    then does a third copy read 'replayed'. (A sender reads a retry's 'replayed' as delivered: were the 503
    recorded, it would subtract mass that was never merged.)"""
    cfg, peer_id, peer_port, status_port, c, daemons = receiver
    set_toml(cfg, "mesh", "enabled", "false")
    r = Node(daemons(cfg, status_port), cfg, peer_id, peer_port, status_port)
    r.proc.wait_ready(60)
    env = c.seal(r.pk)
    assert_rejected(post(peer_port, env), 503, "not_joined")
    assert_rejected(post(peer_port, env), 503, "not_joined")  # the retry is handled again, not "replayed"
    set_toml(cfg, "mesh", "enabled", "true")
    r.proc.signal(signal.SIGHUP)
    answer = wait_for(lambda: (a := post(peer_port, env)).status == 200 and a, timeout=30,
                      what="the same envelope answered once the domain rejoined")
    c.open_pong(answer.body, r.pk)
    assert_rejected(post(peer_port, env), 409, "replayed")
