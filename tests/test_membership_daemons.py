"""Discovery and membership with real `meshd run` subprocesses on loopback: registry trust, reload on SIGHUP
and on file change, leaving and rejoining the mesh, restart-only keys, and kill -9 liveness.

Three domains without a data product (they only ping). Each has its own copy of the governance registry,
so one domain's trust can be edited alone. Network safety: mDNS is disabled everywhere here; everything
binds 127.0.0.1.

The daemons are shared by the tests of this module (starting three daemons costs seconds on a busy
machine); every test starts from the same baseline (`Mesh.baseline`): original files, every daemon
running, everyone alive on everyone.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshd import identity as identitymod
from meshd.ops.config_template import render, set_key
from meshd.ops.localmesh import free_port
from tests.helpers import DaemonProc, log_events, run_cli, set_toml, wait_for

INTERVAL_S = 0.5
JITTER = 0.25
PING_AFTER_S = 0.5
SUSPECT_AFTER_S = 2.0
DEAD_AFTER_S = 4.0
SLACK_S = 3.0  # scheduling slack on a busy 2-core machine, added to every protocol bound
POLL_S = 0.1


@dataclass
class Domain:
    name: str
    directory: Path
    config: Path
    registry: Path
    peer_id: str
    peer_port: int
    status_port: int
    config_text: str = ""
    registry_text: str = ""
    proc: DaemonProc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    def start(self) -> None:
        if self.proc is not None:
            self.proc.stop()  # reaps a killed one and closes its log file
        self.proc = DaemonProc(self.config, self.status_port)

    @property
    def daemon(self) -> DaemonProc:
        assert self.proc is not None
        return self.proc

    def status(self) -> Any:
        return self.daemon.status()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Running, or fail at once (with its log) if the process exited."""
        deadline = time.monotonic() + timeout
        while True:
            if self.daemon.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.daemon.proc.returncode}:\n"
                                     f"{self.daemon.logs()[-4000:]}")
            with contextlib.suppress(OSError, AssertionError, ValueError):
                if self.status()["state"] == "running":
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not running after {timeout}s:\n{self.daemon.logs()[-4000:]}")
            time.sleep(POLL_S)  # polling interval of a deadline loop

    def peers(self) -> dict[str, dict[str, Any]]:
        return {p["peer_id"]: p for p in self.status()["mesh"]["peers"]}

    def state_of(self, other: Domain) -> str | None:
        row = self.peers().get(other.peer_id)
        return None if row is None else str(row["state"])

    def hup(self) -> None:
        self.daemon.signal(signal.SIGHUP)

    def log_events(self, event: str) -> list[dict[str, Any]]:
        return log_events(self.daemon.logs(), event)


class Mesh:
    def __init__(self, domains: list[Domain]) -> None:
        self.domains = domains

    def others(self, d: Domain) -> list[Domain]:
        return [o for o in self.domains if o is not d]

    def all_alive(self) -> bool:
        """Everyone alive on everyone, at an address verified by a signed pong (a peer heard from first is
        alive a moment before its address is verified)."""
        for d in self.domains:
            peers = d.peers()
            for o in self.others(d):
                row = peers.get(o.peer_id)
                if row is None or row["state"] != "alive" or row["address"] is None:
                    return False
        return True

    def describe(self) -> str:
        out = []
        for d in self.domains:
            try:
                rows = [(p["domain"], p["state"], p["source"]) for p in d.status()["mesh"]["peers"]]
            except Exception as exc:  # the daemon may be down: say so
                rows = [("unreachable", str(exc), "")]
            out.append(f"{d.name}: {rows}")
        return "\n".join(out)

    def baseline(self) -> None:
        """Original config and registry files, every daemon running, everyone alive on everyone."""
        for d in self.domains:
            if d.proc is None or d.proc.proc.poll() is not None:
                d.config.write_text(d.config_text)
                d.registry.write_text(d.registry_text)
                d.start()
                continue
            changed = d.config.read_text() != d.config_text or d.registry.read_text() != d.registry_text
            if changed:
                d.config.write_text(d.config_text)
                d.registry.write_text(d.registry_text)
                d.hup()
        for d in self.domains:
            d.wait_ready()
        wait_for(self.all_alive, timeout=30, interval=POLL_S, what="everyone alive on everyone")

    def stop(self) -> None:
        for d in self.domains:
            if d.proc is not None:
                d.proc.stop()




