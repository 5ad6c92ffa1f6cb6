"""Local state under faults, over real daemon processes: a full disk, and SIGTERM racing checkpoint writes.

- A state directory on a small tmpfs that fills up: envelopes are answered 503 ``unavailable`` (as
  docs/protocol.md says), never 500; ``/status`` and ``/metrics`` show the failed checkpoints; once space is
  back, the daemon answers and checkpoints again, without a restart.
- 30 graceful stops landing while periodic checkpoints are being written (3 daemons x 10 stops, a multi-MB
  model, a checkpoint every 50 ms): each stop either leaves its final checkpoint as the newest valid one and
  exits 0, or exits non-zero and says so. None exits 0 without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from meshd import identity as identitymod
from meshd.core.replay import ReplayGuard
from meshd.core.wire import Limits, Wire, decode_body, encode_body
from meshd.ops.localmesh import DomainLayout, LocalMesh, build_mesh, get_status
from meshd.task import datasets
from meshd.task.checkpoints import CheckpointStore
from tests.helpers import DaemonProc, http_get, init_domain, post_envelope, set_toml, wait_for


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _fill(directory: Path) -> Path:
    """Write one file until the file system is full; returns it (delete it to free the space)."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):  # bounded: the tmpfs is far smaller than 4096 x 1 MiB
            with contextlib.suppress(OSError):
                for _ in range(4096):
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return ballast


def _data(tmp: Path, rows: int = 300) -> Path:
    x, y = datasets.load_digits_dataset()
    path = tmp / "data.npz"
    datasets.write_npz_product(path, x[:rows], y[:rows])
    return path


def test_full_disk_answers_503_unavailable_shows_in_status_and_recovers(tmp_path: Path) -> None:
    client = identitymod.generate()
    cfg, peer_id, peer_port, status_port = init_domain(tmp_path / "d", "payments", "--data", str(_data(tmp_path)))
    set_toml(cfg, "trust", "peers", f'["{client.peer_id}"]')
    set_toml(cfg, "gossip", "pull_on_join", "false")
    set_toml(cfg, "checkpoint", "interval_s", "0.3")
    with _tmpfs(tmp_path / "state", "2m") as state:
        set_toml(cfg, "node", "state_dir", f'"{state}"')
        d = DaemonProc(cfg, status_port)
        wire = Wire(client, Limits())
        guard = ReplayGuard(64)
        seq = iter(range(1, 1000))

        def ping(ahead_ms: int = 0) -> tuple[int, bytes]:
            ts = int(time.time() * 1000) + ahead_ms
            env = wire.seal(bytes.fromhex(peer_id), "ping", encode_body({}), next(seq), ts)
            return post_envelope(peer_port, env)

        try:
            d.wait_ready(60)
            status, reply = ping()
            assert status == 200
            opened = wire.open(reply, int(time.time() * 1000), lambda k: k == bytes.fromhex(peer_id), guard)
            assert opened.kind == "pong" and "tasks" in decode_body(opened.body, Limits())
            wait_for(lambda: d.status()["checkpoint"]["last_file"], timeout=60, what="a first checkpoint")

            ballast = _fill(state)
            status, reply = ping(ahead_ms=10_000)  # beyond the replay lease: accepting it needs a write
            assert status == 503 and json.loads(reply)["error"] == "unavailable", (status, reply)
            failing = wait_for(lambda: (c := d.status()["checkpoint"])["failures"] > 0 and c, timeout=60,
                               what="a failed checkpoint in /status")
            assert failing["last_error"] and "No space left" in failing["last_error"], failing
            _, metrics = http_get(d.url + "/metrics")
            line = next(ln for ln in metrics.decode().splitlines()
                        if ln.startswith('meshd_checkpoint_failures_total{task="default"}'))
            assert float(line.split()[-1]) > 0
            assert d.proc.poll() is None  # the daemon lives on

            ballast.unlink()
            at = failing["last_at"]
            wait_for(lambda: d.status()["checkpoint"]["last_at"] != at, timeout=60,
                     what="checkpoints to resume once there is space")
            assert ping()[0] == 200
        finally:
            code = d.stop(30)
        assert code == 0, d.logs()[-3000:]
        assert "Traceback" not in d.logs()


