"""The walking daemon over real sockets and real subprocesses: init, run, status API, signals, sd_notify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshd import config as configmod
from meshd.ops.config_template import render
from tests.helpers import REPO, DaemonProc, free_port, http_get, init_domain, run_cli, set_toml, wait_for


def test_init_writes_private_key_and_valid_config(tmp_path: Path) -> None:
    d = tmp_path / "new"
    cfg, peer_id, _, _ = init_domain(d, "payments")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "identity.key").stat().st_mode) == 0o600
    assert len(peer_id) == 64
    assert configmod.load(cfg).node.domain == "payments"
    # id and keygen agree on the peer id
    assert run_cli("id", "--key", str(d / "identity.key")).stdout.strip() == peer_id
    key_before = (d / "identity.key").read_bytes()
    again = run_cli("init", "--domain", "payments", "--dir", str(d))
    assert again.returncode == 2 and "--force" in again.stderr
    assert (d / "identity.key").read_bytes() == key_before
    forced = run_cli("init", "--domain", "payments", "--dir", str(d), "--force")
    assert forced.returncode == 0 and (d / "identity.key").read_bytes() != key_before


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "k.key"
    first = run_cli("keygen", "--out", str(out))
    assert first.returncode == 0 and len(first.stdout.strip()) == 64
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    second = run_cli("keygen", "--out", str(out))
    assert second.returncode == 2 and "already exists" in second.stderr
    assert run_cli("id", "--key", str(out)).stdout.strip() == first.stdout.strip()


def test_help_lists_every_command() -> None:
    r = run_cli("--help")
    for cmd in ("init", "keygen", "id", "config", "run", "status", "peers", "export", "demo"):
        assert cmd in r.stdout
        assert run_cli(*cmd.split(), "--help").returncode == 0


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = REPO / "config" / "meshd.example.toml"
    cfg = configmod.load(example)
    assert cfg.node.domain == "payments"
    text = example.read_text()
    for key in configmod.field_docs():
        leaf = key.split(".")[-1]
        assert f"{leaf} =" in text or f"# {leaf} =" in text, f"{key} is not documented in {example}"
    # the example is the template `meshd init` writes, rendered: they cannot drift apart
    assert text == render("payments", state_dir="/var/lib/meshd", identity="/etc/meshd/identity.key")


def test_config_check_lists_every_problem(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path, "sales")
    assert run_cli("config", "check", str(cfg)).stdout.strip() == "ok"
    set_toml(cfg, "gossip", "fanout", "0")
    set_toml(cfg, "listen", "peer", '"nohost"')
    cfg.write_text(cfg.read_text().replace("interval_s = 1.0", "intervl_s = 1.0"))
    r = run_cli("config", "check", str(cfg))
    assert r.returncode == 2
    # The per-task keys of `meshd init`'s config live in its one [[task]] table: errors name it.
    assert "task[0].gossip.fanout: must be between 1 and 16 (got 0)" in r.stderr
    assert "listen.peer: must be HOST:PORT (got 'nohost')" in r.stderr
    assert "task[0].gossip.intervl_s: unknown key; did you mean 'task[0].gossip.interval_s'?" in r.stderr


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path / "d", "ops")
    loaded = configmod.load(cfg)
    assert loaded.node.identity == tmp_path / "d" / "identity.key"
    assert loaded.node.state_dir == tmp_path / "d" / "state"


def test_run_serves_status_metrics_and_stops_on_sigterm(tmp_path: Path, daemons) -> None:
    cfg, peer_id, peer_port, status_port = init_domain(tmp_path / "pay", "payments")
    d = daemons(cfg, status_port)
    s = d.wait_ready()
    assert s["domain"] == "payments" and s["peer_id"] == peer_id and s["state"] == "running"
    for key in ("version", "uptime_s", "config", "mesh", "model", "training", "gossip"):
        assert key in s
    assert {"path", "loaded_at", "last_reload_ok", "last_reload_error"} <= s["config"].keys()
    assert {"joined", "peers"} <= s["mesh"].keys()
    assert {"sent", "received", "bytes_sent", "bytes_received", "rejected"} <= s["gossip"].keys()
    assert http_get(d.url + "/healthz") == (200, b"ok\n")
    status, body = http_get(d.url + "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("meshd_up 1.0", "meshd_uptime_seconds", "meshd_messages_sent_total",
                 "meshd_messages_received_total", 'meshd_peers{state="alive"}'):
        assert name in text, name
    assert stat.S_IMODE((tmp_path / "pay" / "state").stat().st_mode) == 0o700
    # the peer listener is up on its own port
    with socket.create_connection(("127.0.0.1", peer_port), timeout=5):
        pass
    r = run_cli("status", "--url", d.url)
    assert r.returncode == 0 and "payments" in r.stdout
    r = run_cli("status", "--config", str(cfg), "--json")
    assert r.returncode == 0 and '"domain": "payments"' in r.stdout
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(5) == 0
    assert time.monotonic() - t0 < 5
    assert "daemon_stopped" in d.logs()


def test_status_cli_reports_unreachable_daemon() -> None:
    r = run_cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "cannot reach the meshd status API" in r.stderr


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path, "payments")
    key = tmp_path / "identity.key"
    os.chmod(key, 0o644)
    r = run_cli("run", "--config", str(cfg), timeout=30)
    assert r.returncode == 2
    assert str(key) in r.stderr and "chmod 600" in r.stderr


def test_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """As OpenSSH does: a 0600 key that another user owns is refused, the file named (needs root to chown)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the key file another owner")
    cfg, *_ = init_domain(tmp_path, "payments")
    key = tmp_path / "identity.key"
    os.chown(key, 65534, 65534)  # nobody
    r = run_cli("run", "--config", str(cfg), timeout=30)
    assert r.returncode == 2
    assert str(key) in r.stderr and "owned by uid 65534" in r.stderr and "chown" in r.stderr


