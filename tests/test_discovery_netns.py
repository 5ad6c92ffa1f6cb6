"""Real mDNS between three network namespaces on a private bridge (tests/netns.py).

Network safety: every zeroconf instance here runs in a child process started with
``ip netns exec`` inside a namespace this test created, whose only interfaces are ``lo`` and
``veth0`` (asserted below), and it binds only that veth's address. The bridge itself lives in a
separate hub namespace, so no mDNS packet can reach the host's real interfaces (eth0...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from tests.netns import NetNs, make_mesh_namespaces  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent
NODE = Path(__file__).resolve().parent / "mdns_node.py"
PORT = 7452
DISCOVER_S = 20.0  # deadline for everyone to see everyone
GOODBYE_S = 10.0


class Node:
    """One mdns_node.py child process and the JSON events it printed."""

    def __init__(self, ns: NetNs, domain: str, peer_id: str, proc: asyncio.subprocess.Process, log: Path):
        self.ns, self.domain, self.peer_id, self.proc, self.log = ns, domain, peer_id, proc, log
        self.events: list[dict[str, Any]] = []

    async def wait_for(self, pred: Callable[[Node], bool], deadline_s: float, what: str) -> None:
        """Read events until ``pred(self)`` holds; fail with the child's log after ``deadline_s``."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(deadline_s):
                while not pred(self):
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise AssertionError("the node exited")
                    self.events.append(json.loads(line))
        except (TimeoutError, AssertionError) as e:
            raise AssertionError(
                f"{self.domain}: {what}: {e!r}\nevents={self.events}\nlog:\n{self.log.read_text()[-3000:]}"
            ) from None

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    def seen(self, peer_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "seen" and e["peer_id"] == peer_id]

    def gone(self, peer_id: str) -> bool:
        return any(e["event"] == "gone" and e["peer_id"] == peer_id for e in self.events)


@pytest.fixture
def nodes_cleanup() -> Iterator[list[asyncio.subprocess.Process]]:
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for p in procs:  # the namespaces' teardown SIGKILLs anything left, too
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()


async def start_node(ns: NetNs, domain: str, tmp: Path, procs: list[asyncio.subprocess.Process]) -> Node:
    peer_id = bytes(SigningKey.generate().verify_key).hex()
    log = tmp / f"{domain}.log"
    argv = [
        sys.executable, str(NODE), "--ip", ns.ip, "--port", str(PORT), "--domain", domain,
        "--peer-id", peer_id, "--max-seconds", "90",
    ]  # fmt: skip
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *ns.argv(argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    procs.append(proc)
    return Node(ns, domain, peer_id, proc, log)


async def test_mdns_discovery_between_namespaces(
    make_mesh_namespaces: Callable[[int], list[NetNs]],  # noqa: F811
    nodes_cleanup: list[asyncio.subprocess.Process],
    tmp_path: Path,
) -> None:
    namespaces = make_mesh_namespaces(3)
    for ns in namespaces:
        # Confinement: the only interfaces a child can bind are lo and the test veth.
        assert sorted(await asyncio.to_thread(ns.link_names)) == ["lo", "veth0"]

    nodes = [await start_node(ns, f"dom{i}.mesh", tmp_path, nodes_cleanup) for i, ns in enumerate(namespaces)]

    # 1. Everyone sees the two others with the right id, address and domain.
    async def sees_others(n: Node) -> None:
        others = [o for o in nodes if o is not n]
        await n.wait_for(lambda m: all(m.seen(o.peer_id) for o in others), DISCOVER_S, "see the others")

    await asyncio.gather(*(sees_others(n) for n in nodes))
    for n in nodes:
        assert not n.seen(n.peer_id), "a node must ignore its own service"
        for o in nodes:
            if o is not n:
                last = n.seen(o.peer_id)[-1]
                assert last["address"] == f"{o.ns.ip}:{PORT}"
                assert last["domain"] == o.domain
                assert last["source"] == "mdns"
                assert last["fp"] is None

    # 2. A TXT update (new model fingerprint) reaches the others.
    await nodes[1].send("fp abc123")
    for n in (nodes[0], nodes[2]):
        await n.wait_for(
            lambda m: any(e["fp"] == "abc123" for e in m.seen(nodes[1].peer_id)), GOODBYE_S, "see the new fp"
        )

    # 3. Stopping a node sends goodbyes: the others get PeerGone for it.
    await nodes[0].send("stop")
    await nodes[0].wait_for(lambda m: m.events[-1]["event"] == "stopped", GOODBYE_S, "stop")
    for n in nodes[1:]:
        await n.wait_for(lambda m: m.gone(nodes[0].peer_id), GOODBYE_S, "see the goodbye")
        assert not n.gone(nodes[1 if n is nodes[2] else 2].peer_id)

    # 4. Restart (start after stop): it is discovered again.
    for n in nodes[1:]:
        n.events.clear()
    await nodes[0].send("start")
    for n in nodes[1:]:
        await n.wait_for(lambda m: bool(m.seen(nodes[0].peer_id)), DISCOVER_S, "see the restart")

    # 5. Clean exit.
    for n in nodes:
        await n.send("exit")
    async with asyncio.timeout(GOODBYE_S):
        codes = [await n.proc.wait() for n in nodes]
    assert codes == [0, 0, 0], [n.log.read_text()[-2000:] for n in nodes]