def _stop_during_checkpoints(d: DaemonProc, store_dir: Path, delay: float) -> tuple[int, str]:
    """Start-to-stop of one daemon, SIGTERM ``delay`` s (random) after its first checkpoint; (exit code, verdict)."""
    wait_for(lambda: d.status()["checkpoint"]["last_file"], timeout=120, what="a first checkpoint")
    time.sleep(delay)  # a random moment within the 50 ms checkpoint cycle, not a sync point
    d.signal(signal.SIGTERM)
    try:
        code = d.proc.wait(60)
    except subprocess.TimeoutExpired:
        d.kill9()
        return -9, "did not exit within 60 s of SIGTERM"
    logs = d.logs()
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    finals = [e for e in events if e.get("event") == "checkpoint_saved" and e.get("final")]
    stopped = [e for e in events if e.get("event") == "daemon_stopped"]
    newest, _ = CheckpointStore(store_dir).load_latest()
    if code == 0:
        if not finals or not stopped:
            return code, "exit 0 without a final checkpoint"
        if newest is None or newest.file_name != finals[-1]["file"]:
            return code, f"exit 0 but the newest checkpoint is {newest and newest.file_name}, not {finals[-1]['file']}"
        return code, "ok"
    if any(e.get("event") == "final_checkpoint_failed" for e in events):
        return code, "said so"
    return code, f"exit {code} without saying why"


@pytest.mark.slow
def test_thirty_stops_racing_checkpoint_writes_never_lose_the_final_one_silently(tmp_path: Path) -> None:
    data = _data(tmp_path, rows=1000)
    domains: list[dict[str, Any]] = []
    for i in range(3):
        cfg, _, _, status_port = init_domain(tmp_path / f"d{i}", f"dom-{i}", "--data", str(data))
        set_toml(cfg, "gossip", "pull_on_join", "false")
        set_toml(cfg, "model", "hidden", "[512, 512]")  # ~300k parameters: each checkpoint is several MB
        set_toml(cfg, "checkpoint", "interval_s", "0.05")
        set_toml(cfg, "checkpoint", "keep", "2")
        store_dir = tmp_path / f"d{i}" / "state" / "tasks" / "default" / "checkpoints"
        domains.append({"cfg": cfg, "port": status_port, "store": store_dir})
    rng = random.Random(0)
    verdicts: list[tuple[int, str]] = []
    for _ in range(10):
        procs = [DaemonProc(d["cfg"], d["port"]) for d in domains]
        try:
            for p in procs:
                p.wait_ready(120)
            # The three stops run at once (they race each other's writes too), each at its own random moment.
            delays = [rng.uniform(0.0, 0.6) for _ in procs]
            with ThreadPoolExecutor(max_workers=len(procs)) as pool:
                verdicts += list(pool.map(_stop_during_checkpoints, procs, [d["store"] for d in domains], delays))
        finally:
            for p in procs:
                p.stop(10)
            for p in procs:  # logs are per run: the next run appends to a fresh file
                with contextlib.suppress(FileNotFoundError):
                    p.log_path.unlink()
    bad = [v for v in verdicts if v[1] not in ("ok", "said so")]
    print(f"30 stops: {sum(v[1] == 'ok' for v in verdicts)} with a final checkpoint, "
          f"{sum(v[1] == 'said so' for v in verdicts)} exited non-zero saying so")
    assert len(verdicts) == 30 and not bad, bad


