"""Who a learning task learns with: its cohort, and what it knows of each peer for that task.

Pure: no I/O and no clock (``now`` is passed in). The mesh knows every trusted peer; a task only ever
gossips with the part of them that (a) its cohort admits, (b) runs a task of the same name, and (c) runs it
with the same model and data schema. (a) is configuration (:class:`Cohort`); (b) and (c) are learned from
signed pongs and from the peers' answers to our shares (:class:`TaskPeers`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["BLOCK_RETRY_S", "Cohort", "TaskPeers", "TaskView", "paced_steps"]

#: A peer found unable to take our shares (another model, another schema, not running the task, or not
#: admitting us) gets none for this long, then is tried again: configs change, and the reason shows meanwhile.
BLOCK_RETRY_S = 30.0


class Cohort:
    """The domains a task learns with: ``("*",)`` for every trusted peer, else domain names and peer ids."""

    def __init__(self, members: tuple[str, ...]) -> None:
        self.members = members
        self.everyone = "*" in members
        self._ids = {bytes.fromhex(m) for m in members if len(m) == 64 and _is_hex(m)}
        self._domains = {m for m in members if m != "*"} - {m for m in members if len(m) == 64 and _is_hex(m)}

    def admits(self, peer_id: bytes, domain: str | None) -> bool:
        """Whether the peer (a trusted key, claiming ``domain`` in its signed messages) is in the cohort."""
        if self.everyone or peer_id in self._ids:
            return True
        return domain is not None and domain in self._domains

    def describe(self) -> list[str]:
        return list(self.members)


def paced_steps(wanted: int, epochs: float, steps_per_epoch: float, heard: list[float], *, slack: float,
                started: tuple[float, float], now: float, listen_s: float, alone: bool) -> int:
    """How many of ``wanted`` steps a domain at ``epochs`` passes over its data may take now (0 = wait) so that it
    keeps pace with its peers (``training.pace = "mesh"``): at most ``slack`` epochs ahead of the median of the
    epoch counts ``heard`` from its alive peers.

    With none heard: a domain alone trains freely. One with alive peers that started (or resumed) training
    at ``started = (time, epochs)`` less than ``listen_s`` ago trains ``slack`` epochs past that point, then
    listens for theirs (every share of a training peer carries its ``epochs``); after ``listen_s``, its peers
    do not train and nothing is kept pace with.
    """
    if heard:
        median = statistics.median(heard)
    elif alone or now - started[0] >= listen_s:
        return wanted
    else:
        median = started[1]
    allowed = (median + slack - epochs) * steps_per_epoch
    return max(0, min(wanted, math.ceil(allowed))) if allowed > 0 else 0


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


@dataclass
class TaskView:
    """What this task knows of one peer."""

    fp: str | None = None  # model fingerprint it advertises for this task
    schema: str | None = None  # data schema fingerprint it advertises for this task
    runs: bool | None = None  # runs a task of this name (None: not known yet)
    blocked: str | None = None  # why it cannot take our shares (incompatible, schema_mismatch, unknown_task...)
    blocked_at: float | None = None
    epochs: float | None = None  # passes over its own data it reported (training pace)
    epochs_at: float | None = None


class TaskPeers:
    """Per-task knowledge of peers, bounded by the number of trusted peers the mesh passes in."""

    def __init__(self, fp: str, schema: str) -> None:
        self.fp = fp
        self.schema = schema
        self._views: dict[bytes, TaskView] = {}

    def view(self, peer_id: bytes) -> TaskView:
        v = self._views.get(peer_id)
        if v is None:
            v = self._views[peer_id] = TaskView()
        return v

    def get(self, peer_id: bytes) -> TaskView | None:
        return self._views.get(peer_id)

    def forget_except(self, keep: set[bytes]) -> None:
        """Drop peers that are no longer trusted (the mesh's table is the bound)."""
        for k in [k for k in self._views if k not in keep]:
            del self._views[k]

    def incompatibility(self, fp: object, schema: object) -> str | None:
        """Why a peer running model ``fp`` on data schema ``schema`` cannot merge with this task, or None."""
        if fp != self.fp:
            return "incompatible"
        if schema != self.schema:
            return "schema_mismatch"
        return None

    def advertised(self, peer_id: bytes, runs: bool, fp: str | None, schema: str | None, now: float) -> None:
        """A signed pong (or share) said whether the peer runs this task, and with which fingerprints."""
        v = self.view(peer_id)
        v.runs = runs
        if not runs:
            v.fp = v.schema = None
            self.block(peer_id, "unknown_task", now)
            return
        v.fp, v.schema = fp, schema
        if fp is not None:
            # Without a schema (an older or minimal client) the peer is judged by its model alone.
            self.block(peer_id, self.incompatibility(fp, schema if schema is not None else self.schema), now)

    def block(self, peer_id: bytes, reason: str | None, now: float) -> None:
        """The peer cannot take our shares (``reason``), or can again (``None``)."""
        v = self.view(peer_id)
        v.blocked = reason
        v.blocked_at = now if reason is not None else None

    def is_blocked(self, peer_id: bytes, now: float) -> bool:
        v = self._views.get(peer_id)
        return v is not None and v.blocked_at is not None and now - v.blocked_at < BLOCK_RETRY_S

    def heard_epochs(self, peer_id: bytes, epochs: float | None, now: float) -> None:
        v = self.view(peer_id)
        v.epochs, v.epochs_at = epochs, (now if epochs is not None else None)

    def epochs_heard(self, among: set[bytes], now: float, horizon: float) -> list[float]:
        """Epoch counts reported by the peers in ``among`` within ``horizon`` seconds."""
        return [v.epochs for k, v in self._views.items()
                if k in among and v.epochs is not None and v.epochs_at is not None and now - v.epochs_at <= horizon]

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {
            k.hex(): {"runs": v.runs, "fp": v.fp, "schema": v.schema, "incompatible": v.blocked, "epochs": v.epochs}
            for k, v in sorted(self._views.items())
        }
