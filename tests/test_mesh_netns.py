"""Three full `meshd run` daemons in three network namespaces find each other by mDNS alone.

No static peers and no registry: each daemon trusts the two other peer ids ([trust] peers) and learns their
addresses from mDNS (`_meshd._tcp.local.` on its namespace's veth), then proves their liveness with
signed pings. A graceful stop (SIGTERM) is seen as `left` by the two others.

Network safety, structurally: every daemon (and so every zeroconf socket) runs in a namespace this test
created, whose only interfaces are `lo` and `veth0` (asserted); `discovery.mdns.interfaces` names that
veth's address. The bridge joining the veths lives in a separate hub namespace and the host namespace
gets no interface on it (`host_link` is off; asserted by comparing the host's link list before and
after), so no mDNS packet can leave through the host's real interfaces (eth0...). Counting packets on
eth0 would prove nothing: other traffic moves those counters. The status API stays on 127.0.0.1 inside
each namespace and is read with `ip netns exec <ns> curl`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshd import identity as identitymod
from meshd.ops.config_template import render, set_key
from tests.helpers import REPO, Fatal, wait_for
from tests.netns import NetNs, make_mesh_namespaces  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.netns

PEER_PORT = 7452
STATUS_PORT = 7453
START_S = 60.0  # a daemon imports torch: slow on a busy machine
DISCOVER_S = 40.0  # mDNS announce + resolve + a signed ping, three ways
LEAVE_S = 10.0
POLL_S = 0.2


@dataclass
class Daemon:
    ns: NetNs
    name: str
    peer_id: str
    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def status(self) -> Any:
        url = f"http://127.0.0.1:{STATUS_PORT}/status"
        if shutil.which("curl"):
            argv = ["curl", "-sf", "--max-time", "5", url]
        else:
            code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
            argv = [sys.executable, "-c", code]
        return json.loads(self.ns.run(argv, timeout=15).stdout)

    def peers(self) -> dict[str, dict[str, Any]]:
        return {p["peer_id"]: p for p in self.status()["mesh"]["peers"]}

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _host_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10, check=True).stdout
    return sorted(line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if line)


def launch(daemons: list[Daemon]) -> None:
    """Start each daemon's `meshd run` in its namespace, its output appended to its log."""
    for d in daemons:
        with d.log_path.open("ab") as log:  # the child keeps its own descriptor
            d.proc = d.ns.exec([sys.executable, "-m", "meshd", "run", "--config", str(d.config)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})


def _configure(ns: NetNs, name: str, directory: Path, ident: identitymod.Identity, trusted: list[str]) -> Path:
    directory.mkdir(mode=0o700)
    identitymod.save(ident, directory / "identity.key")
    text = render(name, peer_addr=f"{ns.ip}:{PEER_PORT}", status_addr=f"127.0.0.1:{STATUS_PORT}")
    settings = {
        "discovery.mdns": {"enabled": "true", "interfaces": f'["{ns.ip}"]'},  # this namespace's veth only
        "trust": {"peers": json.dumps(trusted)},  # trust only; the addresses come from mDNS
        "log": {"format": '"json"'},
        "gossip": {"interval_s": "0.5"},
        "membership": {"ping_after_s": "0.5", "suspect_after_s": "2", "dead_after_s": "4"},
    }
    for section, kv in settings.items():
        for key, value in kv.items():
            text = set_key(text, section, key, value)
    config = directory / "meshd.toml"
    config.write_text(text)
    return config


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:  # the namespaces' teardown SIGKILLs anything left, too
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(10)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(5)


def _poll(cond: Callable[[], Any], timeout: float, what: str, daemons: list[Daemon]) -> Any:
    try:
        return wait_for(cond, timeout=timeout, interval=POLL_S, what=what)
    except AssertionError as exc:
        detail = []
        for d in daemons:
            rows: Any
            try:
                rows = [(p["domain"], p["state"], p["source"]) for p in d.status()["mesh"]["peers"]]
            except Exception as e:  # the daemon may be down: say so
                rows = repr(e)
            detail.append(f"--- {d.name}: {rows}\n{d.logs()}")
        raise AssertionError(f"{exc}\n" + "\n".join(detail)) from None


