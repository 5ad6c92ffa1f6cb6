"""`meshd trust` and `meshd doctor` over real processes (#12 items 3 and 4).

The edits are made by the real CLI on real config files; the round trip runs two real daemons on loopback
(mDNS off, `init_domain`): a peer id with a one-digit typo is refused and shown as an untrusted sender,
`meshd doctor` points at the typo, and `meshd trust remove` + `meshd trust add` fix it while the daemon
runs (its file watcher reloads; no restart), after which doctor passes on the healthy two-domain mesh.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshd import identity as identitymod
from meshd.core.membership import RefusedSenders
from meshd.core.wire import Limits, Wire, encode_body
from tests.helpers import DaemonProc, init_domain, post_envelope, run_cli, set_toml, wait_for

START_S = 90.0  # two daemons importing torch on a loaded 2-core machine
CONVERGE_S = 60.0


def _domain(tmp: Path, name: str) -> tuple[Path, str, int, int]:
    """A domain with a tiny CSV data product and fast liveness timing."""
    d = tmp / name
    cfg, peer_id, peer_port, status_port = init_domain(d, name)
    data = d / "data.csv"
    data.write_text("x0,x1,label\n" + "".join(f"{i % 7}.0,{i % 3}.5,{i % 2}\n" for i in range(40)))
    set_toml(cfg, "data", "path", f'"{data}"')
    set_toml(cfg, "model", "name", '"logreg"')
    set_toml(cfg, "model", "num_classes", "2")
    set_toml(cfg, "membership", "ping_after_s", "0.5")
    set_toml(cfg, "membership", "suspect_after_s", "3.0")
    set_toml(cfg, "membership", "dead_after_s", "8.0")
    return cfg, peer_id, peer_port, status_port


def _key() -> str:
    return identitymod.generate().peer_id


def _typo(peer_id: str, *, valid: bool) -> tuple[str, int]:
    """The same id with one hex digit changed, and where: a valid key (one mistyped id in ~50 is: it gets past
    the config check) or not (the usual case: the config check refuses it)."""
    for at in range(len(peer_id)):
        for digit in "0123456789abcdef":
            if digit == peer_id[at]:
                continue
            typo = peer_id[:at] + digit + peer_id[at + 1:]
            try:
                identitymod.parse_peer_id(typo)
                ok = True
            except ValueError:
                ok = False
            if ok == valid:
                return typo, at
    raise AssertionError("no such typo")  # about 1 in 10^8 for a valid one


def _cli_ok(*args: str) -> str:
    r = run_cli(*args)
    assert r.returncode == 0, f"meshd {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_typo_is_shown_and_doctor_points_at_it_then_trust_add_fixes_it_without_restart(
    tmp_path: Path, daemons: Callable[..., DaemonProc]
) -> None:
    a_cfg, a_id, a_peer, a_status = _domain(tmp_path, "alpha")
    b_cfg, b_id, b_peer, b_status = _domain(tmp_path, "beta")
    typo, at = _typo(b_id, valid=True)
    _cli_ok("trust", "add", "--config", str(b_cfg), "--domain", "alpha", "--peer-id", a_id,
            "--address", f"127.0.0.1:{a_peer}")
    _cli_ok("trust", "add", "--config", str(a_cfg), "--domain", "beta", "--peer-id", typo,
            "--address", f"127.0.0.1:{b_peer}")
    a, b = daemons(a_cfg, a_status), daemons(b_cfg, b_status)
    a.wait_ready(START_S)
    b.wait_ready(START_S)

    # beta pings alpha, which refuses it (untrusted) and records the key with the domain its body claims.
    def refused() -> dict[str, object] | None:
        rows = a.status()["mesh"]["untrusted_senders"]
        return next((r for r in rows if r["peer_id"] == b_id and r["domain"] == "beta"), None)

    row = wait_for(refused, CONVERGE_S, what="alpha to list beta as a refused untrusted sender")
    assert isinstance(row["count"], int) and row["count"] >= 1
    peers = _cli_ok("peers", "--config", str(a_cfg))
    assert "untrusted keys" in peers and b_id in peers and "sent to us (refused)" in peers, peers

    r = run_cli("doctor", "--config", str(a_cfg))
    assert r.returncode == 1, r.stdout
    typo_lines = [line for line in r.stdout.splitlines() if "likely a typo" in line]
    assert len(typo_lines) == 1, r.stdout
    assert typo in typo_lines[0] and b_id in typo_lines[0] and f"position {at + 1} " in typo_lines[0], r.stdout
    assert f"meshd trust add --config {a_cfg} --domain beta --peer-id {b_id}" in r.stdout, r.stdout

    # A flood of fresh untrusted keys turns the table over; it never grows past 32 entries.
    to = bytes.fromhex(a_id)
    flood = [identitymod.generate() for _ in range(40)]
    for i, ident in enumerate(flood):
        env = Wire(ident, Limits()).seal(to, "ping", encode_body({"domain": f"x{i}"}), 1, int(time.time() * 1000))
        status, body = post_envelope(a_peer, env)
        assert status == 403 and b"untrusted" in body
    rows = a.status()["mesh"]["untrusted_senders"]
    assert len(rows) == 32
    assert rows[0]["peer_id"] == flood[-1].peer_id  # newest first
    assert {r["peer_id"] for r in rows} <= {i.peer_id for i in flood} | {b_id}

    up_before = a.status()["uptime_s"]
    _cli_ok("trust", "remove", "--config", str(a_cfg), "--peer-id", typo)
    assert typo not in a_cfg.read_text()
    _cli_ok("trust", "add", "--config", str(a_cfg), "--domain", "beta", "--peer-id", b_id,
            "--address", f"127.0.0.1:{b_peer}")
    listed = _cli_ok("trust", "list", "--config", str(a_cfg))
    assert any(line.split()[:2] == ["beta", "yes"] and line.endswith(b_id) for line in listed.splitlines()), listed

    def alive(d: DaemonProc, other: str) -> bool:
        return any(p["peer_id"] == other and p["state"] == "alive" for p in d.status()["mesh"]["peers"])

    wait_for(lambda: alive(a, b_id) and alive(b, a_id), CONVERGE_S, what="alpha and beta alive on each other")
    s = a.status()
    assert a.proc.poll() is None and s["uptime_s"] >= up_before, "the daemon was restarted"
    assert s["config"]["last_reload_ok"] is True
    assert all(r["peer_id"] != b_id for r in s["mesh"]["untrusted_senders"])  # trusted now: gone from the table

    r = run_cli("doctor", "--config", str(a_cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "checks passed" in r.stdout
    assert f"ok    peer beta ({b_id[:16]}…): alive" in r.stdout, r.stdout
    assert f"ok    data[default]: data.path {a_cfg.parent / 'data.csv'} is readable" in r.stdout, r.stdout


def test_doctor_fails_on_a_missing_data_file_that_config_check_accepts(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path / "d", "sales")
    missing = tmp_path / "nope.csv"
    set_toml(cfg, "data", "path", f'"{missing}"')
    assert run_cli("config", "check", str(cfg)).returncode == 0
    r = run_cli("doctor", "--offline", "--config", str(cfg))
    assert r.returncode == 1, r.stdout
    assert f"FAIL  data[default]: data.path {missing}: does not exist" in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith("doctor: 1 problem(s)"), r.stdout


def test_doctor_fails_on_a_domain_name_used_by_two_keys(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path / "d", "hr")
    k1, k2 = _key(), _key()
    set_toml(cfg, "trust", "peers", f'["{k1}", "{k2}"]')
    with cfg.open("a") as f:  # a hand edit: `trust add` refuses a second key for a domain
        for k, port in ((k1, 7001), (k2, 7002)):
            f.write(f'\n[[peers]]\ndomain = "sales"\naddress = "127.0.0.1:{port}"\npeer_id = "{k}"\n')
    assert run_cli("config", "check", str(cfg)).returncode == 0
    r = run_cli("doctor", "--offline", "--config", str(cfg))
    assert r.returncode == 1, r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("FAIL  domains:"))
    assert "'sales' is the domain of 2 keys" in line and k1 in line and k2 in line, r.stdout
    refused = run_cli("trust", "add", "--config", str(cfg), "--domain", "sales", "--peer-id", _key())
    assert refused.returncode == 2 and "--domain: 'sales' is already the domain of peer id" in refused.stderr


def test_trust_add_keeps_comments_mode_and_owner_and_refuses_an_edit_the_loader_refuses(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path / "d", "hr")
    os.chmod(cfg, 0o640)
    owner = (os.stat(cfg).st_uid, os.stat(cfg).st_gid)
    if os.geteuid() == 0:
        owner = (65534, 65534)
        os.chown(cfg, *owner)
    before = cfg.read_text()
    pid = _key()
    out = _cli_ok("trust", "add", "--config", str(cfg), "--domain", "sales", "--peer-id", pid,
                  "--address", "127.0.0.1:7452")
    assert "trusted sales" in out
    after = cfg.read_text()
    kept = [line for line in before.splitlines() if line.strip() and line != "peers = []"]
    assert [line for line in after.splitlines() if line in kept] == kept  # every other line, in order
    assert f'    "{pid}", # sales' in after
    st = os.stat(cfg)
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == owner
    assert not [p for p in cfg.parent.iterdir() if p.name.endswith(".tmp")]
    assert _cli_ok("config", "check", str(cfg)).strip() == "ok"

    # An edit the daemon's loader would refuse is refused with its message, and the file is left as it was.
    set_toml(cfg, "gossip", "fanout", "0")
    broken = cfg.read_text()
    r = run_cli("trust", "add", "--config", str(cfg), "--domain", "ops", "--peer-id", _key())
    assert r.returncode == 2
    assert "gossip.fanout: must be between 1 and 16 (got 0)" in r.stderr and "nothing written" in r.stderr
    assert cfg.read_text() == broken


KEY = identitymod.generate().peer_id


@pytest.mark.parametrize("args, message", [
    (["--domain", "Sales", "--peer-id", KEY], "--domain: must be 1-63 characters"),
    (["--domain", "sales", "--peer-id", KEY[:63]], "--peer-id: is not a peer id"),
    (["--domain", "sales", "--peer-id", _typo(KEY, valid=False)[0]], "--peer-id: is not a valid Ed25519 public key"),
    (["--domain", "sales", "--peer-id", KEY, "--address", "nowhere"], "--address: must be HOST:PORT"),
])
def test_trust_add_names_the_bad_argument(tmp_path: Path, args: list[str], message: str) -> None:
    cfg, *_ = init_domain(tmp_path / "d", "hr")
    before = cfg.read_text()
    r = run_cli("trust", "add", "--config", str(cfg), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert cfg.read_text() == before


def test_config_check_refuses_a_mistyped_peer_id_that_is_no_valid_key(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path / "d", "hr")
    typo, _ = _typo(_key(), valid=False)
    set_toml(cfg, "trust", "peers", f'["{typo}"]')
    r = run_cli("config", "check", str(cfg))
    assert r.returncode == 2
    assert "trust.peers: item 0 is not a valid Ed25519 public key (mistyped?" in r.stderr, r.stderr


def test_refused_senders_is_bounded_newest_first_and_keeps_a_claimed_domain() -> None:
    t = RefusedSenders(max_entries=3)
    keys = [bytes([i]) * 32 for i in range(5)]
    t.record(keys[0], 1.0, "127.0.0.1", "sales")
    t.record(keys[0], 2.0, "127.0.0.2")  # no claim read this time: the known one stays
    for i, k in enumerate(keys[1:], start=1):
        t.record(k, 2.0 + i, "127.0.0.1")
    assert len(t) == 3 and t.get(keys[0]) is None and t.get(keys[1]) is None  # the oldest went first
    t.record(keys[2], 10.0, "127.0.0.9", "hr")
    snap = t.snapshot(now=11.0)
    assert [r["peer_id"] for r in snap] == [keys[2].hex(), keys[4].hex(), keys[3].hex()]
    assert snap[0] == {"peer_id": keys[2].hex(), "domain": "hr", "count": 2, "last_seen_s": 1.0,
                       "remote": "127.0.0.9"}
    t.forget([keys[2]])
    assert [r["peer_id"] for r in t.snapshot(11.0)] == [keys[4].hex(), keys[3].hex()]
    first = RefusedSenders(1)
    first.record(keys[0], 1.0, "r", "sales")
    first.record(keys[0], 2.0, "r")
    assert first.snapshot(2.0)[0]["domain"] == "sales" and first.snapshot(2.0)[0]["count"] == 2
    with pytest.raises(ValueError):
        RefusedSenders(0)


def test_help_lists_trust_and_doctor() -> None:
    r = run_cli("--help")
    for cmd in ("trust", "doctor"):
        assert cmd in r.stdout
    for cmd in (["trust", "add"], ["trust", "remove"], ["trust", "list"], ["doctor"]):
        assert run_cli(*cmd, "--help").returncode == 0


def test_trust_remove_of_a_registry_key_says_it_stays_trusted(tmp_path: Path) -> None:
    cfg, *_ = init_domain(tmp_path / "d", "hr")
    key = _key()
    registry = tmp_path / "d" / "registry.toml"
    registry.write_text(f'[[peers]]\ndomain = "sales"\npeer_id = "{key}"\naddress = "127.0.0.1:7009"\n')
    set_toml(cfg, "trust", "registry", f'"{registry}"')
    listed = _cli_ok("trust", "list", "--config", str(cfg))
    assert f"sales   yes      127.0.0.1:7009  registry {registry}  {key}" in listed, listed
    before = cfg.read_text()
    r = run_cli("trust", "remove", "--config", str(cfg), "--domain", "sales")
    assert r.returncode == 1 and "nothing to change in the config" in r.stdout
    assert f"{key} is listed in the trust registry ({registry})" in r.stderr and "stays trusted" in r.stderr
    assert cfg.read_text() == before
    missing = run_cli("trust", "remove", "--config", str(cfg), "--domain", "ops")
    assert missing.returncode == 2 and "no key for domain 'ops'" in missing.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="checking for the service user needs root (to chown the key)")
def test_doctor_as_root_checks_the_data_file_for_the_service_user() -> None:
    # Not under tmp_path: pytest's base folder is 0700, which the service user rightly cannot enter.
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="meshd-doctor-test.") as top:
        _doctor_for_the_service_user(Path(top))


def _doctor_for_the_service_user(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    cfg, *_ = init_domain(tmp_path / "d", "sales")
    data = tmp_path / "d" / "data.csv"
    data.write_text("x0,label\n1.0,0\n")
    os.chmod(data, 0o600)  # root's own file: root can read it, the service user cannot
    set_toml(cfg, "data", "path", f'"{data}"')
    os.chmod(tmp_path / "d", 0o755)
    key = tmp_path / "d" / "identity.key"
    os.chown(key, 65534, 65534)  # the service user owns the key, as under the unit's User=
    r = run_cli("doctor", "--offline", "--config", str(cfg))
    assert r.returncode == 1, r.stdout
    assert f"FAIL  data[default]: data.path {data}: the service user (" in r.stdout and "cannot read it" in r.stdout
    os.chmod(data, 0o644)
    os.chown(tmp_path / "d", 65534, 65534)  # and the state dir's parent is its to write
    r = run_cli("doctor", "--offline", "--config", str(cfg))
    assert r.returncode == 0, r.stdout
    assert f"data.path {data} is readable by " in r.stdout
