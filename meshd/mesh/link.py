"""The one narrow interface between the mesh and the tasks it carries.

The mesh (identity, trust, discovery, peer table, transport, replay protection) exists once per daemon and
never imports a task's model code; a task (one model: its averaging state, training, evaluation and
checkpoints) exists once per ``[[task]]`` table. They meet here:

- a task is a :class:`TaskEndpoint`: the mesh hands it the envelopes addressed to it (``share`` and
  ``pull`` bodies naming it in ``task``) and lists what it advertises in pongs and mDNS;
- the mesh is a :class:`MeshLink` to the task: send a body to a peer and read the signed reply, the peers
  a task may gossip with, and the rejection counter.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from meshd.core.membership import Peer

__all__ = ["Answer", "MeshLink", "TaskEndpoint"]


@dataclass(frozen=True)
class Answer:
    """What a task answers to an envelope: a status, and a body the mesh seals as a reply of ``kind``.

    Refusals that count as rejected messages are raised as :class:`meshd.errors.WireError` instead; an
    ``Answer`` with an ``error`` reason (e.g. 503 ``not_ready``) is a refusal that is not the sender's fault.
    """

    status: int
    kind: str | None = None
    body: dict[str, Any] | None = None
    error: str | None = None
    detail: str = ""

    @classmethod
    def refuse(cls, status: int, error: str, detail: str) -> Answer:
        return cls(status, error=error, detail=detail)


class TaskEndpoint(Protocol):
    """A learning task as the mesh sees it."""

    name: str

    def advertised(self) -> tuple[str, str] | None:
        """(model fingerprint, data schema fingerprint) once the task has a model; None before."""

    def admits(self, peer_id: bytes, domain: str | None) -> bool:
        """Whether the task's cohort includes this (trusted) peer."""

    def peer_advertised(self, peer_id: bytes, ids: tuple[str | None, str | None] | None, now: float) -> None:
        """A signed pong said the peer runs this task with these ids, or (None) that it does not run it."""

    async def receive(self, kind: str, sender: bytes, body: dict[str, Any]) -> Answer:
        """A verified ``share`` or ``pull`` for this task; raises WireError to refuse it as bad input."""

    def loops(self) -> dict[str, Coroutine[Any, Any, None]]: ...


class MeshLink(Protocol):
    """The mesh as a task sees it."""

    @property
    def joined(self) -> bool:
        """The mesh is enabled and not closing: a task may send and accept model traffic."""

    @property
    def trusted_count(self) -> int: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def dead_after_s(self) -> float: ...

    def peers(self) -> list[Peer]: ...

    def gossip_targets(self, fanout: int, *, topology: str, round_no: int, among: set[bytes]) -> list[Peer]: ...

    def hello_body(self) -> dict[str, Any]:
        """The sender fields every body carries (``domain``, ``addr``)."""

    async def exchange(self, peer_id: bytes, address: str, kind: str, body: dict[str, Any]) -> tuple[int, bytes, int]:
        """Seal ``body`` as ``kind`` for the peer, post it; (status, raw reply, attempts). Raises SendError."""

    async def open_reply(self, peer_id: bytes, reply: bytes, want_kind: str) -> dict[str, Any] | None:
        """The body of a signed reply of ``want_kind`` from that peer, or None (counted as rejected)."""

    def reject(self, reason: str, remote: str, detail: str, sender: bytes | None = None) -> None:
        """Count and log (once per reason and sender) a refused message."""
