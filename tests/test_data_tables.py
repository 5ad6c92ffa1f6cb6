"""Data products as tables (Parquet file and folder, Feather, CSV through pyarrow) and the typed schema contract:
encoding, missing values, fingerprints, `meshd data describe`, and the errors that name the key and the fix."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch

from meshd import config as configmod
from meshd.config import ColumnConfig
from meshd.core.cohort import TaskPeers
from meshd.errors import ConfigError, DataError
from meshd.task.data import DataProduct, load_data_product, schema_fingerprint
from meshd.task.engine import Engine
from tests.helpers import DaemonProc, Fatal, init_domain, run_cli, set_toml, toml_inline_tables, wait_for

ROWS = {
    "amount": [10.0, None, 30.0, 40.0, 1e6, 0.001],
    "country": ["FR", "DE", None, "FR", "IT", "DE"],
    "vip": [True, False, True, None, False, True],
    "label": [0, 1, 1, 0, 1, 0],
}
SCHEMA = (
    ColumnConfig(name="amount", missing="mean", indicator=True),
    ColumnConfig(name="country", type="categorical", categories=("DE", "FR", "IT"), unknown=True, missing="unknown"),
    ColumnConfig(name="vip", type="boolean", missing="zero"),
)


def _load(path: Path, columns: tuple[ColumnConfig, ...] = (), **kw: object) -> DataProduct:
    args: dict[str, object] = {"label": "label", "features": None, "holdout": 0.0, "num_classes": 2, "seed": 0}
    args.update(kw)
    return load_data_product(path, columns=columns, **args)  # type: ignore[arg-type]


def _parquet(tmp_path: Path, rows: dict[str, list[object]] = ROWS, name: str = "d.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(rows), path)
    return path


def _toml_table(col: ColumnConfig) -> dict[str, object]:
    """A column as its [[data.columns]] table in a config."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in col.__dict__.items()}


def _numeric_rows(n: int = 12) -> dict[str, list[object]]:
    return {"a": [i * 0.5 for i in range(n)], "b": [float(-i) for i in range(n)], "label": [i % 2 for i in range(n)]}


# ------------------------------------------------------------------------------------------- formats


def test_parquet_feather_and_csv_read_the_same_numeric_product(tmp_path: Path) -> None:
    rows = _numeric_rows()
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    feather.write_feather(pa.table(rows), tmp_path / "d.feather")
    pa_csv.write_csv(pa.table(rows), tmp_path / "d.csv")
    loaded = [_load(tmp_path / name) for name in ("d.parquet", "d.feather", "d.csv")]
    expected = torch.tensor([rows["a"], rows["b"]], dtype=torch.float32).T
    for dp in loaded:
        assert dp.feature_names == ("a", "b")
        assert torch.equal(dp.train_x, expected)
        assert dp.train_y.tolist() == rows["label"]
    # Untyped numeric data keeps the fingerprint it always had, whatever the format.
    assert {dp.schema_fingerprint for dp in loaded} == {schema_fingerprint(["a", "b"], "label")}


