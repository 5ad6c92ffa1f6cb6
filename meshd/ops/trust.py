"""`meshd trust add | remove | list`: edit the trust list of a config file safely.

An edit keeps the file's comments and layout (tomlkit), is validated by meshd's own config loader before
anything is written (a refused edit leaves the file as it was), and replaces the file atomically with its
mode and owner kept (temp file, fsync, rename, fsync of the folder). The running daemon's file watcher
then reloads it, so a new peer is accepted without a restart.

One peer lives in two places: its id in ``[trust] peers`` (with its domain as the line's comment), and,
when it has a static address, a ``[[peers]]`` table (domain, address, peer_id).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.items

from meshd import config as configmod
from meshd import store
from meshd.errors import ConfigError, MeshdError

__all__ = ["TrustEntry", "add", "entries", "remove"]


@dataclass
class TrustEntry:
    """One key the config names: trusted or not, and where each fact about it comes from."""

    peer_id: str
    domain: str | None = None
    address: str | None = None
    trusted: bool = False
    sources: list[str] = field(default_factory=list)


def entries(path: Path) -> list[TrustEntry]:
    """Every key of the config's ``[trust] peers``, ``[[peers]]`` and trust registry, ordered by domain.

    Raises ConfigError when the config does not validate (``meshd config check`` says the same)."""
    cfg = configmod.load(path)
    doc = _parse(path.read_text(encoding="utf-8"), path)
    labels = _labels(doc)
    out: dict[str, TrustEntry] = {}
    for pid in cfg.trust.peers:
        out[pid] = TrustEntry(pid, labels.get(pid), trusted=True, sources=["trust.peers"])
    for p in cfg.peers:
        e = out.setdefault(p.peer_id, TrustEntry(p.peer_id))
        e.domain, e.address = p.domain, p.address
        e.sources.append("[[peers]]")
    if cfg.trust.registry is not None:
        from meshd.mesh.discovery import load_registry  # the daemon's own reader of the governance file

        for r in load_registry(cfg.trust.registry):
            pid = r.peer_id.hex()
            e = out.setdefault(pid, TrustEntry(pid))
            e.trusted = True
            e.domain = e.domain or r.domain
            e.address = e.address or r.address
            e.sources.append(f"registry {cfg.trust.registry}")
    return sorted(out.values(), key=lambda e: (e.domain or "~", e.peer_id))


def add(path: Path, domain: str, peer_id: str, address: str | None) -> str:
    """Trust ``peer_id`` as ``domain`` (and dial it at ``address``); returns what was done.

    Raises ConfigError (bad argument, or the edited config would not validate) or MeshdError (I/O)."""
    problems = _check_args(domain=domain, peer_id=peer_id, address=address)
    if problems:
        raise ConfigError(problems)
    path = path.resolve()
    text = _read(path)
    doc = _parse(text, path)
    current = entries(path)
    for e in current:
        if e.domain == domain and e.peer_id != peer_id:
            raise ConfigError([f"--domain: {domain!r} is already the domain of peer id {e.peer_id} "
                               f"({', '.join(e.sources)}); one domain, one key: run `meshd trust remove "
                               f"--domain {domain}` first to replace its key"])
    trust = doc.get("trust")
    if trust is None:
        trust = tomlkit.table()
        doc["trust"] = trust
    ids = _trust_ids(doc)
    labels = _labels(doc)
    done = []
    if peer_id not in ids or labels.get(peer_id) != domain:
        if peer_id not in ids:
            ids.append(peer_id)
            done.append(f"trusted {domain} ({peer_id[:16]}…) in [trust] peers")
        labels[peer_id] = domain
        trust["peers"] = _id_array(ids, labels)
    if address is not None:
        tables = _peer_tables(doc)
        entry = next((t for t in tables if t.get("peer_id") == peer_id), None)
        if entry is None:
            entry = tomlkit.table()
            entry.update({"domain": domain, "address": address, "peer_id": peer_id})
            if "peers" not in doc:
                if not tomlkit.dumps(doc).endswith("\n\n"):
                    doc.add(tomlkit.nl())
                doc.append("peers", tomlkit.aot())
            doc["peers"].append(entry)
            done.append(f"added [[peers]] {domain} at {address}")
        elif entry.get("address") != address or entry.get("domain") != domain:
            entry["domain"], entry["address"] = domain, address
            done.append(f"set [[peers]] {domain} to {address}")
    if not done:
        return f"{domain} ({peer_id[:16]}…) is already trusted in {path}; nothing to change"
    _replace(path, text, tomlkit.dumps(doc))
    return "; ".join(done) + f" ({path})"


def remove(path: Path, *, peer_id: str | None = None, domain: str | None = None) -> tuple[str, list[str]]:
    """Stop trusting a peer (by id or by domain) and drop its ``[[peers]]`` table.

    Returns (what was done, warnings): a key the governance registry lists stays trusted (this command does
    not edit that file). Raises ConfigError when nothing matches or the edit would not validate."""
    problems = _check_args(domain=domain, peer_id=peer_id, address=None)
    if problems:
        raise ConfigError(problems)
    path = path.resolve()
    text = _read(path)
    doc = _parse(text, path)
    matching = [e for e in entries(path) if e.peer_id == peer_id or (domain is not None and e.domain == domain)]
    if not matching:
        what = f"peer id {peer_id}" if peer_id else f"domain {domain!r}"
        raise ConfigError([f"no key for {what} in {path} (see `meshd trust list`)"])
    gone = {e.peer_id for e in matching}
    ids = _trust_ids(doc)
    labels = _labels(doc)
    done = []
    if any(pid in gone for pid in ids):
        doc["trust"]["peers"] = _id_array([pid for pid in ids if pid not in gone], labels)
        done.append("removed from [trust] peers")
    if "peers" in doc:
        tables = _peer_tables(doc)
        keep = [t for t in tables if t.get("peer_id") not in gone]
        if len(keep) != len(tables):
            for i in reversed(range(len(tables))):
                if tables[i].get("peer_id") in gone:
                    del doc["peers"][i]
            if not keep:
                del doc["peers"]
            done.append("removed its [[peers]] table")
    warnings = [f"{e.peer_id} is listed in the trust registry ({s.removeprefix('registry ')}), which this "
                f"command does not edit: it stays trusted until governance removes it there"
                for e in matching for s in e.sources if s.startswith("registry ")]
    names = ", ".join(f"{e.domain or '?'} ({e.peer_id[:16]}…)" for e in matching)
    if done:
        _replace(path, text, tomlkit.dumps(doc))
    return f"{names}: " + ("; ".join(done) if done else "nothing to change in the config") + f" ({path})", warnings


# --- helpers ---------------------------------------------------------------------------------------------


def _check_args(*, domain: str | None, peer_id: str | None, address: str | None) -> list[str]:
    problems = []
    if domain is not None and configmod._domain(domain):
        problems.append(f"--domain: {configmod._domain(domain)} (got {domain!r})")
    if peer_id is not None and configmod._peer_id(peer_id):
        problems.append(f"--peer-id: {configmod._peer_id(peer_id)} (got {peer_id!r})")
    if address is not None and configmod._host_port(address):
        problems.append(f"--address: {configmod._host_port(address)} (got {address!r})")
    return problems


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found; create one with `meshd init --dir {path.parent}`"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read ({exc})"], str(path)) from None


def _parse(text: str, path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None


def _trust_ids(doc: tomlkit.TOMLDocument) -> list[str]:
    trust = doc.get("trust")
    peers = trust.get("peers") if trust is not None else None
    return [str(v) for v in peers] if isinstance(peers, list) else []


def _labels(doc: tomlkit.TOMLDocument) -> dict[str, str]:
    """peer id -> the comment of its line in ``[trust] peers`` (the domain ``trust add`` wrote there)."""
    trust = doc.get("trust")
    peers = trust.get("peers") if trust is not None else None
    out: dict[str, str] = {}
    for group in getattr(peers, "_value", []) if isinstance(peers, tomlkit.items.Array) else []:
        value, comment = getattr(group, "value", None), getattr(group, "comment", None)
        if value is not None and comment is not None:
            label = comment.as_string().lstrip("# ").strip()
            if label and configmod._domain(label) is None:
                out[str(value)] = label
    return out


def _id_array(ids: list[str], labels: dict[str, str]) -> tomlkit.items.Array:
    """``[trust] peers`` as one id a line, each followed by its domain as a comment."""
    arr = tomlkit.array()
    for pid in ids:
        arr.add_line(pid, comment=labels.get(pid))
    if ids:
        arr.add_line(indent="")
    return arr


def _peer_tables(doc: tomlkit.TOMLDocument) -> list[Any]:
    peers = doc.get("peers")
    return list(peers) if isinstance(peers, list) else []


def _replace(path: Path, old_text: str, new_text: str) -> None:
    """Validate the edited config with the daemon's loader, then replace the file atomically (mode, owner)."""
    try:
        raw = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as exc:  # tomlkit wrote something tomllib refuses: never write it
        raise ConfigError([f"the edited config would not be valid TOML ({exc}); the file is unchanged"],
                          str(path)) from None
    configmod.from_dict(raw, base_dir=path.parent, source=path)  # ConfigError: the file is unchanged
    st = os.stat(path)
    if _read(path) != old_text:
        raise MeshdError(f"{path} changed while it was being edited; nothing written, run the command again")
    owner = (st.st_uid, st.st_gid) if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()) else None
    store.atomic_write(path, new_text.encode("utf-8"), mode=st.st_mode & 0o7777, owner=owner)
