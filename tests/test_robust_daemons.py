"""Poisoning-robust gossip against real daemons: a hostile trusted domain (tests/hostile.py, meshd's own wire)
sends scaled models to three honest `meshd run` daemons that learn with `gossip.merge = "clipped"`.

It is quarantined by every honest domain (status, log line), the honest models stay finite and close to
each other and to their own scale, and once it behaves it is let back in (released, its shares merged).
Every wait is a poll with a deadline; nothing asserts on speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meshd import identity as identitymod
from meshd.ops.localmesh import LocalMesh, build_mesh, free_port, get_status
from meshd.task.checkpoints import CheckpointStore
from tests.helpers import http_get, log_events, run_cli, wait_for
from tests.hostile import HonestPeer, HostileDomain, finite, norm

SETTINGS = {
    "training": {"lr": "0.05"},
    "gossip": {"merge": '"clipped"', "quarantine_s": "3.0", "interval_s": "0.3"},
    "checkpoint": {"interval_s": "1.0"},
}


def _status(url: str) -> dict[str, Any]:
    s = get_status(url, timeout=10.0)
    assert s is not None, f"{url}: /status did not answer"
    return s


def _merge_view(url: str, peer_id: str) -> dict[str, Any]:
    return _status(url)["tasks"]["default"]["peers"].get(peer_id, {}).get("merge") or {}


def _models(layout: Any) -> list[torch.Tensor]:
    """Each honest domain's newest checkpointed model (written every second), once all have one."""
    def load() -> list[torch.Tensor] | None:
        out = []
        for d in layout.domains:
            ckpt, _ = CheckpointStore(d.directory / "state" / "tasks" / "default" / "checkpoints").load_latest()
            if ckpt is None:
                return None
            out.append(ckpt.values.to(torch.float64))
        return out
    return wait_for(load, timeout=60, interval=0.2, what="a checkpoint of every honest domain")


def _events(d: Any, name: str) -> list[dict[str, Any]]:
    return log_events((d.directory / "daemon.log").read_text(errors="replace"), name)


def test_a_hostile_domain_sending_scaled_models_is_quarantined_then_let_back_in(tmp_path: Path) -> None:
    layout = build_mesh(tmp_path / "robust", 3, settings=SETTINGS)
    bad_ident, bad_port = identitymod.generate(), free_port()
    with open(layout.workdir / "registry.toml", "a") as f:  # governance trusts it: it is compromised later
        f.write(f'[[peers]]\ndomain = "hostile"\npeer_id = "{bad_ident.peer_id}"\naddress = "127.0.0.1:{bad_port}"\n')
    mesh = LocalMesh(layout)
    hostile: HostileDomain | None = None
    try:
        mesh.start()
        mesh.wait_running(240)
        model = _status(layout.domains[0].status_url)["model"]
        start_norm = norm(_models(layout)[0])
        peers = [HonestPeer(bytes.fromhex(d.peer_id), d.peer_port) for d in layout.domains]
        hostile = HostileDomain(bad_ident, bad_port, "hostile", peers, fp=model["fingerprint"],
                                schema=model["data_schema"], count=model["parameters"], attack="scaled",
                                interval_s=0.3)
        hostile.start()

        def quarantined_everywhere() -> list[dict[str, Any]] | None:
            views = [_merge_view(d.status_url, bad_ident.peer_id) for d in layout.domains]
            return views if all(v.get("quarantined") for v in views) else None

        views = wait_for(quarantined_everywhere, timeout=180, interval=0.3,
                         what="every honest domain to quarantine the hostile one")
        print("hostile as seen by the honest domains:", views)
        assert all(v["quarantines"] >= 1 for v in views)
        for d in layout.domains:
            s = _status(d.status_url)["tasks"]["default"]["gossip"]
            assert s["merge"]["rule"] == "clipped" and s["merge"]["quarantined"] == 1
        assert all(len(_events(d, "peer_quarantined")) >= 1 for d in layout.domains)
        # The metric and `meshd peers` say so too (polled: its quarantine is renewed every few seconds).
        honest0 = layout.domains[0]
        wait_for(lambda: 'meshd_peers_quarantined{task="default"} 1.0' in http_get(honest0.status_url + "/metrics")[1]
                 .decode(), timeout=60, interval=0.2, what="meshd_peers_quarantined 1")
        cli = wait_for(lambda: (r := run_cli("peers", "--url", honest0.status_url)).returncode == 0
                       and "quarantined (" in r.stdout and r.stdout, timeout=60, interval=0.2,
                       what="meshd peers to show the quarantine")
        assert next(line for line in cli.splitlines() if line.startswith("hostile")).count("quarantined") == 1
        # Let it attack a while longer, then check the honest models (their newest checkpoints).
        sent = hostile.stats.sent["share"]
        wait_for(lambda: hostile.stats.sent["share"] >= sent + 30, timeout=120, what="30 more hostile shares")
        models = _models(layout)
        mean = torch.stack(models).mean(0)
        spreads = [norm(m - mean) for m in models]
        norms = [norm(m) for m in models]
        print(f"start norm {start_norm:.3g}; honest norms {norms}; distances to their mean {spreads}")
        assert all(finite(m) for m in models)
        assert all(n < 2.0 * start_norm for n in norms)  # x1e3 shares merged would blow this up
        assert all(sp < 0.5 * start_norm for sp in spreads)
        # It stops attacking: once its quarantine is over its shares are merged again.
        merged_before = {d.name: _merge_view(d.status_url, bad_ident.peer_id).get("merged", 0)
                         for d in layout.domains}
        hostile.attack = "none"

        def let_back_in() -> list[int] | None:
            merged = [_merge_view(d.status_url, bad_ident.peer_id).get("merged", 0) - merged_before[d.name]
                      for d in layout.domains]
            free = [not _merge_view(d.status_url, bad_ident.peer_id).get("quarantined") for d in layout.domains]
            return merged if all(free) and all(m > 0 for m in merged) else None

        merged = wait_for(let_back_in, timeout=180, interval=0.3, what="the hostile domain to be let back in")
        print("shares merged after it behaved:", merged, "answers:", dict(hostile.stats.answers))
        assert all(len(_events(d, "peer_released")) >= 1 for d in layout.domains)
    finally:
        if hostile is not None:
            hostile.stop()
        mesh.stop()
    assert all("BlockingError" not in (d.directory / "daemon.log").read_text(errors="replace")
               for d in layout.domains)