def test_parquet_folder_with_hive_partitions(tmp_path: Path) -> None:
    root = tmp_path / "product"
    for country, amounts in (("FR", [1.0, 2.0]), ("DE", [3.0]), ("IT", [4.0, 5.0, 6.0])):
        part = root / f"country={country}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"amount": amounts, "label": [1] * len(amounts)}), part / "part-0.parquet")
    (root / "_SUCCESS").write_text("")  # writers' markers and hidden files are not data
    (root / ".part-0.parquet.crc").write_text("junk")
    cols = (ColumnConfig(name="amount"),
            ColumnConfig(name="country", type="categorical", categories=("DE", "FR", "IT")))
    dp = _load(root, cols)
    assert dp.num_train == 6
    assert dp.feature_names == ("amount", "country=DE", "country=FR", "country=IT")
    # files in path order: DE, FR, IT; the partition key is a column like any other
    assert dp.train_x.tolist() == [[3, 1, 0, 0], [1, 0, 1, 0], [2, 0, 1, 0], [4, 0, 0, 1], [5, 0, 0, 1], [6, 0, 0, 1]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: folder holds no \.parquet files"):
        _load(empty)


def test_parquet_reads_only_the_columns_it_needs(tmp_path: Path) -> None:
    rows = {**_numeric_rows(4), "notes": [{"k": 1}] * 4}  # a nested column no feature type can read
    path = _parquet(tmp_path, rows)
    dp = _load(path, features=["b", "a"])
    assert dp.feature_names == ("b", "a")
    with pytest.raises(DataError, match="feature 'notes' has type struct"):
        _load(path)


# --------------------------------------------------------------------------------------- typed schema


def test_typed_parquet_encodes_one_hot_boolean_and_missing(tmp_path: Path) -> None:
    dp = _load(_parquet(tmp_path), SCHEMA)
    assert dp.feature_names == ("amount", "amount:missing", "country=DE", "country=FR", "country=IT",
                                "country=<unknown>", "vip")
    assert dp.input_dim == 7 and dp.columns == SCHEMA
    x = dp.train_x.numpy()
    mean = np.float32(np.mean([10.0, 30.0, 40.0, 1e6, 0.001]))
    assert x[1, 0] == mean and x[1, 1] == 1.0 and x[0, 1] == 0.0  # filled with the mean, flagged
    assert x[:, 2:6].tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    assert x[:, 6].tolist() == [1, 0, 1, 0, 0, 1]  # the missing vip is 0 (missing = "zero")


def test_csv_with_categorical_and_missing_cells(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    # "007" stays a category (text, leading zeros kept); empty and NA cells are missing; nan is missing too
    path.write_text("amount,code,vip,label\n1.5,007,yes,0\n,010,no,1\nnan,NA,true,1\n2.5,,F,0\n")
    cols = (ColumnConfig(name="amount", missing="zero", indicator=True),
            ColumnConfig(name="code", type="categorical", categories=("007", "010"), missing="zero"),
            ColumnConfig(name="vip", type="boolean"))
    dp = _load(path, cols)
    assert dp.feature_names == ("amount", "amount:missing", "code=007", "code=010", "vip")
    assert dp.train_x.tolist() == [[1.5, 0, 1, 0, 1], [0, 1, 0, 1, 0], [0, 1, 0, 0, 1], [2.5, 0, 0, 0, 0]]


def test_dictionary_encoded_columns_as_pandas_categoricals_write_them(tmp_path: Path) -> None:
    country = pa.array(["FR", "DE", "FR"]).dictionary_encode()
    path = tmp_path / "d.feather"
    feather.write_feather(pa.table({"country": country, "label": [0, 1, 0]}), path)
    assert pa.types.is_dictionary(feather.read_table(path).schema.field("country").type)
    dp = _load(path, (ColumnConfig(name="country", type="categorical", categories=("DE", "FR")),))
    assert dp.train_x.tolist() == [[0, 1], [1, 0], [0, 1]]
    described = run_cli("data", "describe", str(path))
    assert tomllib.loads(described.stdout)["data"]["columns"][0]["categories"] == ["DE", "FR"]


def test_hashed_categories_are_stable_and_fill_buckets(tmp_path: Path) -> None:
    merchants = [f"m{i}" for i in range(40)]
    path = _parquet(tmp_path, {"merchant": merchants + merchants[:5], "label": [0] * 45})
    cols = (ColumnConfig(name="merchant", type="categorical", buckets=8),)
    a = _load(path, cols)
    b = _load(_parquet(tmp_path, {"merchant": list(reversed(merchants)), "label": [0] * 40}, "other.parquet"), cols)
    assert a.feature_names == tuple(f"merchant#{k}" for k in range(8))
    x = a.train_x.numpy()
    assert (x.sum(axis=1) == 1).all() and (x.sum(axis=0) > 0).sum() >= 6  # one bucket per row, spread out
    assert np.array_equal(x[40:], x[:5])  # the same value, the same bucket
    # the bucket depends on the value only (not on the file, its order or the process): m0 in both files
    assert np.array_equal(b.train_x.numpy()[39], x[0])


def test_fingerprint_covers_types_order_and_categories(tmp_path: Path) -> None:
    path = _parquet(tmp_path)
    base = _load(path, SCHEMA).schema_fingerprint

    def with_country(**kw: object) -> str:
        country = ColumnConfig(**{"name": "country", "type": "categorical", "categories": ("DE", "FR", "IT"),
                                  "unknown": True, "missing": "unknown", **kw})  # type: ignore[arg-type]
        return _load(path, (SCHEMA[0], country, SCHEMA[2])).schema_fingerprint

    assert with_country() == base
    assert with_country(categories=("DE", "FR", "IT", "ES")) != base  # another category list: refused
    assert with_country(categories=("FR", "DE", "IT")) != base  # the same categories in another order
    assert with_country(buckets=4, categories=(), unknown=False, missing="zero") != base  # hashed instead
    assert _load(path, (SCHEMA[0], SCHEMA[2], SCHEMA[1])).schema_fingerprint != base  # column order
    as_numeric = ColumnConfig(name="vip", type="numeric", missing="zero")
    assert _load(path, (*SCHEMA[:2], as_numeric)).schema_fingerprint != base  # boolean -> numeric: same names
    # how a domain fills its own missing cells is its business: not part of the contract
    mean_vip = ColumnConfig(name="vip", type="boolean", missing="mean")
    assert _load(path, (*SCHEMA[:2], mean_vip)).schema_fingerprint == base
    # and the "same columns, other order" hint sees through the order only
    reordered = _load(path, (SCHEMA[0], SCHEMA[2], SCHEMA[1]))
    assert reordered.schema_set_fingerprint == _load(path, SCHEMA).schema_set_fingerprint
    assert _load(path, (*SCHEMA[:2], as_numeric)).schema_set_fingerprint != reordered.schema_set_fingerprint


def test_all_numeric_typed_schema_keeps_the_untyped_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    pa_csv.write_csv(pa.table(_numeric_rows()), path)
    untyped = _load(path)
    typed = _load(path, (ColumnConfig(name="a"), ColumnConfig(name="b", missing="mean")))
    assert typed.schema_fingerprint == untyped.schema_fingerprint
    assert torch.equal(typed.train_x, untyped.train_x)


def _engine(tmp_path: Path, path: Path, columns: tuple[ColumnConfig, ...], name: str) -> Engine:
    cfg = configmod.from_dict({"node": {"domain": "d"}, "model": {"name": "logreg", "num_classes": 2},
                               "data": {"path": str(path), "holdout": 0.0,
                                        "columns": [_toml_table(c) for c in columns]}}, base_dir=tmp_path)
    engine = Engine(cfg.tasks[0], tmp_path / name)
    engine.load()
    return engine


def test_engine_input_is_the_encoded_width_and_other_categories_are_refused(tmp_path: Path) -> None:
    path = _parquet(tmp_path)
    ours = _engine(tmp_path, path, SCHEMA, "ours")
    assert ours.input_dim == 7
    assert ours.schema == _load(path, SCHEMA).schema_fingerprint
    # A domain that lists ES where we list IT: the same model shape, another meaning of its inputs.
    es = ColumnConfig(name="country", type="categorical", categories=("DE", "FR", "ES"), unknown=True,
                      missing="unknown")
    theirs = _engine(tmp_path, path, (SCHEMA[0], es, SCHEMA[2]), "theirs")
    assert theirs.fingerprint == ours.fingerprint
    peers = TaskPeers(ours.fingerprint, ours.schema)
    assert peers.incompatibility(theirs.fingerprint, theirs.schema) == "schema_mismatch"
    assert peers.incompatibility(ours.fingerprint, _engine(tmp_path, path, SCHEMA, "same").schema) is None


# ------------------------------------------------------------------------------------------ describe


def test_describe_prints_a_schema_that_loads(tmp_path: Path) -> None:
    rows = {**ROWS, "when": pa.array([0] * 6, type=pa.timestamp("s"))}
    path = _parquet(tmp_path, rows)
    r = run_cli("data", "describe", str(path))
    assert r.returncode == 0, r.stderr
    assert "# skipped: when (timestamp[ms]): no feature type for it; left out" in r.stdout  # Parquet keeps ms
    described = tomllib.loads(r.stdout)["data"]
    assert [c["name"] for c in described["columns"]] == ["amount", "country", "vip"]
    assert described["columns"][1] == {"name": "country", "type": "categorical", "categories": ["DE", "FR", "IT"],
                                       "unknown": True, "missing": "unknown"}
    # pasted into a config, it validates and loads the data product
    config = tmp_path / "meshd.toml"
    config.write_text(f'[node]\ndomain = "d"\n\n{r.stdout}path = "{path.name}"\n')
    assert run_cli("config", "check", str(config)).stdout.strip() == "ok"
    cfg = configmod.load(config)
    dp = _load(cfg.data.path, cfg.data.columns)  # type: ignore[arg-type]
    assert dp.feature_names == ("amount", "amount:missing", "country=DE", "country=FR", "country=IT",
                                "country=<unknown>", "vip", "vip:missing")


def test_describe_hashes_many_categories_and_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("merchant,label\n" + "".join(f"m{i},0\n" for i in range(300)))
    r = run_cli("data", "describe", str(path))
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["data"]["columns"] == [{"name": "merchant", "type": "categorical",
                                                           "buckets": 512, "missing": "error"}]
    r = run_cli("data", "describe", str(path), "--label", "y")
    assert r.returncode == 2 and "label column 'y' not found (pass --label); available columns: merchant, label" \
        in r.stderr
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.ones((2, 2)), label=np.zeros(2))
    r = run_cli("data", "describe", str(npz))
    assert r.returncode == 2 and "an .npz data product is one numeric array" in r.stderr


# ------------------------------------------------------------------------------------------- errors


def _config_problems(data: dict[str, object], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        configmod.from_dict({"node": {"domain": "d"}, "data": data}, base_dir=tmp_path)
    return "\n".join(err.value.problems)


def test_config_errors_name_the_key_and_the_fix(tmp_path: Path) -> None:
    out = _config_problems({"columns": [{"name": "c", "type": "text"}]}, tmp_path)
    assert "data.columns[0].type: must be one of 'numeric', 'categorical', 'boolean' (got 'text')" in out
    out = _config_problems({"columns": [{"name": "a"}, {"name": "c", "type": "categorical"}]}, tmp_path)
    assert "data.columns[1].categories: a categorical column needs its category list" in out
    assert "`meshd data describe PATH` prints the list" in out
    out = _config_problems({"columns": [{"name": "c", "type": "categorical", "categories": ["x"], "buckets": 4}]},
                           tmp_path)
    assert "data.columns[0].buckets: set either categories (one-hot) or buckets (hashed), not both" in out
    out = _config_problems({"columns": [{"name": "c", "type": "categorical", "categories": ["x"], "missing": "mean"}]},
                           tmp_path)
    assert 'data.columns[0].missing: a categorical column takes "error" | "zero" | "unknown" (got \'mean\')' in out
    out = _config_problems({"columns": [{"name": "c", "type": "categorical", "categories": ["x"],
                                         "missing": "unknown"}]}, tmp_path)
    assert 'data.columns[0].missing: "unknown" puts missing cells in the unknown column, which needs unknown = true' \
        in out
    out = _config_problems({"columns": [{"name": "a", "categories": ["x"]}, {"name": "a"}, {"name": "label"}],
                            "features": ["a"]}, tmp_path)
    assert "data.features: set either data.features (untyped, all numeric) or data.columns (typed)" in out
    assert "data.columns[0].categories: only a categorical column has categories" in out
    assert "data.columns[1].name: column 'a' is declared twice" in out
    assert "data.columns[2].name: 'label' is the label column (data.label); it cannot be a feature" in out
    # in a [[task]], the key path names the task
    with pytest.raises(ConfigError, match=r"task\[0\]\.data\.columns\[0\]\.categories: a categorical column needs"):
        configmod.from_dict({"node": {"domain": "d"}, "task": [{"name": "t", "data": {
            "columns": [{"name": "c", "type": "categorical"}]}}]}, base_dir=tmp_path)


def test_a_changed_column_restarts_its_task(tmp_path: Path) -> None:
    def task(categories: list[str]) -> configmod.TaskConfig:
        return configmod.from_dict({"node": {"domain": "d"}, "data": {"columns": [
            {"name": "c", "type": "categorical", "categories": categories}]}}, base_dir=tmp_path).tasks[0]

    assert configmod.task_needs_restart(task(["x"]), task(["x", "y"])) == ["data.columns[0].categories"]


def test_data_errors_name_the_column_row_and_fix(tmp_path: Path) -> None:
    path = _parquet(tmp_path)
    absent = (*SCHEMA, ColumnConfig(name="merchant", type="categorical", buckets=4))
    with pytest.raises(DataError, match=r"column 'merchant' declared in data\.columns is not in the data product; "
                                        r"available columns: amount, country, vip, label; fix its name or remove it"):
        _load(path, absent)
    strict = ColumnConfig(name="country", type="categorical", categories=("DE", "FR"), missing="zero")
    with pytest.raises(DataError, match=re.escape(
            "feature 'country' at row 5 is 'IT', which is not in its categories; add it to the categories of column "
            "'country' in data.columns (every domain declares the same list), or set unknown = true")):
        _load(path, (strict,))
    no_missing = ColumnConfig(name="country", type="categorical", categories=("DE", "FR", "IT"))
    with pytest.raises(DataError, match=r"feature 'country' at row 3 is missing; .*set missing = \"zero\""):
        _load(path, (no_missing,))
    with pytest.raises(DataError, match=r"feature 'amount' at row 2 is missing; .*missing = \"mean\" or \"zero\""):
        _load(path, (ColumnConfig(name="amount"),))
    with pytest.raises(DataError, match=r"feature 'country' at row 1 .* non-numeric value 'FR'|non-numeric value "
                                        r"'FR' in feature column 'country' at row 1"):
        _load(path, (ColumnConfig(name="country"),))
    with pytest.raises(DataError, match=r"feature 'amount' at row 1 is 10\.0, not a boolean; a boolean column"):
        _load(_parquet(tmp_path, {"amount": [10.0], "label": [0]}, "b.parquet"),
              (ColumnConfig(name="amount", type="boolean"),))
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.ones((2, 2)), label=np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match=r"data\.columns \(a typed schema\) needs a table format"):
        _load(npz, SCHEMA)
    nothing = pa.array([None, None], type=pa.float64())
    all_missing = _parquet(tmp_path, {"amount": nothing, "label": [0, 1]}, "m.parquet")
    with pytest.raises(DataError, match=r"feature 'amount' has no value at all, so no mean"):
        _load(all_missing, (ColumnConfig(name="amount", missing="mean"),))


def test_unreadable_tables_are_data_errors(tmp_path: Path) -> None:
    folder = tmp_path / "product"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0], "label": [0, 1]}), folder / "a.parquet")
    pq.write_table(pa.table({"x": ["a", "b"], "label": [0, 1]}), folder / "b.parquet")  # x changed type
    with pytest.raises(DataError, match=r"product: cannot read data product: .*as a scalar of type double"):
        _load(folder)
    nested = _parquet(tmp_path, {"x": [[1], [2]], "label": [0, 1]})
    with pytest.raises(DataError, match=r"feature 'x' has type list<.*cannot be read as category text"):
        _load(nested, (ColumnConfig(name="x", type="categorical", buckets=2),))


