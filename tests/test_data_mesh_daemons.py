"""A data mesh's data products over real daemons (issue #15): three domains with Parquet folders holding a
categorical column and missing values, features on scales 1e-3 to 1e6, a binary task.

- Federated standardisation (``data.standardize = "mesh"``): every domain ends with the pooled training rows'
  mean and standard deviation (to 1e-6), although no domain sent its rows, and the mesh's ROC AUC is within 2
  points of a model trained centrally on the pooled, centrally standardised rows.
- Appending a day's file to one domain's folder shows a new data-product version in ``/status``; training goes on.
- ``GET /v1/model`` serves the live model in the same format, with the steps it was served at.
- ``meshd export model.safetensors`` scored by the ten lines of torch and safetensors in docs/data.md gives
  the daemon's own predictions.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from meshd import config as configmod
from meshd.ops.localmesh import DomainLayout, LocalMesh, build_mesh, get_status
from meshd.task.data import load_data_product
from meshd.task.engine import Engine, scaled_columns
from meshd.task.metrics import roc_auc
from tests.helpers import (
    assert_no_blocking_calls,
    mesh_part,
    run_cli,
    score_exported,
    toml_inline_tables,
    wait_for,
    write_whole,
)

COLUMNS = [
    {"name": "tiny", "type": "numeric"},  # scale 1e-3
    {"name": "ratio", "type": "numeric", "missing": "mean"},  # scale 1, 10 % missing
    {"name": "amount", "type": "numeric"},  # scale 1e6
    {"name": "region", "type": "categorical", "categories": ["E", "N", "S"]},
]
REGION = {"E": 0.8, "N": -0.8, "S": 0.0}


def _rows(rng: np.random.Generator, n: int, amount_mean: float, p_region: list[float]) -> pa.Table:
    tiny = rng.normal(5e-3, 1e-3, n)
    ratio = rng.normal(0.0, 1.0, n)
    amount = rng.normal(amount_mean, 1e6, n)
    region = rng.choice(["E", "N", "S"], size=n, p=p_region)
    logit = (2.0 * (tiny - 5e-3) / 1e-3 - 1.5 * ratio + (amount - 3e6) / 1e6
             + np.vectorize(REGION.get)(region) + rng.normal(0.0, 0.7, n))
    missing = rng.random(n) < 0.1
    ratio_cells = pa.array(ratio, mask=missing)  # 10 % missing cells
    return pa.table({"tiny": tiny, "ratio": ratio_cells, "amount": amount, "region": region,
                     "fraud": (logit > 0).astype(np.int64)})


def _write(table: pa.Table, path: Path) -> None:
    write_whole(path, lambda p: pq.write_table(table, p))  # a new file appears whole (docs/data.md)


def _task(data: Path, test: Path) -> str:
    return (f'\n[[task]]\nname = "fraud"\ncohort = ["*"]\n'
            f'[task.model]\nname = "logreg"\ntask = "binary"\n'
            f'[task.data]\npath = "{data}"\ntest_path = "{test}"\nlabel = "fraud"\nholdout = 0.0\n'
            f'standardize = "mesh"\nreload_check_s = 0.3\ncolumns = {toml_inline_tables(COLUMNS)}\n'
            f'[task.training]\nlr = 0.05\nmomentum = 0.9\neval_interval_s = 0.5\n')


def _central_auc(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """A logistic regression on the pooled rows (already standardised), trained to convergence."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3000):
        idx = torch.randint(0, x.shape[0], (32,))
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]).squeeze(1), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        auc = roc_auc(model(x_test).squeeze(1).numpy(), y_test.numpy())
    assert auc is not None
    return auc


def _ten_lines(path: Path, rows: torch.Tensor) -> torch.Tensor:
    # The ten lines of docs/data.md ("Serving an exported model"), with `rows` the encoded, unscaled inputs.
    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return score_exported(t, rows)


def _fraud(d: DomainLayout) -> dict[str, Any]:
    s = get_status(d.status_url, timeout=5.0)
    assert s is not None, f"{d.name} does not answer /status"
    task: dict[str, Any] = s["tasks"]["fraud"]
    assert task["state"] != "failed", task.get("error")
    return task


