"""Ten domains on one address (loopback; or peers behind one NAT): the per-address connection cap must not
refuse legitimate peers. With the old default of 8, peers were cut off and marked dead."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshd.ops.localmesh import LocalMesh, build_mesh
from tests.helpers import wait_for

N = 10


@pytest.mark.slow
def test_ten_domains_on_one_address_all_stay_alive(tmp_path: Path) -> None:
    layout = build_mesh(tmp_path, N, settings={
        "training": {"enabled": "false"},  # only gossip and membership traffic
        "gossip": {"interval_s": "0.3", "fanout": "3"},
        "membership": {"ping_after_s": "0.5", "suspect_after_s": "3", "dead_after_s": "6"},
    })
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(timeout=120)

        def all_alive() -> bool:
            return all(s is not None and s["mesh"]["counts"]["alive"] == N - 1 for s in mesh.statuses().values())

        wait_for(all_alive, timeout=60, what="every domain to see the other nine alive")
        # keep gossiping a while (each sample is one status round-trip), then nobody may have been refused: a
        # refused connection is a failed send, which makes the peer suspect at once (every 0.3 s, fanout 3)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            statuses = mesh.statuses()
        for name, s in statuses.items():
            assert s is not None, name
            assert "too_many_connections" not in s["gossip"]["rejected"], (name, s["gossip"]["rejected"])
            assert s["mesh"]["counts"]["alive"] == N - 1, (name, s["mesh"]["counts"])
            assert s["gossip"]["merged"] > 0, name
    finally:
        codes = mesh.stop()
    assert all(c == 0 for c in codes.values()), codes
