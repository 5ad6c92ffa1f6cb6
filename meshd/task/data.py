"""Load a domain's data product (Parquet, Arrow IPC / Feather, CSV or ``.npz``) into tensors, validated, with a
seeded holdout split.

Formats:

* **Tables** (``.parquet``/``.pq``, a folder of Parquet files with optional hive partitions, ``.feather``/
  ``.arrow``/``.ipc``, ``.csv`` with a header row), read column-wise through pyarrow (:mod:`meshd.task.tables`).
  ``label`` names the label column.  Untyped, ``features`` names the feature columns (default: every other
  column, in file order) and every feature cell must be a finite number.  Typed, ``columns``
  (``data.columns`` in the config) declares each feature column's type, encoding and missing-value rule, in
  order (:mod:`meshd.task.schema`); ``feature_names`` are then the encoded columns (``country=FR``).
* **NumPy** (``.npz``): ``label`` names a 1-D label array; the features are ONE 2-D array
  ``[N, D]``.  ``features``, if given, is a single-item list naming that array (e.g. ``["x"]``); by
  default it is the only array in the file besides the label.  Feature names are ``"<array>[j]"``.
  Files are opened with ``allow_pickle=False``.  :func:`meshd.task.datasets.write_npz_product` writes this
  layout (arrays ``x`` and ``label``).

Labels depend on the task kind (``model.task``, :func:`parse_labels`): integers (``3`` or ``3.0``) in
``[0, num_classes)`` for classification; 0 or 1 (also ``true``/``false``) for binary; finite numbers for
regression.

No feature scaling is done here, on purpose: a scaler fitted on one domain's data would differ from every
other domain's, and the shared model would see differently scaled inputs in each domain.  Data products
must be pre-scaled to a common, agreed scale (the demo datasets in :mod:`meshd.task.datasets` are).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from meshd.config import ColumnConfig
from meshd.errors import DataError
from meshd.task.schema import encode, schema_fingerprint
from meshd.task.tables import TABLE_SUFFIXES, TableFile, table_format

__all__ = [
    "MAX_HOLDOUT", "SUPPORTED_SUFFIXES", "DataProduct", "holdout_mask", "load_data_product", "parse_labels",
    "schema_fingerprint", "split_product",
]

MAX_HOLDOUT = 0.9
SUPPORTED_SUFFIXES = (*TABLE_SUFFIXES, ".npz")


@dataclass(frozen=True, eq=False)
class DataProduct:
    """One domain's examples, split into training and holdout rows."""

    train_x: torch.Tensor  # float32 [N_train, D]
    train_y: torch.Tensor  # int64 [N_train] (classification) or float32 [N_train] (binary 0/1, regression)
    holdout_x: torch.Tensor  # float32 [N_holdout, D] (N_holdout may be 0)
    holdout_y: torch.Tensor  # as train_y [N_holdout]
    feature_names: tuple[str, ...]  # the encoded columns, in order (country=FR for a one-hot category)
    label: str
    schema_fingerprint: str  # sha256 hex[:16] of feature names + label + dtype (+ types); advertised to peers
    columns: tuple[ColumnConfig, ...] = ()  # the typed schema it was read with; () = untyped, all numeric

    @property
    def input_dim(self) -> int:
        return len(self.feature_names)

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_holdout(self) -> int:
        return int(self.holdout_y.shape[0])

    @property
    def schema_set_fingerprint(self) -> str:
        """The fingerprint of the same schema with its columns sorted: tells "same columns, other order" apart."""
        return schema_fingerprint(sorted(self.feature_names), self.label,
                                  columns=sorted(self.columns, key=lambda c: c.name))