def _write_domains(root: Path, n: int) -> list[Domain]:
    domains: list[Domain] = []
    for i in range(n):
        name = f"dom-{i}"
        d = root / name
        d.mkdir(mode=0o700)
        ident = identitymod.generate()
        identitymod.save(ident, d / "identity.key")
        peer_port, status_port = free_port(), free_port()
        domains.append(Domain(name, d, d / "meshd.toml", d / "registry.toml", ident.peer_id, peer_port, status_port))
    registry = "".join(
        f'[[peers]]\ndomain = "{o.name}"\npeer_id = "{o.peer_id}"\naddress = "127.0.0.1:{o.peer_port}"\n\n'
        for o in domains
    )
    settings = {
        "discovery.mdns": {"enabled": "false"},  # network safety: loopback only
        "trust": {"registry": '"registry.toml"'},  # this domain's own copy
        "log": {"format": '"json"'},
        "gossip": {"interval_s": str(INTERVAL_S), "jitter": str(JITTER)},
        "membership": {"ping_after_s": str(PING_AFTER_S), "suspect_after_s": str(SUSPECT_AFTER_S),
                       "dead_after_s": str(DEAD_AFTER_S)},
    }
    for dom in domains:
        text = render(dom.name, peer_addr=f"127.0.0.1:{dom.peer_port}", status_addr=f"127.0.0.1:{dom.status_port}")
        for section, kv in settings.items():
            for key, value in kv.items():
                text = set_key(text, section, key, value)
        dom.config_text, dom.registry_text = text, registry
        dom.config.write_text(text)
        dom.registry.write_text(registry)
    return domains


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(_write_domains(tmp_path_factory.mktemp("membership"), 3))
    try:
        for d in m.domains:
            d.start()
        yield m
    finally:
        m.stop()


@pytest.fixture
def base(mesh: Mesh) -> Iterator[Mesh]:
    try:
        mesh.baseline()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{mesh.describe()}") from None
    yield mesh


def _poll(cond: Callable[[], Any], timeout: float, what: str, mesh: Mesh) -> Any:
    try:
        return wait_for(cond, timeout=timeout, interval=POLL_S, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{mesh.describe()}") from None


def test_everyone_sees_everyone_alive_from_the_registry(base: Mesh) -> None:
    for d in base.domains:
        s = d.status()
        assert s["mesh"]["joined"] is True and s["mesh"]["trusted"] == 3  # the registry lists self too
        assert s["mesh"]["mdns"] is False
        rows = s["mesh"]["peers"]
        assert len(rows) == 2, rows
        for o in base.others(d):
            row = next(r for r in rows if r["peer_id"] == o.peer_id)
            assert row["domain"] == o.name
            assert row["address"] == f"127.0.0.1:{o.peer_port}"
            assert row["state"] == "alive"
            assert row["source"] in ("static", "registry")
            assert isinstance(row["last_seen_s"], float) and row["last_seen_s"] >= 0

    d0 = base.domains[0]
    for args in (("peers", "--url", d0.url), ("status", "--peers", "--url", d0.url)):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("DOMAIN"))
        for col in ("STATE", "ADDRESS", "SOURCE", "LAST SEEN", "PEER ID"):
            assert col in lines[header]
        table = lines[header + 1:]
        for o in base.others(d0):
            row = next(line for line in table if line.startswith(o.name))
            assert "alive" in row and "registry" in row and f"127.0.0.1:{o.peer_port}" in row
            assert o.peer_id[:16] in row
    assert "domain" in run_cli("status", "--peers", "--url", d0.url).stdout
    as_json = json.loads(run_cli("peers", "--json", "--url", d0.url).stdout)
    assert {p["peer_id"] for p in as_json} == {o.peer_id for o in base.others(d0)}


def test_distrusting_a_peer_on_sighup_rejects_it_and_drops_it(base: Mesh) -> None:
    d0, d1, d2 = base.domains
    before = d0.status()["gossip"]["rejected"].get("untrusted", 0)
    # Governance removes dom-2 from dom-0's registry only.
    kept = "".join(
        f'[[peers]]\ndomain = "{o.name}"\npeer_id = "{o.peer_id}"\naddress = "127.0.0.1:{o.peer_port}"\n\n'
        for o in (d0, d1)
    )
    d0.registry.write_text(kept)
    d0.hup()
    s = _poll(lambda: (st := d0.status())["mesh"]["trusted"] == 2 and st, 15, "dom-0 to reload its trust", base)
    visible = time.monotonic()
    assert s["config"]["last_reload_ok"] is True
    # dom-2 still trusts dom-0 and keeps pinging it: refused from the next round on (one jittered gossip
    # interval; measured ~0.3 s here, the rest is scheduling slack for a busy machine).
    deadline = INTERVAL_S * (1 + JITTER) + 1.5
    _poll(lambda: d0.status()["gossip"]["rejected"].get("untrusted", 0) > before, deadline,
          "dom-0 to reject dom-2's messages as untrusted", base)
    assert time.monotonic() - visible <= deadline
    peers = d0.peers()
    assert d2.peer_id not in peers and peers[d1.peer_id]["state"] == "alive"
    assert d0.status()["mesh"]["counts"]["alive"] == 1
    # The others are unaffected.
    assert d1.state_of(d2) == "alive"

    # Trusting it again brings it back.
    d0.registry.write_text(d0.registry_text)
    d0.hup()
    _poll(lambda: d0.state_of(d2) == "alive", DEAD_AFTER_S + SLACK_S, "dom-2 alive again on dom-0", base)


