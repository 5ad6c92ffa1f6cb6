"""Metrics people will graph (#12 item 7): process and platform collectors, build info, local-only next to
mesh accuracy, consensus distance, per-peer last-seen age and round-trip time (bounded), exchange latency
histograms, a series for every documented rejection reason from the start; and the shipped Grafana
dashboard and Prometheus alerts reference only what a running daemon exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import meshd
from meshd.core.stats import EXCHANGE_KINDS, REJECT_REASONS, LatencyHistogram
from meshd.ops.localmesh import LocalMesh, build_mesh, get_status
from meshd.ops.status import MAX_PEER_SERIES, render_metrics
from tests.helpers import REPO, assert_no_blocking_calls, http_get, wait_for

DOCS = REPO / "docs"
METRIC_NAME = re.compile(r"\b(?:meshd|process|python)_[a-z0-9_]+\b")


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of a /metrics text (parsed by prometheus_client's own parser)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def _alert_exprs() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\s*expr:\s*(.+)$", (DOCS / "alerts.yml").read_text(), re.M)]


def test_metrics_people_graph_on_a_two_domain_mesh(tmp_path: Path) -> None:
    layout = build_mesh(tmp_path / "mesh", 2, settings={"gossip": {"interval_s": "0.3"}})
    a, b = layout.domains
    mesh = LocalMesh(layout)

    def graphed() -> dict[str, Any] | None:
        s = get_status(a.status_url)
        if s is None:
            return None
        t, g = s["training"], s["gossip"]
        ready = (s["mesh"]["counts"]["alive"] == 1 and g.get("consensus_distance") is not None
                 and g["exchange_latency"]["share"]["count"] > 0
                 and all(t.get(k) is not None for k in ("holdout_accuracy", "local_only_accuracy",
                                                         "test_accuracy", "local_only_test_accuracy")))
        return s if ready else None

    try:
        mesh.start()
        mesh.wait_running(120)
        wait_for(graphed, 120, 0.2, what="two domains that gossip and have evaluated")
        status, body = http_get(a.status_url + "/metrics")
    finally:
        mesh.stop()
    assert_no_blocking_calls(layout)
    assert status == 200
    text = body.decode()
    m = _samples(text)

    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "python_info", "python_gc_collections_total"):
        assert name in m, name
    ((build, one),) = m["meshd_build_info"]
    assert one == 1.0 and build["version"] == meshd.__version__ and build["protocol"] == "2", build
    assert build["torch"].startswith("2.") and build["python"].count(".") == 2, build
    assert m["meshd_ready"] == [({}, 1.0)] and m["meshd_trusted_peers"] == [({}, 2.0)]  # registry: both
    for name in ("meshd_holdout_accuracy", "meshd_local_only_accuracy", "meshd_test_accuracy",
                 "meshd_local_only_test_accuracy"):
        ((labels, value),) = m[name]
        assert labels == {"task": "default"} and 0.0 <= value <= 1.0, (name, labels, value)
    ((_, distance),) = m["meshd_consensus_distance"]
    assert distance >= 0.0
    ((peer, age),) = m["meshd_peer_last_seen_seconds"]
    assert peer == {"domain": b.name, "peer_id": b.peer_id} and age >= 0.0, peer
    ((peer, rtt),) = m["meshd_peer_rtt_seconds"]
    assert peer["peer_id"] == b.peer_id and 0.0 < rtt < 30.0
    counts = {labels["kind"]: v for labels, v in m["meshd_exchange_seconds_count"]}
    # Every kind has its series from the start; a share was answered (waited for above). No ping count is
    # asserted: B's own pings can make it alive here before A pings it.
    assert set(counts) == {*EXCHANGE_KINDS, "other"} and counts["share"] >= 1, counts
    share_buckets = [(lb["le"], v) for lb, v in m["meshd_exchange_seconds_bucket"] if lb["kind"] == "share"]
    assert share_buckets[-1] == ("+Inf", counts["share"])
    assert [v for _, v in share_buckets] == sorted(v for _, v in share_buckets)  # cumulative
    rejected = {labels["reason"]: v for labels, v in m["meshd_messages_rejected_total"]}
    assert set(REJECT_REASONS) <= set(rejected), sorted(set(REJECT_REASONS) - set(rejected))

    # Every metric the dashboard and the alerts use is one this daemon exposes.
    exposed = set(m)
    for source, exprs in (("grafana-dashboard.json", _dashboard_exprs()), ("alerts.yml", _alert_exprs())):
        assert exprs, source
        used = {name for e in exprs for name in METRIC_NAME.findall(e)}
        assert used and used <= exposed, (source, sorted(used - exposed))

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed: /metrics was parsed by prometheus_client only (Debian: prometheus)")
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout, r.stderr)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_alert_rules_pass_promtool() -> None:
    r = subprocess.run(["promtool", "check", "rules", str(DOCS / "alerts.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout, r.stdout
    # tests/alerts_test.yml: each alert fires on the series it is for, and not on its look-alikes (a domain
    # alone by design, a task the mesh helps, a reason that does not rise).
    r = subprocess.run(["promtool", "test", "rules", str(REPO / "tests" / "alerts_test.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_alerts_cover_what_operators_asked_for() -> None:
    names = re.findall(r"^\s*- alert:\s*(\S+)$", (DOCS / "alerts.yml").read_text(), re.M)
    assert {"MeshdNoAlivePeers", "MeshdReloadFailed", "MeshdRejectionsRising",
            "MeshdAccuracyBelowLocalOnly"} <= set(names), names
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dash["panels"] and all(p["targets"] for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_every_documented_rejection_reason_has_a_series_from_the_start() -> None:
    row = next(ln for ln in (DOCS / "status.md").read_text().splitlines() if ln.startswith("| `rejected` |"))
    documented = set(re.findall(r"`([a-z_]+)`", row)) - {"rejected", "bad_pull_reply", "bad_share_reply"}  # per task
    assert documented == set(REJECT_REASONS), documented ^ set(REJECT_REASONS)
    protocol = (DOCS / "protocol.md").read_text()
    checks = re.findall(r"^\| \d+ \| .* \| (`[a-z_]+`(?:, `[a-z_]+`)*) \| \d{3} \|$", protocol, re.M)
    in_protocol = {r for cell in checks for r in re.findall(r"`([a-z_]+)`", cell)}
    assert len(in_protocol) >= 15 and in_protocol <= set(REJECT_REASONS), in_protocol - set(REJECT_REASONS)

    m = _samples(render_metrics({}).decode())  # a daemon that has seen nothing yet
    assert {lb["reason"]: v for lb, v in m["meshd_messages_rejected_total"]} == dict.fromkeys(REJECT_REASONS, 0.0)


def test_per_peer_series_are_bounded_to_the_most_recently_seen() -> None:
    peers = [{"domain": f"d{i}", "peer_id": f"{i:064x}", "last_seen_s": float(i), "rtt_s": 0.01}
             for i in range(3 * MAX_PEER_SERIES)]
    peers.append({"domain": "never", "peer_id": "f" * 64, "last_seen_s": None, "rtt_s": None})
    m = _samples(render_metrics({"mesh": {"peers": peers}}).decode())
    ages = {lb["domain"]: v for lb, v in m["meshd_peer_last_seen_seconds"]}
    assert len(ages) == MAX_PEER_SERIES and max(ages.values()) == MAX_PEER_SERIES - 1  # freshest first
    assert len(m["meshd_peer_rtt_seconds"]) == MAX_PEER_SERIES and "never" not in ages


def test_latency_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = LatencyHistogram()
    for v in (0.001, 0.0011, 0.3, 100.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap["count"] == 4 and snap["buckets"]["0.001"] == 1 and snap["buckets"]["0.0025"] == 2  # type: ignore[index]
    assert snap["buckets"]["0.5"] == 3 and snap["buckets"]["30.0"] == 3 and snap["buckets"]["+Inf"] == 4  # type: ignore[index]
    assert abs(float(snap["sum_s"]) - 100.3021) < 1e-9  # type: ignore[arg-type]
