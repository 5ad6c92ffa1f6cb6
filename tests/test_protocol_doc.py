"""docs/protocol.md cannot rot: its independent client and its header example are run against meshd.core.wire."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from meshd import identity
from meshd.core.replay import ReplayGuard
from meshd.core.wire import (
    PROTOCOL_VERSION,
    Limits,
    Wire,
    body_hash,
    decode_body,
    encode_body,
    signed_header,
    verify_commitment,
)
from meshd.errors import WireError

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
NOW = 1_700_000_000_000


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def client() -> dict[str, Any]:
    [code] = [b for b in _blocks("python") if b.startswith("# meshd-client-example")]
    namespace: dict[str, Any] = {"__name__": "meshd_doc_client"}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def test_doc_client_envelope_is_accepted_by_wire(client: dict[str, Any]) -> None:
    client_key = SigningKey.generate()
    node = identity.generate()
    body = {"fp": "abc123", "version": 4, "weight": 0.25, "codec": "f32", "values": b"\x00" * 16, "count": 4}
    data = client["seal"](client_key, node.public_key, "share", body, 9, NOW)
    guard = ReplayGuard()
    opened = Wire(node, Limits()).open(data, NOW + 1000, lambda pk: pk == bytes(client_key.verify_key), guard)
    assert (opened.sender, opened.kind, opened.seq, opened.ts_ms) == (bytes(client_key.verify_key), "share", 9, NOW)
    assert decode_body(opened.body, Limits()) == body
    with pytest.raises(WireError) as ei:
        Wire(node, Limits()).open(data, NOW, lambda pk: True, guard)
    assert ei.value.reason == "replayed"


def test_doc_client_opens_what_wire_seals(client: dict[str, Any]) -> None:
    client_key = SigningKey.generate()
    node = identity.generate()
    data = Wire(node, Limits()).seal(bytes(client_key.verify_key), "pong", encode_body({}), 3, NOW)
    assert client["open_envelope"](client_key, data) == (node.public_key, "pong", 3, NOW, {})
    tampered = data[:-1] + bytes([data[-1] ^ 0x40])
    with pytest.raises(Exception, match=r"[Ss]ignature"):
        client["open_envelope"](client_key, tampered)


def test_doc_client_and_wire_agree_on_the_signed_header(client: dict[str, Any]) -> None:
    args = (2, b"\x01" * 32, b"\x02" * 32, "ping", 1, NOW, b"\x03" * 24, 16)
    assert client["signed_header"](*args) == signed_header(*args)
    assert client["VERSION"] == PROTOCOL_VERSION == 2


def test_doc_signed_message_example_matches_the_implementation() -> None:
    [example] = [b for b in _blocks("text") if b.startswith("6d657368642d")]
    hex_text = "".join(line.split()[0] for line in example.splitlines() if line.strip())
    header = signed_header(2, b"\x01" * 32, b"\x02" * 32, "ping", 1, NOW, b"\x03" * 24, 16)
    assert bytes.fromhex(hex_text) == header + body_hash(b"")


def _worked_example() -> dict[str, str]:
    [block] = [b for b in _blocks("text") if b.startswith("body ")]
    return {line.split()[0]: line.split()[1] for line in block.splitlines() if line.strip()}


def test_doc_worked_example_is_what_wire_and_the_doc_client_seal(client: dict[str, Any]) -> None:
    """Deterministic inputs (seeded keys, fixed nonce): both implementations produce the page's bytes."""
    sender, recipient = SigningKey(b"\x01" * 32), SigningKey(b"\x02" * 32)
    plaintext = encode_body({"domain": "payments"})
    ex = _worked_example()
    sealed = Wire(identity.Identity(sender), Limits()).seal(
        bytes(recipient.verify_key), "ping", plaintext, 1, NOW, nonce=b"\x03" * 24)
    assert sealed.hex() == ex["envelope"]
    assert client["seal"](sender, bytes(recipient.verify_key), "ping", {"domain": "payments"}, 1, NOW,
                          nonce=b"\x03" * 24).hex() == ex["envelope"]
    env = msgpack.unpackb(sealed)
    assert (env["body"].hex(), env["sig"].hex(), body_hash(plaintext).hex()) == (ex["body"], ex["sig"], ex["blake3"])
    assert client["open_envelope"](recipient, sealed) == (bytes(sender.verify_key), "ping", 1, NOW,
                                                          {"domain": "payments"})


def test_doc_client_verifies_a_commitment_without_any_key(client: dict[str, Any]) -> None:
    alice, bob = identity.generate(), identity.generate()
    plaintext = encode_body({"weight": 0.5, "values": b"\x07" * 40})
    data = Wire(alice, Limits()).seal(bob.public_key, "share", plaintext, 4, NOW)
    assert client["verify_commitment"](data, plaintext) == alice.public_key == verify_commitment(data, plaintext)
    with pytest.raises(BadSignatureError):
        client["verify_commitment"](data, plaintext[:-1] + b"\x08")
    with pytest.raises(ValueError):
        client["verify_commitment"](data, plaintext + b"\x00")


