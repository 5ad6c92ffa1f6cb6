"""Discovery: where are the other domains? mDNS (zeroconf) and a static list/registry file.

Both implementations report :class:`PeerSeen` / :class:`PeerGone` events through the ``on_event``
callback given to their constructor (always called from the event loop thread). Whether a peer is
trusted is not decided here: the peer table puts untrusted keys aside.
"""

from __future__ import annotations

import asyncio
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshd.errors import ConfigError
from meshd.identity import parse_peer_id, peer_id_of

__all__ = [
    "Discovery",
    "DiscoveryEvent",
    "EventHandler",
    "MdnsDiscovery",
    "PeerGone",
    "PeerSeen",
    "StaticDiscovery",
    "StaticPeer",
    "check_address",
    "load_registry",
    "peer_seen_from_info",
]

log = structlog.get_logger("meshd.mesh.discovery")

MAX_DOMAIN_LEN = 64
MAX_FP_LEN = 128


@dataclass(frozen=True)
class PeerSeen:
    peer_id: bytes
    address: str  # "host:port"
    domain: str
    source: str  # static | registry | mdns
    model_fp: str | None = None
    schema_fp: str | None = None  # data schema fingerprint (TXT ``schema``)
    # The tasks it runs (TXT ``tasks``): name -> (model fp prefix, schema fp prefix). Display and a first
    # guess only: the signed pong is what a task trusts.
    tasks: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


TXT_TASKS_MAX = 240  # bytes of the TXT ``tasks`` value (one TXT string holds 255 with its key)
TXT_FP_CHARS = 12  # fingerprint prefix length in TXT ``tasks``
_TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # as config's task.name


def encode_tasks_txt(tasks: dict[str, tuple[str, str]]) -> tuple[str, int]:
    """``name:fp12:schema12`` entries joined by ``,``, as many as fit in TXT_TASKS_MAX; and the total count."""
    out: list[str] = []
    size = 0
    for name, (fp, schema) in sorted(tasks.items()):
        entry = f"{name}:{fp[:TXT_FP_CHARS]}:{schema[:TXT_FP_CHARS]}"
        if size + len(entry) + (1 if out else 0) > TXT_TASKS_MAX:
            break
        out.append(entry)
        size += len(entry) + (1 if len(out) > 1 else 0)
    return ",".join(out), len(tasks)


def decode_tasks_txt(text: str) -> dict[str, tuple[str | None, str | None]] | None:
    """The inverse of :func:`encode_tasks_txt`; None when malformed (the service is then ignored)."""
    if len(text) > TXT_TASKS_MAX + 15:
        return None
    out: dict[str, tuple[str | None, str | None]] = {}
    for entry in filter(None, text.split(",")):
        parts = entry.split(":")
        if len(parts) != 3 or not _TASK_NAME_RE.match(parts[0]):
            return None
        if any(len(x) > TXT_FP_CHARS or not all(c in "0123456789abcdef" for c in x) for x in parts[1:]):
            return None
        out[parts[0]] = (parts[1] or None, parts[2] or None)
    return out


@dataclass(frozen=True)
class PeerGone:
    """A source withdraws a peer: ``address`` (mDNS: the goodbye of one service), or all it said (None)."""

    peer_id: bytes
    source: str
    address: str | None = None


DiscoveryEvent = PeerSeen | PeerGone
EventHandler = Callable[[DiscoveryEvent], None]