def test_encoded_names_must_not_collide(tmp_path: Path) -> None:
    path = _parquet(tmp_path, {"c": ["<unknown>", "x"], "label": [0, 1]})
    cols = (ColumnConfig(name="c", type="categorical", categories=("<unknown>", "x"), unknown=True),)
    with pytest.raises(DataError, match=r"encoded feature names collide: c=<unknown>"):
        _load(path, cols)


def test_example_config_columns_uncommented_are_valid(tmp_path: Path) -> None:
    example = (Path(__file__).resolve().parent.parent / "config" / "meshd.example.toml").read_text()
    start = example.index("# columns = [")
    end = example.index("# ]\n", start) + 4
    columns = "\n".join(line[2:] for line in example[start:end].splitlines())
    text = re.sub(r"^columns = \[\] .*$", lambda _: columns, example[:start], count=1, flags=re.M) + example[end:]
    cfg = configmod.from_dict(tomllib.loads(text), base_dir=tmp_path)
    assert [(c.name, c.type) for c in cfg.tasks[0].data.columns] == [
        ("amount", "numeric"), ("country", "categorical"), ("merchant", "categorical"), ("vip", "boolean")]
    assert cfg.tasks[0].data.columns[2].buckets == 64


def test_doctor_accepts_a_parquet_folder(tmp_path: Path) -> None:
    root = tmp_path / "product"
    for country in ("DE", "FR"):
        (root / f"country={country}").mkdir(parents=True)
        pq.write_table(pa.table(_numeric_rows(4)), root / f"country={country}" / "part-0.parquet")
    cfg, *_ = init_domain(tmp_path / "d", "sales")
    set_toml(cfg, "data", "path", f'"{root}"')
    r = run_cli("doctor", "--offline", "--config", str(cfg))
    assert f"ok    data[default]: data.path {root} is readable (2 .parquet files)" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------ a daemon


