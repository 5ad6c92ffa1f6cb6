"""Envelope round trips and every rejection reason of Wire.open, with real NaCl and real msgpack."""

from __future__ import annotations

import hashlib
import secrets
import struct
import tracemalloc
from typing import Any

import blake3
import msgpack
import nacl.bindings as sodium
import pytest

from meshd import identity
from meshd.core.replay import ReplayGuard
from meshd.core.wire import (
    PROTOCOL_VERSION,
    Limits,
    Opened,
    Wire,
    decode_body,
    encode_body,
    verify_commitment,
)
from meshd.errors import WireError
from meshd.identity import Identity

NOW = 1_700_000_000_000


def trust_all(_: bytes) -> bool:
    return True


@pytest.fixture
def alice() -> Identity:
    return identity.generate()


@pytest.fixture
def bob() -> Identity:
    return identity.generate()


def craft(
    sender: Identity,
    recipient_pk: bytes,
    *,
    v: int = 2,
    kind: str = "share",
    seq: int = 1,
    ts: int = NOW,
    nonce: bytes = b"\x07" * 24,
    plaintext: bytes = b"payload",
    body: bytes | None = None,
    overrides: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    sign_key: Identity | None = None,
) -> bytes:
    """An envelope built independently of meshd.core.wire (blake3, raw libsodium), so the test also
    cross-checks the documented layout; ``body`` replaces the ciphertext (the signature still covers
    ``plaintext``), ``sign_key`` the signer. ``v=1`` signs the way version 1 did (the Poly1305 tag only)."""
    if body is None:
        k = sodium.crypto_box_beforenm(
            sodium.crypto_sign_ed25519_pk_to_curve25519(recipient_pk), bytes(sender.box_private)
        )
        body = sodium.crypto_box_easy_afternm(plaintext, nonce, k)
    kb = kind.encode()
    header = (
        b"meshd-envelope\x00"
        + struct.pack(">H", v)
        + sender.public_key
        + recipient_pk
        + bytes([len(kb)])
        + kb
        + struct.pack(">QQ", seq, ts)
        + nonce
        + struct.pack(">Q", len(body))
    )
    if v == 1:  # version 1: BLAKE2b-256(header || Poly1305 tag), which does not commit to the content
        message = hashlib.blake2b(header + body[:16], digest_size=32).digest()
    else:  # version 2: the header followed by BLAKE3-256 of the plaintext
        message = header + blake3.blake3(plaintext).digest()
    signer = sign_key or sender
    sig = signer.signing_key.sign(message).signature
    env: dict[str, Any] = {
        "v": v,
        "from": sender.public_key,
        "to": recipient_pk,
        "kind": kind,
        "seq": seq,
        "ts": ts,
        "nonce": nonce,
        "body": body,
        "sig": sig,
    }
    env.update(overrides or {})
    for key in drop:
        del env[key]
    return msgpack.packb(env, use_bin_type=True)


def reason_of(
    wire: Wire, data: bytes, guard: ReplayGuard | None = None, now: int = NOW, trusted: Any = trust_all
) -> tuple[str, int]:
    with pytest.raises(WireError) as ei:
        wire.open(data, now, trusted, guard if guard is not None else ReplayGuard())
    return ei.value.reason, ei.value.status


# --- round trips -----------------------------------------------------------------------------------


def test_round_trip(alice: Identity, bob: Identity) -> None:
    wa, wb = Wire(alice, Limits()), Wire(bob, Limits())
    data = wa.seal(bob.public_key, "share", b"\x00\x01hello", seq=7, now_ms=NOW)
    guard = ReplayGuard()
    opened = wb.open(data, NOW + 5, lambda pk: pk == alice.public_key, guard)
    assert opened == Opened(sender=alice.public_key, kind="share", seq=7, ts_ms=NOW, body=b"\x00\x01hello")
    assert guard.dirty and guard.high_water(alice.public_key) == 7