@pytest.mark.slow
def test_a_state_dir_restored_from_an_old_backup_is_accepted_at_once(tmp_path: Path) -> None:
    """A's state directory is copied, A gossips 20+ more rounds, then stops and is restored from the copy. Its
    first shares after the restart are merged by B: none is refused as replayed (its sequence numbers start
    from the clock when that is above the restored reservation)."""
    layout = build_mesh(tmp_path / "restore", 2, settings={
        "training": {"enabled": "false"},
        "gossip": {"interval_s": "0.2", "pull_on_join": "false"},
    })
    a, b = layout.domains
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(120)
        wait_for(lambda: _get(b)["gossip"]["merged"] >= 5, timeout=60, what="B merging A's shares")
        backup = tmp_path / "backup"
        shutil.copytree(a.directory / "state", backup)
        rounds = _get(a)["gossip"]["rounds"]
        wait_for(lambda: _get(a)["gossip"]["rounds"] >= rounds + 20, timeout=60, what="20 more rounds")
        assert mesh.stop(a.name, timeout=60) == {a.name: 0}
        shutil.rmtree(a.directory / "state")
        shutil.copytree(backup, a.directory / "state")
        before = _get(b)
        replayed = before["gossip"]["rejected"].get("replayed", 0)
        mesh.start(a.name)
        mesh.wait_running(120)
        merged = before["gossip"]["merged"]
        wait_for(lambda: _get(b)["gossip"]["merged"] > merged, timeout=30,
                 what="B to merge a share of the restored A")
        after = _get(b)
        assert after["gossip"]["rejected"].get("replayed", 0) == replayed, after["gossip"]["rejected"]
        log_a = (a.directory / "daemon.log").read_text()
        assert '"sequence_from_clock"' in log_a
    finally:
        mesh.stop()


def _get(d: DomainLayout) -> dict[str, Any]:
    s = get_status(d.status_url, timeout=5.0)
    assert s is not None, f"{d.name} does not answer /status"
    return s


def test_a_clock_stepped_back_ten_minutes_does_not_change_which_checkpoint_loads(tmp_path: Path) -> None:
    """Run 1 checkpoints with the real clock; run 2, under a clock 10 minutes back (libfaketime) and with training
    off (the version does not move: ties), writes newer checkpoints dated in the past; run 3 (real clock) must
    load run 2's final checkpoint, the one written last, not run 1's future-dated one."""
    lib = next((p for p in (Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
                            Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1")) if p.is_file()), None)
    if lib is None:
        pytest.skip("libfaketime is not installed (Debian: apt-get install faketime)")
    cfg, _, _, status_port = init_domain(tmp_path / "d", "payments", "--data", str(_data(tmp_path)))
    set_toml(cfg, "gossip", "pull_on_join", "false")
    set_toml(cfg, "checkpoint", "interval_s", "0.3")

    def run(env: dict[str, str] | None) -> list[dict[str, Any]]:
        d = DaemonProc(cfg, status_port, env=env)  # preloaded, not wrapped: SIGTERM reaches the daemon itself
        try:
            d.wait_ready(120)
            wait_for(lambda: d.status()["checkpoint"]["last_file"], timeout=60, what="a checkpoint")
        finally:
            assert d.stop(30) == 0
        events = [json.loads(ln) for ln in d.logs().splitlines() if ln.startswith("{")]
        d.log_path.unlink()
        return events

    first = run(None)
    set_toml(cfg, "training", "enabled", "false")
    second = run({"LD_PRELOAD": str(lib), "FAKETIME": "-10m", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    final = [e["file"] for e in second if e.get("event") == "checkpoint_saved" and e.get("final")][-1]
    assert second[0]["timestamp"] < first[0]["timestamp"]  # the clock really was 10 minutes back
    assert any(e.get("event") == "checkpoint_loaded" for e in second)
    third = run(None)
    loaded = [e["file"] for e in third if e.get("event") == "checkpoint_loaded"]
    assert loaded == [final], (loaded, final)