def test_a_daemon_learns_from_a_partitioned_parquet_product_and_restarts_the_task_on_a_new_category(
        tmp_path: Path) -> None:
    """`meshd data describe` on a hive-partitioned Parquet folder, pasted into a real daemon's config: the task
    trains on the encoded width; a reload with another category list restarts the task with another schema."""
    root = tmp_path / "product"
    rng = np.random.default_rng(0)
    for country in ("DE", "FR"):
        part = root / f"country={country}"
        part.mkdir(parents=True)
        amount = rng.normal(0.0, 1.0, 40)
        pq.write_table(pa.table({"amount": pa.array([None if i % 7 == 0 else float(a) for i, a in enumerate(amount)]),
                                 "label": (amount > 0).astype(np.int64)}), part / "part-0.parquet")
    described = run_cli("data", "describe", str(root))
    assert described.returncode == 0, described.stderr
    columns = tomllib.loads(described.stdout)["data"]["columns"]
    assert [c["name"] for c in columns] == ["amount", "country"]
    config, _, _, status_port = init_domain(tmp_path / "d", "alpha")
    set_toml(config, "data", "path", f'"{root}"')
    set_toml(config, "data", "columns", toml_inline_tables(columns))
    set_toml(config, "model", "name", '"logreg"')
    set_toml(config, "model", "num_classes", "2")
    cfg = configmod.load(config)
    expected = _load(root, cfg.tasks[0].data.columns)
    assert expected.feature_names == ("amount", "amount:missing", "country=DE", "country=FR")
    daemon = DaemonProc(config, status_port)
    try:
        daemon.wait_ready(timeout=60)

        def trained(schema: str) -> Any:
            task = daemon.status()["tasks"]["default"]
            if task["state"] == "failed":
                raise Fatal(f"task failed: {task.get('error')}\n{daemon.logs()}")
            ok = task["model"].get("data_schema") == schema and task["training"]["steps"] > 0
            return task if ok else None

        task = wait_for(lambda: trained(expected.schema_fingerprint), timeout=90, what="training on the product")
        assert task["model"]["parameters"] == 4 * 2 + 2  # logreg over the 4 encoded inputs, 2 classes
        assert task["training"]["train_rows"] + task["training"]["holdout_rows"] == 80
        # another domain lists IT too: this one follows, and its schema (so its compatibility) changes
        widened = [{**c, "categories": ["DE", "FR", "IT"]} if c["name"] == "country" else c for c in columns]
        set_toml(config, "data", "columns", toml_inline_tables(widened))
        assert run_cli("reload", "--config", str(config)).returncode == 0
        cfg = configmod.load(config)
        after = _load(root, cfg.tasks[0].data.columns)
        assert after.schema_fingerprint != expected.schema_fingerprint
        task = wait_for(lambda: trained(after.schema_fingerprint), timeout=90, what="the task restarted")
        assert task["model"]["parameters"] == 5 * 2 + 2
        assert "BlockingError" not in daemon.logs()  # the product is read in a worker thread, never on the loop
    finally:
        daemon.stop()
