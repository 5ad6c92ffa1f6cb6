"""The typed schema contract of a data product: encode typed Arrow columns into the model's input, fingerprint the
schema, and infer a schema from a file (``meshd data describe``).

A feature column is ``numeric`` (a float), ``boolean`` (0/1), or ``categorical``: one-hot over a declared
category list (``country=FR``; values not in the list go to ``country=<unknown>`` when ``unknown = true``), or
hashed into ``buckets`` columns (``country#0`` ...).  A missing cell (empty, null, NaN in a typed numeric
column) is refused, or becomes the column's mean, 0, or the unknown category; ``indicator = true`` adds a 0/1
column ``name:missing``.  Columns are converted whole, in C++ (pyarrow.compute) and numpy; Python loops run
over a column's distinct values (hashing, boolean words), never over its rows, except to word an error.

The model's input is the encoded width, and the schema fingerprint covers every encoded column name (so the
category lists and their order), the label, and the type of every non-numeric column.  A schema of numeric
columns alone has exactly the fingerprint of the untyped data product with the same columns.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tomlkit

from meshd.config import ColumnConfig
from meshd.errors import DataError
from meshd.task.tables import TABLE_SUFFIXES, TableFile, table_format

__all__ = ["Encoded", "describe", "describe_data_product", "encode", "encoded_names", "schema_fingerprint"]

UNKNOWN = "<unknown>"
MISSING_SUFFIX = ":missing"
#: `meshd data describe`: a text column with more distinct values than this is hashed, not listed.
MAX_LISTED_CATEGORIES = 50
_BOOL_WORDS = {"true": 1.0, "false": 0.0, "t": 1.0, "f": 0.0, "yes": 1.0, "no": 0.0, "y": 1.0, "n": 0.0,
               "1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0}


@dataclass(frozen=True, eq=False)
class Encoded:
    """The model's input for one table: float32 [N, D] and the names of its D columns."""

    x: np.ndarray
    names: tuple[str, ...]


def encoded_names(col: ColumnConfig) -> list[str]:
    """The model input columns one feature column becomes, in order."""
    if col.type == "categorical" and col.buckets:
        names = [f"{col.name}#{k}" for k in range(col.buckets)]
    elif col.type == "categorical":
        names = [f"{col.name}={c}" for c in col.categories] + ([f"{col.name}={UNKNOWN}"] if col.unknown else [])
    else:
        names = [col.name]
    return names + ([col.name + MISSING_SUFFIX] if col.indicator else [])


def schema_fingerprint(feature_names: Sequence[str], label: str, dtype: str = "float32",
                       columns: Sequence[ColumnConfig] = ()) -> str:
    """sha256 hex[:16] over the canonical JSON of the encoded feature names (in order), the label name, the
    feature dtype and, for each non-numeric column, its name, type, category list or bucket count."""
    doc: dict[str, object] = {"features": list(feature_names), "label": label, "dtype": dtype}
    typed = [[c.name, c.type, list(c.categories), c.buckets, c.unknown] for c in columns if c.type != "numeric"]
    if typed:  # numeric columns are what an untyped data product holds: their names say all
        doc["types"] = typed
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def encode(path: object, table: pa.Table, columns: Sequence[ColumnConfig], *, typed: bool = True) -> Encoded:
    """Encode ``table``'s feature columns (named by ``columns``, in order) into the model's input.

    ``typed=False`` is the untyped data product: every column numeric, a NaN refused as not finite.
    Every problem raises :class:`DataError` naming ``path``, the column, the row (from 1) and the fix."""
    n = table.num_rows
    width = sum(len(encoded_names(c)) for c in columns)
    # Column-major: each feature is written as one contiguous run (row-major writes of a column are strided,
    # ~15x slower at a million rows); the holdout split's row gather returns row-major copies anyway.
    x = np.empty((n, width), dtype=np.float32, order="F")
    names: list[str] = []
    j = 0
    for col in columns:
        where = _Where(path, col, typed)
        arr = _column(table, col.name)
        if col.type == "categorical":
            block, missing = _categorical(where, arr)
        else:
            values, missing = (_numeric if col.type == "numeric" else _boolean)(where, arr)
            block = _fill(where, values, missing)[:, None]
        if col.indicator:
            block = np.concatenate([block, missing[:, None].astype(np.float32)], axis=1)
        x[:, j:j + block.shape[1]] = block
        j += block.shape[1]
        names.extend(encoded_names(col))
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: encoded feature names collide: {', '.join(repeated)}; rename a category or column")
    return Encoded(x, tuple(names))


