"""Static discovery, the registry file, and mDNS TXT validation (no network here; see *_netns.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.signing import SigningKey
from zeroconf import ServiceInfo

from meshd.errors import ConfigError
from meshd.mesh.discovery import (
    TXT_TASKS_MAX,
    DiscoveryEvent,
    MdnsDiscovery,
    PeerGone,
    PeerSeen,
    StaticDiscovery,
    StaticPeer,
    check_address,
    decode_tasks_txt,
    encode_tasks_txt,
    load_registry,
    peer_seen_from_info,
)


def key() -> bytes:
    return bytes(SigningKey.generate().verify_key)


A, B, C = key(), key(), key()


class Recorder:
    def __init__(self) -> None:
        self.events: list[DiscoveryEvent] = []

    def __call__(self, event: DiscoveryEvent) -> None:
        self.events.append(event)

    def take(self) -> list[DiscoveryEvent]:
        out, self.events = self.events, []
        return out


# ------------------------------------------------------------------ StaticDiscovery


async def test_static_start_reports_entries_with_address_once() -> None:
    rec = Recorder()
    sd = StaticDiscovery([StaticPeer("a", "10.0.0.1:7452", A), StaticPeer("b", None, B, "registry")], rec)
    assert rec.events == []  # nothing before start
    await sd.start()
    assert rec.take() == [PeerSeen(A, "10.0.0.1:7452", "a", "static")]
    await sd.start()  # idempotent
    assert rec.take() == []


async def test_static_update_reports_only_differences() -> None:
    rec = Recorder()
    sd = StaticDiscovery([StaticPeer("a", "h:1", A), StaticPeer("b", "h:2", B)], rec)
    await sd.start()
    rec.take()
    sd.update([StaticPeer("a", "h:1", A), StaticPeer("b", "h:2", B)])
    assert rec.take() == []  # unchanged
    sd.update([StaticPeer("a", "h:9", A), StaticPeer("c", "h:3", C)])
    assert rec.take() == [
        PeerGone(B, "static"),
        PeerSeen(A, "h:9", "a", "static"),
        PeerSeen(C, "h:3", "c", "static"),
    ]
    sd.update([StaticPeer("a2", "h:9", A), StaticPeer("c", None, C)])  # rename; address dropped
    assert rec.take() == [PeerGone(C, "static"), PeerSeen(A, "h:9", "a2", "static")]
    sd.update([StaticPeer("a2", "h:9", A, "registry")])  # source changes: gone under the old one
    assert rec.take() == [PeerGone(A, "static"), PeerSeen(A, "h:9", "a2", "registry")]
    sd.update([StaticPeer("c", None, C)])
    assert rec.take() == [PeerGone(A, "registry")]
    assert sd.entries == [StaticPeer("c", None, C)]


async def test_static_update_while_stopped_only_records_then_restart_reports() -> None:
    rec = Recorder()
    sd = StaticDiscovery([StaticPeer("a", "h:1", A)], rec)
    await sd.start()
    await sd.stop()
    await sd.stop()
    assert rec.take() == [PeerSeen(A, "h:1", "a", "static")]  # stopping reports nothing
    sd.update([StaticPeer("b", "h:2", B)])
    assert rec.take() == []
    await sd.start()
    assert rec.take() == [PeerSeen(B, "h:2", "b", "static")]


# ------------------------------------------------------------------ registry file


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "registry.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_load_registry_happy_path(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        f"""
[[peers]]
domain = "sales"
peer_id = "{A.hex()}"
address = "10.0.0.1:7452"

[[peers]]
domain = "ops"
peer_id = "{B.hex().upper()}"
""",
    )
    assert load_registry(p) == [
        StaticPeer("sales", "10.0.0.1:7452", A, "registry"),
        StaticPeer("ops", None, B, "registry"),
    ]


def test_load_registry_empty_file_is_no_peers(tmp_path: Path) -> None:
    assert load_registry(write(tmp_path, "")) == []


def test_load_registry_collects_every_problem_with_key_paths(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        f"""
[[peers]]
domain = ""
peer_id = "abc"
address = "nohost"

[[peers]]
peer_id = "{A.hex()}"
adress = "10.0.0.1:1"

[[peers]]
domain = "x"
peer_id = "{A.hex()}"
address = "10.0.0.1:70000"

