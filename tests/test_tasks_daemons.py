"""Many learning tasks per daemon, over real daemons: cohorts keep each task's traffic among its domains, and a
config edit adds or removes a task without a restart and without interrupting the other tasks.

Three domains A, B, C: task ``fraud`` (an MLP on digits) on A and B, task ``churn`` (logistic regression on a
synthetic two-class table) on B and C, each with its own data product. Both tasks learn (every domain's task
beats its local-only model by the margin of the learning tests); no ``fraud`` share ever reaches C, and no
``churn`` share reaches A (counted at the receivers: a share for a task a domain does not run is refused as
``unknown_task``, one from outside a task's cohort as ``not_in_cohort``). Then ``churn`` is added to A by
editing its config (A joins by pulling the cohort's model) and removed from B (B stops it after a final
checkpoint while its ``fraud`` keeps training), with the same PIDs throughout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from meshd.ops.localmesh import DomainLayout, LocalMesh, build_mesh, get_status
from meshd.task.checkpoints import CheckpointStore
from meshd.task.datasets import write_npz_product
from tests.helpers import assert_no_blocking_calls, http_get, mesh_part, run_cli, wait_for

GAIN = 0.10  # mesh test accuracy above local-only, per domain and task


def _status(d: DomainLayout) -> dict[str, Any]:
    s = get_status(d.status_url, timeout=5.0)
    assert s is not None, f"{d.name} does not answer /status"
    return s


def _churn_data(rng: np.random.Generator, n: int, share_of_ones: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a linear rule over 4 features, subsampled so that about ``share_of_ones`` of them are class 1."""
    x = rng.normal(size=(20 * n, 4))
    y = (x[:, 0] + 0.7 * x[:, 1] - 0.4 * x[:, 2] > 0).astype(np.int64)
    ones, zeros = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    k = round(n * share_of_ones)
    idx = np.concatenate([ones[:k], zeros[: n - k]])
    rng.shuffle(idx)
    return x[idx], y[idx]


def _task(name: str, cohort: list[str], model: str, classes: int, data: str, test: str) -> str:
    cohort_toml = ", ".join(f'"{c}"' for c in cohort)
    return (f'\n[[task]]\nname = "{name}"\ncohort = [{cohort_toml}]\n'
            f'[task.model]\nname = "{model}"\nnum_classes = {classes}\n'
            f'[task.data]\npath = "{data}"\ntest_path = "{test}"\n'
            f'[task.training]\nlr = 0.1\nmomentum = 0.5\neval_interval_s = 0.5\n[task.checkpoint]\ninterval_s = 2.0\n')


def _gains(s: dict[str, Any], task: str) -> tuple[float | None, float | None]:
    t = s["tasks"][task]["training"]
    return t.get("test_accuracy"), t.get("local_only_test_accuracy")


def _learned(s: dict[str, Any], task: str) -> bool:
    mesh, local = _gains(s, task)
    return mesh is not None and local is not None and mesh >= local + GAIN