class _NotMeshd(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_error(404)

    def log_message(self, *args: Any) -> None:
        pass


def test_an_unrelated_server_at_a_peer_address_is_not_alive(base: Mesh) -> None:
    """Some other HTTP service answers at a trusted peer's address (stale registry, port reuse): its
    unauthenticated 404 is no sign of that peer's life."""
    d0 = base.domains[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _NotMeshd)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="not-meshd", daemon=True)
    thread.start()
    try:
        ghost = identitymod.generate()
        d0.registry.write_text(d0.registry_text + f'[[peers]]\ndomain = "ghost"\npeer_id = "{ghost.peer_id}"\n'
                               f'address = "127.0.0.1:{server.server_address[1]}"\n')
        d0.hup()
        seen: set[str] = set()

        def ghost_dead() -> bool:
            row = d0.peers().get(ghost.peer_id)
            if row is not None:
                seen.add(str(row["state"]))
            return row is not None and row["state"] == "dead"

        _poll(ghost_dead, DEAD_AFTER_S + SLACK_S + 5, "the ghost peer to be dead", base)
        assert "alive" not in seen, seen
        assert all(d0.state_of(o) == "alive" for o in base.others(d0))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_leaving_and_rejoining_the_mesh(base: Mesh) -> None:
    d0, d1, d2 = base.domains
    leaves_before = len(d1.log_events("leave_sent"))
    set_toml(d1.config, "mesh", "enabled", "false")
    d1.hup()
    _poll(lambda: d1.status()["mesh"]["enabled"] is False, 15, "dom-1 to apply mesh.enabled = false", base)
    applied = time.monotonic()
    # The others see it leave within 2 s of the reload being applied (signed leave message).
    wait_for(lambda: d0.state_of(d1) == "left" and d2.state_of(d1) == "left", timeout=2.0, interval=POLL_S,
             what=f"dom-1 'left' on the others within 2 s\n{base.describe()}")
    assert time.monotonic() - applied <= 2.0 + POLL_S
    assert d1.status()["mesh"]["joined"] is False
    _poll(lambda: len(d1.log_events("leave_sent")) > leaves_before, 10, "dom-1 to finish sending its leave", base)
    # It stops sending: nothing goes out over a 2 s sampling window (4 ping periods, 4 gossip rounds).
    sent = d1.status()["gossip"]["sent"]
    window_end = time.monotonic() + 2.0
    while time.monotonic() < window_end:
        assert d1.status()["gossip"]["sent"] == sent, "a daemon that left the mesh keeps sending"
        time.sleep(POLL_S)  # sampling interval of a measurement window
    assert d0.state_of(d1) == "left" and d2.state_of(d1) == "left"  # and nobody brings it back meanwhile

    set_toml(d1.config, "mesh", "enabled", "true")
    d1.hup()
    _poll(lambda: d1.status()["mesh"]["joined"] is True, 15, "dom-1 to rejoin", base)
    _poll(lambda: d0.state_of(d1) == "alive" and d2.state_of(d1) == "alive", DEAD_AFTER_S + SLACK_S,
          "dom-1 alive again on the others", base)
    _poll(lambda: d1.state_of(d0) == "alive" and d1.state_of(d2) == "alive", DEAD_AFTER_S + SLACK_S,
          "the others alive again on dom-1", base)


