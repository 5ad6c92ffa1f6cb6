"""The wire codec: seal and open signed, encrypted msgpack envelopes (layout in docs/protocol.md).

Pure: no I/O, no clock (``now_ms`` is passed in), no asyncio. ``Wire.open`` runs the receiver's checks
cheapest first and raises ``WireError(reason, status)`` at the first failure; nothing else escapes.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack
import nacl.bindings as sodium
import nacl.utils

from meshd.core.replay import ReplayGuard
from meshd.errors import WireError
from meshd.identity import Identity

__all__ = [
    "BODY_HASH_BYTES",
    "DOMAIN_TAG",
    "PROTOCOL_VERSION",
    "Limits",
    "Opened",
    "Wire",
    "body_hash",
    "decode_body",
    "encode_body",
    "signed_header",
    "verify_commitment",
]

PROTOCOL_VERSION = 2  # 2: the signature covers a hash of the plaintext (1 signed only the Poly1305 tag)
DOMAIN_TAG = b"meshd-envelope\x00"  # 15 bytes; separates envelope signatures from any other use of the key
KEY_BYTES = 32
NONCE_BYTES = 24
SIG_BYTES = 64
MAC_BYTES = 16
BODY_HASH_BYTES = 32  # BLAKE3-256 of the plaintext body, appended to the signed header
MAX_KIND_LEN = 16
SEQ_LIMIT = 2**63  # seq must be < SEQ_LIMIT
TS_LIMIT = 2**64  # ts is a u64 in the signed header

_KIND_RE = re.compile(r"[a-z_]{1,16}")
_ENVELOPE_KEYS = frozenset({"v", "from", "to", "kind", "seq", "ts", "nonce", "body", "sig"})
_ENVELOPE_STR_MAX = 64  # longest str in an envelope: a key or the kind
_HEADER_TAIL = struct.Struct(">QQ")


@dataclass(frozen=True)
class Limits:
    """Bounds applied to untrusted bytes before anything is allocated for them."""

    max_message_bytes: int = 64 * 2**20  # whole envelope, bytes; larger is refused unread (413)
    max_skew_ms: int = 60_000  # |ts - now| allowed, ms; bounds how long a captured message stays replayable
    max_depth: int = 8  # msgpack nesting allowed in a decoded body (a flat map is depth 1)
    max_container_len: int = 65_536  # entries per array/map in a body; caps pre-allocation by declared length
    # Values in a whole body (every array item and map entry, containers included). Model values travel as one
    # bin, so a real body holds a few hundred; without this bound a 60 MiB body of small ints decodes into 60
    # million objects (13 s of CPU in one C call that holds the GIL, and 10x its size in memory).
    max_elements: int = 65_536


@dataclass(frozen=True)
class Opened:
    """An envelope that passed every check; ``body`` is the decrypted plaintext."""

    sender: bytes
    kind: str
    seq: int
    ts_ms: int
    body: bytes


class Wire:
    """Seals envelopes from ``identity`` and opens envelopes addressed to it."""

    def __init__(self, identity: Identity, limits: Limits, shared_key_cache_size: int = 1024) -> None:
        if shared_key_cache_size < 1:
            raise ValueError(f"shared_key_cache_size must be >= 1, got {shared_key_cache_size}")
        self._identity = identity
        self._limits = limits
        self._public_key = identity.public_key
        # libsodium's crypto_sign wants the 64-byte secret key (seed || public key).
        self._sign_sk = bytes(identity.signing_key) + self._public_key
        self._box_sk = bytes(identity.box_private)
        self._shared: OrderedDict[bytes, bytes] = OrderedDict()
        self._shared_max = shared_key_cache_size

    @property
    def public_key(self) -> bytes:
        return self._public_key

    def seal(
        self,
        recipient: bytes,
        kind: str,
        body: bytes,
        seq: int,
        now_ms: int,
        nonce: bytes | None = None,
    ) -> bytes:
        """Encrypt ``body`` for ``recipient``, sign, and return the envelope bytes.

        ``nonce`` is for tests only; by default 24 fresh random bytes are drawn per message.
        Raises ValueError on bad arguments, WireError("too_large", 413) if the result exceeds the limit.
        """
        if len(recipient) != KEY_BYTES:
            raise ValueError(f"recipient must be {KEY_BYTES} bytes, got {len(recipient)}")
        if not _KIND_RE.fullmatch(kind):
            raise ValueError(f"kind must be 1-{MAX_KIND_LEN} chars of [a-z_], got {kind!r}")
        if not 1 <= seq < SEQ_LIMIT:
            raise ValueError(f"seq must be in [1, 2**63), got {seq}")
        if not 0 <= now_ms < TS_LIMIT:
            raise ValueError(f"now_ms must be in [0, 2**64), got {now_ms}")
        if nonce is None:
            nonce = nacl.utils.random(NONCE_BYTES)
        elif len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
        try:
            k = self._shared_key(recipient)
        except Exception:
            raise ValueError("recipient is not a valid Ed25519 public key") from None
        ciphertext = sodium.crypto_box_easy_afternm(body, nonce, k)
        message = signed_header(PROTOCOL_VERSION, self._public_key, recipient, kind, seq, now_ms, nonce,
                                len(ciphertext)) + body_hash(body)
        sig = sodium.crypto_sign(message, self._sign_sk)[:SIG_BYTES]
        envelope = _pack_envelope(PROTOCOL_VERSION, self._public_key, recipient, kind, seq, now_ms, nonce,
                                  ciphertext, sig)
        if len(envelope) > self._limits.max_message_bytes:
            raise WireError("too_large", 413,
                            f"envelope is {len(envelope)} bytes, limit {self._limits.max_message_bytes}")
        return envelope

    def open(
        self,
        data: bytes,
        now_ms: int,
        is_trusted: Callable[[bytes], bool],
        replay: ReplayGuard,
        *,
        commit: bool = True,
    ) -> Opened:
        """Check ``data`` in the documented order and return it opened; raise WireError at the first failure.

        The replay guard is committed only after every check passed, so a corrupted copy of a
        message cannot burn its sequence number. With ``commit=False`` the caller commits
        (``replay.commit(sender, seq, ts_ms)``) once the message took effect, and must itself keep two copies
        of one envelope from being handled at the same time.
        """
        limits = self._limits
        if len(data) > limits.max_message_bytes:
            raise WireError("too_large", 413, f"{len(data)} bytes, limit {limits.max_message_bytes}")
        env = _decode_envelope(data, limits)
        if env.v != PROTOCOL_VERSION:
            raise WireError("bad_version", 400, f"version {env.v}, this node speaks {PROTOCOL_VERSION}")
        if env.to != self._public_key:
            raise WireError("wrong_recipient", 421, "envelope is addressed to another node")
        if len(env.body) < MAC_BYTES:  # before the trust check: its answer must not depend on who is trusted
            raise WireError("malformed", 400, f"body shorter than the {MAC_BYTES}-byte Poly1305 tag")
        if not is_trusted(env.sender):
            raise WireError("untrusted", 403, "sender is not a trusted peer")
        # Authenticate before anything that reads this sender's replay state: a `replayed` or `stale` answer
        # would otherwise tell a prober who claims a key it does not hold that this domain trusts the key
        # (docs/protocol.md section 6). The cost is one decryption attempt (Poly1305 over the body) for every
        # envelope that claims a trusted key, which a fresh forgery costs anyway.
        try:
            plaintext = sodium.crypto_box_open_easy_afternm(env.body, env.nonce, self._shared_key(env.sender))
        except Exception:
            raise WireError("bad_ciphertext", 401, "body does not decrypt") from None
        if not _signature_ok(env, plaintext):
            raise WireError("bad_signature", 401, "signature does not verify")
        # Replay and freshness only ever refuse; nothing is recorded until every check passed.
        if not replay.check(env.sender, env.seq):
            raise WireError("replayed", 409, f"seq {env.seq} already seen or below the window")
        if env.ts < replay.not_before_ms:
            raise WireError("stale", 409, f"sealed {replay.not_before_ms - env.ts} ms before this receiver's "
                                          "replay floor (it restarted after an unclean stop, or dropped this "
                                          "sender's window); seal a fresh one")
        if abs(env.ts - now_ms) > limits.max_skew_ms:
            raise WireError("stale", 409, f"timestamp {env.ts - now_ms:+d} ms from now, "
                                          f"allowed ±{limits.max_skew_ms}")
        if commit:
            replay.commit(env.sender, env.seq, env.ts)
        return Opened(sender=env.sender, kind=env.kind, seq=env.seq, ts_ms=env.ts, body=plaintext)

    def forget_peer(self, public_key: bytes) -> None:
        """Drop the cached shared key of a peer (call when it is distrusted)."""
        self._shared.pop(public_key, None)

    def _shared_key(self, peer: bytes) -> bytes:
        k = self._shared.get(peer)
        if k is not None:
            self._shared.move_to_end(peer)
            return k
        peer_x = sodium.crypto_sign_ed25519_pk_to_curve25519(peer)
        k = sodium.crypto_box_beforenm(peer_x, self._box_sk)
        self._shared[peer] = k
        if len(self._shared) > self._shared_max:
            self._shared.popitem(last=False)
        return k


def signed_header(v: int, sender: bytes, to: bytes, kind: str, seq: int, ts: int, nonce: bytes,
                  body_len: int) -> bytes:
    """The fixed binary layout that, followed by ``body_hash(plaintext)``, is the message the sender signs."""
    k = kind.encode("ascii")
    return b"".join((
        DOMAIN_TAG, v.to_bytes(2, "big"), sender, to, bytes((len(k),)), k,
        _HEADER_TAIL.pack(seq, ts), nonce, body_len.to_bytes(8, "big"),
    ))


def body_hash(plaintext: bytes) -> bytes:
    """BLAKE3-256 of a plaintext body: what the signature commits to (docs/protocol.md section 4).

    BLAKE3 rather than BLAKE2b: on the bench host it hashes 4 MiB in 0.6 ms against 4.1 ms, which keeps
    seal+open within 1.3x of a bare Box (bench/wire.py). One thread: the wire thread is one core's worth.
    """
    return blake3.blake3(plaintext).digest()


def verify_commitment(data: bytes, plaintext: bytes, limits: Limits | None = None) -> bytes:
    """Check that the envelope ``data`` is its sender's signed commitment to ``plaintext``; return the sender.

    Needs no key: anyone shown an envelope and its plaintext (by its recipient, say) can check what the
    sender sent. Raises WireError (``malformed``, ``too_large``, ``bad_version`` or ``bad_signature``).
    """
    limits = limits or Limits()
    if len(data) > limits.max_message_bytes:
        raise WireError("too_large", 413, f"{len(data)} bytes, limit {limits.max_message_bytes}")
    env = _decode_envelope(data, limits)
    if env.v != PROTOCOL_VERSION:
        raise WireError("bad_version", 400, f"version {env.v}, this node speaks {PROTOCOL_VERSION}")
    if len(env.body) != len(plaintext) + MAC_BYTES or not _signature_ok(env, plaintext):
        raise WireError("bad_signature", 401, "the envelope's signature does not commit to this plaintext")
    return env.sender


def encode_body(obj: dict[str, Any]) -> bytes:
    """Encode a body map (str keys) as msgpack; floats stay float64."""
    if not isinstance(obj, dict):
        raise TypeError(f"a body is a dict, got {type(obj).__name__}")
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False, strict_types=False)


def decode_body(data: bytes, limits: Limits) -> dict[str, Any]:
    """Decode a plaintext body: a msgpack map with str keys, none repeated in any map, no ext types, nesting
    ≤ ``max_depth``, at most ``max_elements`` values in all.

    Raises WireError("bad_body", 400) on anything else; nothing else escapes.
    """
    n = len(data)
    cap = min(n, limits.max_container_len)
    count = _ElementCount(limits.max_elements)
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, timestamp=0,
            max_str_len=n, max_bin_len=n, max_array_len=cap, max_map_len=cap, max_ext_len=0,
            ext_hook=_reject_ext, list_hook=count.container, object_pairs_hook=count.pairs,
        )
    except _TooManyElements:
        raise WireError("bad_body", 400, f"body holds more than {limits.max_elements} values") from None
    except Exception as exc:  # msgpack raises ValueError, ExtraData, FormatError, StackError, TypeError...
        raise WireError("bad_body", 400, f"not a msgpack body ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise WireError("bad_body", 400, f"a body is a map, got {type(obj).__name__}")
    _check_tree(obj, limits.max_depth)
    return obj


# --- helpers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Envelope:
    v: int
    sender: bytes
    to: bytes
    kind: str
    seq: int
    ts: int
    nonce: bytes
    body: bytes
    sig: bytes


def _signature_ok(env: _Envelope, plaintext: bytes) -> bool:
    # The signature covers the header and a hash of the plaintext, so a signed envelope commits its sender
    # to the body's content, not only to one ciphertext (whose Poly1305 tag anyone holding the pair's
    # shared key can match with another ciphertext).
    message = signed_header(env.v, env.sender, env.to, env.kind, env.seq, env.ts, env.nonce,
                            len(env.body)) + body_hash(plaintext)
    try:
        sodium.crypto_sign_open(env.sig + message, env.sender)
    except Exception:  # BadSignatureError, or a key libsodium refuses: both mean "not signed by sender"
        return False
    return True


def _pack_envelope(v: int, sender: bytes, to: bytes, kind: str, seq: int, ts: int, nonce: bytes,
                   body: bytes, sig: bytes) -> bytes:
    # Built by hand so the ciphertext is copied exactly once (into the joined result).
    p = msgpack.Packer(use_bin_type=True, autoreset=True)
    head = b"".join((
        p.pack_map_header(9),
        p.pack("v"), p.pack(v),
        p.pack("from"), p.pack(sender),
        p.pack("to"), p.pack(to),
        p.pack("kind"), p.pack(kind),
        p.pack("seq"), p.pack(seq),
        p.pack("ts"), p.pack(ts),
        p.pack("nonce"), p.pack(nonce),
        p.pack("body"), _bin_header(len(body)),
    ))
    return b"".join((head, body, p.pack("sig"), p.pack(sig)))


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 2**16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _pairs_no_dupes(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate map key")
    return d


class _TooManyElements(Exception):
    pass


class _ElementCount:
    """msgpack calls ``container`` as each array or map of a body is complete (innermost first): counting
    them and their entries there stops a hostile body after at most ``limit`` values plus what the containers
    still open hold (``max_depth x max_container_len``), in microseconds, instead of after all of them."""

    def __init__(self, limit: int) -> None:
        self._left = limit

    def container(self, obj: Any) -> Any:
        self._left -= 1 + len(obj)
        if self._left < 0:
            raise _TooManyElements
        return obj

    def pairs(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        # A map with a repeated key is refused: the signature commits to the body's bytes, and a reader that
        # kept the first value where meshd kept the last would read another message under the same signature.
        return _pairs_no_dupes(self.container(pairs))


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError("ext types are not allowed")


def _malformed(detail: str) -> WireError:
    return WireError("malformed", 400, detail)


def _decode_envelope(data: bytes, limits: Limits) -> _Envelope:
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, timestamp=0,
            max_str_len=_ENVELOPE_STR_MAX, max_bin_len=min(len(data), limits.max_message_bytes),
            max_array_len=0, max_map_len=16, max_ext_len=0,
            object_pairs_hook=_pairs_no_dupes, ext_hook=_reject_ext,
        )
    except Exception as exc:  # every msgpack failure mode, whatever its class, is "malformed"
        raise _malformed(f"not a msgpack envelope ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise _malformed("an envelope is a msgpack map")
    keys = set(obj)
    if keys != _ENVELOPE_KEYS:
        missing = sorted(str(k) for k in _ENVELOPE_KEYS - keys)
        extra = sorted(repr(k)[:40] for k in keys - _ENVELOPE_KEYS)
        raise _malformed(f"envelope keys: missing {missing}, unexpected {extra}")
    v = _int_field(obj, "v", 0, 2**16)
    sender = _bin_field(obj, "from", KEY_BYTES)
    to = _bin_field(obj, "to", KEY_BYTES)
    kind = obj["kind"]
    if type(kind) is not str or not _KIND_RE.fullmatch(kind):
        raise _malformed("kind must be 1-16 chars of [a-z_]")
    seq = _int_field(obj, "seq", 1, SEQ_LIMIT)
    ts = _int_field(obj, "ts", 0, TS_LIMIT)
    nonce = _bin_field(obj, "nonce", NONCE_BYTES)
    body = obj["body"]
    if type(body) is not bytes:
        raise _malformed("body must be bin")
    sig = _bin_field(obj, "sig", SIG_BYTES)
    return _Envelope(v, sender, to, kind, seq, ts, nonce, body, sig)


def _int_field(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    x = obj[key]
    if type(x) is not int or not lo <= x < hi:  # type() also refuses bool
        raise _malformed(f"{key} must be an int in [{lo}, {hi})")
    return x


def _bin_field(obj: dict[str, Any], key: str, size: int) -> bytes:
    x = obj[key]
    if type(x) is not bytes or len(x) != size:
        raise _malformed(f"{key} must be bin({size})")
    return x


_SCALARS = (str, bytes, int, float, bool, type(None))


def _check_tree(root: dict[str, Any], max_depth: int) -> None:
    # Iterative so a hostile nesting cannot hit Python's recursion limit.
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                raise WireError("bad_body", 400, f"body nested deeper than {max_depth}")
            for k, val in node.items():
                if type(k) is not str:
                    raise WireError("bad_body", 400, "body map keys must be str")
                stack.append((val, depth + 1))
        elif isinstance(node, list):
            if depth > max_depth:
                raise WireError("bad_body", 400, f"body nested deeper than {max_depth}")
            stack.extend((item, depth + 1) for item in node)
        elif not isinstance(node, _SCALARS):
            raise WireError("bad_body", 400, f"unsupported body value {type(node).__name__}")
