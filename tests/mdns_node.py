"""A one-node mDNS discovery process for tests/test_discovery_netns.py (run inside a namespace).

Prints one JSON object per line on stdout: {"event": "started"|"stopped"|"seen"|"gone", ...}.
Reads commands on stdin, one per line: ``start``, ``stop``, ``fp <text>``, ``exit``; EOF = exit.
Exits by itself after ``--max-seconds`` (every test process is bounded in time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import structlog

from meshd.identity import parse_peer_id
from meshd.mesh.discovery import DiscoveryEvent, MdnsDiscovery, PeerSeen


def _print(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _on_event(event: DiscoveryEvent) -> None:
    if isinstance(event, PeerSeen):
        _print(
            {
                "event": "seen",
                "peer_id": event.peer_id.hex(),
                "address": event.address,
                "domain": event.domain,
                "source": event.source,
                "fp": event.model_fp,
            }
        )
    else:
        _print({"event": "gone", "peer_id": event.peer_id.hex(), "source": event.source})


async def _main(args: argparse.Namespace) -> None:
    disc = MdnsDiscovery(
        domain=args.domain,
        peer_id=parse_peer_id(args.peer_id),
        port=args.port,
        advertise_ips=[args.ip],
        interfaces=[args.ip],  # bind only this namespace's veth address
        model_fp=args.fp,
        protocol_version=1,
        on_event=_on_event,
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await disc.start()
    await disc.start()  # idempotent
    _print({"event": "started"})
    try:
        async with asyncio.timeout(args.max_seconds):
            while line := (await reader.readline()).decode().strip():
                cmd, _, arg = line.partition(" ")
                if cmd == "start":
                    await disc.start()
                    _print({"event": "started"})
                elif cmd == "stop":
                    await disc.stop()
                    await disc.stop()  # idempotent
                    _print({"event": "stopped"})
                elif cmd == "fp":
                    await disc.set_model_fp(arg)
                    _print({"event": "fp_set", "fp": arg})
                elif cmd == "exit":
                    break
    except TimeoutError:
        pass
    finally:
        await disc.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--peer-id", required=True)
    p.add_argument("--fp", default=None)
    p.add_argument("--max-seconds", type=float, default=60.0)
    args = p.parse_args()
    # Logs go to stderr: stdout carries only the JSON events.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