def load_data_product(
    path: Path,
    label: str,
    features: Sequence[str] | None,
    holdout: float,
    num_classes: int,
    seed: int,
    *,
    task: str = "classification",
    columns: Sequence[ColumnConfig] = (),
) -> DataProduct:
    """Read, validate and split a data product; every problem raises :class:`DataError` naming the file.

    ``task`` (``model.task``) says what the labels are (:func:`parse_labels`).

    ``holdout`` is the fraction of rows (rounded down, in ``[0, 0.9]``) held out for evaluation, chosen
    by a permutation seeded with ``seed``; at least one row always stays in training.  ``columns`` is a
    typed schema (``data.columns``); it replaces ``features``.
    """
    path = Path(path)
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0.0 <= holdout <= MAX_HOLDOUT:
        raise DataError(f"{path}: holdout fraction must be in [0, {MAX_HOLDOUT}], got {holdout!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"{path}: num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(features, str):
        # A bare string is a Sequence[str] of characters; that is never what the caller meant.
        features = [features]
    columns = tuple(columns)
    if not path.exists():
        raise DataError(f"{path}: data product file not found")
    suffix = path.suffix.lower()
    y_raw: Sequence[str] | np.ndarray
    if path.is_file() and suffix == ".npz":
        if columns:
            raise DataError(f"{path}: data.columns (a typed schema) needs a table format (Parquet, Arrow, CSV); "
                            f"an .npz data product is one numeric array: remove data.columns")
        x, y_raw, names = _read_npz(path, label, features)
    elif table_format(path) is not None:
        x, y_raw, names = _read_table(path, label, features, columns)
    elif not path.is_file():
        raise DataError(f"{path}: data product is not a regular file")
    else:
        raise DataError(
            f"{path}: unsupported data product extension {path.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}"
            " (or a folder of .parquet files)"
        )
    y = parse_labels(path, y_raw, task, num_classes)

    mask = holdout_mask(int(x.shape[0]), holdout, seed)
    hold_idx, train_idx = np.flatnonzero(mask), np.flatnonzero(~mask)
    # Without a holdout every row trains: no gather, only (for a column-major table) the row-major copy.
    train_x = x if hold_idx.size == 0 else x[train_idx]
    return DataProduct(
        train_x=torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)),
        train_y=torch.from_numpy(np.ascontiguousarray(y[train_idx])),
        holdout_x=torch.from_numpy(np.ascontiguousarray(x[hold_idx], dtype=np.float32)),
        holdout_y=torch.from_numpy(np.ascontiguousarray(y[hold_idx])),
        feature_names=tuple(names),
        label=label,
        schema_fingerprint=schema_fingerprint(names, label, columns=columns),
        columns=columns,
    )


def holdout_mask(n: int, holdout: float, seed: int) -> np.ndarray:
    """True for the rows held out of ``n``: ``floor(holdout * n)`` of them (at least one row trains), drawn by a
    permutation seeded with ``seed``."""
    perm = np.random.default_rng(int(seed)).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[perm[: max(0, min(math.floor(holdout * n), n - 1))]] = True
    return mask


def split_product(full: DataProduct, mask: np.ndarray) -> DataProduct:
    """``full`` (every row in ``train_x``, file order) split by ``mask`` (True = held out)."""
    held = torch.from_numpy(mask)
    return replace(full, train_x=full.train_x[~held].contiguous(), train_y=full.train_y[~held].contiguous(),
                   holdout_x=full.train_x[held].contiguous(), holdout_y=full.train_y[held].contiguous())


def parse_labels(path: Path, raw: Sequence[str] | np.ndarray, task: str, num_classes: int) -> np.ndarray:
    """The label column as the task kind needs it; a bad label raises :class:`DataError` naming its row.

    * ``classification``: int64, each an integer in ``[0, num_classes)``;
    * ``binary``: float32 0.0/1.0, from 0/1 (``1.0`` too), booleans, or the words true/false (any case);
    * ``regression``: float32, each a finite number.
    """
    if task == "classification":
        return _check_labels(path, raw, num_classes)
    if task == "binary":
        return _binary_labels(path, raw)
    if task == "regression":
        return _regression_labels(path, raw)
    raise DataError(f"{path}: model.task must be classification, binary or regression, got {task!r}")


# --------------------------------------------------------------------------------------------- helpers