def test_editing_the_file_without_a_signal_is_picked_up(base: Mesh) -> None:
    d2 = base.domains[2]

    def reloads_with(key: str) -> int:
        return sum(1 for e in d2.log_events("config_reloaded") if key in e.get("changed", []))

    n = reloads_with("log.level")
    set_toml(d2.config, "log", "level", '"debug"')  # no signal: the daemon watches the file
    _poll(lambda: reloads_with("log.level") > n, 15, "dom-2 to reload log.level from the file alone", base)
    assert d2.status()["config"]["last_reload_ok"] is True
    # A visible effect too: leaving the mesh by saving the file.
    set_toml(d2.config, "mesh", "enabled", "false")
    _poll(lambda: d2.status()["mesh"]["enabled"] is False, 15, "dom-2 to apply mesh.enabled from the file", base)
    _poll(lambda: base.domains[0].state_of(d2) == "left", 5, "dom-2 'left' on dom-0", base)


def test_invalid_edit_is_refused_and_reported(base: Mesh) -> None:
    d2 = base.domains[2]
    set_toml(d2.config, "membership", "dead_after_s", "1")  # below suspect_after_s: invalid
    d2.hup()
    s = _poll(lambda: (st := d2.status())["config"]["last_reload_ok"] is False and st, 15,
              "dom-2 to refuse the invalid config", base)
    assert "dead_after_s" in (s["config"]["last_reload_error"] or "")
    assert s["state"] == "running" and s["mesh"]["joined"] is True
    assert base.domains[0].state_of(d2) == "alive"


def test_restart_only_change_is_listed_as_pending(base: Mesh) -> None:
    d0, d1, d2 = base.domains
    set_toml(d2.config, "listen", "peer", f'"127.0.0.1:{free_port()}"')
    d2.hup()
    _poll(lambda: "listen.peer" in d2.status()["config"]["pending_restart"], 15,
          "listen.peer in config.pending_restart", base)
    s = d2.status()
    assert s["listen"]["peer"] == f"127.0.0.1:{d2.peer_port}"  # still serving where it was started
    assert s["config"]["last_reload_ok"] is True
    # A later, unrelated reload does not hide that the running listener differs from the file.
    n = len(d2.log_events("config_reloaded"))
    set_toml(d2.config, "log", "level", '"debug"')
    d2.hup()
    _poll(lambda: any("log.level" in e.get("changed", []) for e in d2.log_events("config_reloaded")[n:]), 15,
          "dom-2 to reload log.level", base)
    assert "listen.peer" in d2.status()["config"]["pending_restart"]
    # Putting the running value back clears it.
    d2.config.write_text(d2.config_text)
    d2.hup()
    _poll(lambda: d2.status()["config"]["pending_restart"] == [], 15, "pending_restart to clear", base)
    assert d0.state_of(d2) == "alive" and d1.state_of(d2) == "alive"


def test_kill9_is_suspect_then_dead_and_restart_is_alive(base: Mesh) -> None:
    d0, d1, d2 = base.domains
    watchers = (d0, d2)
    snap = time.monotonic()  # before the snapshots: a lower bound of their time
    rows = {w.name: w.peers()[d1.peer_id] for w in watchers}
    d1.daemon.kill9()
    killed = time.monotonic()
    # The latest contact any watcher can have had: no later than the kill, no earlier than the snapshot said.
    earliest_dead = {w.name: snap - float(rows[w.name]["last_seen_s"]) + DEAD_AFTER_S for w in watchers}
    seen: dict[str, dict[str, float]] = {w.name: {} for w in watchers}

    def both_dead() -> bool:
        now = time.monotonic()
        for w in watchers:
            state = w.state_of(d1)
            assert state is not None
            seen[w.name].setdefault(state, now)
        return all("dead" in s for s in seen.values())

    try:
        wait_for(both_dead, timeout=DEAD_AFTER_S + SLACK_S, interval=POLL_S, what="dom-1 dead on the others")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; states seen: {seen}\n{base.describe()}") from None
    for w in watchers:
        states = seen[w.name]
        assert "suspect" in states, f"{w.name} never showed dom-1 as suspect: {states}"
        assert states["suspect"] <= states["dead"]
        # Dead no sooner than dead_after_s of silence, and no later than dead_after_s (+ slack) after the kill.
        assert states["dead"] >= earliest_dead[w.name] - 0.05, (w.name, states, earliest_dead)
        assert states["dead"] - killed <= DEAD_AFTER_S + SLACK_S

    d1.start()  # same config, same identity, same state directory
    d1.wait_ready()
    _poll(lambda: d0.state_of(d1) == "alive" and d2.state_of(d1) == "alive", DEAD_AFTER_S + SLACK_S,
          "restarted dom-1 alive again on the others", base)
    _poll(lambda: d1.state_of(d0) == "alive" and d1.state_of(d2) == "alive", DEAD_AFTER_S + SLACK_S,
          "the others alive on restarted dom-1", base)
