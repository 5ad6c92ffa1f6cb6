"""A hostile unauthenticated client for tests/test_budget_daemons.py and bench/budget.py: requests streamed by
hand over non-blocking loopback sockets, and a daemon's peak RSS read from /proc."""

from __future__ import annotations

import json
import re
import select
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import TIMEOUT_SCALE

MIB = 2**20


def vm_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


class Peak:
    """A process's RSS growth from now on: VmHWM is reset to the current RSS, then read against it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0; we are root)
        self.base_kib = vm_kib(self.pid, "VmRSS")

    def growth(self) -> int:
        """Bytes the peak RSS grew since this object was made."""
        return max(0, vm_kib(self.pid, "VmHWM") - self.base_kib) * 1024


@dataclass
class Upload:
    """One request streamed by hand; ``answer`` is (status, reason) once read, ("reset", "") if B closed first."""

    sock: socket.socket
    total: int  # body bytes to send
    chunked: bool = False
    sent: int = 0
    got: bytes = b""
    answer: tuple[str, str] | None = None

    def parse(self) -> bool:
        head, sep, body = self.got.partition(b"\r\n\r\n")
        if not sep:
            return False
        m = re.search(rb"^content-length:\s*(\d+)", head, re.I | re.M)
        if m is None or len(body) < int(m.group(1)):
            return False
        status = head.split(b" ", 2)[1].decode()
        reason = ""
        if b"application/json" in head.lower():
            reason = str(json.loads(body[: int(m.group(1))]).get("error", ""))
        self.answer = (status, reason)
        return True


def stream(uploads: list[Upload], *, limit_growth: int, peak: Peak, deadline_s: float,
           on_progress: Callable[[int], None] | None = None) -> int:
    """Send every upload's body (zeros) round-robin while reading answers, until each is answered or reset, or
    the peak RSS grows past ``limit_growth`` (then stop at once: that is the failure a test looks for).
    Returns the largest growth seen."""
    chunk = b"\0" * (256 * 1024)
    open_ = {u.sock: u for u in uploads}
    for u in uploads:
        u.sock.setblocking(False)
    worst = 0
    deadline = time.monotonic() + deadline_s * TIMEOUT_SCALE
    while open_ and time.monotonic() < deadline:
        writers = [s for s, u in open_.items() if u.sent < u.total]
        readable, writable, _ = select.select(list(open_), writers, [], 0.05)
        for s in readable:
            u = open_[s]
            try:
                data = s.recv(65536)
            except (ConnectionError, BlockingIOError):
                data = b""
            u.got += data
            if u.parse() or not data:
                u.answer = u.answer or ("reset", "")
                s.close()
                del open_[s]
        for s in writable:
            u = open_.get(s)
            if u is None:
                continue
            n = min(len(chunk), u.total - u.sent)
            piece = chunk[:n]
            if u.chunked:
                piece = b"%x\r\n" % n + piece + b"\r\n" + (b"0\r\n\r\n" if u.sent + n >= u.total else b"")
            try:
                wrote = s.send(piece)
            except BlockingIOError:
                continue
            except ConnectionError:
                u.answer = ("reset", "")
                s.close()
                del open_[s]
                continue
            if u.chunked and wrote < len(piece):  # keep the chunk framing whole: finish it blocking
                s.setblocking(True)
                try:
                    s.sendall(piece[wrote:])
                except ConnectionError:
                    u.answer = ("reset", "")
                    s.close()
                    del open_[s]
                    continue
                finally:
                    if s.fileno() != -1:
                        s.setblocking(False)
            u.sent += n if u.chunked else wrote
        worst = max(worst, peak.growth())
        if worst > limit_growth:
            break
        if on_progress is not None:
            on_progress(sum(u.sent for u in uploads))
    for s in open_:
        s.close()
    return worst


def gzip_bomb(inflated: int) -> bytes:
    """gzip of ``inflated`` zero bytes (256 MiB make about 0.25 MiB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    zeros = b"\0" * MIB
    return b"".join([*(z.compress(zeros) for _ in range(inflated // MIB)), z.flush()])


def read_answer(s: socket.socket, timeout: float = 30.0) -> tuple[str, str] | None:
    """Block until one HTTP answer is read from ``s``: (status, JSON error reason), or None if it closed first."""
    u = Upload(s, 0)
    s.settimeout(timeout)
    while u.answer is None:
        try:
            data = s.recv(65536)
        except ConnectionError:
            return None
        if not data:
            return None
        u.got += data
        u.parse()
    return u.answer