def test_round_trip_large_and_empty_bodies(alice: Identity, bob: Identity) -> None:
    wa, wb = Wire(alice, Limits()), Wire(bob, Limits())
    guard = ReplayGuard()
    for seq, body in enumerate([b"", b"x" * 300, bytes(range(256)) * 4096], start=1):
        assert wb.open(wa.seal(bob.public_key, "model", body, seq, NOW), NOW, trust_all, guard).body == body


def test_independent_builder_is_accepted(alice: Identity, bob: Identity) -> None:
    opened = Wire(bob, Limits()).open(craft(alice, bob.public_key, seq=3), NOW, trust_all, ReplayGuard())
    assert (opened.kind, opened.seq, opened.body) == ("share", 3, b"payload")


def test_explicit_nonce_is_deterministic_and_random_nonce_is_not(alice: Identity, bob: Identity) -> None:
    wa = Wire(alice, Limits())
    n = b"\x01" * 24
    assert wa.seal(bob.public_key, "ping", b"", 1, NOW, nonce=n) == wa.seal(
        bob.public_key, "ping", b"", 1, NOW, nonce=n
    )
    assert (
        msgpack.unpackb(wa.seal(bob.public_key, "ping", b"", 1, NOW))["nonce"]
        != msgpack.unpackb(wa.seal(bob.public_key, "ping", b"", 1, NOW))["nonce"]
    )
    assert craft(alice, bob.public_key, kind="ping", plaintext=b"", nonce=n) == wa.seal(
        bob.public_key, "ping", b"", 1, NOW, nonce=n
    )  # byte-identical to the documented layout


def test_envelope_is_a_map_with_exactly_the_documented_keys(alice: Identity, bob: Identity) -> None:
    env = msgpack.unpackb(Wire(alice, Limits()).seal(bob.public_key, "leave", b"bye", 9, NOW))
    assert set(env) == {"v", "from", "to", "kind", "seq", "ts", "nonce", "body", "sig"}
    assert env["v"] == PROTOCOL_VERSION and env["from"] == alice.public_key and env["to"] == bob.public_key
    assert len(env["nonce"]) == 24 and len(env["sig"]) == 64 and len(env["body"]) == 3 + 16


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recipient": b"short"},
        {"kind": "Share"},
        {"kind": ""},
        {"kind": "a" * 17},
        {"seq": 0},
        {"seq": 2**63},
        {"now_ms": -1},
        {"nonce": b"\x00" * 23},
    ],
)
def test_seal_refuses_bad_arguments(alice: Identity, bob: Identity, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"recipient": bob.public_key, "kind": "ping", "body": b"", "seq": 1, "now_ms": NOW}
    args.update(kwargs)
    with pytest.raises(ValueError):
        Wire(alice, Limits()).seal(**args)


def test_seal_refuses_to_exceed_the_size_limit(alice: Identity, bob: Identity) -> None:
    with pytest.raises(WireError) as ei:
        Wire(alice, Limits(max_message_bytes=500)).seal(bob.public_key, "share", b"x" * 500, 1, NOW)
    assert (ei.value.reason, ei.value.status) == ("too_large", 413)


# --- each rejection reason ---------------------------------------------------------------------------


def test_too_large_is_checked_first(alice: Identity, bob: Identity) -> None:
    wb = Wire(bob, Limits(max_message_bytes=1000))
    assert reason_of(wb, b"\xff" * 1001) == ("too_large", 413)
    ok = Wire(alice, Limits()).seal(bob.public_key, "share", b"x" * 600, 1, NOW)
    assert len(ok) > 600
    assert wb.open(ok, NOW, trust_all, ReplayGuard()).body == b"x" * 600
    assert reason_of(wb, Wire(alice, Limits()).seal(bob.public_key, "share", b"x" * 1000, 2, NOW)) == ("too_large", 413)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        b"\x80",
        b"\x90",
        b"\xa3abc",
        b"\x01",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({b"v": 1}, use_bin_type=True),
        b"\xdb\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdd\xff\xff\xff\xff",
        b"\xc9\xff\xff\xff\xff\x01",
        b"\x81\xa1v\xc6\xff\xff\xff\xff",
        b"\x81\xa1v\xdb\xff\xff\xff\xffxx",
        b"\x81\xa4body\xc6\x7f\xff\xff\xff",
        b"\xde\xff\xff",
    ],
)
def test_malformed_bytes(bob: Identity, data: bytes) -> None:
    assert reason_of(Wire(bob, Limits()), data) == ("malformed", 400)


