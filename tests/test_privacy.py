"""DP-SGD and the epsilon ledger, without daemons: Opacus's accounting, the ledger's persistence and merge rule,
the budget stop, the require rule, and the [privacy] config keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from meshd import config as configmod
from meshd.config import PrivacyConfig
from meshd.errors import ConfigError
from meshd.task.data import DataProduct
from meshd.task.learner import Learner, TrainConfig
from meshd.task.models import ModelSpec, build_model, flatten
from meshd.task.privacy import Ledger, PrivacyPlan, advertised, epsilon_of, parse_history, weaker_than


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Training as the daemon runs it (training.threads = 1): on a loaded 2-core host, 2 threads are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _plan(rows: int, **kw: Any) -> PrivacyPlan:
    cfg = PrivacyConfig(enabled=True, **{"noise_multiplier": 1.1, **kw})
    return PrivacyPlan.build(cfg, 32, rows)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_matches_opacus_accounting_of_the_same_steps(tmp_path: Path, accountant: str) -> None:
    plan = _plan(1347, accountant=accountant)
    ledger = Ledger(tmp_path / "privacy.json", 1e-5, accountant)
    for chunk in (17, 40, 3, 140):  # reserved in parts, as training rounds do
        ledger.reserve(plan, chunk)
    ref = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for _ in range(200):
        ref.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    expected = ref.get_epsilon(1e-5, eps_error=0.01) if accountant == "prv" else ref.get_epsilon(1e-5)
    assert ledger.steps == 200
    assert ledger.spent == pytest.approx(expected, rel=0.01)
    on_disk = json.loads((tmp_path / "privacy.json").read_text())
    assert on_disk["steps"] == 200 and on_disk["epsilon_spent"] == pytest.approx(ledger.spent)


def test_calibrated_noise_spends_the_budget_over_the_planned_steps() -> None:
    cfg = PrivacyConfig(enabled=True, epsilon=3.0, planned_steps=500)
    plan = PrivacyPlan.build(cfg, 32, 1000)
    assert plan.calibrated and plan.noise_multiplier > 0
    eps = epsilon_of([(plan.noise_multiplier, plan.sample_rate, 500)], cfg.delta, "rdp")
    assert 2.9 <= eps <= 3.0


def test_the_budget_caps_the_steps_and_a_ledger_never_goes_down(tmp_path: Path) -> None:
    plan = _plan(1000)
    ledger = Ledger(tmp_path / "privacy.json", 1e-5, "rdp")
    n = ledger.affordable(plan, 5000, 2.0)
    assert 0 < n < 5000
    ledger.reserve(plan, n)
    assert ledger.spent <= 2.0
    assert ledger.affordable(plan, 1000, 2.0) <= 1  # at most the rounding of one step is left
    assert not ledger.merge([(plan.noise_multiplier, plan.sample_rate, 5)], "peer")  # smaller: ignored
    old = json.loads((tmp_path / "privacy.json").read_text())
    # A restored older file and a newer checkpoint copy: the larger one is kept, on load.
    ledger.reserve(plan, 50)
    extra = ledger.to_extra()
    (tmp_path / "privacy.json").write_text(json.dumps(old))
    again = Ledger(tmp_path / "privacy.json", 1e-5, "rdp")
    warns = again.load(extra)
    assert again.steps == n + 50 and again.source == "checkpoint"
    assert any("larger one is kept" in w for w in warns)
    # ...and the other way round: a newer file and an older checkpoint.
    again.save()
    third = Ledger(tmp_path / "privacy.json", 1e-5, "rdp")
    third.load({"history": old["history"]})
    assert third.steps == n + 50 and third.source == "file"


def test_a_corrupt_ledger_file_falls_back_to_the_checkpoint_copy(tmp_path: Path) -> None:
    (tmp_path / "privacy.json").write_text("{not json")
    ledger = Ledger(tmp_path / "privacy.json", 1e-5, "rdp")
    warns = ledger.load({"history": [[1.0, 0.01, 300]]})
    assert ledger.steps == 300 and warns and "privacy.json" in warns[0]


def test_untrusted_histories_are_validated() -> None:
    assert parse_history([[1.0, 0.01, 3]]) == [(1.0, 0.01, 3)]
    for bad in ([[0.0, 0.01, 3]], [[1.0, 2.0, 3]], [[1.0, 0.01, -1]], [[1.0, 0.01]], "x", [[True, 0.1, 1]],
                [[float("nan"), 0.1, 1]], [[1.0, 0.1, 1]] * 1000):
        assert parse_history(bad) is None, bad


def test_dp_sgd_learner_clips_adds_noise_and_still_learns(digits: DataProduct, one_thread: None) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("logreg"), digits.input_dim, seed=0)
    plan = _plan(digits.num_train, max_grad_norm=1.0, noise_multiplier=0.8)
    learner = Learner(model, digits, TrainConfig(batch_size=32, lr=0.5), dp=plan)
    vec = flatten(model)
    start_acc = learner.holdout_accuracy(vec)
    assert start_acc is not None
    # One step moves the model by at most lr * (clipped sum + noise) / expected batch: with noise that is
    # far beyond the clipped part, two runs from the same start differ (fresh noise every time).
    one, _ = learner.train(vec, 1)
    two, _ = learner.train(vec, 1)
    assert not torch.equal(one, two)
    for _ in range(12):
        vec, _ = learner.train(vec, 20)
    acc = learner.holdout_accuracy(vec)
    assert acc is not None and acc > max(0.6, start_acc + 0.4)
    assert learner.steps_done == 242
    state = learner.optimizer_state()
    assert state["steps_done"] == 242


def test_clipping_bounds_each_update_without_noise(digits: DataProduct, one_thread: None) -> None:
    model = build_model(ModelSpec("mlp"), digits.input_dim, seed=0)
    plan = PrivacyPlan(noise_multiplier=1e-9, max_grad_norm=0.01, sample_rate=32 / digits.num_train,
                       expected_batch=32, accountant="rdp", calibrated=False)
    learner = Learner(model, digits, TrainConfig(batch_size=32, lr=1.0), dp=plan)
    vec = flatten(model)
    for _ in range(5):
        new, _ = learner.train(vec, 1)
        # mean of per-sample gradients each clipped to 0.01 (over the expected batch): a Poisson batch is rarely
        # above 2x its expectation, so the step is at most lr * 0.01 * 2.
        assert float((new - vec).norm()) <= 0.02 + 1e-6
        vec = new


def test_advertised_privacy_and_the_require_rule(tmp_path: Path) -> None:
    cfg = PrivacyConfig(enabled=True, epsilon=3.0, noise_multiplier=1.0)
    plan = PrivacyPlan.build(cfg, 32, 1000)
    ledger = Ledger(tmp_path / "p.json", cfg.delta, "rdp")
    ledger.reserve(plan, 10)
    field = advertised(cfg, ledger, plan)
    assert field["dp"] is True and field["epsilon"] == 3.0 and field["history"] == [[1.0, 0.032, 10]]
    assert weaker_than(field, 3.0) is None
    assert "above privacy.require_epsilon_at_most = 2" in str(weaker_than(field, 2.0))
    assert "does not train with differential privacy" in str(weaker_than({"dp": False}, 8.0))
    assert weaker_than(None, 8.0) is not None
    assert advertised(PrivacyConfig(), None, None) == {"dp": False}


def test_config_names_the_key_and_the_fix(tmp_path: Path) -> None:
    base = {"node": {"domain": "payments"}}
    with pytest.raises(ConfigError) as exc:
        configmod.from_dict({**base, "privacy": {"enabled": True}}, base_dir=tmp_path)
    [problem] = exc.value.problems
    assert problem.startswith("privacy.noise_multiplier:") and "planned_steps" in problem
    with pytest.raises(ConfigError) as exc:
        configmod.from_dict({**base, "task": [{"name": "a", "privacy": {"enabled": True, "accountant": "gdp",
                                                                         "epsilon": -1}}]}, base_dir=tmp_path)
    text = "\n".join(exc.value.problems)
    assert "task[0].privacy.accountant: must be one of 'rdp', 'prv'" in text
    assert "task[0].privacy.epsilon: must be > 0" in text
    cfg = configmod.from_dict({**base, "privacy": {"enabled": True, "noise_multiplier": 1.0, "epsilon": 2.0},
                               "task": [{"name": "a"}, {"name": "b", "privacy": {"epsilon": 1.0}}]},
                              base_dir=tmp_path)
    assert [t.privacy.epsilon for t in cfg.tasks] == [2.0, 1.0]
    assert all(t.privacy.enabled for t in cfg.tasks)
    # The budget applies on reload; the mechanism restarts the task.
    new = configmod.from_dict({**base, "task": [{"name": "a", "privacy": {"enabled": True, "noise_multiplier": 2.0,
                                                                          "epsilon": 4.0}}]}, base_dir=tmp_path)
    old = configmod.from_dict({**base, "task": [{"name": "a", "privacy": {"enabled": True, "noise_multiplier": 1.0,
                                                                          "epsilon": 2.0}}]}, base_dir=tmp_path)
    assert configmod.task_needs_restart(old.tasks[0], new.tasks[0]) == ["privacy.noise_multiplier"]
