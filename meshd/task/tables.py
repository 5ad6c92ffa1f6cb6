"""Read a tabular data product (Parquet file or folder, Arrow IPC / Feather, CSV) into an Arrow table, column-wise.

Every format goes through pyarrow: files are decoded in C++ into typed columns (no Python loop over rows), and
only the columns asked for are read from Parquet and Arrow files.  A folder is a Parquet dataset: every
``*.parquet`` file under it, in path order, with hive-style partition folders (``country=FR/part.parquet``)
adding their key as a column.  Files and folders whose names start with ``.`` or ``_`` (``_SUCCESS``,
``.crc``) are skipped.

CSV: a header row, then one row per example; header names are stripped of surrounding spaces.  Empty cells and
the markers in :data:`CSV_NULLS` are missing values; ``nan`` and ``inf`` are numbers.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as pa_ds

from meshd.errors import DataError

__all__ = ["CSV_NULLS", "TABLE_SUFFIXES", "TableFile", "table_format"]

#: File suffix -> pyarrow format. A folder is read as a Parquet dataset.
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".feather": "ipc", ".arrow": "ipc",
                  ".ipc": "ipc"}
#: CSV cells read as missing (besides quoted empty strings). "nan" is not among them: it is a number, refused
#: by an untyped column and counted as missing by a typed numeric one (meshd.task.schema).
CSV_NULLS = ("", "NA", "N/A", "n/a", "NULL", "null", "None", "#N/A")


def table_format(path: Path) -> str | None:
    """"csv", "parquet" or "ipc" for a path this module reads (a folder is "parquet"); None otherwise."""
    if path.is_dir():
        return "parquet"
    return TABLE_SUFFIXES.get(path.suffix.lower())


class TableFile:
    """One tabular data product: its column names (read from the header or footer only) and :meth:`read`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fmt = table_format(path)
        if fmt is None:
            raise DataError(f"{path}: not a table format ({', '.join(TABLE_SUFFIXES)}, or a folder of Parquet files)")
        self.format = fmt
        self._csv_names: dict[str, str] = {}  # stripped header name -> name as written
        self._dataset: pa_ds.Dataset | None = None
        if fmt == "csv":
            raw = self._csv_header()
            self.names = [name.strip() for name in raw]
            self._csv_names = dict(zip(self.names, raw, strict=True))
        else:
            self._dataset = self._open_dataset()
            self.names = list(self._dataset.schema.names)
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise DataError(f"{path}: duplicate column names in header: {', '.join(dupes)}")

    def read(self, columns: Sequence[str], as_string: Collection[str] = (), as_float: Collection[str] = ()) -> pa.Table:
        """The named columns, in that order.  CSV columns in ``as_string`` are read as text (category values keep
        their leading zeros), those in ``as_float`` as float64; Parquet and Arrow columns keep their stored type."""
        try:
            if self._dataset is not None:
                table = self._dataset.to_table(columns=list(columns))
            else:
                table = self._read_csv(columns, as_string, as_float)
        except (pa.ArrowException, OSError) as exc:  # e.g. a file of a folder whose column types differ
            raise DataError(f"{self.path}: cannot read data product: {exc}") from exc
        return table

    # --- helpers ------------------------------------------------------------------------------------------

    def _open_dataset(self) -> pa_ds.Dataset:
        path = self.path
        try:
            if path.is_dir():
                files = [p for p in path.rglob("*.parquet") if p.is_file()
                         and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)]
                if not files:
                    raise DataError(f"{path}: folder holds no .parquet files (a folder data product is a Parquet "
                                    "dataset: *.parquet files, optionally in hive partitions like country=FR/)")
                return pa_ds.dataset(sorted(str(p) for p in files), format="parquet",
                                     partitioning=pa_ds.partitioning(flavor="hive"), partition_base_dir=str(path))
            return pa_ds.dataset(str(path), format=self.format)
        except (pa.ArrowException, OSError) as exc:
            kind = "Parquet" if self.format == "parquet" else "Arrow IPC / Feather"
            raise DataError(f"{path}: not a readable {kind} data product ({exc})") from exc

    def _csv_header(self) -> list[str]:
        try:
            reader = pa_csv.open_csv(self.path, convert_options=_csv_convert({}, ()))
            names = list(reader.schema.names)
            reader.close()
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                raise DataError(f"{self.path}: file is empty (expected a header row)") from exc
            raise DataError(f"{self.path}: malformed CSV: {_ragged(exc)}") from exc
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read data product: {exc}") from exc
        return names

    def _read_csv(self, columns: Sequence[str], as_string: Collection[str], as_float: Collection[str]) -> pa.Table:
        raw = [self._csv_names[c] for c in columns]
        types = {self._csv_names[c]: pa.string() for c in as_string}
        types |= {self._csv_names[c]: pa.float64() for c in as_float}
        try:
            # Streamed block by block: half the peak memory of read_csv, which holds every block's text at once.
            with pa_csv.open_csv(self.path, convert_options=_csv_convert(types, raw)) as reader:
                table = pa.Table.from_batches(list(reader), schema=reader.schema)
        except pa.ArrowInvalid as exc:
            if "conversion error" not in str(exc):
                raise DataError(f"{self.path}: malformed CSV: {_ragged(exc)}") from exc
            # A cell that is not a number where one was expected (or where type inference, which looks at the
            # first block only, guessed one): read those columns as text; meshd.task.schema names the cell.
            text = {self._csv_names[c]: pa.string() for c in columns}
            table = pa_csv.read_csv(self.path, convert_options=_csv_convert(text, raw))
        return table.rename_columns(list(columns))


def _csv_convert(types: dict[str, pa.DataType], include: Sequence[str]) -> pa_csv.ConvertOptions:
    return pa_csv.ConvertOptions(column_types=types, include_columns=list(include), null_values=list(CSV_NULLS),
                                 strings_can_be_null=True, quoted_strings_can_be_null=True)


def _ragged(exc: Exception) -> str:
    m = re.search(r"Expected (\d+) columns, got (\d+): (.*)", str(exc))
    if m:
        return f"a row has {m.group(2)} fields, the header has {m.group(1)} (row {m.group(3)[:80]!r})"
    return str(exc)
