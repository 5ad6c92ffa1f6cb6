"""Shared fixtures: every daemon a test starts is stopped, and no thread outlives its test."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import DaemonProc


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProc]]:
    started: list[DaemonProc] = []

    def start(config: Path, status_port: int, **kw: object) -> DaemonProc:
        d = DaemonProc(config, status_port, **kw)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t.ident not in before and t.is_alive() and not t.daemon
                and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))]
    for t in leaked():
        t.join(timeout=5)
    left = leaked()
    assert not left, f"threads leaked past the test: {[t.name for t in left]}"