def test_daemons_in_namespaces_find_each_other_by_mdns_and_see_a_leave(
    make_mesh_namespaces: Callable[..., list[NetNs]],  # noqa: F811
    started: list[Daemon],
    tmp_path: Path,
) -> None:
    host_before = _host_links()
    namespaces = make_mesh_namespaces(3)
    assert _host_links() == host_before, "the test network must not add an interface to the host namespace"
    for ns in namespaces:
        assert sorted(ns.link_names()) == ["lo", "veth0"]

    idents = [identitymod.generate() for _ in namespaces]
    for i, ns in enumerate(namespaces):
        name = f"ns-dom-{i}"
        trusted = [x.peer_id for j, x in enumerate(idents) if j != i]
        config = _configure(ns, name, tmp_path / name, idents[i], trusted)
        started.append(Daemon(ns, name, idents[i].peer_id, config, tmp_path / name / "daemon.log"))
    launch(started)

    def running(d: Daemon) -> bool:
        assert d.proc is not None
        if d.proc.poll() is not None:
            raise AssertionError(f"{d.name} exited with {d.proc.returncode}:\n{d.logs()}")
        with contextlib.suppress(subprocess.SubprocessError, ValueError):
            return bool(d.status()["state"] == "running")
        return False

    deadline = time.monotonic() + START_S
    for d in started:
        while not running(d):
            assert time.monotonic() < deadline, f"{d.name} not running after {START_S}s:\n{d.logs()}"
            time.sleep(POLL_S)  # polling interval of a deadline loop

    def everyone_alive_by_mdns() -> bool:
        for d in started:
            peers = d.peers()
            for o in started:
                if o is d:
                    continue
                row = peers.get(o.peer_id)
                # A peer is 'alive' as soon as one of its signed messages arrives; its address is set
                # only once it answered a ping at that address (a signed pong), which can come later.
                if (row is None or row["state"] != "alive" or row["source"] != "mdns"
                        or row["address"] != f"{o.ns.ip}:{PEER_PORT}"):
                    return False
        return True

    _poll(everyone_alive_by_mdns, DISCOVER_S, "everyone alive at its verified address on everyone, found by mDNS",
          started)
    for d in started:
        s = d.status()
        assert s["mesh"]["mdns"] is True and s["mesh"]["joined"] is True
        assert s["mesh"]["untrusted_seen"] == []
        for o in started:
            if o is not d:
                row = s["mesh"]["peers"]
                mine = next(r for r in row if r["peer_id"] == o.peer_id)
                assert mine["address"] == f"{o.ns.ip}:{PEER_PORT}" and mine["domain"] == o.name
        # The daemons ran inside their namespaces only: lo + veth0, nothing else to send on.
        assert sorted(d.ns.link_names()) == ["lo", "veth0"]

    # A graceful stop: signed leave (and mDNS goodbye); the two others show it 'left'.
    gone, rest = started[0], started[1:]
    assert gone.proc is not None
    gone.proc.send_signal(signal.SIGTERM)
    _poll(lambda: all(d.peers()[gone.peer_id]["state"] == "left" for d in rest), LEAVE_S,
          f"{gone.name} 'left' on the others", started)
    assert gone.proc.wait(15) == 0, gone.logs()
    for d in rest:  # the two that stayed still see each other
        other = next(o for o in rest if o is not d)
        assert d.peers()[other.peer_id]["state"] == "alive"


def test_a_wildcard_listener_tells_its_dialable_address_in_its_signed_hellos(
    make_mesh_namespaces: Callable[..., list[NetNs]],  # noqa: F811
    started: list[Daemon],
    tmp_path: Path,
) -> None:
    """Two daemons listening on 0.0.0.0, no mDNS: only A is told B's address ([[peers]]). B learns where A
    listens from the ``addr`` of A's signed pings (the source address of A's route to B), verifies it with a
    signed pong, and reaches A there."""
    namespaces = make_mesh_namespaces(2)
    idents = [identitymod.generate() for _ in namespaces]
    for i, ns in enumerate(namespaces):
        name = f"wild-{i}"
        config = _configure(ns, name, tmp_path / name, idents[i], [idents[1 - i].peer_id])
        text = set_key(config.read_text(), "discovery.mdns", "enabled", "false")
        text = set_key(text, "listen", "peer", f'"0.0.0.0:{PEER_PORT}"')
        if i == 0:
            text += (f'\n[[peers]]\ndomain = "wild-1"\npeer_id = "{idents[1].peer_id}"\n'
                     f'address = "{namespaces[1].ip}:{PEER_PORT}"\n')
        config.write_text(text)
        started.append(Daemon(ns, name, idents[i].peer_id, config, tmp_path / name / "daemon.log"))
    launch(started)
    a, b = started

    def b_reaches_a() -> bool:
        for d in started:
            assert d.proc is not None
            if d.proc.poll() is not None:
                raise Fatal(f"{d.name} exited with {d.proc.returncode}")
        row = b.peers().get(a.peer_id)
        return row is not None and row["state"] == "alive" and row["address"] == f"{a.ns.ip}:{PEER_PORT}"

    _poll(b_reaches_a, START_S + DISCOVER_S, "B to reach A at the address A's signed hellos carry", started)
    row = b.peers()[a.peer_id]
    assert row["source"] == "inbound"
    assert [c["address"] for c in row["candidates"] if c["verified"]] == [f"{a.ns.ip}:{PEER_PORT}"]