def _read_table(
    path: Path, label: str, features: Sequence[str] | None, columns: tuple[ColumnConfig, ...]
) -> tuple[np.ndarray, Sequence[str] | np.ndarray, list[str]]:
    """Features as float32 [N, D] (encoded), the label column, and the encoded feature names.  Rows count from 1."""
    table_file = TableFile(path)
    header = table_file.names
    if label not in header:
        raise DataError(f"{path}: label column {label!r} not found; available columns: {', '.join(header)}")
    if columns:
        for col in columns:
            if col.name not in header:
                raise DataError(f"{path}: column {col.name!r} declared in data.columns is not in the data product; "
                                f"available columns: {', '.join(header)}; fix its name or remove it")
        specs = columns
    else:
        if features is None:
            feat_names = [h for h in header if h != label]
        else:
            feat_names = list(features)
            for name in feat_names:
                if name not in header:
                    raise DataError(
                        f"{path}: feature column {name!r} not found; available columns: {', '.join(header)}"
                    )
            repeated = sorted({name for name in feat_names if feat_names.count(name) > 1})
            if repeated:
                raise DataError(f"{path}: feature columns listed more than once: {', '.join(repeated)}")
            if label in feat_names:
                raise DataError(f"{path}: label column {label!r} is also listed as a feature")
        if not feat_names:
            raise DataError(f"{path}: no feature columns (the file has only the label column {label!r})")
        specs = tuple(ColumnConfig(name=name) for name in feat_names)
    table = table_file.read(
        [c.name for c in specs] + [label],
        as_string=[c.name for c in specs if c.type == "categorical"],
        as_float=[c.name for c in specs if c.type == "numeric"],
    )
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows (only a header)")
    encoded = encode(path, table, specs, typed=bool(columns))
    labels = _label_cells(table.column(label))
    del table
    # Hand the table's memory back now: pyarrow's allocator keeps freed pages a while, and the holdout split
    # that follows allocates the matrix again (peak RSS at a million rows: about -120 MiB, bench/dataload.py).
    pa.default_memory_pool().release_unused()
    return encoded.x, labels, list(encoded.names)


def _label_cells(column: pa.ChunkedArray) -> Sequence[str] | np.ndarray:
    """The label column as numbers (checked vectorised), or its text cells (parsed one by one)."""
    t = column.type
    if column.null_count:  # refused at the first missing one: word it as the empty cell it is
        return ["" if v is None else str(v) for v in column.to_pylist()]
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        numbers: np.ndarray = column.to_numpy()
        return numbers
    cells: list[str] = column.to_pylist()
    return cells


def _read_npz(path: Path, label: str, features: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        # np.load falls back to unpickling anything that is not a zip; say what is wrong instead.
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not a valid .npz archive (not a zip file)")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a valid .npz archive ({exc})") from exc
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(f"{path}: cannot read .npz without pickle ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read data product: {exc}") from exc
    available = ", ".join(sorted(arrays)) or "(none)"
    if not arrays:
        raise DataError(f"{path}: file is empty (the .npz holds no arrays)")
    if label not in arrays:
        raise DataError(f"{path}: label array {label!r} not found; available arrays: {available}")
    if features is None:
        others = sorted(n for n in arrays if n != label)
        if len(others) != 1:
            raise DataError(
                f"{path}: cannot choose the feature array among {others or '(none)'}; name it with features=['<array>']"
            )
        feat_array = others[0]
    else:
        if len(features) != 1:
            raise DataError(
                f"{path}: for .npz data products, features must name exactly one 2-D array, got {list(features)}"
            )
        feat_array = features[0]
        if feat_array not in arrays:
            raise DataError(f"{path}: feature array {feat_array!r} not found; available arrays: {available}")
        if feat_array == label:
            raise DataError(f"{path}: label array {label!r} is also named as the feature array")
    x = arrays[feat_array]
    y = arrays[label]
    if x.ndim != 2:
        raise DataError(f"{path}: feature array {feat_array!r} must be 2-D [rows, features], got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{path}: label array {label!r} must be 1-D, got shape {y.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: no data rows (feature array {feat_array!r} has 0 rows)")
    if x.shape[1] == 0:
        raise DataError(f"{path}: feature array {feat_array!r} has no columns")
    if y.shape[0] != x.shape[0]:
        raise DataError(
            f"{path}: label array {label!r} has {y.shape[0]} rows, feature array {feat_array!r} has {x.shape[0]}"
        )
    names = [f"{feat_array}[{j}]" for j in range(x.shape[1])]
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise DataError(f"{path}: feature array {feat_array!r} is not numeric (dtype {x.dtype})")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_) or np.iscomplexobj(y):
        raise DataError(f"{path}: label array {label!r} is not numeric (dtype {y.dtype})")
    xf = x.astype(np.float64)
    _check_finite(path, xf, names)
    return xf, y, names


