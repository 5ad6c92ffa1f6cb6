"""Under systemd (stdout/stderr connected to journald, JOURNAL_STREAM set to that stream), every log line starts
with its syslog priority, so `journalctl -p warning` finds warnings; start-up errors use the same logger."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import MESHD, REPO, DaemonProc, init_domain, set_toml, wait_for


def _journal_env(path: Path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_a_warning_line_carries_priority_4_and_info_6(tmp_path: Path) -> None:
    cfg, _, peer_port, status_port = init_domain(tmp_path / "d", "payments")
    log = cfg.parent / "daemon.log"
    log.touch()  # DaemonProc appends to this very file: its inode is the "journal stream"
    d = DaemonProc(cfg, status_port, env=_journal_env(log))
    try:
        d.wait_ready()
        req = urllib.request.Request(f"http://127.0.0.1:{peer_port}/v1/envelope", data=b"garbage", method="POST")
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as err:
            assert err.code == 400

        def warned() -> list[str] | None:
            lines = d.logs().splitlines()
            return lines if any(ln.startswith("<4>{") and '"message_rejected"' in ln for ln in lines) else None

        lines = wait_for(warned, timeout=30, what="a message_rejected warning with priority 4")
    finally:
        d.stop()
    started = next(ln for ln in lines if '"daemon_started"' in ln)
    assert started.startswith("<6>{")
    assert json.loads(started[3:])["event"] == "daemon_started"  # the rest of the line is the JSON as before
    assert all(ln[:3] in ("<7>", "<6>", "<4>", "<3>", "<2>") for ln in lines if ln.strip()), lines[:5]


def test_without_journald_lines_are_plain_json(tmp_path: Path) -> None:
    cfg, _, _, status_port = init_domain(tmp_path / "d", "payments")
    d = DaemonProc(cfg, status_port, env={"JOURNAL_STREAM": "1:2"})  # another stream's: not ours
    try:
        d.wait_ready()
    finally:
        d.stop()
    assert all(ln.startswith("{") for ln in d.logs().splitlines() if ln.strip())


def test_a_fatal_start_up_error_goes_through_the_same_logger(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path / "d", "payments")
    set_toml(cfg, "gossip", "fanout", "0")
    err = tmp_path / "stderr"
    err.touch()
    with open(err, "ab") as f:
        r = subprocess.run([*MESHD, "run", "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=f,
                           timeout=60, cwd=REPO, env={**os.environ, **_journal_env(err)})
    assert r.returncode == 2
    (line,) = [ln for ln in err.read_text().splitlines() if "startup_failed" in ln]
    assert line.startswith("<3>{")
    event = json.loads(line[3:])
    assert event["level"] == "error" and event["reason"] == "invalid config"
    assert any("fanout: must be between 1 and 16" in p for p in event["problems"]), event
