"""Many trusted senders against one real `meshd run` daemon, for tests/test_replay_daemons.py and bench/wire.py.

``ManySenders(n, workdir)`` makes ``n`` identities, writes one daemon's config (loopback only, mDNS off, no
task) whose governance registry trusts them all (no addresses: the daemon never calls them), and runs it as a
subprocess. ``seal(i)`` builds a signed, encrypted ``ping`` from sender ``i`` with meshd's own wire, ``post``
sends envelope bytes on one kept-alive loopback connection, ``ping(i)`` does both and opens the ``pong``.
Each sender has its own sequence counter. ``stop()`` (or leaving the ``with`` block) always reaps the daemon.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from meshd import identity as identitymod
from meshd.core.replay import ReplayGuard
from meshd.core.wire import Limits, Wire, encode_body
from meshd.ops.config_template import render, set_key
from meshd.ops.localmesh import free_port
from tests.helpers import DaemonProc, KeptAliveEnvelopes

REPO = Path(__file__).resolve().parent.parent


class ManySenders:
    """``n`` trusted senders and the daemon that trusts them (see the module docstring)."""

    def __init__(self, n: int, workdir: Path, settings: dict[tuple[str, str], str] | None = None) -> None:
        self.workdir = workdir
        self.idents = [identitymod.generate() for _ in range(n)]
        self._wires: dict[int, Wire] = {}
        self._seqs = [0] * n
        workdir.mkdir(parents=True, exist_ok=True)
        node = identitymod.generate()
        identitymod.save(node, workdir / "identity.key", force=True)
        self.pk = node.public_key
        self.peer_port, self.status_port = free_port(), free_port()
        lines = ["# every sender of the test or bench is trusted; no addresses: the daemon never calls them", ""]
        for i, ident in enumerate(self.idents):
            lines += ["[[peers]]", f'domain = "sender-{i}"', f'peer_id = "{ident.peer_id}"', ""]
        (workdir / "registry.toml").write_text("\n".join(lines))
        text = render("receiver", peer_addr=f"127.0.0.1:{self.peer_port}",
                      status_addr=f"127.0.0.1:{self.status_port}")
        for (section, key), value in {("discovery.mdns", "enabled"): "false", ("log", "format"): '"json"',
                                      ("trust", "registry"): '"registry.toml"', **(settings or {})}.items():
            text = set_key(text, section, key, value)
        (workdir / "meshd.toml").write_text(text)
        self.daemon: DaemonProc | None = None
        self.envelopes = KeptAliveEnvelopes(self.peer_port, timeout=60)

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    def start(self, timeout: float = 120.0) -> None:
        self.daemon = DaemonProc(self.workdir / "meshd.toml", self.status_port)
        self.daemon.wait_ready(timeout)

    def logs(self) -> str:
        return "" if self.daemon is None else self.daemon.logs()

    def stop(self) -> int | None:
        self.envelopes.close()
        return None if self.daemon is None else self.daemon.stop(30)

    def __enter__(self) -> ManySenders:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def wire(self, i: int) -> Wire:
        w = self._wires.get(i)
        if w is None:
            w = self._wires[i] = Wire(self.idents[i], Limits())
        return w

    def seal(self, i: int, kind: str = "ping", body: dict[str, Any] | None = None) -> bytes:
        self._seqs[i] += 1
        return self.wire(i).seal(self.pk, kind, encode_body(body or {}), self._seqs[i], int(time.time() * 1000))

    def post(self, envelope: bytes) -> tuple[int, bytes]:
        """POST one envelope on the kept-alive connection (reopened once if the daemon closed it)."""
        return self.envelopes.post(envelope)

    def ping(self, i: int) -> float:
        """A ping from sender ``i``, answered and its pong opened; returns the seconds it took (raises if not 200)."""
        t0 = time.perf_counter()
        status, reply = self.post(self.seal(i))
        if status != 200:
            raise RuntimeError(f"ping from sender {i}: HTTP {status} {reply[:200]!r}")
        opened = self.wire(i).open(reply, int(time.time() * 1000), lambda pk: pk == self.pk, ReplayGuard(1, 1))
        elapsed = time.perf_counter() - t0
        if opened.kind != "pong":
            raise RuntimeError(f"expected a pong, got {opened.kind}")
        return elapsed


def error_of(reply: bytes) -> str | None:
    """The ``error`` reason of a JSON error answer (None for anything else)."""
    try:
        obj = json.loads(reply)
    except ValueError:
        return None
    return obj.get("error") if isinstance(obj, dict) else None
