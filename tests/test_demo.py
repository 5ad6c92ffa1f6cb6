"""`meshd demo` end to end: real daemons, report.json / accuracy.png, and no daemon left behind, also on Ctrl-C.

A short run cannot promise the accuracy gain, so the PASS/FAIL verdict is only checked for its form.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from meshd.ops.localmesh import get_status
from tests.helpers import REPO, wait_for

DEMO = [sys.executable, "-m", "meshd", "demo", "--no-live"]


def _status_ports(workdir: Path) -> dict[str, int]:
    ports = {}
    for cfg in sorted(workdir.glob("domain-*/meshd.toml")):
        listen = tomllib.loads(cfg.read_text())["listen"]
        ports[cfg.parent.name] = int(listen["status"].rsplit(":", 1)[1])
    return ports


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return False
    except OSError:
        return True


def _processes_mentioning(workdir: Path) -> list[int]:
    """Pids of live `meshd run --config <workdir>/...` processes (the demo's daemons)."""
    found = []
    needle = str(workdir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and b"\x00run\x00--config\x00" in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie still answers kill(0): it no longer runs
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _assert_all_stopped(workdir: Path, pids: list[int]) -> None:
    ports = _status_ports(workdir)
    assert ports, f"no domain configs under {workdir}"
    for pid in pids:
        assert _pid_gone(pid), f"daemon pid {pid} still running"
    for name, port in ports.items():
        assert _refuses(port), f"{name}: status port {port} still accepts connections"
    assert _processes_mentioning(workdir) == []


def test_demo_writes_report_and_plot_and_stops_every_daemon(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run([*DEMO, "--domains", "3", "--duration", "8", "--workdir", str(workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    out = proc.stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode in (0, 1), (proc.returncode, out[-3000:], proc.stderr[-3000:])
    assert lines and lines[-1].startswith(("PASS: ", "FAIL: ")), out[-3000:]
    assert (proc.returncode == 0) == lines[-1].startswith("PASS: ")

    report: dict[str, Any] = json.loads((workdir / "report.json").read_text())
    for key in ("settings", "centralized_accuracy", "domains", "timeline", "daemons", "verdict", "timings_s"):
        assert key in report, key
    assert report["settings"]["domains"] == 3
    assert 0.0 <= report["centralized_accuracy"] <= 1.0
    assert [d["domain"] for d in report["domains"]] == ["domain-0", "domain-1", "domain-2"]
    for d in report["domains"]:
        for key in ("classes", "rows", "mesh_test_accuracy", "local_only_test_accuracy", "gain_points",
                    "messages_sent", "messages_received", "model_version"):
            assert key in d, key
        assert 0.0 <= d["mesh_test_accuracy"] <= 1.0
        assert 0.0 <= d["local_only_test_accuracy"] <= 1.0
        assert d["rows"] > 0 and d["classes"]
    assert report["timeline"], "no timeline points"
    assert all(set(p["domains"]) <= {"domain-0", "domain-1", "domain-2"} for p in report["timeline"])
    assert any(p["domains"] for p in report["timeline"])
    assert report["verdict"]["line"] == lines[-1]
    assert set(report["daemons"]) == {"domain-0", "domain-1", "domain-2"}
    assert all(d["exit_code"] == 0 for d in report["daemons"].values()), report["daemons"]

    png = (workdir / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    _assert_all_stopped(workdir, [d["pid"] for d in report["daemons"].values()])


def test_ctrl_c_stops_every_daemon_and_exits_130(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    log = (tmp_path / "demo.out").open("wb")
    proc = subprocess.Popen([*DEMO, "--domains", "3", "--duration", "120", "--workdir", str(workdir)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(_status_ports(workdir)) == 3, timeout=60, interval=0.2, what="the domain configs")
        ports = _status_ports(workdir)

        def running() -> list[int] | None:
            assert proc.poll() is None, f"demo exited early with {proc.returncode}"
            statuses = [get_status(f"http://127.0.0.1:{p}", timeout=1.0) for p in ports.values()]
            if all(s is not None and s.get("state") == "running" for s in statuses):
                return [int(s["pid"]) for s in statuses if s is not None]
            return None

        pids = wait_for(running, timeout=90, interval=0.3, what="every daemon running")
        time.sleep(1.0)  # into the live phase
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    out = (tmp_path / "demo.out").read_text()
    assert code == 130, out[-3000:]
    assert "interrupted" in out
    _assert_all_stopped(workdir, pids)
