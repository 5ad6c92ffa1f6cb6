"""Plain counters shared by the shell components; /status and /metrics read them."""

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
    rounds: int = 0
    merged: int = 0
    pulls: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "received": self.received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "send_failures": self.send_failures,
            "rounds": self.rounds,
            "merged": self.merged,
            "pulls": self.pulls,
            "rejected": dict(sorted(self.rejected.items())),
        }
