"""Property tests: hostile bytes reach Wire.open and decode_body; only WireError ever escapes, and an
envelope is accepted only when it is byte-for-byte the one that was sealed."""

from __future__ import annotations

import contextlib
import tracemalloc
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd import identity
from meshd.core.replay import ReplayGuard
from meshd.core.wire import Limits, Wire, decode_body
from meshd.errors import WireError

NOW = 1_700_000_000_000
ALICE = identity.generate()
BOB = identity.generate()
LIMITS = Limits(max_message_bytes=1 << 16)
SENDER = Wire(ALICE, LIMITS)
RECEIVER = Wire(BOB, LIMITS)
ORIGINALS = [
    SENDER.seal(BOB.public_key, "share", bytes(range(256)) * 2, 17, NOW, nonce=b"\x05" * 24),
    SENDER.seal(BOB.public_key, "ping", b"", 1, NOW),
]
FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=80),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


def trust_all(_: bytes) -> bool:
    return True


def try_open(data: bytes) -> bool:
    """True if accepted; asserts that a refusal is a WireError (anything else fails the test)."""
    guard = ReplayGuard()
    try:
        RECEIVER.open(data, NOW, trust_all, guard)
    except WireError as exc:
        assert exc.status in {400, 401, 403, 409, 413, 421}
        assert not guard.dirty
        return False
    return True


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    original = draw(st.sampled_from(ORIGINALS))
    data = bytearray(original)
    how = draw(
        st.sampled_from(["flip", "truncate", "splice", "delete", "overwrite", "field", "drop_key", "add_key", "repeat"])
    )
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "splice":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=40))
    elif how == "delete":
        i = draw(st.integers(0, len(data) - 1))
        del data[i : i + draw(st.integers(1, 40))]
    elif how == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=16))
        i = draw(st.integers(0, len(data) - 1))
        data[i : i + len(chunk)] = chunk
    elif how == "repeat":
        data = data + data[: draw(st.integers(1, len(data)))]
    else:
        env: dict[Any, Any] = msgpack.unpackb(original)
        key = draw(st.sampled_from(sorted(env)))
        if how == "field":
            env[key] = draw(msgpack_values)
        elif how == "drop_key":
            del env[key]
        else:
            env[draw(st.text(max_size=8) | st.binary(max_size=8))] = draw(msgpack_values)
        data = bytearray(msgpack.packb(env, use_bin_type=True))
    return original, bytes(data)


@FUZZ
@given(mutated())
def test_mutated_envelopes_are_accepted_only_if_unmodified(case: tuple[bytes, bytes]) -> None:
    original, data = case
    if try_open(data):
        assert data == original


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_are_never_accepted(data: bytes) -> None:
    assert not try_open(data)


@FUZZ
@given(st.binary(max_size=300) | msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)))
def test_decode_body_raises_only_wire_error(data: bytes) -> None:
    try:
        out = decode_body(data, Limits())
    except WireError as exc:
        assert (exc.reason, exc.status) == ("bad_body", 400)
    else:
        assert isinstance(out, dict) and all(isinstance(k, str) for k in out)


# Headers that declare a container or string far larger than the input.
HUGE_HEADERS = [
    b"\xc6",
    b"\xdb",
    b"\xdf",
    b"\xdd",
    b"\xc9",
    b"\xda",
    b"\xde",
    b"\xdc",
    b"\xc5",
    b"\xc7",
    b"\xd9",
    b"\xc4",
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(HUGE_HEADERS),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=32),
    st.sampled_from([b"", b"\x81\xa1v", b"\x89\xa4body", b"\x81\xa1k\x91"]),
)
def test_huge_declared_lengths_allocate_nothing(head: bytes, length: int, tail: bytes, prefix: bytes) -> None:
    size = {b"\xc4": 1, b"\xd9": 1, b"\xc7": 1, b"\xc5": 2, b"\xda": 2, b"\xde": 2, b"\xdc": 2}.get(head, 4)
    data = prefix + head + (length % (1 << (8 * size))).to_bytes(size, "big") + tail
    tracemalloc.start()
    try:
        try_open(data)
        with contextlib.suppress(WireError):
            decode_body(data, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak
