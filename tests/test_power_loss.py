"""Power loss (issue #11 item 8): a crash that drops every write the kernel had not yet put on disk.

``kill -9`` keeps the page cache; a power cut does not. Here the daemon's state directory lives on a small
ext4 file system on a loop device, mounted ``noauto_da_alloc,commit=600``: ext4 then neither flushes a
renamed file's data on its own nor commits its journal except when an fsync forces it, so whatever meshd did
not fsync stays in the page cache only. The cut: the daemon is killed with SIGKILL and the loop device's
backing file, the disk as the kernel last wrote it, is copied. A file the test writes just before the cut
without fsync proves the copy lost what was not synced. The copy is then mounted (ext4 replays its journal),
and must hold the newest checkpoint the daemon logged as saved (the line is logged after the fsyncs of
``atomic_write``), and a daemon started on it must load that checkpoint, never send a sequence number it
already used, refuse the last envelope it accepted before the cut (its replay file is typically left empty:
renamed on disk, data not), and run. Four cuts in a row, each on the disk the previous one left.

Needs root, ``losetup``, ``mkfs.ext4`` and loop devices; skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd import identity as identitymod
from meshd.core.replay import ReplayGuard
from meshd.core.wire import Limits, Wire, encode_body
from meshd.task import datasets
from meshd.task.checkpoints import CheckpointStore
from tests.helpers import DaemonProc, init_domain, log_events, post_envelope, set_toml, wait_for

CUTS = 4
IMAGE_BYTES = 48 << 20


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def _loop_mount_works(tmp: Path) -> str | None:
    """None when a loop-mounted ext4 can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mount)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    try:
        with _ext4(tmp / "probe.img", tmp / "probe", fresh=True):
            pass
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot mount an ext4 loop device here: {exc}"
    return None


@contextlib.contextmanager
def _ext4(image: Path, mountpoint: Path, *, fresh: bool = False) -> Iterator[Path]:
    if fresh:
        with open(image, "wb") as f:
            f.truncate(IMAGE_BYTES)
        _run("mkfs.ext4", "-q", "-F", str(image))
    mountpoint.mkdir(parents=True, exist_ok=True)
    dev = _run("losetup", "--find", "--show", str(image))
    try:
        _run("mount", "-t", "ext4", "-o", "noauto_da_alloc,commit=600", dev, str(mountpoint))
        try:
            yield mountpoint
        finally:
            _run("umount", str(mountpoint))
    finally:
        _run("losetup", "-d", dev)


def _saved_checkpoints(log: str) -> list[str]:
    """Checkpoint file names the daemon logged as saved (after their fsyncs), in order."""
    return [e["file"] for e in log_events(log, "checkpoint_saved")]


def _seq_of(name: str) -> int:
    return int(name.split("-")[1][1:])  # ckpt-s<seq>-v<version>.mdck


def test_power_cuts_keep_the_newest_fsynced_checkpoint_and_the_sequence_reservation(tmp_path: Path) -> None:
    reason = _loop_mount_works(tmp_path)
    if reason:
        pytest.skip(reason)
    rng = random.Random(11)
    x, y = datasets.load_digits_dataset()
    datasets.write_npz_product(tmp_path / "data.npz", x[:400], y[:400])
    client = identitymod.generate()
    cfg, peer_id, peer_port, status_port = init_domain(tmp_path / "d", "payments", "--data",
                                                       str(tmp_path / "data.npz"))
    set_toml(cfg, "trust", "peers", f'["{client.peer_id}"]')
    set_toml(cfg, "gossip", "pull_on_join", "false")
    set_toml(cfg, "checkpoint", "interval_s", "0.2")
    set_toml(cfg, "log", "level", '"debug"')  # periodic checkpoint_saved lines are debug
    wire, guard = Wire(client, Limits()), ReplayGuard(64)
    seq = iter(range(1, 100_000))
    highest_pong_seq = 0
    last_env = b""

    def ping() -> None:
        nonlocal highest_pong_seq, last_env
        env = wire.seal(bytes.fromhex(peer_id), "ping", encode_body({}), next(seq), int(time.time() * 1000))
        last_env = env
        status, reply = post_envelope(peer_port, env)
        assert status == 200, reply
        opened = wire.open(reply, int(time.time() * 1000), lambda k: k == bytes.fromhex(peer_id), guard)
        assert opened.seq > highest_pong_seq, "a sequence number was used twice"
        highest_pong_seq = opened.seq

    def checkpoints_after(d: DaemonProc, start: int, count: int) -> None:
        wait_for(lambda: len(_saved_checkpoints(d.logs()[start:])) >= count, timeout=60,
                 what=f"{count} checkpoints")

    log_path = cfg.parent / "daemon.log"
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    _run("mkfs.ext4", "-q", "-F", str(image))
    expected: str | None = None  # the newest checkpoint logged as saved before the previous cut
    for cut in range(CUTS + 1):  # the last start only checks what the last cut left
        with _ext4(image, tmp_path / "mnt") as mnt:
            set_toml(cfg, "node", "state_dir", f'"{mnt / "state"}"')
            log_start = len(log_path.read_text()) if log_path.exists() else 0
            d = DaemonProc(cfg, status_port)
            try:
                d.wait_ready(90)
                if expected is not None:
                    loaded = log_events(d.logs()[log_start:], "checkpoint_loaded")
                    assert loaded and _seq_of(loaded[0]["file"]) >= _seq_of(expected), (cut, expected, loaded)
                    # The cut may have lost the replay windows: the last envelope before it, still fresh
                    # (< 60 s), must not be accepted a second time.
                    status, reply = post_envelope(peer_port, last_env)
                    assert status == 409 and json.loads(reply)["error"] == "stale", (status, reply)
                ping()  # its pong's seq is above every seq of the runs before (checked in ping)
                if cut == CUTS:
                    assert d.stop(30) == 0, d.logs()[-3000:]
                    # A graceful stop marks the windows exact: the next start needs no refusal window.
                    assert json.loads((mnt / "state" / "replay.json").read_text())["clean"] is True
                    break
                checkpoints_after(d, log_start, len(_saved_checkpoints(d.logs()[log_start:])) + 2)
                deadline = time.monotonic() + rng.uniform(0.0, 1.0)  # cut at a random point of the writes
                while time.monotonic() < deadline:
                    ping()
            finally:
                if d.proc.poll() is None:
                    d.kill9()
            saved = _saved_checkpoints(d.logs()[log_start:])
            (mnt / f"unsynced-{cut}").write_bytes(b"x" * 65536)  # never fsynced: the cut must drop it
            shutil.copyfile(image, tmp_path / "cut.img")  # the disk as the kernel last wrote it
        os.replace(tmp_path / "cut.img", image)  # the live file system was unmounted; the copy survives
        with _ext4(image, tmp_path / "mnt") as mnt:
            probe = mnt / f"unsynced-{cut}"
            assert not probe.exists() or probe.stat().st_size == 0, "the cut kept an un-fsynced write"
            ckpt, warnings = CheckpointStore(mnt / "state" / "tasks" / "default" / "checkpoints").load_latest()
            assert ckpt is not None and saved, (warnings, saved)
            assert ckpt.seq >= _seq_of(saved[-1]), (ckpt.seq, saved[-1], warnings)
            expected = saved[-1]
    assert "Traceback" not in log_path.read_text()
