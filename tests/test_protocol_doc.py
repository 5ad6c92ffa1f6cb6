"""docs/protocol.md cannot rot: its independent client and its header example are run against meshd.core.wire."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from meshd import identity
from meshd.core.replay import ReplayGuard
from meshd.core.wire import Limits, Wire, decode_body, encode_body, signed_header
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
    args = (1, b"\x01" * 32, b"\x02" * 32, "ping", 1, NOW, b"\x03" * 24, 16)
    assert client["signed_header"](*args) == signed_header(*args)


def test_doc_header_example_matches_the_implementation() -> None:
    [example] = [b for b in _blocks("text") if b.startswith("6d657368642d")]
    hex_text = "".join(line.split()[0] for line in example.splitlines() if line.strip())
    assert bytes.fromhex(hex_text) == signed_header(1, b"\x01" * 32, b"\x02" * 32, "ping", 1, NOW, b"\x03" * 24, 16)


def test_doc_lists_every_reason_with_its_status() -> None:
    text = DOC.read_text(encoding="utf-8")
    for status, reasons in {
        400: ["malformed", "bad_version", "bad_body", "bad_values", "unknown_kind"],
        401: ["bad_ciphertext"],
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