def describe(table: pa.Table, label: str) -> tuple[list[ColumnConfig], list[str]]:
    """A typed schema inferred from a table: one column per feature (every column but ``label``), and a note
    for each column that has no feature type (dates, nested...), which is left out."""
    cols: list[ColumnConfig] = []
    skipped: list[str] = []
    for name in table.column_names:
        if name == label:
            continue
        arr = _column(table, name)
        t = arr.type
        nulls = arr.null_count > 0
        if pa.types.is_boolean(t):
            cols.append(ColumnConfig(name=name, type="boolean", missing="mean" if nulls else "error", indicator=nulls))
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            if pa.types.is_floating(t):
                nulls = nulls or bool(pc.any(pc.is_nan(arr)).as_py())
            cols.append(ColumnConfig(name=name, type="numeric", missing="mean" if nulls else "error", indicator=nulls))
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            values = sorted(v for v in pc.unique(arr.drop_null()).to_pylist())
            if len(values) <= MAX_LISTED_CATEGORIES:
                cols.append(ColumnConfig(name=name, type="categorical", categories=tuple(values), unknown=nulls,
                                         missing="unknown" if nulls else "error"))
            else:
                buckets = min(1024, 1 << math.ceil(math.log2(len(values))))
                cols.append(ColumnConfig(name=name, type="categorical", buckets=buckets,
                                         missing="zero" if nulls else "error"))
        else:
            skipped.append(f"{name} ({t}): no feature type for it; left out")
    return cols, skipped


def describe_data_product(path: Path, label: str) -> str:
    """``meshd data describe``'s output: the inferred schema of a table data product as a ``[data]`` table to
    paste into the config, with comments."""
    if table_format(path) is None:
        raise DataError(f"{path}: describe reads tables ({', '.join(TABLE_SUFFIXES)}, or a folder of Parquet "
                        "files); an .npz data product is one numeric array and needs no schema")
    table_file = TableFile(path)
    if label not in table_file.names:
        raise DataError(f"{path}: label column {label!r} not found (pass --label); available columns: "
                        f"{', '.join(table_file.names)}")
    table = table_file.read(table_file.names, as_string=[])
    cols, skipped = describe(table, label)
    lines = [
        f"# meshd data describe {path}: {table.num_rows} rows, {len(cols)} feature columns "
        f"(model input width {sum(len(encoded_names(c)) for c in cols)})",
        "# Paste into the config: the keys below go in [data], or in a [[task]]'s [task.data] table.",
        "# Every domain of a mesh must declare the same columns, types and category lists (they are part of",
        "# the schema fingerprint): merge the category lists of all domains, or set unknown = true.",
    ]
    lines += [f"# skipped: {note}" for note in skipped]
    lines += ["[data]", f"label = {_toml(label)}", "columns = ["]
    for col in cols:
        arr = table.column(col.name)
        lines.append(f"  # {col.name}: {arr.type}, {arr.null_count} missing")
        lines.append(f"  {_toml(_column_table(col))},")
    lines.append("]")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- helpers


def _column(table: pa.Table, name: str) -> pa.Array:
    """One column as a single array of plain values (dictionary-encoded columns, e.g. Parquet's, decoded)."""
    arr = table.column(name).combine_chunks()
    return arr.dictionary_decode() if isinstance(arr.type, pa.DictionaryType) else arr