@pytest.mark.slow
def test_three_parquet_domains_standardise_together_learn_and_take_new_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layout = build_mesh(tmp_path / "mesh", 3, dataset="digits", alpha=100.0, seed=0)
    test_path = layout.workdir / "shared" / "fraud-test.parquet"
    _write(_rows(rng, 1500, 3e6, [1 / 3, 1 / 3, 1 / 3]), test_path)
    products = []
    for d, amount_mean, p in zip(layout.domains, (2.0e6, 3.0e6, 4.0e6),
                                 ([0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]), strict=True):
        root = d.directory / "fraud"
        _write(_rows(rng, 500, amount_mean, p), root / "day=1" / "part.parquet")
        products.append(root)
        d.config.write_text(mesh_part(d.config.read_text()) + _task(root, test_path))

    # The reference: every domain's encoded rows pooled, standardised centrally.
    cfg = configmod.load(layout.domains[0].config).tasks[0]
    read = [load_data_product(p, "fraud", None, 0.0, 2, 0, task="binary", columns=cfg.data.columns) for p in products]
    columns = scaled_columns(read[0])
    assert [read[0].feature_names[i] for i in columns] == ["tiny", "ratio", "amount"]
    pooled = torch.cat([r.train_x for r in read]).to(torch.float64)
    mean, std = pooled[:, columns].mean(dim=0), pooled[:, columns].std(dim=0, unbiased=False)
    test = load_data_product(test_path, "fraud", None, 0.0, 2, 0, task="binary", columns=cfg.data.columns)

    def scale(x: torch.Tensor) -> torch.Tensor:
        out = x.to(torch.float64).clone()
        out[:, columns] = (out[:, columns] - mean) / std
        return out.to(torch.float32)

    central = _central_auc(scale(pooled), torch.cat([r.train_y for r in read]), scale(test.train_x), test.train_y)

    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(180)
        settled = wait_for(lambda: all(_fraud(d)["data"]["standardize"]["state"] == "settled"
                                       for d in layout.domains) and [_fraud(d) for d in layout.domains],
                           timeout=180, interval=0.5, what="every domain's scaler settled")
        for task in settled:
            # Settled by the moments' push-sum (here or adopted from a peer), not by the 120 s timeout.
            assert task["data"]["standardize"]["source"] in ("mesh", "peer"), task["data"]["standardize"]
            scaler = task["data"]["standardize"]["scaler"]
            assert scaler["columns"] == list(columns)
            np.testing.assert_allclose(scaler["mean"], mean.numpy(), rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(scaler["std"], std.numpy(), rtol=1e-6)

        def learned() -> list[dict[str, Any]] | None:
            tasks = [_fraud(d) for d in layout.domains]
            aucs = [t["training"].get("test_roc_auc") for t in tasks]
            return tasks if all(a is not None and a >= central - 0.02 for a in aucs) else None

        tasks = wait_for(learned, timeout=240, interval=0.5,
                         what=f"every domain within 2 points of the central ROC AUC {central:.4f}")
        assert all(t["data"]["version"]["rows"] == 500 for t in tasks)

        # The live model (GET /v1/model): the same safetensors file as `meshd export`, with the steps it
        # was served at; the ten lines score it as well as the daemon does.
        a = layout.domains[0]
        live = tmp_path / "live.safetensors"
        with urllib.request.urlopen(a.status_url + "/v1/model", timeout=10) as resp:
            live.write_bytes(resp.read())
        with safe_open(str(live), "pt") as f:
            meta = f.metadata()
        assert meta["meshd.task_name"] == "fraud" and int(meta["meshd.steps"]) > 0
        live_scores = _ten_lines(live, test.train_x).squeeze(1)
        assert roc_auc(live_scores.numpy(), test.train_y.numpy()) >= central - 0.03
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(a.status_url + "/v1/model?task=nope", timeout=10)
        assert unknown.value.code == 404 and "fraud" in unknown.value.read().decode()

        # A new day's file in domain 0's folder: a new data-product version; training goes on, no restart.
        before = _fraud(a)
        _write(_rows(rng, 250, 2.0e6, [0.6, 0.2, 0.2]), products[0] / "day=2" / "part.parquet")
        after = wait_for(lambda: (t := _fraud(a))["data"]["reloads"] == 1 and t, timeout=60, what="the new day")
        assert after["data"]["version"]["rows"] == 750 and after["data"]["reload_error"] is None
        assert after["data"]["version"]["content"] != before["data"]["version"]["content"]
        assert after["training"]["train_rows"] == 750
        assert after["data"]["standardize"]["scaler"] == before["data"]["standardize"]["scaler"]  # kept
        wait_for(lambda: _fraud(a)["training"]["steps"] > after["training"]["steps"] + 50, timeout=60,
                 what="training on the new rows")
    finally:
        mesh.stop(timeout=30)
    assert_no_blocking_calls(layout)

    # The exported model, scored with torch and safetensors only, gives the daemon's predictions.
    out = tmp_path / "fraud.safetensors"
    r = run_cli("export", "--config", str(a.config), "--task", "fraud", "--out", str(out))
    assert r.returncode == 0, r.stderr
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["meshd.task"] == "binary" and json.loads(meta["meshd.features"]) == list(test.feature_names)
    mine = _ten_lines(out, test.train_x).squeeze(1)
    state_dict = tmp_path / "fraud.pt"
    r = run_cli("export", "--config", str(a.config), "--task", "fraud", "--out", str(state_dict))
    assert r.returncode == 0, r.stderr
    cfg = configmod.load(a.config)
    engine = Engine(cfg.tasks[0], cfg.node.state_dir, max_param_abs=cfg.limits.max_param_abs)
    engine.load()  # the daemon's own path: its model, its checkpoint's scaler applied to the test rows
    assert engine.test is not None and engine.module is not None and engine.scaler_ready
    engine.module.load_state_dict(torch.load(state_dict, weights_only=True))
    with torch.no_grad():
        theirs = engine.module(engine.test.train_x).squeeze(1)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert roc_auc(mine.numpy(), test.train_y.numpy()) >= central - 0.02
