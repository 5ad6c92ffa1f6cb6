"""`meshd status` reaches the daemon when it matters most (#12 item 5): as a user who cannot read the
service's config, and after `listen.status` was edited but not yet restarted, through the runtime file the
daemon writes (meshd.ops.runfile); a one-line error, never a traceback, when no daemon is there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.ops.localmesh import free_port
from tests.helpers import MESHD, REPO, init_domain, run_cli, set_toml, wait_for

NOBODY = 65534


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A runtime directory as systemd's RuntimeDirectory= makes it: 0755, outside the 0700 pytest tmp."""
    d = Path(tempfile.mkdtemp(prefix="meshd-run-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *MESHD, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "HOME": "/", **env})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the CLI as another uid (setpriv)")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_status_as_a_user_who_cannot_read_the_config(tmp_path: Path, runtime_dir: Path, daemons) -> None:
    cfg, peer_id, _, status_port = init_domain(tmp_path, "sales")
    os.chmod(cfg, 0o000)  # like /etc/meshd/meshd.toml for anyone but root and meshd
    env = {"MESHD_RUNTIME_DIR": str(runtime_dir)}
    d = daemons(cfg, status_port, env={"RUNTIME_DIRECTORY": str(runtime_dir)})
    d.wait_ready()
    runtime_file = runtime_dir / "status.json"
    doc = json.loads(runtime_file.read_text())
    assert doc["status"] == f"127.0.0.1:{status_port}" and doc["config"] == str(cfg.resolve())
    assert runtime_file.stat().st_mode & 0o777 == 0o644
    assert d.status()["listen"]["status_file"] == str(runtime_file)

    denied = _as_nobody("config", "check", str(cfg), env=env)
    assert denied.returncode == 2 and "Permission denied" in denied.stderr, denied  # it really cannot read it
    r = _as_nobody("status", "--config", str(cfg), env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "sales" in r.stdout and peer_id in r.stdout
    r = _as_nobody("peers", "--config", str(cfg), env=env)
    assert r.returncode == 0 and r.stdout.strip() == "no peers known", (r.stdout, r.stderr)
    r = _as_nobody("status", env=env)  # no --config: whichever daemon left its runtime file
    assert r.returncode == 0 and peer_id in r.stdout, (r.stdout, r.stderr)

    assert d.stop() == 0
    assert not runtime_file.exists()  # a stopped daemon leaves no address behind
    r = _as_nobody("status", "--config", str(cfg), env=env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(cfg) in lines[0] and "is the daemon running?" in lines[0], lines


def test_status_follows_the_address_the_daemon_serves(tmp_path: Path, daemons) -> None:
    """listen.status edited (valid, restart-only) while the daemon runs: status, peers and reload still reach
    it through the runtime file in its state directory; the file of another config is never used."""
    cfg, peer_id, _, status_port = init_domain(tmp_path / "a", "sales")
    other_cfg, _, _, _ = init_domain(tmp_path / "b", "hr")
    d = daemons(cfg, status_port)
    d.wait_ready()
    assert (tmp_path / "a" / "state" / "status.json").is_file()
    set_toml(cfg, "listen", "status", f'"127.0.0.1:{free_port()}"')
    wait_for(lambda: "listen.status" in d.status()["config"]["pending_restart"], 15,
             what="the watcher to reload the edit")
    r = run_cli("status", "--config", str(cfg), env={"MESHD_RUNTIME_DIR": str(tmp_path / "none")})
    assert r.returncode == 0 and peer_id in r.stdout, (r.stdout, r.stderr)
    r = run_cli("reload", "--config", str(cfg), env={"MESHD_RUNTIME_DIR": str(tmp_path / "none")})
    assert r.returncode == 0 and "reloaded" in r.stdout, (r.stdout, r.stderr)
    # Another domain's config, whose daemon is not running: this daemon's runtime file is not its answer.
    r = run_cli("status", "--config", str(other_cfg), env={"MESHD_RUNTIME_DIR": str(tmp_path / "a" / "state")})
    assert r.returncode == 1 and "is the daemon running?" in r.stderr, (r.stdout, r.stderr)
