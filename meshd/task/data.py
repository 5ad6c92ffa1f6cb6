"""Load a domain's data product (CSV or ``.npz``) into tensors, validated, with a seeded holdout split.

Formats:

* **CSV** (``.csv``): a header row, then one row per example.  ``label`` names the label column;
  ``features`` names the feature columns (default: every other column, in file order).  All feature
  cells must be finite numbers.
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

import csv
import hashlib
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meshd.errors import DataError

__all__ = [
    "MAX_HOLDOUT", "SUPPORTED_SUFFIXES", "DataProduct", "load_data_product", "parse_labels", "schema_fingerprint",
]

MAX_HOLDOUT = 0.9
SUPPORTED_SUFFIXES = (".csv", ".npz")


@dataclass(frozen=True, eq=False)
class DataProduct:
    """One domain's examples, split into training and holdout rows."""

    train_x: torch.Tensor  # float32 [N_train, D]
    train_y: torch.Tensor  # int64 [N_train] (classification) or float32 [N_train] (binary 0/1, regression)
    holdout_x: torch.Tensor  # float32 [N_holdout, D] (N_holdout may be 0)
    holdout_y: torch.Tensor  # as train_y [N_holdout]
    feature_names: tuple[str, ...]
    label: str
    schema_fingerprint: str  # sha256 hex[:16] of feature names + label + dtype; advertised to peers

    @property
    def input_dim(self) -> int:
        return len(self.feature_names)

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_holdout(self) -> int:
        return int(self.holdout_y.shape[0])


def load_data_product(
    path: Path,
    label: str,
    features: Sequence[str] | None,
    holdout: float,
    num_classes: int,
    seed: int,
    *,
    task: str = "classification",
) -> DataProduct:
    """Read, validate and split a data product; every problem raises :class:`DataError` naming the file.

    ``task`` (``model.task``) says what the labels are (:func:`parse_labels`).

    ``holdout`` is the fraction of rows (rounded down, in ``[0, 0.9]``) held out for evaluation, chosen
    by a permutation seeded with ``seed``; at least one row always stays in training.
    """
    path = Path(path)
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0.0 <= holdout <= MAX_HOLDOUT:
        raise DataError(f"{path}: holdout fraction must be in [0, {MAX_HOLDOUT}], got {holdout!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"{path}: num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(features, str):
        # A bare string is a Sequence[str] of characters; that is never what the caller meant.
        features = [features]
    if not path.exists():
        raise DataError(f"{path}: data product file not found")
    if not path.is_file():
        raise DataError(f"{path}: data product is not a regular file")
    suffix = path.suffix.lower()
    y_raw: Sequence[str] | np.ndarray
    if suffix == ".csv":
        x, y_raw, names = _read_csv(path, label, features)
    elif suffix == ".npz":
        x, y_raw, names = _read_npz(path, label, features)
    else:
        raise DataError(
            f"{path}: unsupported data product extension {path.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    y = parse_labels(path, y_raw, task, num_classes)

    n = int(x.shape[0])
    rng = np.random.default_rng(int(seed))
    perm = rng.permutation(n)
    n_holdout = min(math.floor(holdout * n), n - 1)
    hold_idx = np.sort(perm[:n_holdout])
    train_idx = np.sort(perm[n_holdout:])
    return DataProduct(
        train_x=torch.from_numpy(np.ascontiguousarray(x[train_idx], dtype=np.float32)),
        train_y=torch.from_numpy(np.ascontiguousarray(y[train_idx])),
        holdout_x=torch.from_numpy(np.ascontiguousarray(x[hold_idx], dtype=np.float32)),
        holdout_y=torch.from_numpy(np.ascontiguousarray(y[hold_idx])),
        feature_names=tuple(names),
        label=label,
        schema_fingerprint=schema_fingerprint(names, label),
    )


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


def schema_fingerprint(feature_names: Sequence[str], label: str, dtype: str = "float32") -> str:
    """sha256 hex[:16] over the canonical JSON of feature names, label name and feature dtype."""
    canonical = json.dumps(
        {"features": list(feature_names), "label": label, "dtype": dtype}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- helpers


def _read_csv(path: Path, label: str, features: Sequence[str] | None) -> tuple[np.ndarray, list[str], list[str]]:
    """Return features as float64 [N, D], raw label cells, and feature names.  Rows count from 1."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: file is empty (expected a header row)")
            header = [h.strip() for h in header]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(f"{path}: duplicate column names in header: {', '.join(dupes)}")
            if label not in header:
                raise DataError(f"{path}: label column {label!r} not found; available columns: {', '.join(header)}")
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
            feat_idx = [header.index(name) for name in feat_names]
            label_idx = header.index(label)
            width = len(header)
            rows: list[list[float]] = []
            labels: list[str] = []
            for row_no, row in enumerate(reader, start=1):
                if not row:
                    continue  # blank line
                if len(row) != width:
                    raise DataError(f"{path}: row {row_no} has {len(row)} fields, the header has {width}")
                try:
                    rows.append([float(row[i]) for i in feat_idx])
                except ValueError:
                    for name, i in zip(feat_names, feat_idx, strict=True):
                        try:
                            float(row[i])
                        except ValueError:
                            raise DataError(
                                f"{path}: non-numeric value {row[i]!r} in feature column {name!r} at row {row_no}"
                            ) from None
                    raise  # unreachable: some cell failed above
                labels.append(row[label_idx])
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV file ({exc})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read data product: {exc}") from exc
    if not rows:
        raise DataError(f"{path}: no data rows (only a header)")
    x = np.asarray(rows, dtype=np.float64)
    _check_finite(path, x, feat_names)
    return x, labels, feat_names


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
