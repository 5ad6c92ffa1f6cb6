"""Local training: it learns digits, is reproducible, never mutates its input, and checkpoints its optimizer."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import msgpack
import pytest
import torch

from meshd.errors import ModelError
from meshd.task.data import DataProduct, load_data_product
from meshd.task.datasets import load_digits_dataset, write_npz_product
from meshd.task.learner import Learner, TrainConfig, limit_torch_threads
from meshd.task.models import ModelSpec, build_model, flatten, param_count


def _learner(data: DataProduct, cfg: TrainConfig, name: str = "mlp", seed: int = 0) -> tuple[Learner, torch.Tensor]:
    model = build_model(ModelSpec(name), data.input_dim, seed=seed)
    return Learner(model, data, cfg), flatten(model)


def test_mlp_learns_digits(digits: DataProduct) -> None:
    learner, vec = _learner(digits, TrainConfig(batch_size=32, lr=0.1, momentum=0.9, seed=1))
    initial_acc = learner.holdout_accuracy(vec)
    assert initial_acc is not None and initial_acc < 0.3
    vec, first = learner.train(vec, 20)
    losses = [first.loss]
    for _ in range(14):
        vec, res = learner.train(vec, 20)
        losses.append(res.loss)
    assert learner.steps_done == 300
    assert losses[-1] < 0.5 * losses[0]
    acc = learner.holdout_accuracy(vec)
    assert acc is not None and acc > 0.85
    train_acc = learner.evaluate(vec, digits.train_x, digits.train_y)
    assert 0.85 < train_acc <= 1.0


def test_default_config_logreg_learns(digits: DataProduct) -> None:
    learner, vec = _learner(digits, TrainConfig(), name="logreg")
    vec, res = learner.train(vec, 300)
    # 1348 training rows: 43 steps per epoch (42 full batches and one of 4), so 300 steps = 6 epochs + 42
    assert digits.num_train == 1348
    assert res.steps == 300 and res.samples == 6 * 1348 + 42 * 32
    acc = learner.holdout_accuracy(vec)
    assert acc is not None and acc > 0.8


def test_same_seed_and_start_give_identical_results(digits: DataProduct) -> None:
    cfg = TrainConfig(lr=0.05, momentum=0.5, seed=3)
    a, start = _learner(digits, cfg)
    b, _ = _learner(digits, cfg)
    va, ra = a.train(start, 60)
    vb, rb = b.train(start, 60)
    assert torch.equal(va, vb)
    assert ra == rb
    c, _ = _learner(digits, TrainConfig(lr=0.05, momentum=0.5, seed=4))
    vc, _ = c.train(start, 60)
    assert not torch.equal(va, vc)


def test_train_does_not_mutate_start(digits: DataProduct) -> None:
    learner, start = _learner(digits, TrainConfig())
    before = start.clone()
    out, _ = learner.train(start, 5)
    assert torch.equal(start, before)
    assert out.dtype == torch.float64 and out.shape == start.shape
    assert not torch.equal(out, start)
    out_again, _ = learner.train(start, 0)
    assert torch.equal(out_again, start)


def test_zero_steps(digits: DataProduct) -> None:
    learner, start = _learner(digits, TrainConfig())
    out, res = learner.train(start, 0)
    assert torch.equal(out, start)
    assert res.steps == 0 and res.samples == 0 and math.isnan(res.loss)
    with pytest.raises(ValueError, match="non-negative"):
        learner.train(start, -1)


def test_wrong_start_length(digits: DataProduct) -> None:
    learner, start = _learner(digits, TrainConfig())
    with pytest.raises(ModelError, match="values, the model needs"):
        learner.train(start[:-1], 1)


def test_divergence_raises_and_resets_momentum(digits: DataProduct) -> None:
    learner, start = _learner(digits, TrainConfig(momentum=0.9))
    learner.train(start, 3)
    poisoned = start.clone()
    poisoned[0] = float("inf")
    with pytest.raises(ModelError, match="training diverged"):
        learner.train(poisoned, 3)
    assert learner.steps_done == 3
    assert all(m is None for m in learner.optimizer_state()["momentum"])
    out, res = learner.train(start, 3)  # recovers from a good vector
    assert torch.isfinite(out).all() and math.isfinite(res.loss)


def test_holdout_accuracy_none_without_holdout(tmp_path: Path) -> None:
    x, y = load_digits_dataset()
    path = tmp_path / "d.npz"
    write_npz_product(path, x[:100], y[:100])
    data = load_data_product(path, label="label", features=None, holdout=0.0, num_classes=10, seed=0)
    learner, vec = _learner(data, TrainConfig())
    assert learner.holdout_accuracy(vec) is None
    with pytest.raises(ValueError, match="zero rows"):
        learner.evaluate(vec, data.holdout_x, data.holdout_y)


def test_optimizer_state_round_trip_through_msgpack(digits: DataProduct) -> None:
    cfg = TrainConfig(lr=0.05, momentum=0.9, seed=2)
    a, start = _learner(digits, cfg)
    mid, _ = a.train(start, 50)  # crosses an epoch boundary (43 steps per epoch)
    state = msgpack.unpackb(msgpack.packb(a.optimizer_state(), use_bin_type=True), raw=False)
    assert state["steps_done"] == 50

    b, _ = _learner(digits, cfg, seed=9)  # a fresh learner, as after a restart
    b.load_optimizer_state(state)
    assert b.steps_done == 50
    va, _ = a.train(mid, 30)
    vb, _ = b.train(mid, 30)
    assert torch.equal(va, vb)

    with pytest.raises(ModelError, match="momentum for 1 tensors"):
        b.load_optimizer_state({"steps_done": 1, "momentum": [None]})
    with pytest.raises(ModelError, match="lacks"):
        b.load_optimizer_state({"momentum": []})


def test_concurrent_calls_are_serialised(digits: DataProduct) -> None:
    learner, start = _learner(digits, TrainConfig())
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                out, _ = learner.train(start, 4)
                learner.evaluate(out, digits.holdout_x, digits.holdout_y)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert learner.steps_done == 3 * 5 * 4


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        TrainConfig(momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=-1.0)


def test_batch_larger_than_data(tmp_path: Path) -> None:
    x, y = load_digits_dataset()
    path = tmp_path / "small.npz"
    write_npz_product(path, x[:10], y[:10])
    data = load_data_product(path, label="label", features=None, holdout=0.0, num_classes=10, seed=0)
    learner, vec = _learner(data, TrainConfig(batch_size=64))
    _, res = learner.train(vec, 3)
    assert res.samples == 30
    assert param_count(build_model(ModelSpec("mlp"), 64, 0)) == vec.numel()


def test_limit_torch_threads() -> None:
    current = torch.get_num_threads()
    limit_torch_threads(current)
    assert torch.get_num_threads() == current
    with pytest.raises(ValueError):
        limit_torch_threads(0)
