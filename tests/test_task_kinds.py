"""Task kinds (issue #15 item 4): classification, binary and regression models, their losses, labels and
metrics. The metrics are checked against scikit-learn's (the reference; the daemon does not import it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score as sk_f1
from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

from meshd import config as configmod
from meshd.errors import ConfigError, DataError, ModelError
from meshd.ops import cli
from meshd.ops.status import render_metrics
from meshd.task.data import load_data_product, parse_labels
from meshd.task.datasets import write_npz_product
from meshd.task.engine import Engine
from meshd.task.learner import Learner, TrainConfig
from meshd.task.metrics import TASK_KINDS, f1_score, mae, rmse, roc_auc, task_kind
from meshd.task.models import ModelSpec, build_model, fingerprint, flatten, initial_seed
from meshd.task.privacy import PrivacyPlan

# --- metrics against scikit-learn -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-4, 4)), min_size=2, max_size=60))
def test_roc_auc_matches_sklearn_with_ties(rows: list[tuple[int, int]]) -> None:
    y = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows], dtype=np.float64) / 2  # few distinct values: many ties
    ours = roc_auc(s, y)
    if len(set(y.tolist())) < 2:
        assert ours is None  # undefined with one class (scikit-learn raises)
    else:
        assert ours == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_on_large_random_scores_and_extremes() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 5000)
    s = rng.normal(size=5000) + y * 0.7
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert roc_auc(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.2, 0.1]), np.array([0, 0, 1])) == 0.0
    assert roc_auc(np.zeros(4), np.array([0, 1, 0, 1])) == 0.5  # all tied: chance


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=40))
def test_f1_matches_sklearn(rows: list[tuple[int, int]]) -> None:
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows])
    assert f1_score(p, y) == pytest.approx(sk_f1(y, p, zero_division=0.0), abs=1e-12)


def test_rmse_and_mae_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=300), rng.normal(size=300)
    assert rmse(p, y) == pytest.approx(math.sqrt(mean_squared_error(y, p)), rel=1e-12)
    assert mae(p, y) == pytest.approx(mean_absolute_error(y, p), rel=1e-12)


def test_binary_scores_threshold_at_probability_half() -> None:
    kind = task_kind("binary")
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 3.0])  # sigmoid >= 0.5 exactly from logit 0
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    got = kind.score(kind.predictions(logits.reshape(-1, 1)), y)
    pred = (torch.sigmoid(logits) >= 0.5).long().numpy()
    assert got["accuracy"] == pytest.approx(float(np.mean(pred == y.numpy())))
    assert got["f1"] == pytest.approx(sk_f1(y.numpy(), pred))
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y.numpy(), logits.numpy()))


# --- task kinds: outputs, losses, directions ------------------------------------------------------------------


def _config(model: dict[str, str]) -> configmod.Config:
    return configmod.from_dict({"node": {"domain": "a"}, "model": model}, base_dir=Path("."))


def test_config_choices_are_the_task_kinds() -> None:
    assert _config({}).tasks[0].model.task == "classification"  # existing configs unchanged
    for kind in TASK_KINDS:
        assert _config({"task": kind}).tasks[0].model.task == kind
    with pytest.raises(ConfigError, match=r"model\.task.*classification.*binary.*regression"):
        _config({"task": "ranking"})
    with pytest.raises(ModelError, match=r"model\.task"):
        task_kind("ranking")


def test_losses_are_the_matching_torch_losses() -> None:
    gen = torch.Generator().manual_seed(0)
    out1 = torch.randn(8, 1, generator=gen)
    yb = torch.tensor([0.0, 1.0] * 4)
    yr = torch.randn(8, generator=gen)
    assert torch.allclose(task_kind("binary").loss(out1, yb),
                          torch.nn.functional.binary_cross_entropy_with_logits(out1.reshape(-1), yb))
    assert torch.allclose(task_kind("regression").loss(out1, yr), torch.mean((out1.reshape(-1) - yr) ** 2))
    out3 = torch.randn(8, 3, generator=gen)
    yc = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    assert torch.allclose(task_kind("classification").loss(out3, yc), torch.nn.functional.cross_entropy(out3, yc))
    with pytest.raises(ModelError, match="one output per row"):
        task_kind("regression").loss(out3, yr)


def test_improvement_respects_the_metric_direction() -> None:
    cls, reg = task_kind("classification"), task_kind("regression")
    assert cls.higher_is_better and not reg.higher_is_better
    assert cls.improved(0.5, None) and cls.improved(0.806, 0.8) and not cls.improved(0.803, 0.8)
    assert not cls.improved(0.7, 0.8)
    assert reg.improved(0.9, 1.0) and not reg.improved(0.998, 1.0) and not reg.improved(1.2, 1.0)
    assert task_kind("binary").headline({"roc_auc": None, "accuracy": 0.9}) == 0.9  # one-class holdout: no AUC


# --- models: outputs and fingerprints -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn1d"])
def test_binary_and_regression_models_have_one_output(name: str) -> None:
    for task, width in (("classification", 10), ("binary", 1), ("regression", 1)):
        model = build_model(ModelSpec(name, task=task), input_dim=40, seed=0)
        assert model(torch.zeros(2, 40)).shape == (2, width)


def test_task_kind_is_part_of_the_fingerprint_and_classification_fingerprints_are_unchanged() -> None:
    fps = {}
    for task in TASK_KINDS:
        spec = ModelSpec("logreg", task=task, num_classes=2)
        fps[task] = fingerprint(spec, build_model(spec, 5, 0), 5)
    assert len(set(fps.values())) == 3  # binary and regression are the same shape, and still refuse each other
    # A classification model hashes as it did before model.task existed (values computed with the code of then):
    # its checkpoints and its peers stay valid.
    assert fps["classification"] == "b753d09a78845f90e781f83cc4ffce52"
    assert initial_seed(ModelSpec("logreg", num_classes=2), 5, 0) == 7029287933050178307
    # num_classes does not matter to a one-output model
    a, b = ModelSpec("mlp", task="binary", num_classes=2), ModelSpec("mlp", task="binary", num_classes=7)
    assert fingerprint(a, build_model(a, 5, 0), 5) == fingerprint(b, build_model(b, 5, 0), 5)
    with pytest.raises(ModelError, match=r"model\.task"):
        ModelSpec("mlp", task="ranking")


# --- labels ------------------------------------------------------------------------------------------------


def test_binary_labels_accept_01_and_true_false(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    assert parse_labels(p, ["0", "1", "true", " FALSE ", "True", "1.0"], "binary", 2).tolist() == [0, 1, 1, 0, 1, 1]
    assert parse_labels(p, np.array([True, False]), "binary", 2).dtype == np.float32
    for bad in (["0", "2"], ["yes"], ["0.5"], ["nan"]):
        with pytest.raises(DataError, match=r"row \d+ is not 0 or 1.*binary"):
            parse_labels(p, bad, "binary", 2)
    with pytest.raises(DataError, match="row 3 is not 0 or 1"):
        parse_labels(p, np.array([0, 1, 3]), "binary", 2)


def test_regression_labels_are_finite_numbers(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    assert parse_labels(p, ["1.5", " -2e3", "7"], "regression", 2).tolist() == [1.5, -2000.0, 7.0]
    with pytest.raises(DataError, match=r"label 'x' at row 2 is not a number.*regression"):
        parse_labels(p, ["1", "x"], "regression", 2)
    for bad in (["inf"], np.array([1.0, np.nan]), np.array([1e300])):
        with pytest.raises(DataError, match="is not a finite number"):
            parse_labels(p, bad, "regression", 2)


def test_load_data_product_keeps_float_targets(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a,b,y\n0,1,0.25\n1,0,-3.5\n2,2,10\n3,1,0\n")
    d = load_data_product(p, "y", None, 0.25, 10, 0, task="regression")
    assert d.train_y.dtype == torch.float32 and sorted(d.train_y.tolist() + d.holdout_y.tolist()) == [
        -3.5, 0.0, 0.25, 10.0]
    with pytest.raises(DataError, match="not an integer"):
        load_data_product(p, "y", None, 0.25, 10, 0)  # classification (the default) still wants integers


# --- the learner on both new kinds, with and without DP ---------------------------------------------------------


def _product(tmp_path: Path, task: str, n: int = 600, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    signal = x @ np.array([1.0, -2.0, 0.5, 0.0, 1.5])
    y = signal + 0.1 * rng.normal(size=n) if task == "regression" else (signal > 0).astype(np.float64)
    path = tmp_path / f"{task}.npz"
    write_npz_product(path, x, y, label_dtype=np.float32)
    return path, x, y


@pytest.mark.parametrize("dp", [False, True])
@pytest.mark.parametrize("task", ["regression", "binary"])
def test_learner_learns_both_new_kinds_with_and_without_dp(tmp_path: Path, task: str, dp: bool) -> None:
    """Regression: RMSE far below predicting the training mean, no accuracy; binary: AUC > 0.95."""
    path, _, _ = _product(tmp_path, task)
    data = load_data_product(path, "label", None, 0.2, 2, 0, task=task)
    name, lr, clip, noise = ("logreg", 0.05, 5.0, 0.3) if task == "regression" else ("mlp", 0.2, 1.0, 0.5)
    model = build_model(ModelSpec(name, task=task), data.input_dim, 0)
    plan = PrivacyPlan(noise_multiplier=noise, max_grad_norm=clip, sample_rate=32 / data.num_train,
                       expected_batch=32, accountant="rdp", calibrated=False) if dp else None
    learner = Learner(model, data, TrainConfig(batch_size=32, lr=lr, task=task), dp=plan)
    vec, res = learner.train(flatten(model), 300)
    assert math.isfinite(res.loss)
    scores = learner.scores(vec, data.holdout_x, data.holdout_y)
    with pytest.raises(ModelError, match="not read for a classification task"):
        Learner(model, data, TrainConfig())
    if task == "regression":
        mean_rmse = float((data.holdout_y - data.train_y.mean()).pow(2).mean().sqrt())
        assert set(scores) == {"rmse", "mae"}
        assert scores["rmse"] is not None and scores["rmse"] < 0.3 * mean_rmse, (scores, mean_rmse)
        with pytest.raises(ModelError, match="no accuracy"):
            learner.evaluate(vec, data.holdout_x, data.holdout_y)
    else:
        assert set(scores) == {"accuracy", "roc_auc", "f1"}
        assert scores["roc_auc"] is not None and scores["roc_auc"] > 0.95, scores
        assert scores["accuracy"] is not None and scores["accuracy"] > 0.85, scores
        assert learner.evaluate(vec, data.holdout_x, data.holdout_y) == scores["accuracy"]


# --- status: fields, /metrics series, `meshd status`, docs -------------------------------------------------


def _training(kind: str) -> dict[str, object]:
    cfg = configmod.from_dict({"node": {"domain": "a"}, "model": {"task": kind}}, base_dir=Path(".")).tasks[0]
    engine = Engine(cfg, Path("/nonexistent"))
    fields = engine.score_fields
    return {"task": kind, "metric": engine.kind.primary, "higher_is_better": engine.kind.higher_is_better,
            **{k: 0.5 for k in fields}} | ({k: None for k in fields if k.endswith("_accuracy")}
                                           if kind == "regression" else {})


def test_every_score_field_is_documented_and_exported() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "status.md").read_text()
    for kind in TASK_KINDS:
        tr = _training(kind)
        m = render_metrics({"tasks": {"t": {"state": "running", "training": tr}}}).decode()
        assert f'meshd_task_kind{{kind="{kind}",metric="{tr["metric"]}",task="t"}} 1.0' in m
        for key, value in tr.items():
            assert f"`{key}`" in docs, f"training.{key} is not documented in docs/status.md"
            if key.endswith(("_accuracy", "_roc_auc", "_f1", "_rmse", "_mae")):
                sample = f'meshd_{key}{{task="t"}} 0.5'
                assert (sample in m) == (value is not None), (kind, key)
    # classification keeps exactly the fields it had
    assert [k for k in _training("classification") if k.endswith("accuracy")] == [
        "holdout_accuracy", "local_only_accuracy", "test_accuracy", "local_only_test_accuracy"]


def test_meshd_status_names_the_metric_of_each_task() -> None:
    tasks = {name: {"state": "running", "joined": True, "model": {"name": "logreg", "version": 3, "task": kind},
                    "training": _training(kind), "gossip": {"merged": 1}}
             for name, kind in (("default", "regression"), ("fraud", "binary"))}
    s = {"domain": "a", "model": tasks["default"]["model"], "training": tasks["default"]["training"], "tasks": tasks}
    out = cli.format_status(s)
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "holdout rmse 0.5, mae 0.5; local-only rmse 0.5, mae 0.5" in lines["training"]
    assert "regression" in lines["model"]
    assert "HOLDOUT" in lines["TASK"] and "HOLDOUT ACC" not in lines["TASK"]
    assert lines["default"].split()[7:9] == ["rmse", "0.5"] and lines["fraud"].split()[7:9] == ["auc", "0.5"]
    s["tasks"] = {"default": {**tasks["default"], "training": _training("classification")}}
    assert "HOLDOUT ACC" in cli.format_status(s)  # classifiers only: the table reads as before