def test_doc_client_refuses_what_the_receiver_refuses_without_assert(client: dict[str, Any]) -> None:
    """Explicit checks (an ``assert`` vanishes under ``python -O``): a bool version, duplicate keys, v1, v3."""
    key = SigningKey.generate()
    node = identity.generate()
    good = Wire(node, Limits()).seal(bytes(key.verify_key), "pong", encode_body({}), 3, NOW)
    env = msgpack.unpackb(good)
    assert good[0] == 0x89
    bad = {
        "bool version": msgpack.packb({**env, "v": True}),
        "duplicate key": b"\x8a" + good[1:] + msgpack.packb("v") + msgpack.packb(2),
        "trailing bytes": good + b"\x00",
        "version 1": msgpack.packb({**env, "v": 1}),
        "float seq": msgpack.packb({**env, "seq": 3.0}),
        "str nonce": msgpack.packb({**env, "nonce": "x" * 24}),
        "extra key": msgpack.packb({**env, "x": 1}),
    }
    for data in bad.values():
        with pytest.raises(ValueError):  # msgpack's ExtraData is a ValueError too
            client["open_envelope"](key, data)
        with pytest.raises(WireError):
            Wire(identity.Identity(key), Limits()).open(data, NOW, lambda _pk: True, ReplayGuard())
    assert client["open_envelope"](key, good)[1] == "pong"


def test_doc_fingerprint_example_is_what_a_model_computes() -> None:
    from meshd.task import models

    text = DOC.read_text(encoding="utf-8")
    [block] = [b for b in _blocks("text") if b.startswith('{"entries"')]
    canonical, fp_line = block.strip().splitlines()
    spec = models.ModelSpec("logreg", num_classes=3)
    module = models.build_model(spec, 4, seed=1)
    assert fp_line == f"fp = {models.fingerprint(spec, module, 4)}"
    import hashlib

    assert hashlib.sha256(canonical.encode()).hexdigest()[:32] == fp_line.split()[-1]
    # the documented entry names of the built-in models
    assert list(models.build_model(models.ModelSpec("mlp", hidden=(8, 5), num_classes=3), 4, 1).state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    cnn = models.build_model(models.ModelSpec("cnn1d", channels=(4, 6), kernel_size=5, num_classes=3), 40, 1)
    assert [(k, list(t.shape)) for k, t in cnn.state_dict().items()] == [
        ("1.weight", [4, 1, 5]), ("1.bias", [4]), ("3.weight", [6, 4, 5]), ("3.bias", [6]),
        ("6.weight", [3, 6 * 20]), ("6.bias", [3])]
    assert "row-major (C) order" in text
    flat = models.flatten(module)
    sd = module.state_dict()
    assert float(flat[1 * 4 + 2]) == float(sd["0.weight"][1, 2])  # element [i, j] of [m, n] at i * n + j
    assert float(flat[12]) == float(sd["0.bias"][0])


def test_doc_depth_examples_hold() -> None:
    assert decode_body(msgpack.packb({"k": [[[[[[[]]]]]]]}), Limits())
    with pytest.raises(WireError):
        decode_body(msgpack.packb({"k": [[[[[[[[]]]]]]]]}), Limits())
    assert '`{"k": [[[[[[[]]]]]]]}`' in DOC.read_text(encoding="utf-8")


def test_doc_lists_every_reason_with_its_status() -> None:
    text = DOC.read_text(encoding="utf-8")
    for status, reasons in {
        400: ["malformed", "bad_version", "bad_body", "bad_values", "unknown_kind"],
        403: ["untrusted"],
        409: ["replayed", "stale", "incompatible"],
        413: ["too_large"],
        421: ["wrong_recipient"],
        404: ["not_found"],
        408: ["read_timeout"],
        503: ["not_joined", "not_ready", "unavailable"],
    }.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {status} |"))
        for reason in reasons:
            assert f"`{reason}`" in row, (status, reason)


def test_doc_client_talks_to_a_running_daemon(client: dict[str, Any], tmp_path: Path, daemons: Any) -> None:
    """The page alone is enough: its client pings a real daemon and opens the signed pong."""
    import time

    from tests.helpers import init_domain, set_toml

    client_key = SigningKey.generate()
    cfg, peer_id, peer_port, status_port = init_domain(tmp_path, "payments")
    set_toml(cfg, "trust", "peers", f'["{bytes(client_key.verify_key).hex()}"]')
    d = daemons(cfg, status_port)
    d.wait_ready()
    url = f"http://127.0.0.1:{peer_port}/v1/envelope"
    node_pk = bytes.fromhex(peer_id)
    status, reply = client["post"](url, client["seal"](client_key, node_pk, "ping", {}, 1, int(time.time() * 1000)))
    assert status == 200
    sender, kind, _seq, _ts, body = client["open_envelope"](client_key, reply)
    assert (sender, kind, body.get("domain")) == (node_pk, "pong", "payments")
    # the same envelope again is a replay; a share for a model this domain does not run is incompatible
    again = client["seal"](client_key, node_pk, "ping", {}, 1, int(time.time() * 1000))
    assert client["post"](url, again)[0] == 409
    share = {"fp": "0" * 32, "version": 1, "weight": 0.5, "codec": "f32", "values": b"\0" * 16, "count": 4}
    status, reply = client["post"](url, client["seal"](client_key, node_pk, "share", share, 2, int(time.time() * 1000)))
    assert status == 409 and b"incompatible" in reply
    assert d.status()["gossip"]["rejected"] == {"replayed": 1, "incompatible": 1}