@pytest.mark.slow
def test_two_tasks_with_their_own_cohorts_and_a_task_added_and_removed_by_reload(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layout = build_mesh(tmp_path / "tasks", 3, dataset="digits", alpha=0.1, seed=0)
    a, b, c = layout.domains
    shared = layout.workdir / "shared"
    write_npz_product(shared / "churn-test.npz", *_churn_data(rng, 600, 0.5))
    for d, ones in ((a, 0.05), (b, 0.08), (c, 0.92)):
        write_npz_product(d.directory / "churn.npz", *_churn_data(rng, 300, ones))
    fraud = {d.name: _task("fraud", [a.name, b.name], "mlp", 10, "data.npz", "../shared/test.npz") for d in (a, b)}
    churn = {d.name: _task("churn", [b.name, c.name, a.name], "logreg", 2, "churn.npz", "../shared/churn-test.npz")
             for d in (a, b, c)}
    base = {d.name: mesh_part(d.config.read_text()) for d in layout.domains}
    a.config.write_text(base[a.name] + fraud[a.name])
    b.config.write_text(base[b.name] + fraud[b.name] + churn[b.name])
    # C also runs a task whose data product is missing: that task fails alone, churn and the mesh carry on.
    broken = _task("forecast", ["*"], "logreg", 2, "missing.npz", "../shared/churn-test.npz")
    c.config.write_text(base[c.name] + churn[c.name] + broken)
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(180)
        pids = {d.name: _status(d)["pid"] for d in layout.domains}

        def both_learned() -> dict[str, dict[str, Any]] | None:
            ss = {d.name: _status(d) for d in layout.domains}
            ok = (_learned(ss[a.name], "fraud") and _learned(ss[b.name], "fraud")
                  and _learned(ss[b.name], "churn") and _learned(ss[c.name], "churn"))
            return ss if ok else None

        ss = wait_for(both_learned, timeout=240, interval=0.5, what="fraud on A+B and churn on B+C to beat local-only")
        assert sorted(ss[a.name]["tasks"]) == ["fraud"]
        assert sorted(ss[b.name]["tasks"]) == ["churn", "fraud"]
        assert sorted(ss[c.name]["tasks"]) == ["churn", "forecast"]
        forecast = ss[c.name]["tasks"]["forecast"]
        assert forecast["state"] == "failed" and "missing.npz" in forecast["error"], forecast
        assert ss[c.name]["tasks"]["churn"]["state"] == "running"
        for name, task in ((a.name, "fraud"), (b.name, "fraud"), (b.name, "churn"), (c.name, "churn")):
            assert ss[name]["tasks"][task]["gossip"]["merged"] > 0, (name, task)
            print(f"{name} {task}: mesh/local-only {_gains(ss[name], task)}")
        # Counted at the receivers: nobody ever sent A or C a share of a task it does not run.
        for d in (a, c):
            rejected = ss[d.name]["gossip"]["rejected"]
            assert rejected.get("unknown_task", 0) == 0 and rejected.get("not_in_cohort", 0) == 0, (d.name, rejected)
        # The two tasks' models are different models: each fingerprint is the same on both of its domains.
        fps = {(n, task): s["tasks"][task]["model"].get("fingerprint") for n, s in ss.items() for task in s["tasks"]}
        assert fps[a.name, "fraud"] == fps[b.name, "fraud"] != fps[b.name, "churn"] == fps[c.name, "churn"]
        # The pongs list the tasks a peer runs.
        rows = {p["domain"]: p for p in ss[b.name]["mesh"]["peers"]}
        assert sorted(rows[a.name]["tasks"]) == ["fraud"] and sorted(rows[c.name]["tasks"]) == ["churn"]
        # /metrics labels each task's series; `meshd export` needs --task when a domain runs several.
        _, metrics = http_get(b.status_url + "/metrics")
        for task in ("fraud", "churn"):
            assert f'meshd_training_steps_total{{task="{task}"}}' in metrics.decode(), task
            assert f'meshd_task_up{{state="running",task="{task}"}} 1.0' in metrics.decode(), task
        wait_for(lambda: (b.directory / "state" / "tasks" / "fraud" / "checkpoints").is_dir()
                 and any((b.directory / "state" / "tasks" / "fraud" / "checkpoints").glob("*.mdck")),
                 timeout=60, what="a checkpoint of B's fraud task")
        r = run_cli("export", "--config", str(b.config), "--out", str(tmp_path / "m.pt"))
        assert r.returncode != 0 and "--task" in r.stderr and "churn" in r.stderr, r.stderr
        r = run_cli("export", "--config", str(b.config), "--out", str(tmp_path / "fraud.pt"), "--task", "fraud")
        assert r.returncode == 0, r.stderr
        state = torch.load(tmp_path / "fraud.pt", weights_only=True)
        assert sum(v.numel() for v in state.values()) == ss[b.name]["tasks"]["fraud"]["model"]["parameters"]

        # --- A joins churn by a config edit: it pulls the cohort's model, and learns with B and C.
        a.config.write_text(base[a.name] + fraud[a.name] + churn[a.name])

        def a_in_churn() -> dict[str, Any] | None:
            s = _status(a)
            t = s["tasks"].get("churn")
            return s if t and t["state"] == "running" and t["gossip"]["merged"] > 0 and _learned(s, "churn") else None

        sa = wait_for(a_in_churn, timeout=180, interval=0.5, what="A to join churn without a restart")
        assert sa["pid"] == pids[a.name]
        log_a = (a.directory / "daemon.log").read_text()
        assert '"model_pulled"' in log_a and '"task": "churn"' in log_a

        # --- B leaves churn: it stops it (final checkpoint) and keeps training fraud.
        fraud_steps = _status(b)["tasks"]["fraud"]["training"]["steps"]
        b.config.write_text(base[b.name] + fraud[b.name])

        def b_left_churn() -> dict[str, Any] | None:
            s = _status(b)
            trained = s["tasks"]["fraud"]["training"]["steps"] > fraud_steps + 50
            return s if "churn" not in s["tasks"] and trained else None

        sb = wait_for(b_left_churn, timeout=120, interval=0.5, what="B to stop churn while fraud keeps training")
        assert sb["pid"] == pids[b.name] and sb["tasks"]["fraud"]["state"] == "running"
        ckpt, _ = CheckpointStore(b.directory / "state" / "tasks" / "churn" / "checkpoints").load_latest()
        assert ckpt is not None and ckpt.version > 0  # the final checkpoint of the stopped task
        # A and C keep learning churn together; C stops sending to B (a ping listed B's tasks).
        merged_c = _status(c)["tasks"]["churn"]["gossip"]["merged"]
        wait_for(lambda: _status(c)["tasks"]["churn"]["gossip"]["merged"] > merged_c + 5, timeout=60,
                 what="C to keep merging churn shares (from A)")

        # --- C changes churn's cohort to leave A out: from that reload on, C refuses A's churn shares as
        # not_in_cohort (counted at C), and A sees why; nothing restarts.
        c.config.write_text(base[c.name] + _task("churn", [b.name, c.name], "logreg", 2, "churn.npz",
                                                 "../shared/churn-test.npz") + broken)

        def c_refuses_a() -> dict[str, Any] | None:
            s = _status(c)
            view = _status(a)["tasks"]["churn"]["peers"].get(c.peer_id, {})
            refused = s["gossip"]["rejected"].get("not_in_cohort", 0) > 0
            return s if refused and view.get("incompatible") == "not_in_cohort" else None

        sc = wait_for(c_refuses_a, timeout=60, what="C to refuse A's churn shares once A is out of its cohort")
        assert sc["pid"] == pids[c.name] and sc["tasks"]["churn"]["cohort"] == [b.name, c.name]
        assert mesh.alive() == [d.name for d in layout.domains]
        assert_no_blocking_calls(layout)
    finally:
        mesh.stop()