class Discovery(Protocol):
    """A source of peer-seen / peer-gone events. ``start``/``stop`` are idempotent and restartable."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# --------------------------------------------------------------------------- static / registry


@dataclass(frozen=True)
class StaticPeer:
    """A peer listed by the config (``static``) or a registry file (``registry``)."""

    domain: str
    address: str | None  # None: trusted key whose address comes from another source (mDNS)
    peer_id: bytes
    source: str = "static"


class StaticDiscovery:
    """Reports a fixed list of peers; :meth:`update` (config reload) reports only the differences."""

    def __init__(self, entries: Sequence[StaticPeer], on_event: EventHandler) -> None:
        self._on_event = on_event
        self._entries = _by_id(entries)
        self._running = False

    @property
    def entries(self) -> list[StaticPeer]:
        return list(self._entries.values())

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        for e in self._entries.values():
            if e.address is not None:
                self._on_event(PeerSeen(e.peer_id, e.address, e.domain, e.source))

    async def stop(self) -> None:
        # Nothing to withdraw: the listed peers did not go anywhere because we stopped looking.
        self._running = False

    def update(self, entries: Sequence[StaticPeer]) -> None:
        """Replace the list: PeerGone for removed entries, PeerSeen for new and changed ones.

        An entry whose address was removed, or whose source changed, is reported gone (under its
        old source) first. Before :meth:`start`, or after :meth:`stop`, it only records the list.
        """
        new = _by_id(entries)
        old, self._entries = self._entries, new
        if not self._running:
            return
        for pid, before in old.items():
            after = new.get(pid)
            if before.address is None:
                continue
            if after is None or after.address is None or after.source != before.source:
                self._on_event(PeerGone(pid, before.source))
        for pid, after in new.items():
            if after.address is not None and old.get(pid) != after:
                self._on_event(PeerSeen(pid, after.address, after.domain, after.source))


def _by_id(entries: Sequence[StaticPeer]) -> dict[bytes, StaticPeer]:
    return {e.peer_id: e for e in entries}  # a later duplicate wins; load_registry refuses them


def load_registry(path: Path) -> list[StaticPeer]:
    """Read a registry file: ``[[peers]]`` tables with ``domain``, ``peer_id`` (hex), ``address``.

    ``address`` ("host:port") is optional. Every problem is collected into one
    :class:`~meshd.errors.ConfigError` naming ``registry.peers[i].field`` and the file.
    """
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"registry: cannot read the file ({e.strerror or e})"], where) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(["registry: the file is not UTF-8 text"], where) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"registry: invalid TOML ({e})"], where) from None

    problems: list[str] = []
    unknown = sorted(set(doc) - {"peers"})
    if unknown:
        problems.append(f"registry: unknown keys {unknown} (expected only [[peers]])")
    tables = doc.get("peers", [])
    if not isinstance(tables, list):
        raise ConfigError([*problems, "registry.peers: must be an array of tables [[peers]]"], where)

    out: list[StaticPeer] = []
    first_index: dict[bytes, int] = {}
    for i, t in enumerate(tables):
        key = f"registry.peers[{i}]"
        if not isinstance(t, dict):
            problems.append(f"{key}: must be a table, got {type(t).__name__}")
            continue
        extra = sorted(set(t) - {"domain", "peer_id", "address"})
        if extra:
            problems.append(f"{key}: unknown keys {extra} (allowed: domain, peer_id, address)")
        domain, peer_id, address = t.get("domain"), t.get("peer_id"), t.get("address")
        ok = True
        if domain is None:
            problems.append(f"{key}.domain: missing")
            ok = False
        elif (why := _check_domain(domain)) is not None:
            problems.append(f"{key}.domain: {why} (got {domain!r})")
            ok = False
        pid = b""
        if peer_id is None:
            problems.append(f"{key}.peer_id: missing")
            ok = False
        elif not isinstance(peer_id, str):
            problems.append(f"{key}.peer_id: must be a string, got {type(peer_id).__name__}")
            ok = False
        else:
            try:
                pid = parse_peer_id(peer_id)
            except ValueError as e:
                problems.append(f"{key}.peer_id: {e}")
                ok = False
        if address is not None:
            if not isinstance(address, str):
                problems.append(f"{key}.address: must be a string, got {type(address).__name__}")
                ok = False
            elif (why := check_address(address)) is not None:
                problems.append(f"{key}.address: {why} (got {address!r})")
                ok = False
        if pid and pid in first_index:
            problems.append(f"{key}.peer_id: duplicate of registry.peers[{first_index[pid]}].peer_id")
            ok = False
        elif pid:
            first_index[pid] = i
        if ok:
            assert isinstance(domain, str)
            out.append(StaticPeer(domain=domain, address=address, peer_id=pid, source="registry"))
    if problems:
        raise ConfigError(problems, where)
    return out


def check_address(address: str) -> str | None:
    """Why ``address`` is not a usable "host:port" (IPv6 as "[addr]:port"), or None if it is."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return 'must be "host:port"'
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return 'an IPv6 host must be in brackets: "[addr]:port"'
    if host in ("[]",) or any(c.isspace() for c in host):
        return "bad host"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return "port must be 1..65535"
    return None