def test_missing_or_malformed_key_is_refused(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path, "payments")
    key = tmp_path / "identity.key"
    key.write_text("not a key\n")
    r = run_cli("run", "--config", str(cfg), timeout=30)
    assert r.returncode == 2 and str(key) in r.stderr and "meshd keygen" in r.stderr
    key.unlink()
    r = run_cli("run", "--config", str(cfg), timeout=30)
    assert r.returncode == 2 and "does not exist" in r.stderr and str(key) in r.stderr


def test_misspelled_config_key_is_refused(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path, "payments")
    cfg.write_text(cfg.read_text().replace("fanout = 1", "fanuot = 1"))
    r = run_cli("run", "--config", str(cfg), timeout=30)
    assert r.returncode == 2
    assert "task[0].gossip.fanuot: unknown key; did you mean 'task[0].gossip.fanout'?" in r.stderr


def test_sighup_with_broken_config_keeps_running(tmp_path: Path, daemons) -> None:
    cfg, _, _, status_port = init_domain(tmp_path, "payments")
    d = daemons(cfg, status_port)
    d.wait_ready()
    good = cfg.read_text()
    cfg.write_text(good.replace("level = \"info\"", "level = \"loud\""))
    d.signal(signal.SIGHUP)
    s = wait_for(lambda: (st := d.status())["config"]["last_reload_ok"] is False and st, what="reload to fail")
    assert "log.level: must be one of" in s["config"]["last_reload_error"]
    assert s["state"] == "running" and d.proc.poll() is None
    assert http_get(d.url + "/healthz")[0] == 200
    # fixing the file is picked up without a signal (the daemon watches it)
    cfg.write_text(good.replace("level = \"info\"", "level = \"debug\""))
    wait_for(lambda: d.status()["config"]["last_reload_ok"] is True, what="reload to succeed")
    assert d.stop() == 0


def test_restart_only_changes_are_listed_not_ignored(tmp_path: Path, daemons) -> None:
    cfg, _, _, status_port = init_domain(tmp_path, "payments")
    d = daemons(cfg, status_port)
    d.wait_ready()
    set_toml(cfg, "listen", "peer", f'"127.0.0.1:{free_port()}"')
    d.signal(signal.SIGHUP)
    s = wait_for(lambda: (st := d.status())["config"]["pending_restart"] and st, what="pending_restart")
    assert s["config"]["pending_restart"] == ["listen.peer"]


