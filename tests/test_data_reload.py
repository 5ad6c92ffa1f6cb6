"""Data that keeps arriving: the data product's version, and a real daemon that reads new files without a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from meshd import config as configmod
from meshd.errors import ModelError
from meshd.task import models
from meshd.task.checkpoints import CheckpointStore
from meshd.task.data import load_data_product
from meshd.task.engine import Engine, task_state_dir
from meshd.task.learner import Learner, TrainConfig
from meshd.task.versions import data_version, signature
from tests.helpers import DaemonProc, Fatal, init_domain, log_events, set_toml, wait_for, write_whole


def _part(path: Path, rows: int, seed: int, columns: tuple[str, ...] = ("a", "b")) -> None:
    """Rows of a separable two-class problem, written under a hidden name and renamed: a file appears whole."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (rows, len(columns)))
    table = {c: x[:, j] for j, c in enumerate(columns)} | {"label": (x[:, 0] > 0).astype(np.int64)}
    write_whole(path, lambda p: pq.write_table(pa.table(table), p))


def test_signature_and_version_follow_the_files(tmp_path: Path) -> None:
    root = tmp_path / "product"
    _part(root / "day=1" / "part.parquet", 10, 0)
    sig = signature(root)
    assert [name for name, _, _ in sig] == ["day=1/part.parquet"]
    v1 = data_version(root, 10, sig)
    assert v1.rows == 10 and v1.files == 1 and len(v1.content) == 16
    assert v1.snapshot()["modified"].endswith("+00:00")
    assert signature(root) == sig and data_version(root, 10, sig).content == v1.content  # nothing changed
    _part(root / "day=2" / "part.parquet", 10, 1)
    sig2 = signature(root)
    assert sig2 != sig and data_version(root, 20, sig2).content != v1.content
    (root / "day=2" / "part.parquet").write_bytes((root / "day=1" / "part.parquet").read_bytes())
    assert data_version(root, 20, signature(root)).content != v1.content  # same bytes, another path
    single = tmp_path / "one.csv"
    single.write_text("a,label\n1,0\n")
    assert [name for name, _, _ in signature(single)] == ["one.csv"]


def test_a_learner_takes_new_rows_and_keeps_its_model_and_steps(tmp_path: Path) -> None:
    _part(tmp_path / "old" / "p.parquet", 40, 0)
    _part(tmp_path / "new" / "p.parquet", 40, 1)
    _part(tmp_path / "new" / "q.parquet", 40, 2)
    old = load_data_product(tmp_path / "old", "label", None, 0.0, 2, 0)
    new = load_data_product(tmp_path / "new", "label", None, 0.0, 2, 0)
    spec = models.ModelSpec(name="logreg", num_classes=2)
    learner = Learner(models.build_model(spec, 2, 0), old, TrainConfig(batch_size=8, lr=0.1, seed=0))
    start = models.flatten(models.build_model(spec, 2, 0))
    flat, _ = learner.train(start, 5)
    learner.replace_data(new)
    assert learner.data is new and learner.steps_done == 5
    flat2, result = learner.train(flat, 15)  # a pass over the 80 new rows and more: indices within them
    assert result.steps == 15 and learner.steps_done == 20 and not torch.equal(flat2, flat)
    _part(tmp_path / "wide" / "p.parquet", 40, 3, columns=("a", "b", "c"))
    wide = load_data_product(tmp_path / "wide", "label", None, 0.0, 2, 0)
    with pytest.raises(ModelError, match="differ"):
        learner.replace_data(wide)


def _rows_of(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.tolist()}


def test_appended_rows_leave_the_old_split_alone_and_a_rewrite_draws_it_again(tmp_path: Path) -> None:
    """A row the model trained on is never held out after a reload that only added rows."""
    root = tmp_path / "product"
    _part(root / "day=1" / "part.parquet", 200, 0)
    cfg = configmod.from_dict({"node": {"domain": "d"}, "model": {"name": "logreg", "num_classes": 2},
                               "data": {"path": str(root), "holdout": 0.25}}, base_dir=tmp_path)
    engine = Engine(cfg.tasks[0], tmp_path / "state")
    engine.load()
    assert engine.data is not None and engine.data.num_holdout == 50
    trained, held = _rows_of(engine.data.train_x), _rows_of(engine.data.holdout_x)

    _part(root / "day=2" / "part.parquet", 100, 1)  # sorts after day=1: appended
    product, version, mask = engine.read_data()
    assert version.rows == 300 and product.num_holdout == 50 + 25
    assert trained <= _rows_of(product.train_x) and held <= _rows_of(product.holdout_x)
    engine.adopt_data(product, version, mask)
    assert engine.holdout_kept is True and engine.data is product

    _part(root / "day=1" / "part.parquet", 200, 7)  # the first day rewritten: the old rows are gone
    product, version, mask = engine.read_data()
    engine.adopt_data(product, version, mask)
    assert engine.holdout_kept is False and product.num_holdout == 75


