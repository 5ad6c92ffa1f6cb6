"""Issue #10 item 2 against a real `meshd run` daemon: a trusted peer that pulls in a loop cannot drain it.

A client holding a key the daemon trusts speaks the real wire (meshd.core.wire: signed, encrypted, one keep-alive
HTTP connection on loopback) and sends 2,000 ``pull`` envelopes to a daemon that does not train. Before the
fix every pull was answered with half of the free weight: 1,074 took the weight to 5e-324, the answers then
carried weight 0.0 and ``s / w`` moved the model. Now pulls are rate-limited per peer and in total (429
``pull_rate`` / ``pull_budget``) and refused below the weight floor (429 ``weight_low``): the weight stays
above ``gossip.pull_min_weight``, every answer carries weight > 0 and the model is unchanged (the daemon's
own checkpoints before and after). The loop is bounded in count and time and asserts nothing on speed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from meshd import identity as identitymod
from meshd.core import codec as codecmod
from meshd.core.replay import ReplayGuard
from meshd.core.wire import Limits, Wire, encode_body
from meshd.ops.localmesh import LocalMesh, build_mesh, get_status
from meshd.task.checkpoints import CheckpointStore
from tests.helpers import TIMEOUT_SCALE, KeptAliveEnvelopes, http_get, wait_for

PULLS = 2000
FLOOR = 0.1  # gossip.pull_min_weight's default
FRACTION = 0.25  # gossip.pull_fraction's default


def _status(url: str) -> dict[str, Any]:
    s = get_status(url, timeout=10.0)
    assert s is not None, f"{url}: /status did not answer"
    return s


def _checkpoint(directory: Path, after_seq: int = 0) -> Any:
    store = CheckpointStore(directory / "state" / "tasks" / "default" / "checkpoints")

    def newer() -> Any:
        ckpt, _ = store.load_latest()
        return ckpt if ckpt is not None and ckpt.seq > after_seq else None
    return wait_for(newer, timeout=60, interval=0.2, what=f"a checkpoint newer than #{after_seq}")


class Puller:
    """A trusted peer's pulls over one keep-alive connection, sealed with meshd's own wire."""

    def __init__(self, ident: identitymod.Identity, to: bytes, port: int, ids: dict[str, Any]) -> None:
        self.ident, self.to, self.port, self.ids = ident, to, port, ids
        self.wire = Wire(ident, Limits())
        self.seqs = itertools.count(1)
        self.envelopes = KeptAliveEnvelopes(port)

    def pull(self) -> tuple[int, bytes]:
        return self.send("pull", {"domain": "puller", **self.ids})

    def send(self, kind: str, body: dict[str, Any]) -> tuple[int, bytes]:
        env = self.wire.seal(self.to, kind, encode_body(body), next(self.seqs), int(time.time() * 1000))
        return self.envelopes.post(env)

    def open_model(self, data: bytes) -> dict[str, Any]:
        opened = self.wire.open(data, int(time.time() * 1000), lambda pk: pk == self.to, ReplayGuard())
        assert opened.kind == "model"
        body = msgpack.unpackb(opened.body, raw=False)
        assert isinstance(body, dict)
        return body

    def close(self) -> None:
        self.envelopes.close()


@contextlib.contextmanager
def single_domain(tmp_path: Path, gossip: dict[str, str]) -> Iterator[tuple[Any, Puller]]:
    """One `meshd run` domain that does not train, and a peer it trusts (no address: never called) that pulls."""
    layout = build_mesh(tmp_path / "pull", 1, settings={
        "training": {"enabled": "false"}, "gossip": gossip, "checkpoint": {"interval_s": "0.5"}})
    domain = layout.domains[0]
    puller_ident = identitymod.generate()
    with open(layout.workdir / "registry.toml", "a") as f:
        f.write(f'[[peers]]\ndomain = "puller"\npeer_id = "{puller_ident.peer_id}"\n')
    mesh = LocalMesh(layout)
    puller: Puller | None = None
    try:
        mesh.start()
        mesh.wait_running(240)
        # Joined (its own pull on join found nobody): pulls are answered from now on, not refused not_ready.
        wait_for(lambda: _status(domain.status_url)["tasks"]["default"]["joined"], timeout=60,
                 what="the task to have joined")
        model = _status(domain.status_url)["model"]
        ids = {"task": "default", "fp": model["fingerprint"], "schema": model["data_schema"]}
        puller = Puller(puller_ident, bytes.fromhex(domain.peer_id), domain.peer_port, ids)
        yield domain, puller
    finally:
        if puller is not None:
            puller.close()
        mesh.stop()
    log = (domain.directory / "daemon.log").read_text(errors="replace")
    assert "BlockingError" not in log and "request_failed" not in log


@pytest.mark.parametrize("limits", ["defaults", "floor_only"])
def test_two_thousand_pulls_leave_the_model_unchanged_and_the_weight_bounded(tmp_path: Path, limits: str) -> None:
    gossip = {"codec": '"f64"', "exchange": '"push"'}  # f64: an answer carries the model exactly
    if limits == "floor_only":  # no rate limit at all: the weight floor alone must hold
        gossip |= {"pull_interval_s": "0.0", "max_pulls_per_min": "1000000.0"}
    with single_domain(tmp_path, gossip) as (domain, puller):
        before = _checkpoint(domain.directory)
        assert before.weight == pytest.approx(1.0)

        answers: dict[str, int] = {}
        weights: list[float] = []
        deadline = time.monotonic() + 300 * TIMEOUT_SCALE  # a bound on the loop, not a speed requirement
        started = time.monotonic()
        for _ in range(PULLS):
            assert time.monotonic() < deadline, f"2,000 pulls not sent in time: {answers}"
            status, data = puller.pull()
            if status == 200:
                body = puller.open_model(data)
                weights.append(float(body["weight"]))
                values = codecmod.decode(body["values"], body["count"], body["codec"])
                assert torch.allclose(values, before.values, rtol=1e-9, atol=1e-12), "an answer moved the model"
                answers["200"] = answers.get("200", 0) + 1
            else:
                assert status == 429, (status, data[:300])
                reason = json.loads(data)["error"]
                answers[reason] = answers.get(reason, 0) + 1
        elapsed = time.monotonic() - started
        print(f"{limits}: {PULLS} pulls in {elapsed:.1f} s: {answers}; answer weights {weights}")

        assert sum(answers.values()) == PULLS
        assert weights and all(w > 0 for w in weights)
        assert all(w <= FRACTION * 1.0 + 1e-12 for w in weights)  # a bounded fraction of at most 1.0 free
        task = _status(domain.status_url)["tasks"]["default"]
        weight = task["gossip"]["weight"]
        assert weight >= FLOOR
        rejected = task["gossip"]["rejected"]
        refused = {k: v for k, v in answers.items() if k != "200"}
        assert {k: rejected.get(k, 0) for k in refused} == refused  # each refusal counted under its reason
        assert task["gossip"]["pulls"] == answers["200"]
        if limits == "defaults":
            # One answer per peer per 5 s: however long the loop took, at most this many were answered.
            assert answers["200"] <= 1 + elapsed / 5.0 + 1
            assert set(refused) <= {"pull_rate", "pull_budget", "weight_low"}
            assert refused.get("pull_rate", 0) >= PULLS - answers["200"] - refused.get("weight_low", 0) - 30
        else:
            # 0.75 ** 8 = 0.100 >= 0.1 > 0.75 ** 9: eight answers, then the floor refuses every pull.
            assert answers["200"] == 8 and refused == {"weight_low": PULLS - 8}
            assert weight == pytest.approx(0.75 ** 8)
            # A push-pull share below the floor is still answered, but with at most the weight it brought:
            # an exchange never lowers the responder's weight, so the floor has nothing to guard (a domain
            # that answered nobody looked like a sink to the clipped rule).
            share = {"domain": "puller", **puller.ids, "codec": "f64", "count": int(before.values.numel()),
                     "values": codecmod.encode(before.values, "f64"), "weight": 0.01, "version": 0, "reply": True}
            status, data = puller.send("share", share)
            assert status == 200, (status, data[:300])
            given = float(puller.open_model(data)["weight"])
            assert 0 < given <= 0.01
            weight = _status(domain.status_url)["tasks"]["default"]["gossip"]["weight"]
            assert weight == pytest.approx(0.75 ** 8 + 0.01 - given) and weight >= 0.75 ** 8
            answers["share"] = 1  # one share merged (mesh_stats received below)
        after = _checkpoint(domain.directory, _checkpoint(domain.directory).seq)  # written after all of the above
        assert after.weight == pytest.approx(weight)
        assert torch.allclose(after.values, before.values, rtol=1e-9, atol=1e-12), (
            f"the model moved by {float((after.values - before.values).abs().max()):.3g}")
        # Issue #10 item 9c: `received` counts what took effect, the refusals are in `rejected` alone.
        mesh_stats = _status(domain.status_url)["gossip"]
        assert mesh_stats["received"] == answers["200"] + answers.get("share", 0), mesh_stats
        assert {k: mesh_stats["rejected"].get(k, 0) for k in refused} == refused


def test_received_counts_only_envelopes_that_took_effect(tmp_path: Path) -> None:
    """Issue #10 item 9c: docs/status.md says `received` counts accepted envelopes; refused ones were counted
    too. A ping and a pull answered, three shares for a task it does not run and a second pull refused: 2."""
    with single_domain(tmp_path, {}) as (domain, puller):
        assert puller.send("ping", {"domain": "puller"})[0] == 200
        before = _status(domain.status_url)["gossip"]
        assert before["received"] == 1
        statuses = [puller.send("share", {"task": "nope"})[0] for _ in range(3)]
        statuses += [puller.pull()[0], puller.pull()[0]]
        assert statuses == [409, 409, 409, 200, 429], statuses
        after = _status(domain.status_url)["gossip"]
        assert after["received"] == 2, after
        assert after["rejected"].get("unknown_task", 0) == before["rejected"].get("unknown_task", 0) + 3
        assert after["rejected"].get("pull_rate", 0) == before["rejected"].get("pull_rate", 0) + 1
        status, text = http_get(domain.status_url + "/metrics")
        assert status == 200 and b"\nmeshd_messages_received_total 2.0\n" in text