def test_sd_notify_ready_watchdog_reload_stopping(tmp_path: Path, daemons) -> None:
    cfg, _, _, status_port = init_domain(tmp_path, "payments")
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(10)
    messages: list[str] = []

    def receive_until(token: str) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            messages.extend(sock.recv(4096).decode().splitlines())
            if messages.count(token) >= 1:
                return
        raise AssertionError(f"{token} not received; got {messages}")

    try:
        d = daemons(cfg, status_port, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"})
        receive_until("READY=1")
        for _ in range(3):
            messages.clear()
            receive_until("WATCHDOG=1")
        d.signal(signal.SIGHUP)
        messages.clear()
        receive_until("RELOADING=1")
        receive_until("READY=1")
        d.signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert d.proc.wait(5) == 0
    finally:
        sock.close()


def test_stalled_loop_stops_watchdog_pings(tmp_path: Path) -> None:
    """The watchdog ping comes from the event loop, so a blocked loop stops it (systemd then restarts us)."""
    code = (
        "import asyncio, time\n"
        "from meshd.ops.sdnotify import Notifier\n"
        "async def main():\n"
        f"    n = Notifier({{'NOTIFY_SOCKET': {str(tmp_path / 'wd.sock')!r}, 'WATCHDOG_USEC': '100000'}})\n"
        "    t = asyncio.create_task(n.watchdog_loop())\n"
        "    await asyncio.sleep(0.3)\n"
        "    print('STALL', flush=True)\n"
        "    time.sleep(1.0)  # a deliberately blocked loop\n"
        "    t.cancel()\n"
        "asyncio.run(main())\n"
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "wd.sock"))
    sock.settimeout(0.5)
    try:
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        before = 0
        while True:
            try:
                before += sock.recv(100).count(b"WATCHDOG=1")
            except TimeoutError:
                break
        assert p.stdout.readline().strip() == "STALL"
        p.wait(10)
        assert before >= 2
    finally:
        sock.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / "systemd" / "meshd.service").read_text()
    for needle in ("Type=notify", "ExecReload=/opt/meshd/bin/meshd reload --config", "WatchdogSec=",
                   "Restart=on-failure",
                   "StateDirectory=meshd", "ConfigurationDirectory=meshd", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
                   "RestrictAddressFamilies=", "SystemCallFilter=@system-service", "UMask=0077",
                   "ExecStart=/opt/meshd/bin/meshd run --config /etc/meshd/meshd.toml"):
        assert needle in unit, needle
    # verify needs the executable to exist: point it at this checkout's meshd
    meshd_bin = Path(sys.executable).parent / "meshd"
    local = tmp_path / "meshd.service"
    local.write_text(unit.replace("/opt/meshd/bin/meshd", str(meshd_bin)))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "meshd.service" not in r.stderr, r.stderr


