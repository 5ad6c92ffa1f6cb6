"""Demo datasets built offline, non-IID Dirichlet splits, and the .npz data product writer."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshd.task.data import load_data_product
from meshd.task.datasets import (
    dirichlet_split,
    load_digits_dataset,
    load_mnist1d_dataset,
    train_test_split_indices,
    write_npz_product,
)


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_digits(no_network: None) -> None:
    x, y = load_digits_dataset()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))


def test_mnist1d_generated_offline(no_network: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # mnist1d.get_dataset would cache a pickle in the cwd; nothing may appear
    state: Any = np.random.get_state(legacy=False)
    x, y = load_mnist1d_dataset(num_samples=4000, seed=0)
    after: Any = np.random.get_state(legacy=False)
    assert np.array_equal(state["state"]["key"], after["state"]["key"])  # global RNG untouched
    assert state["state"]["pos"] == after["state"]["pos"]
    assert list(tmp_path.iterdir()) == []
    assert x.shape == (4000, 40) and x.dtype == np.float32
    assert y.shape == (4000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [400] * 10
    assert np.isfinite(x).all()
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-4
    x2, y2 = load_mnist1d_dataset(num_samples=4000, seed=0)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = load_mnist1d_dataset(num_samples=200, seed=1)
    assert not np.array_equal(x[:200], x3)


def test_mnist1d_rejects_tiny() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        load_mnist1d_dataset(num_samples=5)


def _classes_per_domain(labels: np.ndarray, domains: list[np.ndarray], share: float = 0.05) -> list[int]:
    # Classes that make up at least `share` of a domain's rows.
    out = []
    for idx in domains:
        counts = np.bincount(labels[idx], minlength=10)
        out.append(int((counts >= share * idx.size).sum()))
    return out


def test_dirichlet_low_alpha_is_non_iid_and_covers_everything() -> None:
    _, y = load_digits_dataset()
    domains = dirichlet_split(y, n_domains=8, alpha=0.1, seed=0)
    assert len(domains) == 8
    merged = np.concatenate(domains)
    assert merged.dtype == np.int64
    assert np.array_equal(np.sort(merged), np.arange(y.size))  # every index exactly once
    assert all(d.size >= 10 for d in domains)
    assert all(np.array_equal(d, np.sort(d)) for d in domains)
    few = _classes_per_domain(y, domains)
    assert np.mean(few) <= 4.0, few
    iid = _classes_per_domain(y, dirichlet_split(y, n_domains=8, alpha=100.0, seed=0))
    assert min(iid) == 10, iid


def test_dirichlet_is_seeded() -> None:
    _, y = load_digits_dataset()
    a = dirichlet_split(y, 5, 0.5, seed=1)
    b = dirichlet_split(y, 5, 0.5, seed=1)
    c = dirichlet_split(y, 5, 0.5, seed=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_dirichlet_min_per_domain_honoured_and_bounded() -> None:
    _, y = load_digits_dataset()
    domains = dirichlet_split(y, n_domains=10, alpha=0.1, seed=3, min_per_domain=60)
    assert min(d.size for d in domains) >= 60
    with pytest.raises(ValueError, match="attempts"):
        # 10 domains of >= 170 rows from 1797 needs an almost exactly even split: alpha=0.05 never gives one
        dirichlet_split(y, n_domains=10, alpha=0.05, seed=0, min_per_domain=170)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_split(y, n_domains=10, alpha=1.0, seed=0, min_per_domain=200)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_split(y, n_domains=2, alpha=0.0, seed=0)


def test_train_test_split_indices() -> None:
    train, test = train_test_split_indices(100, 0.25, seed=0)
    assert test.size == 25 and train.size == 75
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    again = train_test_split_indices(100, 0.25, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, train_test_split_indices(100, 0.25, seed=1)[1])
    with pytest.raises(ValueError):
        train_test_split_indices(10, 1.0, seed=0)


def test_write_npz_product_loads_as_data_product(tmp_path: Path) -> None:
    x, y = load_digits_dataset()
    path = tmp_path / "digits.npz"
    write_npz_product(path, x.astype(np.float64), y.astype(np.int32))
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["label", "x"]
        assert npz["x"].dtype == np.float32 and npz["label"].dtype == np.int64
    dp = load_data_product(path, label="label", features=None, holdout=0.2, num_classes=10, seed=0)
    assert dp.input_dim == 64 and dp.num_train + dp.num_holdout == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["digits.npz"]
    with pytest.raises(ValueError):
        write_npz_product(path, x, y[:-1])
