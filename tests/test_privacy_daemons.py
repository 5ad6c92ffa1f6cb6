"""Differential privacy over real daemons: the budget stops training (gossip goes on), the ledger survives
kill -9 and a restore of an older state directory without going down, and a weaker peer is refused.

Three domains on digits, DP-SGD everywhere: A has a tiny budget (it runs out within seconds), B a large one,
C a large one too but requires its cohort to advertise epsilon <= 10, so it refuses B and accepts A (4).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from meshd.ops.localmesh import DomainLayout, LocalMesh, build_mesh, get_status
from tests.helpers import assert_no_blocking_calls, http_get, wait_for


def _status(d: DomainLayout) -> dict[str, Any]:
    s = get_status(d.status_url, timeout=5.0)
    assert s is not None, f"{d.name} does not answer /status"
    return s


def _privacy(d: DomainLayout) -> dict[str, Any]:
    task = _status(d)["tasks"]["default"]
    g = task["gossip"]
    return {**task["privacy"], "merged": g["merged"], "sent": g["shares_sent"], "trained": task["training"]["steps"],
            "rejected": task["gossip"]["rejected"], "joined": task["joined"]}


def _ledger_file(d: DomainLayout) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((d.directory / "state" / "tasks" / "default" / "privacy.json").read_text())
    return data


def _set(d: DomainLayout, key: str, value: str) -> None:
    from meshd.ops.config_template import set_key
    d.config.write_text(set_key(d.config.read_text(), "privacy", key, value))


@pytest.mark.slow
def test_budget_stop_ledger_survives_kill9_and_restore_and_weaker_peer_is_refused(tmp_path: Path) -> None:
    layout = build_mesh(tmp_path / "dp", 3, dataset="digits", alpha=1.0, seed=0, settings={
        "privacy": {"enabled": "true", "noise_multiplier": "1.0", "epsilon": "1000.0"},
        "training": {"local_baseline": "false", "lr": "0.1", "pace": '"free"'},
        "checkpoint": {"interval_s": "1.0"},
        "gossip": {"interval_s": "0.3", "per_round": "0"},  # train back to back, gossip every 0.3 s
    })
    a, b, c = layout.domains
    _set(a, "epsilon", "4.0")
    _set(c, "require_epsilon_at_most", "10.0")
    mesh = LocalMesh(layout, env={"MESHD_BLOCKBUSTER": "1"})
    try:
        mesh.start()
        mesh.wait_running(120)

        # --- A runs out: training stops at the budget, says so once, and A keeps gossiping.
        pa = wait_for(lambda: (p := _privacy(a))["exhausted"] and p, timeout=120, interval=0.3,
                      what="A to exhaust its epsilon budget of 4.0")
        assert 3.5 < pa["epsilon_spent"] <= 4.0 and pa["epsilon_remaining"] >= 0 and pa["accountant"] == "rdp"
        assert pa["delta"] == 1e-5 and pa["trained"] == pa["steps"] > 0
        merged_then = pa["merged"]
        wait_for(lambda: _privacy(a)["merged"] > merged_then + 3, timeout=60, what="A to keep merging after the stop")
        pa2 = _privacy(a)
        assert pa2["trained"] == pa["trained"] and pa2["steps"] == pa["steps"], (pa, pa2)
        assert pa2["epsilon_spent"] == pa["epsilon_spent"], (pa, pa2)
        assert _ledger_file(a)["epsilon_spent"] == pytest.approx(pa["epsilon_spent"], abs=1e-6)
        logs = (a.directory / "daemon.log").read_text()
        assert logs.count('"privacy_budget_exhausted"') == 1, logs[-3000:]
        _, metrics = http_get(a.status_url + "/metrics")
        text = metrics.decode()
        assert 'meshd_privacy_epsilon_budget{task="default"} 4.0' in text
        assert 'meshd_privacy_exhausted{task="default"} 1.0' in text
        assert 'meshd_privacy_accountant{accountant="rdp",task="default"} 1.0' in text

        # --- Raising the budget is an explicit config edit: the reload resumes training, up to the new budget.
        _set(a, "epsilon", "4.5")
        pa3 = wait_for(lambda: (p := _privacy(a))["trained"] > pa["trained"] and p, timeout=60,
                       what="A to train again after its budget was raised")
        assert pa3["epsilon_budget"] == 4.5 and pa3["epsilon_spent"] <= 4.5
        assert '"privacy_budget_raised"' in (a.directory / "daemon.log").read_text()

        # --- C requires epsilon <= 10: B (budget 50) is refused with its own reason, A is merged.
        # (A's first shares wait for C's clipped rule to calibrate: with B refused, on A alone after 16 of them.)
        wait_for(lambda: (p := _privacy(c))["rejected"].get("privacy_too_weak", 0) > 0 and p["merged"] > 0
                      and p, timeout=120, what="C to refuse B as privacy_too_weak and merge A")
        refused = _status(c)["gossip"]["rejected"]
        assert refused.get("privacy_too_weak", 0) > 0, refused

        # --- B: a kill -9 loop while it trains never lowers its ledger.
        seen = 0.0
        for _ in range(2):
            before = wait_for(lambda s=seen: (p := _privacy(b))["epsilon_spent"] > s and p, timeout=60,
                              what="B to spend more budget")
            mesh.kill9(b.name)
            on_disk = _ledger_file(b)["epsilon_spent"]
            assert on_disk >= before["epsilon_spent"] - 1e-6  # /status rounds to 6 decimals
            mesh.start(b.name)
            mesh.wait_running(120)
            after = _privacy(b)
            assert after["epsilon_spent"] >= on_disk - 1e-6, (on_disk, after)
            seen = after["epsilon_spent"]

        # --- B restored from an older copy of its state dir: the spent epsilon comes back (peers echo it).
        assert mesh.stop(b.name)[b.name] == 0
        backup = tmp_path / "backup-state"
        shutil.copytree(b.directory / "state", backup)
        old_spent = _ledger_file(b)["epsilon_spent"]
        mesh.start(b.name)
        mesh.wait_running(120)
        grown = wait_for(lambda: (p := _privacy(b))["epsilon_spent"] > old_spent + 0.3 and p, timeout=120,
                         what="B to spend well beyond its backup")
        # A has merged shares of B that carry the larger ledger (C refuses B) before B stops.
        wait_for(lambda: _privacy(b)["sent"] > grown["sent"] + 2, timeout=60, what="B to deliver more shares")
        assert mesh.stop(b.name)[b.name] == 0
        before_restore = _ledger_file(b)["epsilon_spent"]
        shutil.rmtree(b.directory / "state")
        shutil.copytree(backup, b.directory / "state")
        assert _ledger_file(b)["epsilon_spent"] < before_restore
        mesh.start(b.name)
        mesh.wait_running(120)
        restored = wait_for(lambda: (p := _privacy(b))["joined"] and p, timeout=60, what="B to rejoin")
        assert restored["epsilon_spent"] >= grown["epsilon_spent"] - 1e-6, (restored, grown)
        assert restored["ledger_source"] == "peer"
        assert '"privacy_ledger_restored"' in (b.directory / "daemon.log").read_text()
        assert _ledger_file(b)["epsilon_spent"] >= grown["epsilon_spent"] - 1e-6
        assert_no_blocking_calls(layout)
    finally:
        mesh.stop()