def test_meshd_reload_reports_a_refused_config_and_applies_a_good_one(tmp_path: Path) -> None:
    """`meshd reload` (the unit's ExecReload) exits 1 naming the key when the daemon refuses the edit, and
    the daemon keeps running on its previous config; a good edit is applied and reported."""
    cfg, _, _, status_port = init_domain(tmp_path, "payments")
    d = DaemonProc(cfg, status_port)
    try:
        d.wait_ready()
        good = cfg.read_text()
        set_toml(cfg, "gossip", "fanout", "0")
        r = run_cli("reload", "--config", str(cfg))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "reload refused" in r.stderr and "task[0].gossip.fanout: must be between 1 and 16" in r.stderr
        s = d.status()
        assert s["state"] == "running" and s["config"]["last_reload_ok"] is False
        cfg.write_text(good)
        set_toml(cfg, "gossip", "interval_s", "0.7")
        r = run_cli("reload", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        # The file watcher may have applied the edit first (then this reload has nothing left to change).
        assert "reloaded" in r.stdout and ("task[0].gossip.interval_s" in r.stdout or "no change" in r.stdout)
        assert d.status()["config"]["last_reload_ok"] is True
        applied = [ln for ln in d.logs().splitlines() if '"config_reloaded"' in ln]
        assert any("task[0].gossip.interval_s" in ln for ln in applied), applied
    finally:
        assert d.stop() == 0
    r = run_cli("reload", "--url", f"http://127.0.0.1:{status_port}")
    assert r.returncode == 1 and "cannot reach" in r.stderr


def test_a_single_model_config_of_the_previous_form_runs_unchanged(tmp_path: Path) -> None:
    """A config without [[task]] tables (model, data and training at the top level, as every config before
    the many-tasks daemon) runs as one task named "default"; its single-model checkpoint folder is moved to
    STATE/tasks/default on the first start."""
    from meshd import identity as identitymod
    from meshd.task import datasets

    x, y = datasets.load_digits_dataset()
    datasets.write_npz_product(tmp_path / "data.npz", x[:200], y[:200])
    identitymod.save(identitymod.generate(), tmp_path / "identity.key")
    peer_port, status_port = free_port(), free_port()
    cfg = tmp_path / "meshd.toml"
    cfg.write_text(f"""
[node]
domain = "payments"
identity = "identity.key"
state_dir = "state"

[listen]
peer = "127.0.0.1:{peer_port}"
status = "127.0.0.1:{status_port}"

[discovery.mdns]
enabled = false

[model]
name = "mlp"
hidden = [32]

[data]
path = "data.npz"

[training]
lr = 0.05
eval_interval_s = 0.5

[gossip]
interval_s = 0.5
""")
    legacy = tmp_path / "state" / "checkpoints"
    legacy.mkdir(parents=True)
    (legacy / "note.txt").write_text("a file of the single-model state dir")
    d = DaemonProc(cfg, status_port)
    try:
        s = d.wait_ready()
        assert list(s["tasks"]) == ["default"] and s["tasks"]["default"]["state"] == "running"
        s = wait_for(lambda: (st := d.status())["training"]["steps"] > 0 and st, timeout=60, what="training")
        assert s["model"]["name"] == "mlp" and s["model"]["parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    finally:
        assert d.stop() == 0
    assert (tmp_path / "state" / "tasks" / "default" / "checkpoints" / "note.txt").is_file()
    assert not legacy.exists()
    assert "moved the single-model checkpoints" in d.logs()


def test_status_exits_1_and_readyz_503_when_degraded(tmp_path: Path) -> None:
    """Scriptable health: a domain alone by design is ready; one whose trusted peers are all unreachable, or
    whose last reload was refused, is degraded (`meshd status` exits 1 and says why; /readyz answers 503)."""
    from meshd import identity as identitymod

    cfg, _, _, status_port = init_domain(tmp_path, "payments")
    d = DaemonProc(cfg, status_port)
    try:
        d.wait_ready()
        status, body = http_get(d.url + "/readyz")
        assert status == 200 and json.loads(body) == {"ready": True, "problems": []}
        assert run_cli("status", "--url", d.url).returncode == 0
        ghost = identitymod.generate().peer_id  # trusted, at an address where nobody listens
        nowhere = f"127.0.0.1:{free_port()}"
        cfg.write_text(cfg.read_text() + f'\n[[peers]]\ndomain = "sales"\naddress = "{nowhere}"\npeer_id = "{ghost}"\n')
        set_toml(cfg, "trust", "peers", f'["{ghost}"]')
        assert run_cli("reload", "--config", str(cfg)).returncode == 0
        r = wait_for(lambda: (r := run_cli("status", "--url", d.url)).returncode == 1 and r, timeout=30,
                     what="status to report the mesh degraded")
        assert "degraded: mesh enabled with 1 trusted peers, none alive" in r.stderr
        status, body = http_get(d.url + "/readyz")
        assert status == 503 and "none alive" in json.loads(body)["problems"][0]
        set_toml(cfg, "gossip", "fanout", "0")
        assert run_cli("reload", "--config", str(cfg)).returncode == 1
        r = run_cli("status", "--json", "--url", d.url)
        assert r.returncode == 1 and "last config reload failed" in r.stderr
        assert json.loads(r.stdout)["health"]["ready"] is False
    finally:
        assert d.stop() == 0
