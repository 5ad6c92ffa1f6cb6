"""Replay protection: the receiver's per-sender sliding window and the sender's reserved sequence counter.

Pure: persistence is the caller's (``ReplayGuard.to_state``/``from_state``, ``SequenceCounter.reserved``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

__all__ = ["SEQ_LIMIT", "ReplayGuard", "SequenceCounter"]

SEQ_LIMIT = 2**63  # sequence numbers are in [1, SEQ_LIMIT)
_PEER_KEY_BYTES = 32


class ReplayGuard:
    """IPsec-style anti-replay window per sender: a high-water mark plus a bitmap of the last ``window`` seqs.

    Bit ``i`` of ``bits`` set means seq ``hw - i`` was accepted. A seq at or below ``hw - window`` is
    refused outright. Per sender the guard also keeps the highest ``ts`` it accepted.

    ``not_before_ms`` (0: off) is a floor on envelope timestamps: the wire refuses anything sealed before it.
    It is raised (never lowered) when a sender's window is dropped: the sender's highest accepted ``ts`` + 1,
    so an envelope accepted before can never pass again, whatever the number of senders (at most
    ``max_senders`` windows are kept, the least recently committed is dropped first). The caller also sets it
    when the windows of a previous run are not known exactly (after an unclean stop).
    """

    def __init__(self, window: int = 64, max_senders: int = 4096) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if max_senders < 1:
            raise ValueError(f"max_senders must be >= 1, got {max_senders}")
        self.window = window
        self.max_senders = max_senders
        self._mask = (1 << window) - 1
        self._peers: OrderedDict[bytes, tuple[int, int, int]] = OrderedDict()  # sender -> (hw, bits, max ts)
        self.not_before_ms = 0
        self.dirty = False  # set by commit/forget: whether anything was recorded since it was last cleared

    def __len__(self) -> int:
        return len(self._peers)

    def check(self, sender: bytes, seq: int) -> bool:
        """True if ``seq`` from ``sender`` is acceptable: in range, not seen, not below the window."""
        if not 1 <= seq < SEQ_LIMIT:
            return False
        hw, bits, _ = self._peers.get(sender, (0, 0, 0))
        if seq > hw:
            return True
        offset = hw - seq
        if offset >= self.window:
            return False
        return not (bits >> offset) & 1

    def commit(self, sender: bytes, seq: int, ts_ms: int = 0) -> None:
        """Record ``seq`` (sealed at ``ts_ms``) as seen. Call only after ``check`` passed and the message was
        fully verified."""
        if not 1 <= seq < SEQ_LIMIT:
            raise ValueError(f"seq must be in [1, 2**63), got {seq}")
        hw, bits, max_ts = self._peers.pop(sender, (0, 0, 0))
        if seq > hw:
            shift = seq - hw
            bits = ((bits << shift) | 1) & self._mask if shift < self.window else 1
            hw = seq
        elif hw - seq < self.window:
            bits |= 1 << (hw - seq)
        self._peers[sender] = (hw, bits, max(max_ts, ts_ms))  # re-inserted at the end: most recently committed
        while len(self._peers) > self.max_senders:
            self._drop(*self._peers.popitem(last=False))
        self.dirty = True

    def forget(self, sender: bytes) -> None:
        """Drop a sender's window (e.g. when it is distrusted); the timestamp floor keeps its old envelopes out."""
        entry = self._peers.pop(sender, None)
        if entry is not None:
            self._drop(sender, entry)
            self.dirty = True

    def _drop(self, _sender: bytes, entry: tuple[int, int, int]) -> None:
        self.not_before_ms = max(self.not_before_ms, entry[2] + 1)

    def high_water(self, sender: bytes) -> int:
        """Highest seq accepted from ``sender`` (0 if none)."""
        return self._peers.get(sender, (0, 0, 0))[0]

    def to_state(self) -> dict[str, Any]:
        """JSON-able ``{peer_id_hex: {"hw": int, "bits": int, "ts": int}}``, least recently committed first."""
        return {s.hex(): {"hw": hw, "bits": bits, "ts": ts} for s, (hw, bits, ts) in self._peers.items()}

    @classmethod
    def from_state(cls, state: object, window: int = 64, max_senders: int = 4096) -> ReplayGuard:
        """Rebuild from ``to_state()`` output (``ts`` optional: older files); raises ValueError naming the first
        problem. ``not_before_ms`` is not part of the state: the caller decides it for each start."""
        guard = cls(window, max_senders)
        if not isinstance(state, dict):
            raise ValueError(f"replay state must be an object, got {type(state).__name__}")
        for peer_hex, entry in state.items():
            if not isinstance(peer_hex, str) or len(peer_hex) != 2 * _PEER_KEY_BYTES:
                raise ValueError(f"replay state key {peer_hex!r:.80} is not a 64-char peer id")
            try:
                sender = bytes.fromhex(peer_hex)
            except ValueError:
                raise ValueError(f"replay state key {peer_hex!r} is not hex") from None
            if not isinstance(entry, dict) or set(entry) - {"ts"} != {"hw", "bits"}:
                raise ValueError(f"replay state for {peer_hex} must be {{'hw': int, 'bits': int, 'ts': int}}")
            hw, bits, ts = entry["hw"], entry["bits"], entry.get("ts", 0)
            if type(hw) is not int or not 0 <= hw < SEQ_LIMIT:
                raise ValueError(f"replay state for {peer_hex}: hw must be an int in [0, 2**63), got {hw!r}")
            if type(bits) is not int or bits < 0 or bits.bit_length() > max(window, 1024):
                raise ValueError(f"replay state for {peer_hex}: bits must be a non-negative int bitmap")
            if hw == 0 and bits:
                raise ValueError(f"replay state for {peer_hex}: bits set with hw 0")
            if type(ts) is not int or ts < 0:
                raise ValueError(f"replay state for {peer_hex}: ts must be a non-negative int, got {ts!r}")
            guard._peers[sender] = (hw, bits & guard._mask, ts)  # a narrower window drops the oldest bits
        while len(guard._peers) > max_senders:
            guard._drop(*guard._peers.popitem(last=False))
        return guard


class SequenceCounter:
    """The sender's one counter for all recipients, crash-safe by reservation.

    The caller persists ``reserved`` whenever ``next()`` returns a new reservation, BEFORE sending that
    seq; after a restart (even kill -9) it starts a new counter at the persisted reservation, so no
    sequence number is ever used twice.
    """

    def __init__(self, start: int, reserve_block: int = 1024) -> None:
        if not 1 <= start < SEQ_LIMIT:
            raise ValueError(f"start must be in [1, 2**63), got {start}")
        if reserve_block < 1:
            raise ValueError(f"reserve_block must be >= 1, got {reserve_block}")
        self._next = start
        self._reserved = start  # nothing at or above this may be used until a reservation is persisted
        self._block = reserve_block

    @property
    def reserved(self) -> int:
        """First seq not yet covered by a reservation; a restarted counter starts here."""
        return self._reserved

    def next(self) -> tuple[int, int | None]:
        """Return ``(seq, reservation)``; a non-None reservation must be persisted before ``seq`` is sent."""
        seq = self._next
        if seq >= SEQ_LIMIT:
            raise OverflowError("sequence numbers exhausted (2**63)")
        new: int | None = None
        if seq >= self._reserved:
            self._reserved = min(seq + self._block, SEQ_LIMIT)
            new = self._reserved
        self._next = seq + 1
        return seq, new