@dataclass(frozen=True)
class _Where:
    """The column being encoded, to word errors."""

    path: object
    col: ColumnConfig
    typed: bool

    def fail(self, what: str, row: int, fix: str) -> DataError:
        return DataError(f"{self.path}: feature {self.col.name!r} at row {row + 1} {what}; {fix}")


def _numeric(where: _Where, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (0 where missing) and the missing mask; a NaN is missing in a typed column."""
    t = arr.type
    if pa.types.is_float64(t):
        f = arr
    elif pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        f = pc.cast(arr, pa.float64())
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        f = _parse_floats(where, arr)
    else:
        raise DataError(f"{where.path}: feature {where.col.name!r} has type {t}, which is not numeric; declare "
                        f"its type in data.columns, or leave it out of the features")
    if not f.null_count:  # the common case: no copy of the column, no mask to build
        values = f.to_numpy(zero_copy_only=False)
        if np.isfinite(values).all():
            return values, np.zeros(len(values), dtype=bool)
        missing = np.zeros(len(values), dtype=bool)
    else:
        missing = f.is_null().to_numpy(zero_copy_only=False)
        values = f.fill_null(0.0).to_numpy(zero_copy_only=False)
    nan = np.isnan(values)
    if nan.any():
        if not where.typed:
            row = int(np.argmax(nan))
            raise DataError(f"{where.path}: feature {where.col.name!r} at row {row + 1} is nan; data products must "
                            f"contain only finite numbers (declare the column in data.columns with missing = "
                            f"\"mean\" or \"zero\" to read NaN as missing)")
        missing = missing | nan
        values = np.where(nan, 0.0, values)
    inf = np.isinf(values)
    if inf.any():
        row = int(np.argmax(inf))
        raise DataError(f"{where.path}: feature {where.col.name!r} at row {row + 1} is {values[row]}; "
                        "data products must contain only finite numbers")
    return values, missing


def _parse_floats(where: _Where, arr: pa.Array) -> pa.Array:
    """Text cells as float64, in C++; cells it refuses (spaces around a number) through Python's float()."""
    if pa.types.is_binary(arr.type):
        try:
            arr = arr.cast(pa.string())
        except pa.ArrowInvalid:
            bad = next(i for i, v in enumerate(arr.to_pylist()) if v is not None and not _utf8(v))
            raise where.fail("is not UTF-8 text", bad, "the data product must be UTF-8") from None
    try:
        return pc.cast(arr, pa.float64())
    except pa.ArrowInvalid:
        pass
    out: list[float | None] = []
    for i, cell in enumerate(arr.to_pylist()):  # only for a column the fast path refused: word the bad cell
        try:
            out.append(None if cell is None else float(cell))
        except ValueError:
            raise DataError(f"{where.path}: non-numeric value {cell!r} in feature column {where.col.name!r} at row "
                            f"{i + 1}" + ("" if where.typed else "; declare its type (categorical?) in "
                                          "data.columns, or leave it out of data.features")) from None
    return pa.array(out, type=pa.float64())


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _boolean(where: _Where, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """0/1 values and the missing mask, from booleans, numbers 0/1, or words (true/false, yes/no, t/f...)."""
    t = arr.type
    if pa.types.is_boolean(t):
        f = pc.cast(arr, pa.float64())
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        f = pc.cast(arr, pa.float64())
        ok = pc.fill_null(pc.is_in(f, value_set=pa.array([0.0, 1.0])), True).to_numpy(zero_copy_only=False)
        if not ok.all():
            row = int(np.argmin(ok))
            raise where.fail(f"is {f[row].as_py()}, not a boolean", row,
                             "a boolean column holds true/false (or 0/1); declare it numeric if it is a number")
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        f = _map_distinct(arr, lambda v: _BOOL_WORDS.get(v.strip().lower()), pa.float64())
        bad = (f.is_null().to_numpy(zero_copy_only=False) & ~arr.is_null().to_numpy(zero_copy_only=False))
        if bad.any():
            row = int(np.argmax(bad))
            raise where.fail(f"is {arr[row].as_py()!r}, not a boolean", row,
                             "a boolean column holds true/false, yes/no, t/f or 1/0")
    else:
        raise DataError(f"{where.path}: feature {where.col.name!r} has type {t}, which cannot be a boolean")
    missing = f.is_null().to_numpy(zero_copy_only=False)
    return f.fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64, copy=False), missing


def _fill(where: _Where, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """float32 values, missing cells filled as the column's `missing` says."""
    if missing.any():
        how = where.col.missing if where.typed else "error"
        if how == "error":
            row = int(np.argmax(missing))
            raise where.fail("is missing", row, "fill it in the data product, or declare the column in data.columns "
                             "with missing = \"mean\" or \"zero\" (and indicator = true to keep where it was missing)")
        if how == "mean":
            present = ~missing
            if not present.any():
                raise DataError(f"{where.path}: feature {where.col.name!r} has no value at all, so no mean to fill "
                                f"missing cells with; use missing = \"zero\" or leave the column out")
            values = np.where(missing, values[present].mean(), values)
    return values.astype(np.float32)


def _categorical(where: _Where, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """One-hot [N, width] of a categorical column and its missing mask."""
    col = where.col
    try:
        text = arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())
    except pa.ArrowException:
        raise DataError(f"{where.path}: feature {col.name!r} has type {arr.type}, whose values cannot be read as "
                        f"category text; declare another type for it, or leave it out") from None
    missing = text.is_null().to_numpy(zero_copy_only=False)
    n = len(text)
    if col.buckets:
        index = _map_distinct(text, lambda v: _bucket(v, col.buckets), pa.int64())
        width = col.buckets
    else:
        index = pc.index_in(text, value_set=pa.array(list(col.categories), type=pa.string()))
        width = len(col.categories) + (1 if col.unknown else 0)
    idx = index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    unlisted = (idx < 0) & ~missing
    if unlisted.any():
        if not col.unknown:
            row = int(np.argmax(unlisted))
            raise where.fail(f"is {text[row].as_py()!r}, which is not in its categories", row,
                             f"add it to the categories of column {col.name!r} in data.columns (every domain "
                             f"declares the same list), or set unknown = true to map unlisted values to "
                             f"{col.name}={UNKNOWN}")
        idx[unlisted] = len(col.categories)
    if missing.any():
        if col.missing == "error":
            row = int(np.argmax(missing))
            raise where.fail("is missing", row, "fill it in the data product, or set missing = \"zero\" (no "
                             "category) or \"unknown\" (with unknown = true) for column "
                             f"{col.name!r} in data.columns")
        idx[missing] = len(col.categories) if col.missing == "unknown" else -1
    block = np.zeros((n, width), dtype=np.float32)
    rows = np.flatnonzero(idx >= 0)
    block[rows, idx[rows]] = 1.0
    return block, missing


def _map_distinct(arr: pa.Array, fn: object, out_type: pa.DataType) -> pa.Array:
    """``fn`` applied to each distinct non-null value (a Python loop over distinct values, not rows)."""
    enc = arr.dictionary_encode()
    mapped = pa.array([fn(v) for v in enc.dictionary.to_pylist()], type=out_type)  # type: ignore[operator]
    return mapped.take(enc.indices)


def _bucket(value: str, buckets: int) -> int:
    """A stable hash (the same on every domain and every run, unlike Python's hash()) into [0, buckets)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def _column_table(col: ColumnConfig) -> dict[str, object]:
    out: dict[str, object] = {"name": col.name, "type": col.type}
    if col.categories:
        out["categories"] = list(col.categories)
    if col.buckets:
        out["buckets"] = col.buckets
    if col.unknown:
        out["unknown"] = True
    out["missing"] = col.missing
    if col.indicator:
        out["indicator"] = True
    return out


def _toml(value: object) -> str:
    """A TOML value on one line (strings escaped as TOML wants, tables inline)."""
    if isinstance(value, dict):
        table = tomlkit.inline_table()
        table.update(value)
        return table.as_string()
    return tomlkit.item(value).as_string()
