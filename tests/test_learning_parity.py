"""Learning parity over real daemons: the data schema is part of compatibility, a domain's influence scales
with its rows, and `training.threads` is honoured (issue: learn as well as a central server)."""

from __future__ import annotations

import csv
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from meshd.ops.config_template import set_key
from meshd.ops.localmesh import DomainLayout, LocalMesh, build_mesh, get_status
from meshd.task.datasets import write_npz_product
from tests.helpers import assert_no_blocking_calls, score_exported, wait_for


def _status(d: DomainLayout) -> dict[str, Any]:
    s = get_status(d.status_url, timeout=5.0)
    assert s is not None, f"{d.name} does not answer /status"
    return s


def _set(d: DomainLayout, section: str, key: str, value: str) -> None:
    d.config.write_text(set_key(d.config.read_text(), section, key, value))


def _write_csv(path: Path, columns: list[str], x: np.ndarray, y: np.ndarray) -> None:
    order = {"a": 0, "b": 1, "c": 2}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, "label"])
        for row, label in zip(x, y, strict=True):
            w.writerow([*(f"{row[order[c]]:.6f}" for c in columns), int(label)])


# --- the data schema -----------------------------------------------------------------------------------------


def test_columns_in_another_order_are_refused_or_aligned_by_name(tmp_path: Path) -> None:
    """Three domains whose CSVs hold the same three features: A in order a,b,c; B in order c,a,b with
    `features = []` (its own file order); C in order c,b,a but `data.features = ["a","b","c"]`, the mesh's order.
    A and C learn together; B is refused with `schema_mismatch` both ways and never merges a share."""
    rng = np.random.default_rng(0)
    layout = build_mesh(tmp_path / "schema", 3, settings={
        "model": {"name": '"logreg"', "num_classes": "2"},
        "data": {"test_path": '""', "holdout": "0.2"},
        "training": {"lr": "0.1"},
    })
    a, b, c = layout.domains
    for d, columns in ((a, ["a", "b", "c"]), (b, ["c", "a", "b"]), (c, ["c", "b", "a"])):
        x = rng.normal(size=(300, 3))
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
        _write_csv(d.directory / "data.csv", columns, x, y)
        _set(d, "data", "path", '"data.csv"')
    _set(c, "data", "features", '["a", "b", "c"]')
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(180)

        def settled() -> dict[str, dict[str, Any]] | None:
            ss = {d.name: _status(d) for d in layout.domains}
            names = {d.peer_id: d.name for d in layout.domains}
            flags = {n: {names[k]: v["incompatible"] for k, v in s["tasks"]["default"]["peers"].items()}
                     for n, s in ss.items()}
            ok = (flags[a.name].get(b.name) == "schema_mismatch" and flags[c.name].get(b.name) == "schema_mismatch"
                  and set(flags[b.name].values()) == {"schema_mismatch"}
                  and ss[a.name]["gossip"]["merged"] > 5 and ss[c.name]["gossip"]["merged"] > 5)
            return ss if ok else None

        ss = wait_for(settled, timeout=180, interval=0.5, what="A and C merging, B flagged schema_mismatch by all")
        schemas = {n: s["model"]["data_schema"] for n, s in ss.items()}
        assert schemas[a.name] == schemas[c.name] != schemas[b.name]
        assert ss[b.name]["gossip"]["merged"] == 0  # B never averaged a model trained on other column meanings
        assert ss[b.name]["gossip"]["weight"] == 1.0  # nor did any of its shares reach A or C
        # The pongs said so before any share went out: B offered none, and none of theirs reached it.
        assert ss[b.name]["tasks"]["default"]["gossip"]["shares_sent"] == 0
        assert all(s["gossip"]["rejected"].get("bad_values", 0) == 0 for s in ss.values())
    finally:
        mesh.stop()
    assert_no_blocking_calls(layout)


# --- data weighting ------------------------------------------------------------------------------------------


def _big_rule_probability(d: DomainLayout, x: np.ndarray, y: np.ndarray) -> float:
    """Mean probability the domain's live model (``GET /v1/model``) gives the big domain's label on ``x``.

    Unlike accuracy, this does not hang on the sign of a near-zero weight: a model that weighs both rules
    equally gives about 0.5 whichever way it leans, the weighted optimum about 10/11 on confident rows."""
    with urllib.request.urlopen(d.status_url + "/v1/model", timeout=10) as resp:
        t = load_safetensors(resp.read())
    p = torch.softmax(score_exported(t, torch.from_numpy(x)), dim=1)[torch.arange(len(y)), torch.from_numpy(y)]
    return float(p.mean())


