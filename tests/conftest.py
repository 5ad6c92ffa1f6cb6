"""Shared fixtures: every daemon a test starts is stopped, and no thread outlives its test."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import DaemonProc

if TYPE_CHECKING:
    from meshd.task.data import DataProduct

# Every daemon the suite starts runs with the blocking-call guard: a blocking call on its event loop
# raises inside the daemon (and the `daemons` fixture fails the test that started it).
os.environ["MESHD_BLOCKBUSTER"] = "1"


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
    for d in started:
        assert "BlockingError" not in d.logs(), f"blocking call on the event loop of {d.config}:\n{d.logs()}"


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


@pytest.fixture(scope="module")  # one per test module, as before: no test sees another module's use
def digits(tmp_path_factory: pytest.TempPathFactory) -> DataProduct:
    """scikit-learn's digits as one data product (a quarter held out): the learner and privacy unit tests."""
    from meshd.task.data import load_data_product  # torch and the data stack only for the tests that use it
    from meshd.task.datasets import load_digits_dataset, write_npz_product

    x, y = load_digits_dataset()
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    write_npz_product(path, x, y)
    return load_data_product(path, label="label", features=None, holdout=0.25, num_classes=10, seed=0)