def test_huge_declared_lengths_do_not_allocate(bob: Identity) -> None:
    wb = Wire(bob, Limits())
    crafted = [
        b"\xdb\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdd\xff\xff\xff\xff",
        b"\xc9\xff\xff\xff\xff\x05",
        b"\x89\xa4body\xc6\x03\xff\xff\xff",
    ]
    tracemalloc.start()
    try:
        for data in crafted:
            assert reason_of(wb, data) == ("malformed", 400)
            with pytest.raises(WireError):
                decode_body(data, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20


def test_truncated_envelopes_are_malformed(alice: Identity, bob: Identity) -> None:
    data = Wire(alice, Limits()).seal(bob.public_key, "share", b"body" * 10, 1, NOW)
    wb = Wire(bob, Limits())
    for cut in range(len(data)):
        assert reason_of(wb, data[:cut]) == ("malformed", 400)
    assert reason_of(wb, data + b"\x00") == ("malformed", 400)  # trailing bytes


@pytest.mark.parametrize(
    ("overrides", "drop"),
    [
        ({"v": True}, ()),
        ({"v": 1.0}, ()),
        ({"v": -1}, ()),
        ({"v": 2**16}, ()),
        ({"v": "1"}, ()),
        ({"seq": 0}, ()),
        ({"seq": -5}, ()),
        ({"seq": 2**63}, ()),
        ({"seq": False}, ()),
        ({"ts": -1}, ()),
        ({"ts": 1.5}, ()),
        ({"kind": "Share"}, ()),
        ({"kind": "a" * 17}, ()),
        ({"kind": ""}, ()),
        ({"kind": b"share"}, ()),
        ({"kind": "sh-are"}, ()),
        ({"from": b"\x00" * 31}, ()),
        ({"to": b"\x00" * 33}, ()),
        ({"nonce": b"\x00" * 23}, ()),
        ({"sig": b"\x00" * 63}, ()),
        ({"from": "x" * 32}, ()),
        ({"body": "text"}, ()),
        ({"body": None}, ()),
        ({"extra": 1}, ()),
        ({}, ("sig",)),
        ({}, ("body",)),
        ({}, ("v",)),
        ({"nonce": [1, 2]}, ()),
        ({"sig": {"a": 1}}, ()),
    ],
)
def test_wrong_types_missing_and_extra_keys_are_malformed(
    alice: Identity, bob: Identity, overrides: dict[str, Any], drop: tuple[str, ...]
) -> None:
    assert reason_of(Wire(bob, Limits()), craft(alice, bob.public_key, overrides=overrides, drop=drop)) == (
        "malformed",
        400,
    )


def test_duplicate_and_non_str_keys_are_malformed(alice: Identity, bob: Identity) -> None:
    good = craft(alice, bob.public_key)
    assert good[0] == 0x89
    dup = b"\x8a" + good[1:] + msgpack.packb("v") + msgpack.packb(1)
    assert reason_of(Wire(bob, Limits()), dup) == ("malformed", 400)
    env = msgpack.unpackb(good)
    env[b"v"] = env.pop("v")
    assert reason_of(Wire(bob, Limits()), msgpack.packb(env, use_bin_type=True)) == ("malformed", 400)


def test_unknown_version_reaches_the_version_check(alice: Identity, bob: Identity) -> None:
    # Properly signed envelopes of other versions are well-formed, so the version check is what refuses them.
    assert reason_of(Wire(bob, Limits()), craft(alice, bob.public_key, v=3)) == ("bad_version", 400)
    assert reason_of(Wire(bob, Limits()), craft(alice, bob.public_key, v=0)) == ("bad_version", 400)


def test_a_version_1_envelope_is_refused_as_bad_version(alice: Identity, bob: Identity) -> None:
    """Version 1 signed only the Poly1305 tag; a v2 receiver refuses such an envelope outright."""
    guard = ReplayGuard()
    assert reason_of(Wire(bob, Limits()), craft(alice, bob.public_key, v=1), guard) == ("bad_version", 400)
    assert not guard.dirty


def test_wrong_recipient(alice: Identity, bob: Identity) -> None:
    carol = identity.generate()
    data = Wire(alice, Limits()).seal(carol.public_key, "ping", b"", 1, NOW)
    assert reason_of(Wire(bob, Limits()), data) == ("wrong_recipient", 421)
    assert Wire(carol, Limits()).open(data, NOW, trust_all, ReplayGuard()).kind == "ping"


def test_untrusted_is_checked_before_the_signature(alice: Identity, bob: Identity) -> None:
    mallory = identity.generate()
    wb = Wire(bob, Limits())

    def only_alice(pk: bytes) -> bool:
        return pk == alice.public_key

    assert reason_of(wb, craft(mallory, bob.public_key), trusted=only_alice) == ("untrusted", 403)
    # Even a forged signature from an untrusted key reports "untrusted" (cheapest check first).
    assert reason_of(wb, craft(mallory, bob.public_key, sign_key=alice), trusted=only_alice) == ("untrusted", 403)


def test_forged_signature(alice: Identity, bob: Identity) -> None:
    mallory = identity.generate()
    forged = craft(alice, bob.public_key, sign_key=mallory)
    guard = ReplayGuard()
    assert reason_of(Wire(bob, Limits()), forged, guard) == ("bad_signature", 401)
    assert not guard.dirty and guard.high_water(alice.public_key) == 0


def _field_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of each value inside a sealed envelope (found by re-encoding each field)."""
    env = msgpack.unpackb(data)
    spans: dict[str, tuple[int, int]] = {}
    pos = 1  # map header
    for key in env:
        pos += len(msgpack.packb(key))
        n = len(msgpack.packb(env[key], use_bin_type=True))
        spans[key] = (pos, pos + n)
        pos += n
    assert pos == len(data)
    return spans


def test_every_single_bit_flip_is_rejected(alice: Identity, bob: Identity) -> None:
    data = Wire(alice, Limits()).seal(bob.public_key, "share", bytes(range(100)), 42, NOW)
    wb = Wire(bob, Limits())
    spans = _field_spans(data)
    _, body_hi = spans["body"]
    payload_lo = body_hi - 100 - 16  # first ciphertext byte (after the bin header)
    seen: dict[str, set[str]] = {}
    for i in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[i] ^= 1 << bit
            guard = ReplayGuard()
            with pytest.raises(WireError) as ei:
                wb.open(bytes(mutated), NOW, trust_all, guard)
            assert not guard.dirty  # a corrupted copy never burns a sequence number
            field = next((k for k, (lo, hi) in spans.items() if lo <= i < hi), "structure")
            seen.setdefault(field, set()).add(ei.value.reason)
            value_byte = field in ("nonce", "sig", "from", "to") and i >= spans[field][0] + 2
            if value_byte and field == "sig":
                assert ei.value.reason == "bad_signature"
            if value_byte and field == "nonce":
                assert ei.value.reason == "bad_ciphertext"  # the nonce is authenticated by the Poly1305 tag
            if field == "body" and i >= payload_lo:
                # tag or ciphertext start/middle/end: the tag (under the shared key) catches it, a 401
                assert ei.value.reason == "bad_ciphertext", (i, bit)
                assert ei.value.status == 401
            if value_byte and field == "to":
                assert ei.value.reason == "wrong_recipient"
    assert set(seen) == {"structure", "v", "from", "to", "kind", "seq", "ts", "nonce", "sig", "body"}
    assert "bad_signature" in seen["seq"] and "bad_signature" in seen["ts"]


# --- the signature commits to the plaintext (protocol version 2) ---------------------------------------------


def test_swapped_content_under_a_valid_signature_is_refused(alice: Identity, bob: Identity) -> None:
    """Whoever holds the pair's shared key (a stolen recipient key) can make a second ciphertext with the same
    nonce and Poly1305 tag; it decrypts, but the sender's signature covers the plaintext's hash, so it is
    refused. Under version 1 (the tag signed) this envelope was accepted with the swapped content."""
    honest = encode_body({"weight": 0.5, "pad": b"\x00" * 48})
    data = Wire(alice, Limits()).seal(bob.public_key, "share", honest, 5, NOW)
    env = msgpack.unpackb(data)
    k = sodium.crypto_box_beforenm(sodium.crypto_sign_ed25519_pk_to_curve25519(alice.public_key),
                                   bytes(bob.box_private))  # the recipient's side of the pair key
    wanted = encode_body({"weight": 1e6, "pad": b"\x00" * 48})
    assert len(wanted) == len(honest)
    forged_body = _same_tag_ciphertext(k, env["nonce"], env["body"], wanted, free=wanted.index(b"\x00" * 48))
    assert forged_body[:16] == env["body"][:16] and forged_body != env["body"]
    swapped = sodium.crypto_box_open_easy_afternm(forged_body, env["nonce"], k)  # a valid ciphertext...
    assert swapped != honest and decode_body(swapped, Limits())["weight"] == 1e6  # ...of other content
    forged = msgpack.packb({**env, "body": forged_body}, use_bin_type=True)
    guard = ReplayGuard()
    assert reason_of(Wire(bob, Limits()), forged, guard) == ("bad_signature", 401)
    assert not guard.dirty
    assert Wire(bob, Limits()).open(data, NOW, trust_all, guard).body == honest  # the real one still passes


def test_a_third_party_holding_the_plaintext_can_verify_the_commitment(alice: Identity, bob: Identity) -> None:
    """The envelope and its plaintext are enough, without any key: the recipient can show what the sender sent."""
    plaintext = encode_body({"weight": 0.25, "values": b"\x01" * 64})
    data = Wire(alice, Limits()).seal(bob.public_key, "share", plaintext, 9, NOW)
    assert verify_commitment(data, plaintext) == alice.public_key
    for other in (plaintext[:-1] + b"\x02", plaintext + b"\x00", plaintext[:-1], b""):
        with pytest.raises(WireError) as ei:
            verify_commitment(data, other)
        assert (ei.value.reason, ei.value.status) == ("bad_signature", 401)
    for bad, reason in ((data[:-3], "malformed"), (craft(alice, bob.public_key, v=1), "bad_version")):
        with pytest.raises(WireError) as ei:
            verify_commitment(bad, b"payload")
        assert ei.value.reason == reason
    assert verify_commitment(craft(alice, bob.public_key), b"payload") == alice.public_key


def _same_tag_ciphertext(k: bytes, nonce: bytes, body: bytes, wanted: bytes, free: int) -> bytes:
    """A crypto_box_easy_afternm body that decrypts (under ``k``, ``nonce``) to ``wanted`` except for one
    16-byte block at or after ``free``, and carries the same Poly1305 tag as ``body``: the forgery that any
    holder of the shared key can make (Poly1305 is not a commitment)."""
    stream = _xsalsa20_block0(k, nonce)
    r = int.from_bytes(stream[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(stream[16:32], "little")
    p = (1 << 130) - 5
    tag = int.from_bytes(body[:16], "little")
    # Ciphertext of `wanted` under the same stream: XOR with the honest plaintext's keystream.
    keystream = sodium.crypto_box_easy_afternm(b"\x00" * len(wanted), nonce, k)[16:]
    j = -(-free // 16)  # first whole block inside the free bytes (at least 32 of them)
    assert (j + 1) * 16 < min(free + 32, len(wanted))
    for _ in range(64):  # each try succeeds with probability ~0.7
        cipher = bytearray(x ^ y for x, y in zip(wanted, keystream, strict=True))
        blocks = [int.from_bytes(bytes(cipher[i:i + 16]) + b"\x01", "little") for i in range(0, len(cipher), 16)]
        n = len(blocks)
        rest = sum(c * pow(r, n - i, p) for i, c in enumerate(blocks) if i != j) % p
        for m in range(4):  # acc mod p + s = tag (mod 2**128): acc mod p is one of four candidates
            acc = ((tag - s) % (1 << 128)) + m * (1 << 128)
            if acc >= p:
                continue
            c_j = (acc - rest) * pow(pow(r, n - j, p), -1, p) % p
            if 1 << 128 <= c_j < 1 << 129:
                cipher[16 * j:16 * j + 16] = (c_j - (1 << 128)).to_bytes(16, "little")
                return body[:16] + bytes(cipher)
        f = 16 * (j + 1)  # a free byte after block j: change it and try again
        wanted = wanted[:f] + secrets.token_bytes(1) + wanted[f + 1:]
    raise AssertionError("no same-tag ciphertext found")


def _xsalsa20_block0(k: bytes, nonce: bytes) -> bytes:
    """The first 64 bytes of the XSalsa20 stream: crypto_secretbox takes its Poly1305 key from bytes 0-31."""
    subkey = _salsa20_words(k, nonce[:16], hsalsa=True)
    return _salsa20_words(subkey, nonce[16:] + b"\x00" * 8, hsalsa=False)


def _salsa20_words(key: bytes, inp: bytes, hsalsa: bool) -> bytes:
    m = 0xFFFFFFFF
    c = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
    kw = struct.unpack("<8I", key)
    iw = struct.unpack("<4I", inp)
    x = [c[0], *kw[:4], c[1], *iw, c[2], *kw[4:], c[3]]
    y = list(x)

    def quarter(a: int, b: int, cc: int, d: int) -> None:
        def rotl(v: int, n: int) -> int:
            return ((v << n) & m) | (v >> (32 - n))
        y[b] ^= rotl((y[a] + y[d]) & m, 7)
        y[cc] ^= rotl((y[b] + y[a]) & m, 9)
        y[d] ^= rotl((y[cc] + y[b]) & m, 13)
        y[a] ^= rotl((y[d] + y[cc]) & m, 18)

    for _ in range(10):
        for q in ((0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11),
                  (0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14)):
            quarter(*q)
    if hsalsa:
        return struct.pack("<8I", *(y[i] for i in (0, 5, 10, 15, 6, 7, 8, 9)))
    return struct.pack("<16I", *((a + b) & m for a, b in zip(y, x, strict=True)))


def test_bad_ciphertext_after_a_good_signature(alice: Identity, bob: Identity) -> None:
    guard = ReplayGuard()
    data = craft(alice, bob.public_key, body=b"\x00" * 40, seq=5)  # validly signed garbage
    assert reason_of(Wire(bob, Limits()), data, guard) == ("bad_ciphertext", 401)
    assert reason_of(Wire(bob, Limits()), craft(alice, bob.public_key, body=b"", seq=5), guard) == (
        "malformed",
        400,
    )
    assert guard.check(alice.public_key, 5) and not guard.dirty


# --- replay and freshness ------------------------------------------------------------------------------


def test_same_message_twice_is_replayed(alice: Identity, bob: Identity) -> None:
    data = Wire(alice, Limits()).seal(bob.public_key, "share", b"m", 1, NOW)
    wb, guard = Wire(bob, Limits()), ReplayGuard()
    wb.open(data, NOW, trust_all, guard)
    assert reason_of(wb, data, guard) == ("replayed", 409)


def test_replay_survives_a_restart_of_the_receiver(alice: Identity, bob: Identity) -> None:
    data = Wire(alice, Limits()).seal(bob.public_key, "share", b"m", 10, NOW)
    guard = ReplayGuard()
    Wire(bob, Limits()).open(data, NOW, trust_all, guard)
    restored = ReplayGuard.from_state(guard.to_state())
    assert reason_of(Wire(bob, Limits()), data, restored) == ("replayed", 409)


def test_envelopes_sealed_before_the_replay_floor_are_stale(alice: Identity, bob: Identity) -> None:
    """A power cut can lose the replay windows; the restarted receiver refuses anything sealed before its floor
    as stale (not replayed: a sender reads a retry's 'replayed' as delivered)."""
    wa, wb = Wire(alice, Limits()), Wire(bob, Limits())
    old = wa.seal(bob.public_key, "share", b"m", 7, NOW - 1)
    fresh = wa.seal(bob.public_key, "share", b"m", 8, NOW)
    guard = ReplayGuard()  # the windows were lost
    guard.not_before_ms = NOW
    assert reason_of(wb, old, guard) == ("stale", 409)
    assert wb.open(fresh, NOW, trust_all, guard).seq == 8
    assert ReplayGuard.from_state(guard.to_state()).not_before_ms == 0  # not persisted: one start's rule


def test_a_corrupted_copy_does_not_burn_the_sequence_number(alice: Identity, bob: Identity) -> None:
    data = Wire(alice, Limits()).seal(bob.public_key, "share", b"m", 3, NOW)
    wb, guard = Wire(bob, Limits()), ReplayGuard()
    bad = data[:-1] + bytes([data[-1] ^ 1])
    assert reason_of(wb, bad, guard) == ("bad_signature", 401)
    assert wb.open(data, NOW, trust_all, guard).seq == 3


def test_reorder_window(alice: Identity, bob: Identity) -> None:
    wa, wb, guard = Wire(alice, Limits()), Wire(bob, Limits()), ReplayGuard(window=64)
    s5, s3 = (wa.seal(bob.public_key, "share", b"", s, NOW) for s in (5, 3))
    wb.open(s5, NOW, trust_all, guard)
    wb.open(s3, NOW, trust_all, guard)
    assert reason_of(wb, s3, guard) == ("replayed", 409)
    wb.open(wa.seal(bob.public_key, "share", b"", 200, NOW), NOW, trust_all, guard)
    assert reason_of(wb, wa.seal(bob.public_key, "share", b"", 136, NOW), guard) == ("replayed", 409)
    assert wb.open(wa.seal(bob.public_key, "share", b"", 137, NOW), NOW, trust_all, guard).seq == 137


@pytest.mark.parametrize(
    ("skew", "ok"), [(0, True), (60_000, True), (-60_000, True), (60_001, False), (-60_001, False), (10**9, False)]
)
def test_timestamp_skew_window(alice: Identity, bob: Identity, skew: int, ok: bool) -> None:
    data = Wire(alice, Limits()).seal(bob.public_key, "ping", b"", 1, NOW + skew)
    wb, guard = Wire(bob, Limits()), ReplayGuard()
    if ok:
        assert wb.open(data, NOW, trust_all, guard).ts_ms == NOW + skew
    else:
        assert reason_of(wb, data, guard) == ("stale", 409)
        assert not guard.dirty


def test_replay_is_checked_before_staleness(alice: Identity, bob: Identity) -> None:
    data = Wire(alice, Limits()).seal(bob.public_key, "ping", b"", 1, NOW)
    wb, guard = Wire(bob, Limits()), ReplayGuard()
    wb.open(data, NOW, trust_all, guard)
    assert reason_of(wb, data, guard, now=NOW + 10**7) == ("replayed", 409)


# --- shared-key cache ----------------------------------------------------------------------------------


def test_shared_key_cache_is_bounded_and_forget_peer_still_works(alice: Identity, bob: Identity) -> None:
    wa = Wire(alice, Limits(), shared_key_cache_size=2)
    peers = [identity.generate() for _ in range(5)]
    for p in peers:
        wa.seal(p.public_key, "ping", b"", 1, NOW)
    assert len(wa._shared) == 2
    wa.forget_peer(peers[-1].public_key)
    wa.forget_peer(b"unknown")
    assert peers[-1].public_key not in wa._shared
    data = wa.seal(bob.public_key, "ping", b"hi", 2, NOW)
    assert Wire(bob, Limits()).open(data, NOW, trust_all, ReplayGuard()).body == b"hi"


# --- bodies -------------------------------------------------------------------------------------------


def test_body_round_trip() -> None:
    body = {
        "fp": "abc",
        "version": 3,
        "weight": 0.5,
        "codec": "f32",
        "values": b"\x00" * 8,
        "count": 2,
        "nested": {"a": [1, 2, {"b": None}]},
    }
    assert decode_body(encode_body(body), Limits()) == body


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([1]),
        msgpack.packb(3),
        msgpack.packb({1: 2}),
        msgpack.packb({b"k": 1}, use_bin_type=True),
        msgpack.packb({"k": msgpack.ExtType(1, b"x")}),
        b"\x81\xa1k\xd4\x01\x00",
        b"\x81\xa1k\xc7\x00\x05",  # fixext1, ext8 with length 0
        msgpack.packb({"k": 1}) + b"\x00",
        b"\xdf\xff\xff\xff\xff",
        b"\x81\xa1k\xdd\xff\xff\xff\xff",
        msgpack.packb({"k": {"k": {"k": {"k": {"k": {"k": {"k": {"k": {}}}}}}}}}),  # depth 9
        msgpack.packb({"k": [[[[[[[[]]]]]]]]}),
        msgpack.packb({"k": {1: 2}}),
        b"\x81\xa1k" + b"\x91" * 5000 + b"\xc0",
    ],
)
def test_bad_bodies(data: bytes) -> None:
    with pytest.raises(WireError) as ei:
        decode_body(data, Limits())
    assert (ei.value.reason, ei.value.status) == ("bad_body", 400)