def _check_domain(domain: object) -> str | None:
    if not isinstance(domain, str):
        return f"must be a string, got {type(domain).__name__}"
    if not 1 <= len(domain) <= MAX_DOMAIN_LEN:
        return f"must be 1..{MAX_DOMAIN_LEN} characters"
    if not domain.isprintable():
        return "must be printable characters only"
    return None


# --------------------------------------------------------------------------- mDNS


class _LogOnce:
    """At most one log line per key per interval: mDNS content is attacker-controlled."""

    def __init__(self, interval_s: float = 300.0, max_keys: int = 512) -> None:
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._last: dict[str, float] = {}

    def warning(self, event: str, key: str, **kw: Any) -> None:
        now = time.monotonic()
        k = f"{event}\0{key}"
        last = self._last.get(k)
        if last is not None and now - last < self._interval_s:
            return
        if len(self._last) >= self._max_keys:
            self._last.clear()  # crude but bounded; worst case a few repeated lines
        self._last[k] = now
        log.warning(event, **kw)


def peer_seen_from_info(info: ServiceInfo, protocol_version: int) -> PeerSeen | str:
    """Validate a resolved meshd service: a PeerSeen, or the reason it is ignored."""
    props = info.properties
    try:
        id_text = (props.get(b"id") or b"").decode("ascii")
        domain = (props.get(b"domain") or b"").decode("utf-8")
        version = (props.get(b"v") or b"").decode("ascii")
        fp = (props.get(b"fp") or b"").decode("utf-8")
        schema = (props.get(b"schema") or b"").decode("utf-8")
        tasks_txt = props.get(b"tasks")
        tasks_text = None if tasks_txt is None else tasks_txt.decode("ascii")
    except UnicodeDecodeError:
        return "TXT values are not text"
    try:
        peer_id = parse_peer_id(id_text)
    except ValueError as e:
        return f"bad id: {e}"
    if (why := _check_domain(domain)) is not None:
        return f"bad domain: {why}"
    if not version.isdigit() or int(version) != protocol_version:
        return f"protocol version {version!r}, we speak {protocol_version}"
    if len(fp) > MAX_FP_LEN or not fp.isprintable():
        return "bad fp"
    if len(schema) > MAX_FP_LEN or not schema.isprintable():
        return "bad schema"
    if tasks_text is None:  # a single-model meshd: its one task is the default one
        tasks = {"default": (fp[:TXT_FP_CHARS] or None, schema[:TXT_FP_CHARS] or None)} if fp else {}
    elif (decoded := decode_tasks_txt(tasks_text)) is None:
        return "bad tasks"
    else:
        tasks = decoded
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses:
        return "no IPv4 address"
    if info.port is None or not 1 <= info.port <= 65535:
        return "bad port"
    return PeerSeen(peer_id, f"{addresses[0]}:{info.port}", domain, "mdns", fp or None, schema or None, tasks)


