"""A whole mesh on one machine: identities, configs, a governance registry and non-IID data products for
N domains on free loopback ports, and real `meshd run` processes for them. Used by `meshd demo`,
`bench/learning.py` and the integration tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshd import identity as identitymod
from meshd.ops.config_template import render, set_key


@dataclass(frozen=True)
class DomainLayout:
    name: str
    directory: Path
    config: Path
    peer_id: str
    peer_port: int
    status_port: int
    rows: int
    classes: tuple[int, ...]

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"


@dataclass(frozen=True)
class MeshLayout:
    workdir: Path
    domains: list[DomainLayout]
    test_path: Path
    train_path: Path
    dataset: str
    alpha: float
    seed: int


_taken: set[int] = set()


def free_port() -> int:
    """A free loopback port BELOW the kernel's ephemeral range.

    `bind(0)` ports come from the ephemeral range, where every outgoing connection on the machine takes
    its local port: a port picked there can be taken before the daemon binds it. Nothing takes ports
    below the range by itself.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def load_dataset(name: str, seed: int, num_samples: int = 40_000) -> tuple[np.ndarray, np.ndarray]:
    from meshd.task import datasets

    if name == "digits":
        return datasets.load_digits_dataset()
    if name == "mnist1d":
        return datasets.load_mnist1d_dataset(num_samples=num_samples, seed=seed)
    raise ValueError(f"unknown dataset {name!r} (digits or mnist1d)")


def build_mesh(
    workdir: Path,
    n_domains: int,
    *,
    dataset: str = "digits",
    alpha: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    min_per_domain: int = 20,
    settings: Mapping[str, Mapping[str, str]] | None = None,
    data: tuple[np.ndarray, np.ndarray] | None = None,
) -> MeshLayout:
    """Write everything N domains need under `workdir`; `settings` = {section: {key: toml value}}."""
    from meshd.task import datasets

    workdir.mkdir(parents=True, exist_ok=True)
    x, y = data if data is not None else load_dataset(dataset, seed)
    train_idx, test_idx = datasets.train_test_split_indices(len(y), test_fraction, seed)
    shared = workdir / "shared"
    shared.mkdir(exist_ok=True)
    test_path, train_path = shared / "test.npz", shared / "train-pooled.npz"
    datasets.write_npz_product(test_path, x[test_idx], y[test_idx])
    datasets.write_npz_product(train_path, x[train_idx], y[train_idx])  # for the centralized reference only
    parts = datasets.dirichlet_split(y[train_idx], n_domains, alpha, seed, min_per_domain=min_per_domain)
    num_classes = int(y.max()) + 1
    layouts: list[DomainLayout] = []
    registry_lines = ["# Governance registry: every domain listed here is trusted, at this address.", ""]
    for i, part in enumerate(parts):
        name = f"domain-{i}"
        d = workdir / name
        d.mkdir(mode=0o700, exist_ok=True)
        ident = identitymod.generate()
        identitymod.save(ident, d / "identity.key", force=True)
        rows = train_idx[part]
        datasets.write_npz_product(d / "data.npz", x[rows], y[rows])
        peer_port, status_port = free_port(), free_port()
        text = render(name, peer_addr=f"127.0.0.1:{peer_port}", status_addr=f"127.0.0.1:{status_port}",
                      data_path="data.npz")
        base: dict[str, dict[str, str]] = {
            "discovery.mdns": {"enabled": "false"},  # loopback mesh: the registry gives the addresses
            "trust": {"registry": '"../registry.toml"'},
            "data": {"test_path": '"../shared/test.npz"'},
            "model": {"num_classes": str(num_classes)},
            "training": {"seed": str(seed + i), "eval_interval_s": "1.0"},
            "log": {"format": '"json"'},
            # every domain of a local mesh connects from 127.0.0.1; each keeps up to 2 connections per peer
            "limits": {"max_connections_per_ip": str(max(64, 4 * n_domains))},
        }
        for section, kv in (settings or {}).items():
            base.setdefault(section, {}).update(kv)
        for section, kv in base.items():
            for key, value in kv.items():
                text = set_key(text, section, key, value)
        (d / "meshd.toml").write_text(text)
        registry_lines += ["[[peers]]", f'domain = "{name}"', f'peer_id = "{ident.peer_id}"',
                           f'address = "127.0.0.1:{peer_port}"', ""]
        classes = tuple(int(c) for c in np.unique(y[rows]))
        layouts.append(DomainLayout(name, d, d / "meshd.toml", ident.peer_id, peer_port, status_port,
                                    len(rows), classes))
    (workdir / "registry.toml").write_text("\n".join(registry_lines))
    return MeshLayout(workdir, layouts, test_path, train_path, dataset, alpha, seed)


def get_status(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/status", timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


class LocalMesh:
    """Runs one real `meshd run` process per domain; `stop()` always reaps them all."""

    def __init__(self, layout: MeshLayout, env: Mapping[str, str] | None = None) -> None:
        self.layout = layout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Any] = {}
        self._env = {**os.environ, **(env or {})}

    def start(self, name: str | None = None) -> None:
        for d in self.layout.domains:
            if name is not None and d.name != name:
                continue
            log = open(d.directory / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs[d.name] = log
            self.procs[d.name] = subprocess.Popen(
                [sys.executable, "-m", "meshd", "run", "--config", str(d.config)],
                stdout=log, stderr=subprocess.STDOUT, env=self._env,
            )

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {d.name: get_status(d.status_url) for d in self.layout.domains}

    def wait_running(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = {d.name for d in self.layout.domains if d.name in self.procs}
        while pending:
            for d in self.layout.domains:
                if d.name in pending:
                    proc = self.procs[d.name]
                    if proc.poll() is not None:
                        raise RuntimeError(f"{d.name} exited with {proc.returncode}; see {d.directory / 'daemon.log'}")
                    s = get_status(d.status_url)
                    if s and s.get("state") == "running":
                        pending.discard(d.name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"domains not running after {timeout}s: {sorted(pending)}")
            time.sleep(0.1)  # polling interval of a deadline loop

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait(10)
        self._logs.pop(name).close()

    def stop(self, name: str | None = None, timeout: float = 10.0) -> dict[str, int | None]:
        names = [name] if name else list(self.procs)
        for n in names:
            p = self.procs.get(n)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for n in names:
            p = self.procs.get(n)
            if p is None:
                continue
            try:
                codes[n] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
                codes[n] = None
            log = self._logs.pop(n, None)
            if log is not None:
                log.close()
        return codes

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]


def centralized_accuracy(layout: MeshLayout, model: str = "mlp", steps: int = 2000, lr: float = 0.05,
                         batch_size: int = 32, hidden: tuple[int, ...] = (64,), seed: int = 0) -> float:
    """The reference line: the same model trained on the pooled training data, scored on the shared test."""
    from meshd.task import models
    from meshd.task.data import load_data_product
    from meshd.task.learner import Learner, TrainConfig

    num_classes = int(np.load(layout.test_path)["label"].max()) + 1
    num_classes = max(num_classes, int(np.load(layout.train_path)["label"].max()) + 1)
    pooled = load_data_product(layout.train_path, "label", None, 0.0, num_classes, seed)
    test = load_data_product(layout.test_path, "label", None, 0.0, num_classes, seed)
    spec = models.ModelSpec(name=model, hidden=hidden, num_classes=num_classes)
    module = models.build_model(spec, pooled.input_dim, seed)
    learner = Learner(module, pooled, TrainConfig(batch_size=batch_size, lr=lr, seed=seed))
    flat, _ = learner.train(models.flatten(module), steps)
    return learner.evaluate(flat, test.train_x, test.train_y)
