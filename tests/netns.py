"""Test helper: N network namespaces on one private bridge, for real multi-host tests on one machine.

Layout (nothing is created in the host's own network namespace unless ``host_link=True``)::

    hub namespace "mh<sfx>":  bridge br0 (multicast snooping off) + one veth end per node
    node namespace "mn<sfx><i>":  lo + veth0 with 10.A.B.(i+1)/24

The bridge lives in its own namespace, so the host's interfaces (eth0...) never see a packet, and
deleting the namespaces removes every link. A process started with :meth:`NetNs.exec` sees only
``lo`` and ``veth0``, so anything it binds (zeroconf included) is confined to the test network.

Use from a test module::

    from tests.netns import make_mesh_namespaces  # noqa: F401  (pytest fixture)

    def test_x(make_mesh_namespaces):
        a, b, c = make_mesh_namespaces(3)
        proc = a.exec([sys.executable, "-c", "..."], stdout=subprocess.PIPE)

Requires root and ``ip netns``; the fixture skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = ["Mesh", "NetNs", "make_mesh_namespaces", "mesh_namespaces", "unavailable_reason"]

_IP_TIMEOUT_S = 10.0
NODE_IFNAME = "veth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=_IP_TIMEOUT_S)


@dataclass
class NetNs:
    """One node namespace: ``name`` (for ``ip netns exec``), ``ip`` (its veth0 address)."""

    name: str
    ip: str
    prefix_len: int = 24
    ifname: str = NODE_IFNAME
    hub: str = ""  # the hub namespace holding the bridge
    hub_port: str = ""  # this node's veth end inside the hub

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace (for asyncio.create_subprocess_exec too)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this namespace; the caller owns (waits for / kills) the process."""
        return subprocess.Popen(self.argv(argv), **popen_kwargs)

    def run(
        self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this namespace to completion; text output captured."""
        return subprocess.run(self.argv(argv), check=check, capture_output=True, text=True, timeout=timeout)

    def link_names(self) -> list[str]:
        """Names of the network interfaces visible inside the namespace."""
        out = self.run(["ip", "-o", "link", "show"]).stdout
        return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if line]

    def set_link(self, up: bool) -> None:
        """Cut (``up=False``) or restore this node's cable to the bridge (partition tests)."""
        _ip("-n", self.hub, "link", "set", "dev", self.hub_port, "up" if up else "down")


@dataclass
class Mesh:
    """The namespaces of one test network; :meth:`close` removes them all (idempotent)."""

    hub: str
    subnet: str  # e.g. "10.213.7" (the /24 prefix, without the last octet)
    nodes: list[NetNs] = field(default_factory=list)
    host_ifname: str | None = None
    host_ip: str | None = None
    _made: list[str] = field(default_factory=list)

    def close(self) -> None:
        for name in reversed(self._made):
            _kill_processes_in(name)
            _ip("netns", "del", name, check=False)
        self._made.clear()
        if self.host_ifname is not None:  # normally gone with the hub already (veth pairs die together)
            _ip("link", "del", self.host_ifname, check=False)
            self.host_ifname = None


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None if they can)."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"mp{secrets.token_hex(4)}"
    try:
        res = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` failed: {e}"
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@contextlib.contextmanager
def mesh_namespaces(n: int, *, host_link: bool = False) -> Iterator[Mesh]:
    """Create ``n`` node namespaces on a private bridge; remove everything on exit, even on failure.

    ``host_link=True`` also plugs the host into the bridge (``Mesh.host_ip`` = x.x.x.254) so the test
    process can reach the nodes' ports directly; without it, reach them with :meth:`NetNs.run`.
    """
    if not 1 <= n <= 250:
        raise ValueError("1..250 namespaces")
    sfx = secrets.token_hex(3)  # names stay <= 15 chars; random so parallel runs do not collide
    subnet = f"10.{random.randint(200, 249)}.{random.randint(0, 255)}"
    mesh = Mesh(hub=f"mh{sfx}", subnet=subnet)
    try:
        _ip("netns", "add", mesh.hub)
        mesh._made.append(mesh.hub)
        _ip("-n", mesh.hub, "link", "set", "lo", "up")
        _ip("-n", mesh.hub, "link", "add", "br0", "type", "bridge")
        # Snooping would drop mDNS until some querier sends IGMP queries; there is none here.
        _ip("-n", mesh.hub, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", mesh.hub, "link", "set", "br0", "up")
        for i in range(n):
            node = NetNs(name=f"mn{sfx}{i}", ip=f"{subnet}.{i + 1}", hub=mesh.hub, hub_port=f"p{i}")
            _ip("netns", "add", node.name)
            mesh._made.append(node.name)
            _ip("-n", node.name, "link", "set", "lo", "up")
            _ip(
                "-n", mesh.hub, "link", "add", node.hub_port, "type", "veth",
                "peer", "name", node.ifname, "netns", node.name,
            )  # fmt: skip
            _ip("-n", mesh.hub, "link", "set", node.hub_port, "master", "br0", "up")
            _ip("-n", node.name, "addr", "add", f"{node.ip}/{node.prefix_len}", "dev", node.ifname)
            _ip("-n", node.name, "link", "set", node.ifname, "multicast", "on", "up")
            mesh.nodes.append(node)
        if host_link:
            mesh.host_ifname, mesh.host_ip = f"mh{sfx}h", f"{subnet}.254"
            _ip(
                "link", "add", mesh.host_ifname, "type", "veth",
                "peer", "name", "host", "netns", mesh.hub,
            )  # fmt: skip
            _ip("-n", mesh.hub, "link", "set", "host", "master", "br0", "up")
            _ip("addr", "add", f"{mesh.host_ip}/24", "dev", mesh.host_ifname)
            _ip("link", "set", mesh.host_ifname, "up")
        yield mesh
    finally:
        mesh.close()


@pytest.fixture
def make_mesh_namespaces() -> Iterator[Callable[..., list[NetNs]]]:
    """Factory fixture: ``make_mesh_namespaces(n, host_link=False) -> list[NetNs]``; torn down after the test."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:

        def make(n: int, *, host_link: bool = False) -> list[NetNs]:
            return stack.enter_context(mesh_namespaces(n, host_link=host_link)).nodes

        yield make


def _kill_processes_in(name: str) -> None:
    """SIGKILL what the test left running inside namespace ``name`` (only test processes live there)."""
    res = _ip("netns", "pids", name, check=False)
    for pid in res.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