class MdnsDiscovery:
    """Advertise this domain and browse for others with mDNS (``_meshd._tcp.local.``).

    ``interfaces``: IPv4 addresses of the interfaces to bind; None or empty binds all interfaces
    (production default; tests must always pass explicit addresses).
    """

    SERVICE_TYPE = "_meshd._tcp.local."
    RESOLVE_TIMEOUT_MS = 3000
    MAX_RESOLVING = 64  # concurrent resolutions; more Added/Updated events are dropped (logged)
    MAX_NAMES = 1024  # service names remembered for PeerGone

    def __init__(
        self,
        *,
        domain: str,
        peer_id: bytes,
        port: int,
        advertise_ips: list[str],
        interfaces: list[str] | None,
        model_fp: str | None,
        protocol_version: int,
        schema_fp: str | None = None,
        tasks: dict[str, tuple[str, str]] | None = None,
        on_event: EventHandler,
        instance_name: str | None = None,
    ) -> None:
        self._domain = domain
        self._peer_id = peer_id
        self._port = port
        self._advertise_ips = list(advertise_ips)
        self._interfaces = list(interfaces) if interfaces else None
        self._model_fp = model_fp
        self._schema_fp = schema_fp
        self._tasks = dict(tasks) if tasks is not None else None
        self._protocol_version = protocol_version
        self._on_event = on_event
        hex12 = peer_id_of(peer_id)[:12]
        label = instance_name or f"{_dns_safe(domain)[:40]}-{hex12}"
        self._name = f"{label}.{self.SERVICE_TYPE}"
        self._server = f"meshd-{hex12}.local."
        self._lock = asyncio.Lock()
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._names: dict[str, tuple[bytes, str]] = {}  # service name -> (peer id, address), for PeerGone
        self._quiet = _LogOnce()

    @property
    def running(self) -> bool:
        return self._aiozc is not None

    @property
    def service_name(self) -> str:
        """The registered instance name (zeroconf may add " (2)" on a name conflict)."""
        return self._info.name if self._info is not None else self._name

    async def start(self) -> None:
        async with self._lock:
            if self._aiozc is not None:
                return
            interfaces: Any = self._interfaces or InterfaceChoice.All
            aiozc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            try:
                info = self._service_info()
                await (await aiozc.async_register_service(info, allow_name_change=True))
                self._aiozc, self._info = aiozc, info
                self._browser = AsyncServiceBrowser(aiozc.zeroconf, self.SERVICE_TYPE, handlers=[self._on_state_change])
            except BaseException:
                self._aiozc = self._info = self._browser = None
                await aiozc.async_close()
                raise
            log.info(
                "mdns_registered",
                name=info.name,
                addresses=info.parsed_addresses(),
                port=self._port,
                interfaces=self._interfaces or "all",
            )

    async def stop(self) -> None:
        """Withdraw the service (goodbye packets go out) and then close the sockets."""
        async with self._lock:
            aiozc, browser, info = self._aiozc, self._browser, self._info
            if aiozc is None:
                return
            self._aiozc = self._browser = self._info = None
            try:
                if browser is not None:
                    await browser.async_cancel()
                tasks = list(self._resolving.values())
                for t in tasks:
                    t.cancel()
                if tasks:
                    await asyncio.wait(tasks)
                if info is not None:
                    await (await aiozc.async_unregister_service(info))
            finally:
                self._resolving.clear()
                self._names.clear()
                await aiozc.async_close()
            log.info("mdns_stopped", name=info.name if info else self._name)

    async def set_model_fp(self, fp: str | None) -> None:
        """Advertise a new model fingerprint (TXT ``fp``); takes effect now if running."""
        async with self._lock:
            self._model_fp = fp
            await self._update_locked()

    async def set_tasks(self, tasks: dict[str, tuple[str, str]], model_fp: str | None, schema_fp: str | None) -> None:
        """Advertise another set of tasks (TXT ``tasks``, and ``fp``/``schema`` of the default one)."""
        async with self._lock:
            if (self._tasks, self._model_fp, self._schema_fp) == (tasks, model_fp, schema_fp):
                return
            self._tasks, self._model_fp, self._schema_fp = dict(tasks), model_fp, schema_fp
            await self._update_locked()

    async def _update_locked(self) -> None:
        if self._aiozc is None or self._info is None:
            return
        info = self._service_info(name=self._info.name)
        await (await self._aiozc.async_update_service(info))
        self._info = info
        log.info("mdns_updated", name=info.name, fp=self._model_fp, tasks=sorted(self._tasks or {}))

    # ------------------------------------------------------------------ internals

    def _service_info(self, name: str | None = None) -> ServiceInfo:
        ips = self._advertise_ips or self._interfaces or _local_ipv4_addresses()
        if not ips:
            raise ValueError("no IPv4 address to advertise (set advertise_ips)")
        props = {
            "id": peer_id_of(self._peer_id),
            "domain": self._domain,
            "v": str(self._protocol_version),
            "fp": self._model_fp or "",
            "schema": self._schema_fp or "",
        }
        if self._tasks is not None:
            props["tasks"], count = encode_tasks_txt(self._tasks)
            props["ntasks"] = str(count)
        return ServiceInfo(
            self.SERVICE_TYPE,
            name or self._name,
            port=self._port,
            properties=props,
            server=self._server,
            parsed_addresses=ips,
        )

    def _on_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Called by zeroconf from the event loop; must not block and must not raise into zeroconf.
        if self._aiozc is None or (self._info is not None and name == self._info.name):
            return
        if state_change is ServiceStateChange.Removed:
            task = self._resolving.pop(name, None)
            if task is not None:
                task.cancel()
            # One service's goodbye withdraws its address only (anyone can send one, for any name, and
            # another service may advertise the same id elsewhere): the peer table decides what it means.
            known = self._names.pop(name, None)
            if known is not None and known not in self._names.values():
                self._emit(PeerGone(known[0], "mdns", known[1]))
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()  # a newer Added/Updated supersedes it
        elif len(self._resolving) >= self.MAX_RESOLVING:
            self._quiet.warning("mdns_resolve_dropped", "all", name=name, reason="too many resolutions")
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name), name=f"mdns-resolve {name}")
        self._resolving[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        for name, t in list(self._resolving.items()):
            if t is task:
                del self._resolving[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("mdns_resolve_crashed", task=task.get_name(), exc_info=exc)

    async def _resolve(self, name: str) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        info = AsyncServiceInfo(self.SERVICE_TYPE, name)
        if not await info.async_request(aiozc.zeroconf, self.RESOLVE_TIMEOUT_MS):
            self._quiet.warning("mdns_resolve_failed", name, name=name)
            return
        seen = peer_seen_from_info(info, self._protocol_version)
        if isinstance(seen, str):
            self._quiet.warning("mdns_ignored", name, name=name, reason=seen)
            return
        if seen.peer_id == self._peer_id:
            return  # our own service under another name (e.g. a stale one from before a restart)
        if name not in self._names and len(self._names) >= self.MAX_NAMES:
            del self._names[next(iter(self._names))]
        before = self._names.get(name)
        self._names[name] = (seen.peer_id, seen.address)
        if before is not None and before != self._names[name] and before not in self._names.values():
            self._emit(PeerGone(before[0], "mdns", before[1]))  # the service moved: its old address is withdrawn
        self._emit(seen)

    def _emit(self, event: DiscoveryEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            # There is no caller to hand this to (we run inside zeroconf's callbacks): log it loudly.
            log.exception("discovery_handler_failed", event=type(event).__name__)


def _dns_safe(text: str) -> str:
    """An instance-name label from a domain name: no dots (they would split the label)."""
    out = "".join(c if (c.isalnum() or c in "-_") else "-" for c in text)
    return out.strip("-") or "meshd"


def _local_ipv4_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host (used only when nothing was configured)."""
    import ifaddr  # zeroconf's own dependency

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return found