[[peers]]
domain = "ok"
peer_id = "{A.hex()}"
address = 7452
""",
    )
    with pytest.raises(ConfigError) as ei:
        load_registry(p)
    err = ei.value
    assert err.path == str(p)
    assert str(p) in str(err)
    text = "\n".join(err.problems)
    for needle in (
        "registry.peers[0].domain: must be 1..64 characters",
        "registry.peers[0].peer_id: a peer id is 64 hex characters, got 3",
        'registry.peers[0].address: must be "host:port"',
        "registry.peers[1].domain: missing",
        "registry.peers[1]: unknown keys ['adress']",
        "registry.peers[2].address: port must be 1..65535",
        "registry.peers[2].peer_id: duplicate of registry.peers[1].peer_id",
        "registry.peers[3].address: must be a string, got int",
    ):
        assert needle in text, (needle, err.problems)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("peers = 3", "registry.peers: must be an array of tables"),
        ("peers = [1]", "registry.peers[0]: must be a table, got int"),
        ("[[peers]\n", "registry: invalid TOML"),
        ("other = 1", "registry: unknown keys ['other']"),
        ('[[peers]]\ndomain = "a\\u0007"\npeer_id = "x"', "registry.peers[0].domain: must be printable"),
        ('[[peers]]\ndomain = "a"\npeer_id = 5', "registry.peers[0].peer_id: must be a string, got int"),
        ('[[peers]]\ndomain = "a"\npeer_id = "' + "zz" * 32 + '"', "registry.peers[0].peer_id: a peer id is hex"),
    ],
)
def test_load_registry_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_registry(write(tmp_path, text))
    assert any(needle in prob for prob in ei.value.problems), ei.value.problems
    assert ei.value.path is not None and ei.value.path.endswith("registry.toml")


def test_load_registry_missing_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_registry(tmp_path / "nope.toml")
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_registry(bad)


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("10.0.0.1:7452", True),
        ("host.example:1", True),
        ("[::1]:7452", True),
        ("::1:7452", False),
        ("10.0.0.1", False),
        (":7452", False),
        ("h:0", False),
        ("h:65536", False),
        ("h:x", False),
        ("h h:1", False),
    ],
)
def test_check_address(address: str, ok: bool) -> None:
    assert (check_address(address) is None) == ok


# ------------------------------------------------------------------ mDNS TXT validation (offline)

TYPE = MdnsDiscovery.SERVICE_TYPE


def info(props: dict[str, str], addresses: list[str] | None = None, port: int = 7452) -> ServiceInfo:
    return ServiceInfo(
        TYPE,
        f"x.{TYPE}",
        port=port,
        properties=props,
        server="x.local.",
        parsed_addresses=["10.1.2.3"] if addresses is None else addresses,
    )


def good_props() -> dict[str, str]:
    return {"id": A.hex(), "domain": "sales", "v": "1", "fp": "abc123"}


def test_txt_valid() -> None:
    # No `tasks` key: a single-model meshd, whose one task is the default one.
    assert peer_seen_from_info(info(good_props()), 1) == PeerSeen(
        A, "10.1.2.3:7452", "sales", "mdns", "abc123", tasks={"default": ("abc123", None)})
    assert peer_seen_from_info(info({**good_props(), "fp": ""}), 1) == PeerSeen(
        A, "10.1.2.3:7452", "sales", "mdns", None
    )
    tasks = {"fraud": ("0123456789abcdef", "fedcba9876543210"), "churn": ("aa", "bb")}
    text, count = encode_tasks_txt(tasks)
    assert (text, count) == ("churn:aa:bb,fraud:0123456789ab:fedcba987654", 2)
    seen = peer_seen_from_info(info({**good_props(), "tasks": text}), 1)
    assert isinstance(seen, PeerSeen)
    assert seen.tasks == {"churn": ("aa", "bb"), "fraud": ("0123456789ab", "fedcba987654")}


def test_txt_tasks_are_bounded_and_checked() -> None:
    many = {f"task-{i:02d}-{'x' * 40}": ("f" * 64, "e" * 64) for i in range(10)}
    text, count = encode_tasks_txt(many)
    assert len(text) <= TXT_TASKS_MAX and count == 10 and 0 < text.count(",") + 1 < 10
    assert decode_tasks_txt(text) is not None
    assert decode_tasks_txt("a:00:00," * 40) is None  # longer than any sender writes
    for bad in ("x", "a:b", "Bad:00:00", "a:zz:00", "a:" + "0" * 13 + ":00"):
        assert decode_tasks_txt(bad) is None, bad
        assert peer_seen_from_info(info({**good_props(), "tasks": bad}), 1) == "bad tasks"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": "abc"}, "bad id"),
        ({"id": "g" * 64}, "bad id"),
        ({"domain": ""}, "bad domain"),
        ({"domain": "d" * 65}, "bad domain"),
        ({"domain": "a\nb"}, "bad domain"),
        ({"v": "2"}, "protocol version"),
        ({"v": "one"}, "protocol version"),
        ({"fp": "f" * 129}, "bad fp"),
    ],
)
def test_txt_malformed_is_ignored_with_reason(change: dict[str, str], reason: str) -> None:
    got = peer_seen_from_info(info({**good_props(), **change}), 1)
    assert isinstance(got, str) and reason in got


def test_txt_missing_keys_and_no_ipv4() -> None:
    got = peer_seen_from_info(info({"domain": "x", "v": "1"}), 1)
    assert isinstance(got, str) and "bad id" in got
    got = peer_seen_from_info(info(good_props(), addresses=["fe80::1"]), 1)
    assert got == "no IPv4 address"


async def test_mdns_stop_before_start_is_a_noop() -> None:
    md = MdnsDiscovery(
        domain="sales.eu",
        peer_id=A,
        port=7452,
        advertise_ips=["10.1.2.3"],
        interfaces=["10.1.2.3"],
        model_fp=None,
        protocol_version=1,
        on_event=Recorder(),
    )
    assert not md.running
    await md.stop()
    await md.set_model_fp("x")  # recorded for the next start, nothing sent
    assert md.service_name == f"sales-eu-{A.hex()[:12]}.{TYPE}"