def test_a_daemon_trains_on_files_that_arrive_and_refuses_a_broken_one(tmp_path: Path) -> None:
    """A folder of daily Parquet files: a new day's file is read without a restart, the model, its version
    and the epoch count kept; a file that cannot be read is refused with its reason, once, and training goes
    on; the final checkpoint records the data version it was trained on."""
    root = tmp_path / "product"
    _part(root / "day=1" / "part.parquet", 100, 0)
    config, _, _, status_port = init_domain(tmp_path / "d", "alpha")
    set_toml(config, "data", "path", f'"{root}"')
    set_toml(config, "data", "reload_check_s", "0.2")
    set_toml(config, "model", "name", '"logreg"')
    set_toml(config, "model", "num_classes", "2")
    daemon = DaemonProc(config, status_port)

    def task() -> Any:
        t = daemon.status()["tasks"]["default"]
        if t["state"] == "failed":
            raise Fatal(f"task failed: {t.get('error')}\n{daemon.logs()}")
        return t

    try:
        daemon.wait_ready(timeout=60)
        first = wait_for(lambda: (t := task())["training"]["steps"] > 20 and t, timeout=90, what="training")
        assert first["data"]["version"]["rows"] == 100 and first["data"]["reloads"] == 0
        assert first["data"]["reload_error"] is None and first["training"]["train_rows"] == 80
        top = daemon.status()["data"]
        assert top["version"] == daemon.status()["tasks"]["default"]["data"]["version"]  # mirrored

        _part(root / "day=2" / "part.parquet", 100, 1)
        second = wait_for(lambda: (t := task())["data"]["reloads"] == 1 and t, timeout=60, what="the new day read")
        assert second["data"]["version"]["rows"] == 200 and second["data"]["version"]["files"] == 2
        assert second["data"]["version"]["content"] != first["data"]["version"]["content"]
        assert second["training"]["train_rows"] == 160  # holdout 0.2 of 200 rows
        assert second["data"]["holdout"] == "kept"  # day 2 sorts last: the first day's split stays
        assert second["model"]["version"] >= first["model"]["version"]  # the model was kept, not rebuilt
        assert second["training"]["steps"] >= first["training"]["steps"]
        assert second["training"]["epochs"] >= first["training"]["epochs"]
        wait_for(lambda: task()["training"]["steps"] > second["training"]["steps"] + 20, timeout=60,
                 what="training on after the reload")

        # A file without column b: the product cannot be read as the task's schema; refused, training goes on.
        _part(root / "day=3" / "part.parquet", 50, 2, columns=("a", "c"))
        broken = wait_for(lambda: (t := task())["data"]["reload_error"] and t, timeout=60, what="the refusal")
        assert broken["data"]["reloads"] == 1 and broken["data"]["version"]["rows"] == 200
        steps = broken["training"]["steps"]
        # Training goes on (and the daemon keeps looking every 0.2 s): the unchanged broken product is not re-read.
        wait_for(lambda: task()["training"]["steps"] > steps + 50, timeout=60, what="training despite it")
        logs = daemon.logs()
        assert len(log_events(logs, "data_reloaded")) == 1, logs[-3000:]
        assert len(log_events(logs, "data_reload_refused")) == 1, logs[-3000:]
        assert "BlockingError" not in logs
    finally:
        assert daemon.stop(timeout=30) == 0, daemon.logs()[-3000:]
    cfg = configmod.load(config)
    ckpt, _ = CheckpointStore(task_state_dir(cfg.node.state_dir, "default") / "checkpoints").load_latest()
    assert ckpt is not None and ckpt.extra["data"]["rows"] == 200
    assert ckpt.extra["data"]["content"] == second["data"]["version"]["content"]
