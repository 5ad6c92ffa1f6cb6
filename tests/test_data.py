"""Data products: CSV and .npz loading, validation messages, and the seeded holdout split."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from meshd.errors import DataError
from meshd.task.data import DataProduct, load_data_product, schema_fingerprint
from meshd.task.datasets import write_npz_product


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _grid_csv(tmp_path: Path, n: int = 20) -> Path:
    # "id" is unique per row so splits can be checked for overlap.
    rows = [[i, i * 0.5, -i, i % 3] for i in range(n)]
    return _write_csv(tmp_path / "grid.csv", ["id", "a", "b", "label"], rows)


def _load(path: Path, **kw: object) -> DataProduct:
    args: dict[str, object] = {"label": "label", "features": None, "holdout": 0.0, "num_classes": 10, "seed": 0}
    args.update(kw)
    return load_data_product(path, **args)  # type: ignore[arg-type]


def test_csv_happy_path(tmp_path: Path) -> None:
    dp = _load(_grid_csv(tmp_path))
    assert dp.feature_names == ("id", "a", "b")
    assert dp.label == "label"
    assert dp.train_x.dtype == torch.float32 and dp.train_x.shape == (20, 3)
    assert dp.train_y.dtype == torch.int64 and dp.train_y.tolist() == [i % 3 for i in range(20)]
    assert dp.holdout_x.shape == (0, 3) and dp.holdout_y.shape == (0,)
    assert dp.input_dim == 3 and dp.num_train == 20 and dp.num_holdout == 0
    assert torch.equal(dp.train_x[5], torch.tensor([5.0, 2.5, -5.0]))
    assert re.fullmatch(r"[0-9a-f]{16}", dp.schema_fingerprint)


def test_csv_selected_features_in_given_order(tmp_path: Path) -> None:
    dp = _load(_grid_csv(tmp_path), features=["b", "a"])
    assert dp.feature_names == ("b", "a")
    assert torch.equal(dp.train_x[4], torch.tensor([-4.0, 2.0]))
    assert dp.schema_fingerprint != _load(_grid_csv(tmp_path), features=["a", "b"]).schema_fingerprint


def test_csv_float_formatted_integer_labels(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "f.csv", ["x", "y"], [[0.1, "3.0"], [0.2, " 4 "]])
    assert _load(path, label="y").train_y.tolist() == [3, 4]


def test_schema_fingerprint_depends_on_names_and_label() -> None:
    fp = schema_fingerprint(["a", "b"], "label")
    assert fp == schema_fingerprint(("a", "b"), "label")
    assert fp != schema_fingerprint(["a", "b"], "target")
    assert fp != schema_fingerprint(["a", "c"], "label")
    assert fp != schema_fingerprint(["a", "b"], "label", dtype="float64")


def test_npz_happy_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((30, 4)).astype(np.float32)
    y = rng.integers(0, 10, 30)
    path = tmp_path / "p.npz"
    write_npz_product(path, x, y)
    dp = _load(path)
    assert dp.feature_names == ("x[0]", "x[1]", "x[2]", "x[3]")
    assert torch.equal(dp.train_x, torch.from_numpy(x))
    assert dp.train_y.tolist() == y.tolist()
    named = _load(path, features=["x"])
    assert named.schema_fingerprint == dp.schema_fingerprint


def test_npz_float_labels_and_explicit_feature_array(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    np.savez(path, feats=np.ones((3, 2)), other=np.zeros(3), target=np.array([0.0, 1.0, 2.0]))
    dp = _load(path, label="target", features=["feats"])
    assert dp.train_y.tolist() == [0, 1, 2]
    assert dp.feature_names == ("feats[0]", "feats[1]")


# ------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: data product file not found"):
        _load(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"data\.xlsx: unsupported data product extension '\.xlsx'.*\.csv.*\.npz"):
        _load(path)


def test_corrupt_parquet_and_feather(tmp_path: Path) -> None:
    for name in ("data.parquet", "data.feather"):
        path = tmp_path / name
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match=rf"{re.escape(name)}: not a readable (Parquet|Arrow IPC / Feather) data"):
            _load(path)


def test_empty_csv(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        _load(path)


def test_header_only_csv(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "h.csv", ["a", "label"], [])
    with pytest.raises(DataError, match=r"h\.csv: no data rows"):
        _load(path)


def test_missing_label_column_lists_available(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"grid\.csv: label column 'target' not found; available columns: id, a, b, label"
    ):
        _load(_grid_csv(tmp_path), label="target")


def test_missing_feature_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"feature column 'zzz' not found; available columns: id, a, b, label"):
        _load(_grid_csv(tmp_path), features=["a", "zzz"])


def test_feature_listed_twice_or_label_as_feature(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="feature columns listed more than once: a"):
        _load(_grid_csv(tmp_path), features=["a", "a"])
    with pytest.raises(DataError, match="label column 'label' is also listed as a feature"):
        _load(_grid_csv(tmp_path), features=["a", "label"])


def test_non_numeric_feature_names_row_and_column(tmp_path: Path) -> None:
    rows: list[list[object]] = [[1, 2, 0], [3, 4, 1], [5, "abc", 1]]
    path = _write_csv(tmp_path / "n.csv", ["f1", "f2", "label"], rows)
    with pytest.raises(DataError, match=r"n\.csv: non-numeric value 'abc' in feature column 'f2' at row 3"):
        _load(path)


def test_empty_feature_cell(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "n.csv", ["f1", "label"], [[1, 0], ["", 1]])
    with pytest.raises(DataError, match=r"feature 'f1' at row 2 is missing; .*data\.columns with missing = \"mean\""):
        _load(path)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_feature(tmp_path: Path, bad: str) -> None:
    path = _write_csv(tmp_path / "n.csv", ["f1", "f2", "label"], [[1, 2, 0], [3, bad, 1]])
    with pytest.raises(DataError, match=rf"n\.csv: feature 'f2' at row 2 is -?{bad.lstrip('-')}; .*finite"):
        _load(path)


def test_label_out_of_range_message(tmp_path: Path) -> None:
    rows = [[0.1 * i, i % 10] for i in range(6)] + [[0.7, 12]]
    path = _write_csv(tmp_path / "l.csv", ["f", "label"], rows)
    with pytest.raises(DataError, match=r"label 12 at row 7 cannot be represented by a model with num_classes=10"):
        _load(path)


@pytest.mark.parametrize("bad", ["-1", "10"])
def test_label_out_of_range_bounds(tmp_path: Path, bad: str) -> None:
    path = _write_csv(tmp_path / "l.csv", ["f", "label"], [[0.1, 9], [0.2, bad]])
    with pytest.raises(DataError, match=rf"label {bad} at row 2 cannot be represented"):
        _load(path)


@pytest.mark.parametrize("bad", ["2.5", "cat", ""])
def test_label_not_integer(tmp_path: Path, bad: str) -> None:
    path = _write_csv(tmp_path / "l.csv", ["f", "label"], [[0.1, 1], [0.2, bad]])
    with pytest.raises(DataError, match=rf"label '?{bad}'? at row 2 is not an integer"):
        _load(path)


def test_ragged_row(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("a,b,label\n1,2,0\n1,2\n")
    with pytest.raises(DataError, match=r"r\.csv: malformed CSV: a row has 2 fields, the header has 3 \(row '1,2'\)"):
        _load(path)


def test_duplicate_header(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", ["a", "a", "label"], [[1, 2, 0]])
    with pytest.raises(DataError, match="duplicate column names in header: a"):
        _load(path)


@pytest.mark.parametrize("holdout", [-0.1, 0.95, 1.0])
def test_holdout_fraction_range(tmp_path: Path, holdout: float) -> None:
    with pytest.raises(DataError, match=r"holdout fraction must be in \[0, 0\.9\]"):
        _load(_grid_csv(tmp_path), holdout=holdout)


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    np.savez(path, x=np.ones((4, 2)), label=np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match=r"p\.npz: label array 'y' not found; available arrays: label, x"):
        _load(path, label="y")
    with pytest.raises(DataError, match="feature array 'feats' not found"):
        _load(path, features=["feats"])
    with pytest.raises(DataError, match="must name exactly one 2-D array"):
        _load(path, features=["x", "x"])
    with pytest.raises(DataError, match=r"label 3 at row 4 cannot be represented by a model with num_classes=3"):
        _load(path, num_classes=3)

    many = tmp_path / "many.npz"
    np.savez(many, a=np.ones((4, 2)), b=np.ones((4, 2)), label=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"cannot choose the feature array among \['a', 'b'\]"):
        _load(many)

    flat = tmp_path / "flat.npz"
    np.savez(flat, x=np.ones(4), label=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"feature array 'x' must be 2-D"):
        _load(flat)

    mismatch = tmp_path / "mm.npz"
    np.savez(mismatch, x=np.ones((4, 2)), label=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="label array 'label' has 3 rows, feature array 'x' has 4"):
        _load(mismatch)

    nan = tmp_path / "nan.npz"
    xs = np.ones((4, 2))
    xs[2, 1] = np.nan
    np.savez(nan, x=xs, label=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"feature 'x\[1\]' at row 3 is nan"):
        _load(nan)

    text = tmp_path / "text.npz"
    np.savez(text, x=np.array([["a", "b"]]), label=np.zeros(1, dtype=np.int64))
    with pytest.raises(DataError, match="not numeric"):
        _load(text)

    frac = tmp_path / "frac.npz"
    np.savez(frac, x=np.ones((2, 2)), label=np.array([1.0, 1.5]))
    with pytest.raises(DataError, match=r"label 1\.5 at row 2 is not an integer"):
        _load(frac)

    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.ones((0, 2)), label=np.zeros(0, dtype=np.int64))
    with pytest.raises(DataError, match="no data rows"):
        _load(empty)


def test_npz_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match=r"junk\.npz: not a valid \.npz"):
        _load(path)


def test_npz_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "zero.npz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"zero\.npz"):
        _load(path)


def test_npz_object_arrays_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([[1, None]], dtype=object), label=np.zeros(1, dtype=np.int64))
    with pytest.raises(DataError, match="without pickle"):
        _load(path)


# -------------------------------------------------------------------------------------- holdout split


def test_holdout_disjoint_and_complete(tmp_path: Path) -> None:
    dp = _load(_grid_csv(tmp_path, n=50), holdout=0.3)
    train_ids = set(dp.train_x[:, 0].tolist())
    hold_ids = set(dp.holdout_x[:, 0].tolist())
    assert len(hold_ids) == dp.num_holdout == 15
    assert len(train_ids) == dp.num_train == 35
    assert not train_ids & hold_ids
    assert train_ids | hold_ids == {float(i) for i in range(50)}
    # labels travel with their rows
    assert dp.holdout_y.tolist() == [int(i) % 3 for i in dp.holdout_x[:, 0].tolist()]


def test_holdout_reproducible_with_seed(tmp_path: Path) -> None:
    path = _grid_csv(tmp_path, n=50)
    a = _load(path, holdout=0.3, seed=5)
    b = _load(path, holdout=0.3, seed=5)
    c = _load(path, holdout=0.3, seed=6)
    assert torch.equal(a.holdout_x, b.holdout_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.holdout_x, c.holdout_x)


def test_at_least_one_training_row(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "one.csv", ["f", "label"], [[1.0, 0]])
    dp = _load(path, holdout=0.9)
    assert dp.num_train == 1 and dp.num_holdout == 0
    two = _write_csv(tmp_path / "two.csv", ["f", "label"], [[1.0, 0], [2.0, 1]])
    dp2 = _load(two, holdout=0.9)
    assert dp2.num_train == 1 and dp2.num_holdout == 1
