"""The mesh's plain counters (envelopes, bytes, rejections); /status and /metrics read them. Each learning
task counts its own rounds, merges and pulls."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class GossipStats:
    sent: int = 0
    received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "received": self.received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "send_failures": self.send_failures,
            "rejected": dict(sorted(self.rejected.items())),
        }