def test_body_depth_limit_is_configurable() -> None:
    depth8 = msgpack.packb({"k": {"k": {"k": {"k": {"k": {"k": {"k": {}}}}}}}})
    assert decode_body(depth8, Limits())
    with pytest.raises(WireError):
        decode_body(depth8, Limits(max_depth=2))


def test_body_container_length_limit() -> None:
    data = msgpack.packb({"k": list(range(100))})
    assert decode_body(data, Limits())["k"] == list(range(100))
    with pytest.raises(WireError):
        decode_body(data, Limits(max_container_len=50))


def test_a_key_repeated_in_any_body_map_is_bad_body() -> None:
    """The signature commits to the body (protocol 2): a map that two readers could read two ways is refused,
    at the top and nested; the same keys in different maps are fine."""
    top = b"\x82\xa1a\x01\xa1a\x02"  # {"a": 1, "a": 2}
    nested = b"\x81\xa1m" + top  # {"m": {"a": 1, "a": 2}}
    for raw in (top, nested):
        with pytest.raises(WireError) as ei:
            decode_body(raw, Limits())
        assert (ei.value.reason, ei.value.status) == ("bad_body", 400)
    assert decode_body(msgpack.packb({"a": {"a": 1}, "b": [{"a": 2}]}), Limits()) == {"a": {"a": 1}, "b": [{"a": 2}]}
