"""Data product loading: time and peak RSS of `load_data_product` on a 1-million-row, 30-column file, CSV and
Parquet through pyarrow, against the CSV reader meshd had before (csv module, one Python float list per row).

Run: ``.venv/bin/python bench/dataload.py [--quick] [--rows N] [--out FILE]`` (default
bench/results/dataload.json; ``--quick``: 100,000 rows, bench/results/dataload-quick.json).

The old reader is not copied here: its module, ``meshd/task/data.py`` as of commit ``OLD_READER_COMMIT`` (the
last one with the csv-module reader), is read from git history (``git show``) and imported under another name, so
the comparison runs today's code against the real old code.  Each reader runs in its own child process, once per
repetition, and its peak RSS is that child's own ``ru_maxrss`` (``os.wait4``), so readers never share a heap; a
child that imports everything and loads nothing gives the baseline that the ``loaded`` figures subtract.
Both readers do the same whole job: read, validate, encode, split (holdout 0.2) into float32/int64 tensors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "dataload.json"
OLD_READER_COMMIT = "f957c36"  # main before data products went through pyarrow
COLS = 30
CLASSES = 10
READERS = ("baseline", "old_csv", "new_csv", "new_parquet")


def make_files(directory: Path, rows: int, seed: int = 0) -> dict[str, Path]:
    """A CSV and a Parquet file with the same rows: 30 float features (4 decimals, as exports print them) and an
    integer label."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    columns = {f"f{j}": np.round(rng.normal(0.0, 10.0 ** (j % 7 - 3), rows), 4) for j in range(COLS)}
    columns["label"] = rng.integers(0, CLASSES, rows)
    table = pa.table(columns)
    paths = {"csv": directory / "product.csv", "parquet": directory / "product.parquet"}
    pa_csv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"])
    return paths


def make_child(directory: str, rows: str) -> None:
    """Write the files in a child process, so the parent stays small: a child's ru_maxrss would count the
    parent's pages that it inherits at fork."""
    paths = make_files(Path(directory), int(rows))
    print(json.dumps({k: str(p) for k, p in paths.items()}))


def child(reader: str, path: str) -> None:
    """One measurement, in a child process: print the load time and what was loaded, as JSON."""
    import numpy  # noqa: F401  (the baseline imports what every reader imports)
    import pyarrow  # noqa: F401
    import torch

    from meshd.task import data as new

    loader = new.load_data_product
    if reader == "old_csv":
        loader = _old_module().load_data_product
    result: dict[str, Any] = {"reader": reader}
    if reader != "baseline":
        t0 = time.perf_counter()
        dp = loader(Path(path), "label", None, 0.2, CLASSES, 0)
        result["seconds"] = time.perf_counter() - t0
        result["rows"] = dp.num_train + dp.num_holdout
        result["input_dim"] = dp.input_dim
        result["schema_fingerprint"] = dp.schema_fingerprint
        # summed in float64 on the fly (no float64 copy of the matrix to inflate the peak)
        result["checksum"] = float(dp.train_x.sum(dtype=torch.float64) + dp.holdout_x.sum(dtype=torch.float64))
    print(json.dumps(result))


def _old_module() -> Any:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_READER_COMMIT}:meshd/task/data.py"],
                            check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix="_old_data.py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("meshd_old_data", f.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def measure(reader: str, path: Path) -> dict[str, Any]:
    """Run one reader in a child process; its own peak RSS from wait4, not the parent's or a sibling's."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", reader, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{reader} failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out)
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 rows, one repetition (smoke run)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2, help="runs per reader; the fastest is reported")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON results (default {DEFAULT_OUT}; with --quick, dataload-quick.json beside it)")
    ap.add_argument("--child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--make", nargs=2, metavar=("DIR", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.make:
        make_child(*args.make)
        return
    rows, repeat = (100_000, 1) if args.quick else (args.rows, args.repeat)
    out = args.out or (DEFAULT_OUT.with_name("dataload-quick.json") if args.quick else DEFAULT_OUT)
    with tempfile.TemporaryDirectory(prefix="meshd-dataload-") as tmp:
        t0 = time.perf_counter()
        made = subprocess.run([sys.executable, __file__, "--make", tmp, str(rows)], check=True, capture_output=True,
                              text=True, cwd=REPO).stdout
        paths = {k: Path(p) for k, p in json.loads(made).items()}
        print(f"{rows} rows x {COLS} features: CSV {paths['csv'].stat().st_size / 2**20:.0f} MiB, Parquet "
              f"{paths['parquet'].stat().st_size / 2**20:.0f} MiB (written in {time.perf_counter() - t0:.1f} s)")
        results: dict[str, dict[str, Any]] = {}
        for reader in READERS:
            path = paths["parquet" if reader.endswith("parquet") else "csv"]
            runs = [measure(reader, path) for _ in range(repeat)]
            best = min(runs, key=lambda r: r.get("seconds", 0.0))
            best["peak_rss_mib"] = min(r["peak_rss_mib"] for r in runs)
            best["runs_seconds"] = [round(r.get("seconds", 0.0), 3) for r in runs]
            results[reader] = best
        sizes = {k: p.stat().st_size for k, p in paths.items()}
    base = results["baseline"]["peak_rss_mib"]
    loaded = [r for name, r in results.items() if name != "baseline"]
    assert len({r["checksum"] for r in loaded}) == 1, "the readers disagree on the values"
    assert len({r["schema_fingerprint"] for r in loaded}) == 1, "the readers disagree on the schema fingerprint"
    print(f"{'reader':<12} {'seconds':>8} {'peak RSS MiB':>13} {'above baseline':>15}")
    print(f"{'baseline':<12} {'':>8} {base:>13.0f} {'':>15}   (python + numpy + pyarrow + torch imported)")
    for name, r in results.items():
        if name != "baseline":
            r["loaded_rss_mib"] = r["peak_rss_mib"] - base
            print(f"{name:<12} {r['seconds']:>8.2f} {r['peak_rss_mib']:>13.0f} {r['loaded_rss_mib']:>15.0f}")
    old = results["old_csv"]
    for name in ("new_csv", "new_parquet"):
        r = results[name]
        print(f"{name} vs old_csv: {old['seconds'] / r['seconds']:.1f}x faster, "
              f"{old['loaded_rss_mib'] / max(r['loaded_rss_mib'], 1):.1f}x less memory above the baseline")
    report = {
        "bench": "dataload",
        "rows": rows, "features": COLS, "repeat": repeat, "file_bytes": sizes,
        "old_reader": f"meshd/task/data.py at {OLD_READER_COMMIT} (git show), csv module",
        "readers": results,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
