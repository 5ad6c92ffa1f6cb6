"""`meshd doctor`: the checks `meshd config check` cannot make, one line each, and what to do about a failure.

Offline (from the config file and the machine): the config is valid, the identity key is there with a safe
mode and owner, each task's data product is there and readable, the state directory is writable, the ports
are free (when no daemon runs), no domain name belongs to two keys. Online (from the running daemon's
``/status``): it answers on its status address, every trusted peer is alive, no trusted peer id is one or
two hex digits off an untrusted key that contacted us (a typo: the id to trust is printed), no envelope
was refused for clock skew, mDNS runs where it is enabled.

The exit code is 0 only when every check holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import stat
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd import config as configmod
from meshd import identity as identitymod
from meshd.config import Config
from meshd.errors import ConfigError, IdentityError

__all__ = ["Check", "run_checks", "typo_distance"]

OK, FAIL, SKIP = "ok", "FAIL", "skip"
MAX_TYPO_DIGITS = 2
DEFAULT_CONFIG = Path("/etc/meshd/meshd.toml")


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``status`` is ok, FAIL or skip; ``fix`` says what to do about a FAIL."""

    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}" + (f"\n      fix: {self.fix}" if self.fix else "")


def run_checks(path: Path, status_url: str | None, fetch: Callable[[str], dict[str, Any]] | None = None) -> list[Check]:
    """Every check, in order. ``status_url`` None: offline checks only. ``fetch`` gets /status (tests)."""
    try:
        cfg = configmod.load(path)
    except ConfigError as exc:
        return [Check(FAIL, "config", f"{path}: {p}", "edit the file; `meshd config check` lists the same")
                for p in exc.problems]
    out = [Check(OK, "config", f"{path} is valid ({len(cfg.tasks)} task(s), {len(cfg.trust.peers)} trusted "
                               f"peer id(s){', a registry' if cfg.trust.registry else ''})")]
    out.append(_identity(cfg))
    out += _data(cfg)
    out.append(_state_dir(cfg))
    status: dict[str, Any] | None = None
    if status_url is not None:
        try:
            status = (fetch or _get_status)(status_url)
            out.append(Check(OK, "daemon", f"answers on {status_url} (domain {status.get('domain')}, "
                                           f"{status.get('state')}, up {status.get('uptime_s', 0):.0f} s)"))
        except (OSError, ValueError) as exc:
            out.append(Check(FAIL, "daemon", f"no answer on {status_url} ({getattr(exc, 'reason', exc)})",
                             "start it (`systemctl start meshd`, see `journalctl -u meshd`); the online checks "
                             "are skipped"))
    out += _ports(cfg, running=status is not None)
    out += _duplicate_domains(cfg, status)
    if status is not None:
        out += _typos(cfg, status)
        out += _peers_alive(cfg, status)
        out += _skew_and_mdns(cfg, status)
    return out


def _flag(cfg: Config) -> str:
    """`` --config PATH`` for the commands a fix suggests, unless the config is the default one."""
    return "" if cfg.source is None or cfg.source == DEFAULT_CONFIG else f" --config {cfg.source}"


def typo_distance(a: str, b: str) -> list[int]:
    """Positions at which two peer ids (hex, same length) differ; [] for equal ids or ids of other lengths."""
    if len(a) != len(b):
        return []
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


# --- offline ---------------------------------------------------------------------------------------------


def _identity(cfg: Config) -> Check:
    path = cfg.node.identity
    try:
        st = path.stat()
        if os.geteuid() == 0 and st.st_uid != 0:
            # root checks a key the service user owns: meshd must run as that owner (the unit's User=).
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise IdentityError(f"identity key {path} is readable by group/others (mode "
                                    f"{stat.S_IMODE(st.st_mode):04o}); fix with `chmod 600 {path}`")
            peer_id = "(not read as root: the daemon reads it as its owner)"
        else:
            peer_id = identitymod.load(path).peer_id
    except FileNotFoundError:
        return Check(FAIL, "identity", f"identity key {path} does not exist",
                     f"create one with `meshd keygen --out {path}` (its owner must be the service user)")
    except IdentityError as exc:
        return Check(FAIL, "identity", str(exc))
    return Check(OK, "identity", f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}), "
                                 f"peer id {peer_id}")


