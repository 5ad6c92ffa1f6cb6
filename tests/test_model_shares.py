"""Model shares against a real daemon that runs a model: bad shares are refused and change nothing."""

from __future__ import annotations

import math
import struct
import time
from typing import Any

import pytest

from meshd import identity as identitymod
from meshd.core import codec as codecmod
from meshd.core.replay import ReplayGuard
from meshd.core.wire import Limits, Wire, decode_body, encode_body
from meshd.task import datasets
from tests.helpers import DaemonProc, init_domain, post_envelope, set_toml


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("shares")
    x, y = datasets.load_digits_dataset()
    datasets.write_npz_product(tmp / "data.npz", x[:300], y[:300])
    client = identitymod.generate()
    cfg, peer_id, peer_port, status_port = init_domain(tmp / "d", "payments", "--data", str(tmp / "data.npz"))
    set_toml(cfg, "trust", "peers", f'["{client.peer_id}"]')
    set_toml(cfg, "training", "enabled", "false")  # the model only changes by merges
    set_toml(cfg, "gossip", "pull_on_join", "false")
    # Push-sum's own share semantics, one share at a time (the default clipped rule refuses a first share while
    # it calibrates: tests/test_robust_daemons.py)
    set_toml(cfg, "gossip", "merge", '"pushsum"')
    d = DaemonProc(cfg, status_port)
    try:
        status = d.wait_ready()
        yield {"d": d, "client": client, "to": bytes.fromhex(peer_id), "port": peer_port, "status": status,
               "seq": iter(range(1, 10_000))}
    finally:
        d.stop()
        assert "BlockingError" not in d.logs()


def _share(node: Any, **overrides: Any) -> tuple[int, bytes]:
    model = node["status"]["model"]
    n = model["parameters"]
    body = {"fp": model["fingerprint"], "schema": model["data_schema"], "version": 1, "weight": 0.5,
            "codec": "f32", "count": n, "values": struct.pack(f"<{n}f", *([0.01] * n)), "rows": 300.0}
    body.update(overrides)
    wire = Wire(node["client"], Limits())
    env = wire.seal(node["to"], "share", encode_body(body), next(node["seq"]), int(time.time() * 1000))
    return post_envelope(node["port"], env)


def _model_state(node: Any) -> tuple[Any, ...]:
    s = node["d"].status()
    return s["gossip"]["weight"], s["gossip"]["merged"], s["model"]["version"]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"weight": 1e6}, "bad_values"),  # more than the whole mesh's mass: a takeover attempt
        ({"weight": -1.0}, "bad_values"),
        ({"weight": math.nan}, "bad_values"),
        ({"values": struct.pack("<f", math.nan) * 4810}, "bad_values"),
        ({"values": struct.pack("<f", math.inf) * 4810}, "bad_values"),
        ({"values": struct.pack("<f", 3e7) * 4810}, "bad_values"),  # beyond limits.max_param_abs
        ({"values": b"\0" * 12}, "bad_values"),  # length does not match count
        ({"count": 7}, "bad_body"),  # not this model's size
        ({"count": 4810.0}, "bad_body"),  # the size, but not an int (docs/protocol.md: every type error is bad_body)
        ({"weight": True}, "bad_body"),
        ({"version": -1}, "bad_values"),
        ({"fp": None}, "incompatible"),
        ({"codec": "f8"}, "bad_body"),
        ({"fp": "0" * 32}, "incompatible"),
        ({"schema": "0" * 16}, "schema_mismatch"),  # the same model trained on other columns: never averaged
        ({"schema": None}, "schema_mismatch"),
        ({"rows": -1.0}, "bad_body"),
        ({"rows": "many"}, "bad_body"),
        ({"epochs": math.inf}, "bad_body"),
        ({"codec": "q8", "values": b"\x7f" + b"\0" * (5 * 76 - 1) + b"\0" * 4810}, "bad_values"),  # k = 127
        ({"version": 2**64 - 1}, "bad_values"),  # once merged, the next step overflowed and killed the daemon
        ({"version": 2**53 + 1}, "bad_values"),
        ({"task": "fraud"}, "unknown_task"),  # a task this domain does not run
        ({"task": 7}, "bad_body"),
    ],
)
def test_bad_share_is_refused_and_changes_nothing(node: Any, overrides: dict[str, Any], reason: str) -> None:
    assert node["status"]["model"]["parameters"] == 4810  # mlp(64) on 64 features, 10 classes
    before = _model_state(node)
    status, reply = _share(node, **overrides)
    assert status in (400, 409), (status, reply)
    assert reason.encode() in reply
    assert _model_state(node) == before
    assert node["d"].status()["gossip"]["rejected"][reason] >= 1