def _weighting_run(tmp: Path, big_rows: int, small_rows: int, overrides: dict[str, dict[str, str]]
                   ) -> tuple[float, float, list[dict[str, Any]]]:
    """Two domains with opposite labelling rules; returns the served models' mean accuracy on the big domain's
    rule, the mean probability they give its labels, and the domains' last status."""
    rng = np.random.default_rng(1)
    layout = build_mesh(tmp, 2, settings={
        "model": {"name": '"logreg"', "num_classes": "2"},
        "data": {"holdout": "0.0"},
        "training": {"lr": "0.05", "momentum": "0.9", "eval_interval_s": "0.5"},
        **overrides,
    })
    big, small = layout.domains
    for d, n, flip in ((big, big_rows, False), (small, small_rows, True)):
        x = rng.normal(size=(n, 2)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        write_npz_product(d.directory / "data.npz", x, 1 - y if flip else y)
    x_test = rng.normal(size=(2000, 2)).astype(np.float32)
    y_test = (x_test[:, 0] > 0).astype(np.int64)
    write_npz_product(layout.test_path, x_test, y_test)  # the big domain's rule
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(180)

        def trained() -> list[dict[str, Any]] | None:
            ss = [_status(d) for d in layout.domains]
            done = all((s["training"]["evaluated_at_steps"] or 0) >= 400 for s in ss[1:]) and all(
                s["training"]["test_accuracy"] is not None and s["gossip"]["merged"] > 20 for s in ss)
            return ss if done else None

        ss = wait_for(trained, timeout=240, interval=0.5, what="both domains trained and gossiping")
        # Averaged over 24 samples 32 steps apart: between two exchanges each domain's model swings towards
        # its own rule, and one sample would catch that swing at a random phase.
        probs: list[float] = []
        for _ in range(24):
            probs.extend(_big_rule_probability(d, x_test, y_test) for d in layout.domains)
            last = int(_status(layout.domains[1])["training"]["steps"])

            def stepped(last: int = last) -> bool:
                return int(_status(layout.domains[1])["training"]["steps"]) >= last + 32

            wait_for(stepped, timeout=60, interval=0.05, what="32 more steps")
        prob = sum(probs) / len(probs)
    finally:
        mesh.stop()
    assert_no_blocking_calls(layout)
    return sum(float(s["training"]["test_accuracy"]) for s in ss) / 2, prob, ss


@pytest.mark.slow
def test_a_domain_with_ten_times_the_rows_pulls_the_mesh_towards_its_optimum(tmp_path: Path) -> None:
    """Logistic regression; the big domain (2,000 rows) labels by x0 > 0, the small one (200 rows) by x0 < 0.
    The weighted optimum (10:1, FedAvg's weighting) follows the big domain's rule; with equal influence the two
    rules cancel and the mesh model is close to a coin toss on it. Default config (data-weighted updates,
    steps paced to rows) against `weighting = "equal"`, `pace = "free"` and a fixed `steps_per_round` (every
    domain takes the same steps and counts the same)."""
    weighted, weighted_p, ss = _weighting_run(tmp_path / "weighted", 2000, 200, {})
    equal, equal_p, _ = _weighting_run(tmp_path / "equal", 2000, 200,
                              {"training": {"lr": "0.05", "momentum": "0.9", "eval_interval_s": "0.5",
                                            "weighting": '"equal"', "pace": '"free"', "steps_per_round": "8"}})
    print(f"on the big domain's rule: data-weighted accuracy {weighted:.3f}, probability {weighted_p:.3f}; "
          f"equal accuracy {equal:.3f}, probability {equal_p:.3f}")
    big, small = ss
    assert big["training"]["update_scale"] > 1.5 > 0.5 > small["training"]["update_scale"]  # ~1.8 and ~0.18
    assert 1000 < big["training"]["mesh_mean_rows"] < 1200  # (2000 + 200) / 2, estimated by gossip
    assert weighted >= 0.85
    # Equal influence leaves the model near w = 0: its accuracy is whichever side a tiny weight falls (it was
    # 0.50 in one run, 0.90 in another), but the probability it gives the big rule's labels stays near 0.5.
    assert weighted_p - equal_p >= 0.15


# --- threads --------------------------------------------------------------------------------------------------


def test_training_threads_is_honoured_and_exchanges_are_push_pull(tmp_path: Path) -> None:
    """`training.threads` is applied; shares ask for the receiver's share back by default (push-pull), and a
    domain with `gossip.settle` serves the model its settle phase left."""
    layout = build_mesh(tmp_path / "threads", 2, settings={"gossip": {"pull_on_join": "false"}})
    _, two = layout.domains
    _set(two, "training", "threads", "2")
    _set(two, "gossip", "settle", "1")
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(180)
        threads = wait_for(lambda: (t := [_status(d)["training"]["threads"] for d in layout.domains])[0]
                           and t[1] and t, timeout=120, interval=0.2, what="both domains training")
        assert threads == [1, 2]
        ss = wait_for(lambda: (ss := [_status(d) for d in layout.domains]) and all(
            s["gossip"]["replies_merged"] > 0 and s["gossip"]["replies_sent"] > 0 for s in ss)
            and ss[1]["gossip"]["served"] == "settled" and ss,
            timeout=120, interval=0.2, what="both domains merging the shares sent back in answers")
        assert ss[0]["gossip"]["served"] == "blend"  # no settle phase: the blend of estimate and peers' models
        assert all(s["tasks"]["default"]["gossip"]["rejected"].get("bad_share_reply", 0) == 0 for s in ss)
    finally:
        mesh.stop()
    assert_no_blocking_calls(layout)