@dataclass(frozen=True)
class ServiceUser:
    """The user the daemon runs as, when doctor runs as root for it: the identity key's owner (the daemon
    refuses a key it does not own), so permissions are checked for that user, not for root."""

    uid: int
    gids: frozenset[int]
    name: str

    @classmethod
    def of(cls, cfg: Config) -> ServiceUser | None:
        if os.geteuid() != 0:
            return None  # doctor runs as the service user itself (or as another user: its own access is checked)
        try:
            st = cfg.node.identity.stat()
        except OSError:
            return None
        if st.st_uid == 0:
            return None
        try:
            pw = pwd.getpwuid(st.st_uid)
            return cls(st.st_uid, frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid)), pw.pw_name)
        except KeyError:
            return cls(st.st_uid, frozenset({st.st_gid}), f"uid {st.st_uid}")

    def denied(self, path: Path, want: int) -> str | None:
        """Why this user cannot reach ``path`` with ``want`` (os.R_OK/W_OK/X_OK bits) by mode bits, or None.
        (ACLs are not read: a path denied here may still be allowed by one.)"""
        path = path.absolute()
        for parent in reversed(path.parents):
            if not self._allows(parent, os.X_OK):
                return f"the service user ({self.name}) cannot enter {parent}"
        if not self._allows(path, want):
            return f"the service user ({self.name}) cannot {'write' if want & os.W_OK else 'read'} it"
        if path.is_relative_to("/home") or path.is_relative_to("/root"):
            return "it is under /home or /root, which the unit hides (ProtectHome=yes)"
        return None

    def _allows(self, path: Path, want: int) -> bool:
        st = path.stat()
        shift = 6 if st.st_uid == self.uid else 3 if st.st_gid in self.gids else 0
        return (st.st_mode >> shift) & want == want


def _data(cfg: Config) -> list[Check]:
    out = []
    user = ServiceUser.of(cfg)
    for task in cfg.tasks:
        name = f"data[{task.name}]"
        files = [(k, p) for k, p in (("path", task.data.path), ("test_path", task.data.test_path)) if p is not None]
        if not files:
            out.append(Check(OK, name, "no data product (this task only averages)"))
        for key, p in files:
            want = os.R_OK | (os.X_OK if p.is_dir() else 0)  # a folder is listed, too
            why = _unreadable(p) or (user.denied(p, want) if user else None)
            if why:
                out.append(Check(FAIL, name, f"data.{key} {p}: {why}",
                                 f"put the file there or fix data.{key}; the service user "
                                 f"({user.name if user else 'meshd'}) must be able to read it, and not under /home "
                                 "(ProtectHome=yes)"))
            else:
                who = f" by {user.name}" if user else ""
                size = (f"{sum(1 for _ in p.rglob('*.parquet'))} .parquet files" if p.is_dir()
                        else f"{p.stat().st_size} bytes")
                out.append(Check(OK, name, f"data.{key} {p} is readable{who} ({size})"))
    return out


def _unreadable(p: Path) -> str | None:
    try:
        if p.is_dir():  # a folder of Parquet files (meshd/task/tables.py)
            next(p.iterdir(), None)
            return None
        with p.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None


def _state_dir(cfg: Config) -> Check:
    d = cfg.node.state_dir
    target = d if d.exists() else d.parent
    user = ServiceUser.of(cfg)
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".meshd-doctor."):
            pass
        why = user.denied(target, os.W_OK | os.X_OK) if user else None
    except OSError as exc:
        why = f"cannot write {'in it' if d.exists() else 'its parent ' + str(target)} ({exc.strerror})"
    if why:
        return Check(FAIL, "state_dir", f"{d}: {why}",
                     f"create it for the service user: `install -d -m 0700 -o {user.name if user else 'meshd'} {d}` "
                     "(or set node.state_dir)")
    return Check(OK, "state_dir", f"{d} is writable" if d.exists() else f"{d} will be created (0700) at start")