def _check_finite(path: Path, x: np.ndarray, names: Sequence[str]) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            f"{path}: feature {names[col]!r} at row {row + 1} is {float(x[row, col])}; "
            "data products must contain only finite numbers"
        )


def _check_labels(path: Path, raw: Sequence[str] | np.ndarray, num_classes: int) -> np.ndarray:
    """Labels as int64, each an integer in [0, num_classes); rows count from 1."""
    if isinstance(raw, np.ndarray):
        # Vectorised check; the per-cell loop below only runs to word the error for the first bad label.
        if np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_:
            vals = raw.astype(np.int64)
            whole = np.ones(raw.shape, dtype=bool)
        else:
            f = raw.astype(np.float64)
            whole = np.isfinite(f) & (f == np.floor(np.where(np.isfinite(f), f, 0.0)))
            vals = np.where(whole, f, 0.0).astype(np.int64)
        bad = ~whole | (vals < 0) | (vals >= num_classes)
        if not bad.any():
            return vals
        first = int(np.argmax(bad))
        _check_labels_slow(path, raw[first:], num_classes, first)
        raise AssertionError("unreachable: the slow check raises for the first bad label")
    return _check_labels_slow(path, raw, num_classes, 0)


def _check_labels_slow(path: Path, raw: Sequence[object] | np.ndarray, num_classes: int, start: int) -> np.ndarray:
    out = np.empty(len(raw), dtype=np.int64)
    for j, cell in enumerate(raw):
        i = start + j
        value = _parse_label(cell)
        if value is None:
            raise DataError(f"{path}: label {_show(cell)} at row {i + 1} is not an integer")
        if not 0 <= value < num_classes:
            raise DataError(
                f"{path}: label {value} at row {i + 1} cannot be represented by a model with "
                f"num_classes={num_classes} (labels must be integers in [0, {num_classes}))"
            )
        out[i] = value
    return out


def _parse_label(cell: object) -> int | None:
    if isinstance(cell, str):
        text = cell.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            f = float(text)
        except ValueError:
            return None
    else:
        try:
            f = float(cell)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
    if not math.isfinite(f) or not f.is_integer():
        return None
    return int(f)


_BOOL_WORDS = {"true": 1.0, "false": 0.0}


def _binary_labels(path: Path, raw: Sequence[object] | np.ndarray) -> np.ndarray:
    if isinstance(raw, np.ndarray) and (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_):
        f = raw.astype(np.float64)
        bad = (f != 0.0) & (f != 1.0)  # NaN is neither
        if not bad.any():
            return f.astype(np.float32)
        first = int(np.argmax(bad))
        raise DataError(f"{path}: label {_show(raw[first])} at row {first + 1} is not 0 or 1 (model.task = "
                        "\"binary\" needs labels 0/1 or true/false)")
    out = np.empty(len(raw), dtype=np.float32)
    for i, cell in enumerate(raw):
        word = _BOOL_WORDS.get(cell.strip().lower()) if isinstance(cell, str) else None
        value = word if word is not None else _parse_label(cell)
        if value not in (0, 1):
            raise DataError(f"{path}: label {_show(cell)} at row {i + 1} is not 0 or 1 (model.task = "
                            "\"binary\" needs labels 0/1 or true/false)")
        out[i] = float(value)
    return out


def _regression_labels(path: Path, raw: Sequence[object] | np.ndarray) -> np.ndarray:
    if isinstance(raw, np.ndarray) and (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_):
        f = raw.astype(np.float64)
    else:
        f = np.empty(len(raw), dtype=np.float64)
        for i, cell in enumerate(raw):
            try:
                f[i] = float(cell.strip() if isinstance(cell, str) else cell)
            except (TypeError, ValueError):
                raise DataError(f"{path}: label {_show(cell)} at row {i + 1} is not a number "
                                "(model.task = \"regression\" needs numeric targets)") from None
    bad = ~np.isfinite(f) | (np.abs(f) > np.finfo(np.float32).max)
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(f"{path}: label {f[first]} at row {first + 1} is not a finite number "
                        "(model.task = \"regression\" needs finite targets)")
    return f.astype(np.float32)


def _show(cell: object) -> str:
    return repr(cell) if isinstance(cell, str) else str(cell)
