"""Test helpers: free ports, polling with a deadline, and real `meshd run` subprocesses."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from meshd.ops.config_template import set_key
from meshd.ops.localmesh import free_port

T = TypeVar("T")
MESHD = [sys.executable, "-m", "meshd"]
REPO = Path(__file__).resolve().parent.parent
# Deadlines say when to give up, never how fast something must be: on a loaded machine (CI once ran at load
# average 12, and this suite passes at 20) every deadline of wait_for is this many times longer.
TIMEOUT_SCALE = float(os.environ.get("MESHD_TEST_TIMEOUT_SCALE", "3"))


def wait_for(cond: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    """Poll `cond` until it returns a truthy value or the deadline passes (then fail with `what`).

    The deadline is ``timeout x TIMEOUT_SCALE``: only a failing test waits that long."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Fatal:
            raise
        except Exception as exc:  # the condition may fail until the thing is up
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}; last error: {last_exc}")
        time.sleep(interval)  # polling interval of a deadline loop, not synchronisation


def log_events(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of a daemon (service-mode output) whose event is ``event``, in order."""
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("event") == event:
            out.append(obj)
    return out


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class KeptAliveEnvelopes:
    """POSTs envelopes to a daemon's peer listener on loopback over one kept-alive connection, reopened once
    when the daemon had closed it; (HTTP status, body)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port, self.timeout = port, timeout
        self._conn: http.client.HTTPConnection | None = None

    def post(self, envelope: bytes) -> tuple[int, bytes]:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self._conn.request("POST", "/v1/envelope", body=envelope,
                                   headers={"Content-Type": "application/x-meshd-envelope"})
                resp = self._conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def post_envelope(port: int, data: bytes) -> tuple[int, bytes]:
    """POST an envelope to a daemon's peer listener on loopback; (HTTP status, body)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/envelope", data=data, method="POST",
                                 headers={"Content-Type": "application/x-meshd-envelope"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def http_json(url: str) -> Any:
    status, body = http_get(url)
    assert status == 200, (status, body)
    return json.loads(body)


def run_cli(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHD, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def init_domain(directory: Path, domain: str, *extra: str) -> tuple[Path, str, int, int]:
    """`meshd init` on free loopback ports; returns (config path, peer id, peer port, status port)."""
    peer_port, status_port = free_port(), free_port()
    r = run_cli("init", "--domain", domain, "--dir", str(directory),
                "--peer-addr", f"127.0.0.1:{peer_port}", "--status-addr", f"127.0.0.1:{status_port}", *extra)
    assert r.returncode == 0, r.stderr
    peer_id = next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("peer id:"))
    # Network safety: tests never advertise on the machine's real interfaces (netns tests opt in per ns).
    set_toml(directory / "meshd.toml", "discovery.mdns", "enabled", "false")
    return directory / "meshd.toml", peer_id, peer_port, status_port


def set_toml(path: Path, section: str, key: str, value: str) -> None:
    """Set `key = value` (TOML text) inside `[section]` of a config file."""
    path.write_text(set_key(path.read_text(), section, key, value))


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a file under a hidden name, then rename it: a data product's new file appears whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hidden = path.with_name("." + path.name)
    write(hidden)
    os.replace(hidden, path)


def toml_inline_tables(tables: list[dict[str, object]]) -> str:
    """A list of tables as TOML on one line (JSON's strings, lists and booleans are TOML's)."""
    return "[" + ", ".join("{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in t.items()) + "}" for t in tables) + "]"


def mesh_part(text: str) -> str:
    """A rendered config without its tasks: everything before the first [[task]] table."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() == "[[task]]"), len(lines))
    return "\n".join(lines[:first]) + "\n"


class Fatal(Exception):
    """Raised by a `wait_for` condition to stop waiting at once (e.g. the process already exited)."""


class DaemonProc:
    """A real `meshd run` subprocess; stop() is idempotent and always reaps it."""

    def __init__(self, config: Path, status_port: int, env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None) -> None:
        self.config = config
        self.status_port = status_port
        self.log_path = config.parent / "daemon.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(wrapper or []), *MESHD, "run", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})},
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    def status(self) -> Any:
        return http_json(self.url + "/status")

    def wait_ready(self, timeout: float = 30.0) -> Any:
        def ready() -> Any:
            if self.proc.poll() is not None:
                raise Fatal(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            s = self.status()
            return s if s["state"] == "running" else None
        return wait_for(ready, timeout, what=f"{self.config} to be running")

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def assert_no_blocking_calls(layout: Any) -> None:
    """The suite runs daemons with MESHD_BLOCKBUSTER=1 (conftest): a blocking call on a loop is logged."""
    for d in layout.domains:
        log = (d.directory / "daemon.log").read_text(errors="replace")
        assert "BlockingError" not in log, f"blocking call on the event loop of {d.name}:\n{log[-4000:]}"


def score_exported(t: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The outputs of an exported model (``meshd export``, ``GET /v1/model``) for the encoded, unscaled ``rows``,
    as docs/data.md's ten lines ("Serving an exported model") compute them from the file's tensors ``t``: the
    mesh's scaler, then the linear layers with ReLU between them."""
    x = (rows.to(torch.float32) - t["input.mean"]) / t["input.std"]
    layers = sorted({int(k.split(".")[0]) for k in t if k[0].isdigit()})
    for i, n in enumerate(layers):
        x = x @ t[f"{n}.weight"].T + t[f"{n}.bias"]
        x = torch.relu(x) if i < len(layers) - 1 else x
    return x
