"""The mesh's plain counters (envelopes, bytes, rejections, exchange latencies); /status and /metrics read
them. Each learning task counts its own rounds, merges and pulls."""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field

# Every reason an incoming message can be refused for and counted under (docs/status.md `gossip.rejected`,
# docs/protocol.md section 6): /metrics has a series for each from the start, so rate() and alerts work
# before the first rejection. Refused answers to our own requests add `reply_*` series as they happen.
REJECT_REASONS = (
    "malformed", "bad_version", "wrong_recipient", "untrusted", "bad_signature", "replayed", "stale",
    "bad_ciphertext", "bad_body", "unknown_kind", "unknown_task", "not_in_cohort", "incompatible",
    "schema_mismatch", "privacy_too_weak", "bad_values", "too_large", "unavailable", "internal", "read_timeout",
    "too_many_connections", "busy", "unsupported_encoding", "evicted", "pull_rate", "pull_budget", "weight_low",
    "not_joined", "not_ready", "task_stopped",
)
# Envelope kinds this domain sends as requests; the latency histogram has one series per kind (bounded).
EXCHANGE_KINDS = ("ping", "share", "pull", "leave")
# Upper bounds (seconds) of the exchange latency buckets: loopback answers in milliseconds, a model share
# over a slow link in seconds; beyond gossip.request_timeout_s nothing is observed.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RTT_ALPHA = 0.125  # weight of a new sample in a peer's smoothed round-trip time (as TCP's SRTT, RFC 6298)


@dataclass
class LatencyHistogram:
    """Counts of observations per bucket of :data:`LATENCY_BUCKETS` (the last slot is +Inf), and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total_s += seconds

    def snapshot(self) -> dict[str, object]:
        """``{"buckets": {le: cumulative count}, "count", "sum_s"}``, ``le`` as Prometheus writes it."""
        cumulative, running = {}, 0
        for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.counts, strict=True):
            running += n
            cumulative[bound] = running
        return {"buckets": cumulative, "count": running, "sum_s": self.total_s}


@dataclass
class GossipStats:
    sent: int = 0
    received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    exchange: dict[str, LatencyHistogram] = field(
        default_factory=lambda: {k: LatencyHistogram() for k in (*EXCHANGE_KINDS, "other")})

    def observe_exchange(self, kind: str, seconds: float) -> None:
        """An answered request of ``kind`` took ``seconds`` from send to answer (retries included)."""
        self.exchange[kind if kind in EXCHANGE_KINDS else "other"].observe(seconds)

    def snapshot(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "received": self.received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "send_failures": self.send_failures,
            "rejected": dict(sorted(self.rejected.items())),
            "exchange_latency": {k: h.snapshot() for k, h in self.exchange.items()},
        }


@dataclass
class LoopLag:
    """How late the event loop ran a timer: the latest figure and the largest over the last ``window_s``.

    A daemon whose loop is stalled (a blocking call, one huge decode) serves nothing meanwhile and misses its
    systemd watchdog; this is the figure that shows it (``/status`` ``loop``, ``meshd_loop_lag_*``)."""

    window_s: float = 60.0
    last_s: float = 0.0
    _recent: deque[tuple[float, float]] = field(default_factory=deque)  # (when, lag), lags decreasing

    def observe(self, now: float, lag_s: float) -> None:
        self.last_s = lag_s
        # Only the samples that can still be the maximum are kept: newer ones of at least their size drop them.
        while self._recent and self._recent[-1][1] <= lag_s:
            self._recent.pop()
        self._recent.append((now, lag_s))
        while self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def snapshot(self, now: float) -> dict[str, float]:
        recent = [lag for when, lag in self._recent if when >= now - self.window_s]
        return {"lag_s": round(self.last_s, 4), "max_lag_s": round(max(recent, default=0.0), 4),
                "window_s": self.window_s}


def smoothed(previous: float | None, sample: float) -> float:
    """A peer's smoothed round-trip time after one more ``sample``."""
    return sample if previous is None else (1 - RTT_ALPHA) * previous + RTT_ALPHA * sample