def _ports(cfg: Config, running: bool) -> list[Check]:
    out = []
    for key in ("peer", "status"):
        addr = getattr(cfg.listen, key)
        if running:
            out.append(Check(SKIP, f"listen.{key}", f"{addr} is the running daemon's"))
            continue
        host, port = configmod.split_host_port(addr)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                # As the daemon's listener does (aiohttp): connections in TIME_WAIT do not make a port busy.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
        except OSError as exc:
            out.append(Check(FAIL, f"listen.{key}", f"cannot bind {addr} ({exc.strerror})",
                             f"stop what uses it (`ss -ltnp 'sport = :{port}'`) or change listen.{key}"))
        else:
            out.append(Check(OK, f"listen.{key}", f"{addr} is free"))
    return out


def _domains_of(cfg: Config, status: dict[str, Any] | None) -> dict[str, set[str]]:
    """Domain name -> the trusted keys said to be it: [[peers]], registry, trust comments, the daemon's table."""
    from meshd.ops import trust

    by_domain: dict[str, set[str]] = {}
    assert cfg.source is not None
    with contextlib.suppress(ConfigError, OSError):
        for e in trust.entries(cfg.source):
            if e.domain:
                by_domain.setdefault(e.domain, set()).add(e.peer_id)
    for p in (status or {}).get("mesh", {}).get("peers", []):  # trusted peers only, with the domain they sent
        if p.get("domain") and p.get("peer_id"):
            by_domain.setdefault(str(p["domain"]), set()).add(str(p["peer_id"]))
    return by_domain


def _duplicate_domains(cfg: Config, status: dict[str, Any] | None) -> list[Check]:
    out = []
    for domain, keys in sorted(_domains_of(cfg, status).items()):
        if domain == cfg.node.domain:
            out.append(Check(FAIL, "domains", f"{domain!r} is this domain's own name, but peer id(s) "
                                              f"{', '.join(sorted(keys))} also claim it",
                             "each domain has its own name; ask that domain which name is its own"))
        elif len(keys) > 1:
            out.append(Check(FAIL, "domains", f"{domain!r} is the domain of {len(keys)} keys: "
                                              + ", ".join(sorted(keys)),
                             f"keep the right one: `meshd trust remove{_flag(cfg)} --peer-id ID` for each other "
                             "(`meshd trust list` shows where each is listed)"))
    return out or [Check(OK, "domains", "no domain name belongs to two keys")]


# --- online ----------------------------------------------------------------------------------------------


def _get_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/status", timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def _trusted_ids(cfg: Config) -> dict[str, str | None]:
    from meshd.ops import trust

    out: dict[str, str | None] = {pid: None for pid in cfg.trust.peers}
    assert cfg.source is not None
    with contextlib.suppress(ConfigError, OSError):
        for e in trust.entries(cfg.source):
            if e.trusted:
                out[e.peer_id] = e.domain
    return out


def _typos(cfg: Config, status: dict[str, Any]) -> list[Check]:
    mesh = status.get("mesh", {})
    untrusted = [(str(u.get("peer_id", "")), u.get("domain"), "sent us envelopes")
                 for u in mesh.get("untrusted_senders", [])]
    untrusted += [(str(u.get("peer_id", "")), u.get("domain"), f"was discovered ({u.get('source')})")
                  for u in mesh.get("untrusted_seen", [])]
    out = []
    for tid, tdomain in sorted(_trusted_ids(cfg).items()):
        for uid, udomain, how in untrusted:
            diff = typo_distance(tid, uid)
            if 0 < len(diff) <= MAX_TYPO_DIGITS:
                where = ", ".join(f"{i + 1} ({tid[i]} vs {uid[i]})" for i in diff)
                domain = tdomain or udomain or "NAME"
                out.append(Check(
                    FAIL, "peer ids",
                    f"trusted peer id {tid} ({tdomain or 'domain unknown'}) differs in {len(diff)} hex digit(s), "
                    f"at position {where}, from {uid} which {how} claiming domain {udomain or 'unknown'}: "
                    f"likely a typo",
                    f"if {uid[:16]}… is {domain}'s key (check with `meshd id` there): `meshd trust remove{_flag(cfg)} "
                    f"--peer-id {tid}` then `meshd trust add{_flag(cfg)} --domain {domain} --peer-id {uid}`"))
    return out or [Check(OK, "peer ids", f"no trusted peer id is {MAX_TYPO_DIGITS} hex digits or fewer off an "
                                         f"untrusted key seen ({len(untrusted)} seen)")]