def test_good_share_is_merged(node: Any) -> None:
    weight, merged, _ = _model_state(node)
    status, reply = _share(node, weight=0.5)
    assert status == 204, reply
    weight2, merged2, _ = _model_state(node)
    assert merged2 == merged + 1 and weight2 == pytest.approx(weight + 0.5)


def test_a_far_ahead_version_moves_ours_by_a_bounded_step_and_the_daemon_lives_on(node: Any) -> None:
    _, merged, version = _model_state(node)
    status, reply = _share(node, version=2**53)  # the largest accepted: a hostile peer's fast-forward
    assert status == 204, reply
    _, merged2, version2 = _model_state(node)
    assert merged2 == merged + 1 and version < version2 <= version + 1024
    assert node["d"].proc.poll() is None


def test_pull_answers_a_quarter_of_the_weight_sealed_to_the_requester(node: Any) -> None:
    weight, *_ = _model_state(node)
    wire = Wire(node["client"], Limits())
    fp, schema = node["status"]["model"]["fingerprint"], node["status"]["model"]["data_schema"]
    env = wire.seal(node["to"], "pull", encode_body({"fp": fp, "schema": schema}), next(node["seq"]),
                    int(time.time() * 1000))
    status, reply = post_envelope(node["port"], env)
    assert status == 200
    opened = wire.open(reply, int(time.time() * 1000), lambda pk: pk == node["to"], ReplayGuard())
    body = decode_body(opened.body, Limits())
    assert opened.kind == "model" and body["fp"] == fp and body["weight"] == pytest.approx(weight / 4)
    assert body["schema"] == schema and body["rows"] > 0
    assert _model_state(node)[0] == pytest.approx(weight * 3 / 4)  # gossip.pull_fraction = 0.25


def test_pull_for_another_schema_is_refused(node: Any) -> None:
    weight, *_ = _model_state(node)
    wire = Wire(node["client"], Limits())
    body = {"fp": node["status"]["model"]["fingerprint"], "schema": "f" * 16}
    env = wire.seal(node["to"], "pull", encode_body(body), next(node["seq"]), int(time.time() * 1000))
    status, reply = post_envelope(node["port"], env)
    assert status == 409 and b"schema_mismatch" in reply
    assert _model_state(node)[0] == weight  # nothing given away


def test_push_pull_share_is_answered_with_the_receivers_own_half_from_before_the_merge(node: Any) -> None:
    weight, merged, _ = _model_state(node)
    model = node["status"]["model"]
    n = model["parameters"]
    body = {"fp": model["fingerprint"], "schema": model["data_schema"], "version": 1, "weight": 0.5,
            "codec": "f32", "count": n, "values": struct.pack(f"<{n}f", *([0.25] * n)), "rows": 300.0,
            "reply": True}
    wire = Wire(node["client"], Limits())
    env = wire.seal(node["to"], "share", encode_body(body), next(node["seq"]), int(time.time() * 1000))
    status, reply = post_envelope(node["port"], env)
    assert status == 200, reply
    opened = wire.open(reply, int(time.time() * 1000), lambda pk: pk == node["to"], ReplayGuard())
    back = decode_body(opened.body, Limits())
    assert opened.kind == "model" and back["fp"] == model["fingerprint"] and back["schema"] == model["data_schema"]
    assert back["weight"] == pytest.approx(min(weight / 2, 0.5))  # its half from before our 0.5 arrived
    assert "reply" not in back  # an answer never asks for another answer
    values = codecmod.decode(back["values"], n, back["codec"])
    assert float((values - 0.25).abs().max()) > 1e-3  # its own model, not our share echoed
    weight2, merged2, _ = _model_state(node)
    assert merged2 == merged + 1 and weight2 == pytest.approx(weight - min(weight / 2, 0.5) + 0.5)
    # an answer never carries more weight than the share that asked for it: tiny shares cannot drain a domain
    status, reply = _share(node, reply=True, weight=1e-6)
    assert status == 200, reply
    opened = wire.open(reply, int(time.time() * 1000), lambda pk: pk == node["to"], ReplayGuard())
    assert decode_body(opened.body, Limits())["weight"] == pytest.approx(1e-6)
    weight2 = _model_state(node)[0]
    # a refused push-pull share sends nothing back and costs the receiver nothing
    status, reply = _share(node, reply=True, schema="0" * 16)
    assert status == 409 and b"schema_mismatch" in reply
    assert _model_state(node)[0] == pytest.approx(weight2)
