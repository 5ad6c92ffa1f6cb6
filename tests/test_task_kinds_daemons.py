"""Regression and binary tasks over real daemons (issue #15 item 4).

Domains A and B run two tasks each: ``price``, a regression (a linear target plus noise, features shifted
differently in each domain), and ``fraud``, a binary task on a linearly separable rule. Both learn: the mesh
model's RMSE on a shared test set ends far below that of predicting the mean of the training targets, and its
ROC AUC above 0.9; `/status`, `/metrics` and `meshd status` show the task kinds and their metrics next to the
local-only baseline's. Domain C runs ``fraud`` on the same data and model but with ``model.task =
"regression"``: the task kind is part of the model fingerprint, so A and B refuse it as ``incompatible`` and
it refuses them, and no share is merged across.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshd.ops.localmesh import DomainLayout, LocalMesh, build_mesh, get_status
from meshd.task.datasets import write_npz_product
from tests.helpers import assert_no_blocking_calls, http_get, mesh_part, run_cli, wait_for

W_PRICE = np.array([1.5, -2.0, 0.7, 0.0])
W_FRAUD = np.array([1.0, 1.0, -1.0, 0.5])


def _status(d: DomainLayout) -> dict[str, Any]:
    s = get_status(d.status_url, timeout=5.0)
    assert s is not None, f"{d.name} does not answer /status"
    return s


def price_rows(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 4)) + np.array([shift, -shift, 0.0, 0.0])
    return x, x @ W_PRICE + 3.0 + 0.1 * rng.normal(size=n)


def fraud_rows(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 4)) + np.array([shift, 0.0, 0.0, 0.0])
    return x, (x @ W_FRAUD > 0).astype(np.float32)


def _task(name: str, kind: str, data: str, test: str, lr: float) -> str:
    return (f'\n[[task]]\nname = "{name}"\ncohort = ["*"]\n'
            f'[task.model]\nname = "logreg"\ntask = "{kind}"\n'
            f'[task.data]\npath = "{data}"\ntest_path = "{test}"\n'
            f'[task.training]\nlr = {lr}\neval_interval_s = 0.5\n')


@pytest.mark.slow
def test_regression_and_binary_tasks_learn_and_report_their_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layout = build_mesh(tmp_path / "kinds", 3, dataset="digits", alpha=100.0, seed=0)
    a, b, c = layout.domains
    shared = layout.workdir / "shared"
    x_test, y_test = price_rows(rng, 600, 0.0)
    write_npz_product(shared / "price-test.npz", x_test, y_test, label_dtype=np.float32)
    write_npz_product(shared / "fraud-test.npz", *fraud_rows(rng, 600, 0.0), label_dtype=np.float32)
    train_targets = []
    for d, shift in ((a, 1.0), (b, -1.0), (c, 0.0)):
        x, y = price_rows(rng, 300, shift)
        train_targets.append(y)
        write_npz_product(d.directory / "price.npz", x, y, label_dtype=np.float32)
        write_npz_product(d.directory / "fraud.npz", *fraud_rows(rng, 300, shift), label_dtype=np.float32)
    # The reference: predict the mean of A's and B's training targets for every test row.
    mean_rmse = math.sqrt(float(np.mean((y_test - np.concatenate(train_targets[:2]).mean()) ** 2)))
    for d in (a, b):
        d.config.write_text(mesh_part(d.config.read_text())
                            + _task("price", "regression", "price.npz", "../shared/price-test.npz", 0.05)
                            + _task("fraud", "binary", "fraud.npz", "../shared/fraud-test.npz", 0.2))
    c.config.write_text(mesh_part(c.config.read_text())
                        + _task("fraud", "regression", "fraud.npz", "../shared/fraud-test.npz", 0.2))
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(180)

        def learned() -> dict[str, dict[str, Any]] | None:
            ss = {d.name: _status(d) for d in layout.domains}
            for d in (a, b):
                price, fraud = (ss[d.name]["tasks"][t]["training"] for t in ("price", "fraud"))
                rmse, auc = price.get("test_rmse"), fraud.get("test_roc_auc")
                if rmse is None or rmse > 0.25 * mean_rmse or auc is None or auc <= 0.9:
                    return None
                if any(ss[d.name]["tasks"][t]["gossip"]["merged"] == 0 for t in ("price", "fraud")):
                    return None
            flags = {n: {p: v["incompatible"] for p, v in s["tasks"]["fraud"]["peers"].items()} for n, s in ss.items()}
            if not (flags[a.name].get(c.peer_id) == flags[b.name].get(c.peer_id) == "incompatible"
                    and flags[c.name].get(a.peer_id) == flags[c.name].get(b.peer_id) == "incompatible"):
                return None
            return ss

        ss = wait_for(learned, timeout=240, interval=0.5,
                      what="price RMSE below a quarter of the mean predictor's and fraud AUC above 0.9 on A and B, "
                           "C flagged incompatible for fraud both ways")
        for d in (a, b):
            tasks = ss[d.name]["tasks"]
            price, fraud = tasks["price"]["training"], tasks["fraud"]["training"]
            print(f"{d.name}: price {({k: v for k, v in price.items() if 'rmse' in k or 'mae' in k})} "
                  f"(mean predictor rmse {mean_rmse:.3f}); fraud "
                  f"{({k: v for k, v in fraud.items() if 'auc' in k or 'f1' in k or 'accuracy' in k})}")
            assert tasks["price"]["model"]["task"] == "regression" and tasks["fraud"]["model"]["task"] == "binary"
            assert (price["task"], price["metric"], price["higher_is_better"]) == ("regression", "rmse", False)
            assert (fraud["task"], fraud["metric"], fraud["higher_is_better"]) == ("binary", "roc_auc", True)
            # Every metric of its kind, for the served model and the local-only baseline, on both sets.
            for scope in ("holdout", "local_only", "test", "local_only_test"):
                for key in (f"{scope}_rmse", f"{scope}_mae"):
                    assert isinstance(price[key], float) and price[key] >= 0.0, (key, price)
                for key in (f"{scope}_accuracy", f"{scope}_roc_auc", f"{scope}_f1"):
                    assert isinstance(fraud[key], float) and 0.0 <= fraud[key] <= 1.0, (key, fraud)
                assert price[f"{scope}_accuracy"] is None  # no accuracy for a regression; the field stays
                assert f"{scope}_rmse" not in fraud and f"{scope}_roc_auc" not in price
            assert price["test_mae"] <= price["test_rmse"] + 1e-9  # MAE never exceeds RMSE
            assert fraud["test_f1"] > 0.8 and fraud["test_accuracy"] > 0.85, fraud
        # Same model shape, other task kind: the fingerprints differ and nothing crossed between them.
        fps = {n: s["tasks"]["fraud"]["model"]["fingerprint"] for n, s in ss.items()}
        assert fps[a.name] == fps[b.name] != fps[c.name]
        assert ss[c.name]["tasks"]["fraud"]["gossip"]["merged"] == 0
        assert ss[c.name]["tasks"]["fraud"]["training"]["test_rmse"] is not None  # C learns on its own

        _, body = http_get(a.status_url + "/metrics")
        text = body.decode()
        for line in ('meshd_task_kind{kind="regression",metric="rmse",task="price"} 1.0',
                     'meshd_task_kind{kind="binary",metric="roc_auc",task="fraud"} 1.0'):
            assert line in text, line
        for series in ('meshd_test_rmse{task="price"}', 'meshd_local_only_mae{task="price"}',
                       'meshd_test_roc_auc{task="fraud"}', 'meshd_local_only_test_f1{task="fraud"}',
                       'meshd_holdout_accuracy{task="fraud"}'):
            assert series in text, series
        assert 'meshd_holdout_accuracy{task="price"}' not in text  # a regression has no accuracy sample

        r = run_cli("status", "--url", a.status_url)
        assert r.returncode == 0, r.stderr
        header, rows = r.stdout.split("TASK", 1)[1].splitlines()[0], r.stdout.split("TASK", 1)[1].splitlines()[1:]
        assert "HOLDOUT" in header and "HOLDOUT ACC" not in header, header
        cells = {row.split()[0]: row for row in rows if row.strip()}
        assert " rmse " in cells["price"] and " auc " in cells["fraud"], r.stdout
    finally:
        mesh.stop()
    assert_no_blocking_calls(layout)