def _peers_alive(cfg: Config, status: dict[str, Any]) -> list[Check]:
    mesh = status.get("mesh", {})
    if not mesh.get("enabled", True):
        return [Check(SKIP, "peers", "mesh.enabled is false: this domain has left the mesh")]
    trusted = _trusted_ids(cfg)
    if not trusted:
        return [Check(FAIL, "peers", "no peer is trusted: this domain learns alone",
                      f"`meshd trust add{_flag(cfg)} --domain NAME --peer-id ID [--address HOST:PORT]` for each peer")]
    rows = {p.get("peer_id"): p for p in mesh.get("peers", [])}
    out = []
    for pid, domain in sorted(trusted.items(), key=lambda kv: (kv[1] or "~", kv[0])):
        p = rows.get(pid)
        name = f"peer {domain or (p or {}).get('domain') or '?'} ({pid[:16]}…)"
        if p is None:
            out.append(Check(FAIL, name, "trusted, but never found (no address from [[peers]], the registry or mDNS)",
                             f"give its address: `meshd trust add{_flag(cfg)} --domain NAME --peer-id {pid} "
                             "--address HOST:PORT`"))
        elif p.get("state") != "alive":
            seen = p.get("last_seen_s")
            out.append(Check(FAIL, name, f"{p.get('state')} at {p.get('address') or 'no address'} (last heard "
                                         f"{'never' if seen is None else f'{seen:.0f} s ago'})",
                             "is its daemon running, and is its peer port open from here? Does it trust our "
                             f"peer id {status.get('peer_id')}?"))
        else:
            out.append(Check(OK, name, f"alive at {p.get('address')} (answered {p.get('last_seen_s', 0):.1f} s ago)"))
    return out


def _skew_and_mdns(cfg: Config, status: dict[str, Any]) -> list[Check]:
    out = []
    rejected = (status.get("gossip") or {}).get("rejected") or {}
    stale = int(rejected.get("stale", 0)) + int(rejected.get("reply_stale", 0))
    if stale:
        out.append(Check(FAIL, "clock", f"{stale} envelope(s) refused as stale: a peer's clock is more than "
                                        f"limits.max_skew_s = {cfg.limits.max_skew_s:g} s off ours",
                         "run NTP (`timedatectl status`) here and on the peers"))
    else:
        out.append(Check(OK, "clock", "no envelope refused for clock skew"))
    want = cfg.mesh.enabled and cfg.discovery.mdns.enabled
    mdns = bool(status.get("mesh", {}).get("mdns"))
    if want and not mdns:
        out.append(Check(FAIL, "mdns", "enabled, but not running (see `journalctl -u meshd` for mdns_start_failed)",
                         "check discovery.mdns.interfaces and that UDP 5353 is allowed, or disable mDNS and "
                         "list peers with `meshd trust add --address`"))
    else:
        out.append(Check(OK if mdns else SKIP, "mdns", "running" if mdns else "disabled in the config"))
    return out


def report(checks: list[Check]) -> tuple[str, int]:
    """The lines to print, and the exit code (0 only when nothing failed)."""
    failed = [c for c in checks if c.status == FAIL]
    lines = [c.line() for c in checks]
    lines.append(f"doctor: {len(failed)} problem(s)" if failed else
                 f"doctor: all {sum(c.status == OK for c in checks)} checks passed")
    return "\n".join(lines), 1 if failed else 0

