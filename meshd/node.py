"""The gossip node: the async shell around the pure core (wire, membership, averaging) and the learner."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import structlog

from meshd import config as configmod
from meshd.config import Config
from meshd.identity import Identity
from meshd.logs import QuietLog
from meshd.stats import GossipStats
from meshd.transport import PeerServer, Reply, ServerLimits

log = structlog.get_logger("meshd.node")


class Node:
    def __init__(self, cfg: Config, identity: Identity, stats: GossipStats) -> None:
        self.cfg = cfg
        self.identity = identity
        self.stats = stats
        self.listen_host, self.listen_port = configmod.split_host_port(cfg.listen.peer)
        self._quiet = QuietLog(60.0)
        self._server: PeerServer | None = None

    async def open(self) -> None:
        pass

    async def start_listening(self) -> None:
        limits = ServerLimits(
            max_body_bytes=int(self.cfg.limits.max_message_mib * 2**20),
            read_timeout_s=self.cfg.limits.read_timeout_s,
            max_connections_per_ip=self.cfg.limits.max_connections_per_ip,
        )
        self._server = PeerServer(self.listen_host, self.listen_port, limits, self._handle, self._rejected)
        await self._server.start()
        self.listen_port = self._server.port

    def loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {}

    async def apply_config(self, new: Config) -> None:
        self.cfg = new

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop()

    def snapshot(self) -> dict[str, Any]:
        return {
            "listen": {"peer": f"{self.listen_host}:{self.listen_port}"},
            "mesh": {"joined": self.cfg.mesh.enabled, "peers": [], "counts": {}, "untrusted_seen": []},
        }

    def _rejected(self, reason: str, remote: str) -> None:
        self.stats.rejected[reason] += 1
        ok, suppressed = self._quiet.should_log((reason, remote))
        if ok:
            log.warning("message_rejected", reason=reason, remote=remote, suppressed=suppressed)

    async def _handle(self, data: bytes, remote: str) -> Reply:
        return Reply.error(501, "not_implemented", "gossip is not enabled in this build")
