"""A regression task over real daemons: what each gossip codec costs in RMSE at equal local steps.

Two domains on loopback learn ``price`` (``model.task = "regression"``, logreg: a linear target plus noise of
standard deviation 0.1, features shifted +1 / -1 in the two domains; the data of
``tests/test_task_kinds_daemons.py``) with ``gossip.codec`` f64, q8 and q4. Once both domains have trained
``--steps`` local steps and scored their served model after that, the table gives the served model's RMSE and
MAE on a shared test set, next to the local-only baseline's and to predicting the mean of the training
targets. A figure, not an assertion: run it on a quiet machine.

    .venv/bin/python bench/task_kinds.py [--quick] [--out bench/results/task_kinds.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.*, when run as a script

from meshd.ops.localmesh import LocalMesh, build_mesh, get_status
from meshd.task.datasets import write_npz_product
from tests.helpers import mesh_part, wait_for
from tests.test_task_kinds_daemons import price_rows

CODECS = ("f64", "q8", "q4")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "task_kinds.json"


def run_codec(workdir: Path, codec: str, steps: int) -> dict[str, Any]:
    """One 2-domain mesh with the given codec; the scores of each domain after ``steps`` local steps."""
    rng = np.random.default_rng(0)
    layout = build_mesh(workdir, 2, dataset="digits", alpha=100.0, seed=0)
    x_test, y_test = price_rows(rng, 600, 0.0)
    write_npz_product(layout.workdir / "shared" / "price-test.npz", x_test, y_test, label_dtype=np.float32)
    targets = []
    for d, shift in zip(layout.domains, (1.0, -1.0), strict=True):
        x, y = price_rows(rng, 300, shift)
        targets.append(y)
        write_npz_product(d.directory / "price.npz", x, y, label_dtype=np.float32)
        d.config.write_text(mesh_part(d.config.read_text()) + (
            '\n[[task]]\nname = "price"\n[task.model]\nname = "logreg"\ntask = "regression"\n'
            '[task.data]\npath = "price.npz"\ntest_path = "../shared/price-test.npz"\n'
            f'[task.training]\nlr = 0.05\neval_interval_s = 0.5\n[task.gossip]\ncodec = "{codec}"\n'))
    mean_rmse = math.sqrt(float(np.mean((y_test - np.concatenate(targets).mean()) ** 2)))
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(120)

        def scored() -> list[dict[str, Any]] | None:
            trs = []
            for d in layout.domains:
                s = get_status(d.status_url, timeout=5.0)
                tr = s["tasks"]["price"]["training"] if s else {}
                if (tr.get("evaluated_at_steps") or 0) < steps or tr.get("test_rmse") is None:
                    return None
                trs.append(tr)
            return trs

        trs = wait_for(scored, timeout=600, interval=0.5, what=f"{steps} steps on both domains ({codec})")
    finally:
        mesh.stop()
    return {"codec": codec, "mean_predictor_rmse": mean_rmse, "domains": [
        {k: tr[k] for k in ("evaluated_at_steps", "test_rmse", "test_mae", "local_only_test_rmse",
                            "local_only_test_mae")} for tr in trs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,500 local steps instead of 4,000")
    ap.add_argument("--steps", type=int, default=None, help="local steps per domain before the score is read")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    steps = args.steps or (1500 if args.quick else 4000)
    root = Path(tempfile.mkdtemp(prefix="meshd-task-kinds-"))
    t0 = time.monotonic()
    runs = [run_codec(root / codec, codec, steps) for codec in CODECS]
    print(f"regression (RMSE floor: noise std 0.1), 2 domains, {steps} local steps each; shared test set\n")
    print("| codec | mesh RMSE (A, B) | mesh MAE (A, B) | local-only RMSE (A, B) | mean predictor RMSE |")
    print("|---|---|---|---|---|")
    for r in runs:
        a, b = r["domains"]
        print(f"| {r['codec']} | {a['test_rmse']:.4f}, {b['test_rmse']:.4f} | {a['test_mae']:.4f}, "
              f"{b['test_mae']:.4f} | {a['local_only_test_rmse']:.4f}, {b['local_only_test_rmse']:.4f} | "
              f"{r['mean_predictor_rmse']:.3f} |")
    out = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
           "steps": steps, "elapsed_s": round(time.monotonic() - t0, 1), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
