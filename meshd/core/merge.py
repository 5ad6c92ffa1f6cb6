"""Merge rules: how a learning task screens a peer's model before push-sum adds it. Pure: time is passed in.

A task holds one :class:`MergeRule`, chosen by ``gossip.merge``; the task calls ``rule.merge(ps, peer, ...)``
for every share (and catch-up pull) it accepts, ``rule.refused(peer, reason, now)`` for every one it refuses,
``rule.pull_refusal(peer, now)`` before it answers a pull, and never branches on which rule is active.
Both rules keep the same per-peer accounts (merged, clipped, refused by reason), shown in ``/status``.

**Pulls, every rule.** A pull's answer gives mass away at once (``PushSum.split_for_pull``), so pulls are
rate-limited whatever the rule: one answered per peer per ``pull_interval_s`` (``pull_rate`` otherwise),
and ``max_pulls_per_min`` from all peers together, a token bucket holding that many (``pull_budget``
otherwise). With the task's weight floor (``gossip.pull_min_weight``) this is what keeps a trusted peer
that pulls in a loop from draining the responder's weight (issue #10 item 2).

``"pushsum"`` (:class:`PushSumRule`) adds the share as it came (``PushSum.merge``): exact push-sum, and no
defence against a trusted peer that lies.

``"clipped"`` (:class:`ClippedRule`) is of the ClippedGossip class (He, Karimireddy, Jaggi 2022: each node mixes
``x_i + CLIP(x_j - x_i, tau_i)`` with a radius from the bulk of its neighbours' distances), made to work with
asynchronous, lossy push-sum. A share is screened in this order, and the first check that fails refuses it
(the sender keeps its mass):

- **Quarantine** (``quarantined``): the peer is quarantined (below).
- **Versions** (``old_version``). A share whose version is below the last one merged from the same peer, or
  more than ``stale_versions`` behind the median of the versions in the peers' latest shares (recent, not
  quarantined; once ``min_peers`` have sent one), is refused: a replayed old model is refused once the mesh
  has trained past it. The median, not this node's own version: a minority lying about versions, up or down,
  moves neither the reference nor (next item) this node's version, so it cannot make honest peers look old.
- **Calibration** (``calibrating``). Until ``min_peers`` peers (3, or all the trusted peers when there are
  fewer) have sent a share, there is no radius: shares are refused and only their distances are remembered.
  Hostile peers that speak first cannot drag the model before honest ones are heard; it costs a few rounds
  of gossip at a task's first start. After ``CALIBRATION_MAX_REFUSALS`` refusals the peers heard so far
  suffice (a node that only a few peers send to, the topology's choice, must not wait forever).
- **Clipping and strikes** (``far_off``). A share's model ``v`` is moved towards the local model ``z``:
  ``v' = z + (v - z) * min(1, tau / ||v - z||)``. The radius ``tau`` is ``clip_factor`` (the daemon's
  ``gossip.clip_factor``, 4) times the lower third (the order statistic at ``(m - 1) // 3`` of ``m``), over
  the peers heard from recently (not quarantined), of each peer's median distance over its last ``HISTORY``
  shares: one typical distance per peer, so a flooding peer counts once, and the lower third stays an honest
  distance while fewer than two thirds of the peers heard are hostile (ClippedGossip's rule takes the radius
  from the lower part of the neighbours' distances for the same reason; its factor ``1 / sqrt(delta)`` is 2
  for a hostile fraction of a quarter, which struck honest asynchronous peers into quarantine on 16 real
  daemons: docs/learning.md section 8). ``tau`` is never below ``RADIUS_FLOOR`` (1e-3) times the local
  model's norm, and a share within that distance is merged whole and not remembered: identical models
  calibrated the radius to 0, which stayed 0.
  A share farther than ``STRIKE_RATIO`` (1.25) x ``tau`` is refused (``far_off``) and is a *strike* (not while
  the domain's data are standardised and nothing trains: ``RuleParams.strikes``)
  (merging such shares clipped let sign-flip and IPM shrink every model before the quarantine); it is
  remembered as at most ``QUARANTINE_RATIO`` (4) x ``tau``, not its distance: far-off models cannot blow
  ``tau`` up, honest distances that grow still raise it step by step. Except while this node is *adrift*: when
  the latest shares of more than two thirds of the peers heard recently (not quarantined) are beyond the strike
  distance, the node's own model is the one far off (an attack dragged it away), and a far share is merged
  clipped instead, not struck: such a node used to quarantine the honest peers that would bring it back, and
  be quarantined by them (two thirds, as for the radius: a hostile minority's far shares alone never make a
  node adrift).
- **Reciprocity** (``unproven``; push-pull tasks, ``require_answer``). A one-way share (one that asks for no
  answer) counts only once one of the peer's answers has been merged here: a sink, which takes shares and
  answers none, never moves the model. After that, one one-way share is merged per answer of the peer's
  merged here (a credit of at most ``_BUCKET_SHARES``); a one-way share beyond it is refused (``unproven``)
  and *overdraws*, and ``OVERDRAWN_LIMIT`` (2) overdrafts not made up by answers since quarantine the peer
  (on probation, one does). Honest peers of a push-pull task send no one-way shares at all; an attacker that
  answers and then sends a share every round to every domain (five times an honest peer's rate in
  ``bench/robustness.py``) is quarantined within a few rounds. The cost: a domain whose task sends one-way
  shares (``gossip.exchange = "push"``, or a privacy bound) to a push-pull domain more often than that domain
  asks it for answers is quarantined there too, so a task's domains should agree on ``gossip.exchange``.
  Push-pull shares and answers (``reciprocal``) are screened as usual.
- **Rate bound** (``peer_budget``). One peer's shares merged are at most ``max_peer_shares`` per local gossip
  round (a token bucket refilled by ``PushSum.rounds``, holding ``_BUCKET_SHARES`` = 2): a flood of shares each
  within the radius cannot drag the model by the radius many times a round.
- **Mixing bound.** A share whose weight exceeds ``max_share_weight`` (1) x the local weight moves the model
  as a share of that weight would (at most halfway to ``v'``): its weight is merged whole, its values are
  drawn further towards ``z``. Weight inflation buys no influence. (Cutting the weight instead decayed every
  weight of a one-way mesh towards 0: an honest heavy share reaches light nodes all the time.)
- **Weight ceiling.** After a merge, the local weight is brought back to ``weight_ceiling`` (the mesh's honest
  total, one per domain) by scaling down the free part of the mass (``PushSum.limit_weight``), which leaves
  the model unchanged: inflated weights cannot grow until honest shares exceed the accepted cap.
- **Versions merged.** A merge raises the local version by at most ``max_version_step`` and never beyond the
  peers' median plus that step; a clipped share never asks for a catch-up pull (``Merged.trusted_version``).
- **Rows.** The share's mean-rows estimate is clamped to ``[m / ROWS_FACTOR, ROWS_FACTOR m]`` of the local one
  ``m`` (64, as the update scale: honest domains' rows differ by that much, and a clamp of 2 biased a
  10:1 mesh's mean rows to half its value).

**Quarantine.** ``quarantine_after`` (3) strikes in a row put the peer in quarantine for ``quarantine_s``; so
do ``quarantine_after`` push-pull shares in a row that the peer took (acknowledged: this node gave the mass
away) without an answer merged here (:meth:`MergeRule.answered`): a *sink* that only drains the mesh's mass,
or answers with models this rule refuses (an answer refused for a reason of this node's own,
``NEUTRAL_REFUSALS``, counts neither way); and ``OVERDRAWN_LIMIT`` one-way shares beyond the peer's answers
(reciprocity, above). A quarantined peer's shares are refused (its pulls are answered under the pull limits:
a domain quarantined for lagging, or restored from an old backup, catches up by pulling), it is left out
of the radius and of the version median, and the task sends it nothing (``runtime.eligible``). When the time
is up it is released on probation: its next share is merged as any other, but a single strike puts it back at
once. Quarantine is local: it follows only from what this node received itself; no message can quarantine a
peer elsewhere.

**What exactness is given up, and why.** Plain push-sum conserves mass: the sender subtracts exactly what the
receiver adds, so with training off every model converges to the exact mean of the starting models. Here
the receiver acknowledges a clipped share with the same answer as any other, and the sender subtracts
``values * weight`` (``docs/protocol.md`` §8: the acknowledgement carries no amount, so the sender cannot
subtract what was kept). The receiver adds ``v'' * weight`` with ``v''`` clipped (or drawn in by the mixing
bound): the difference leaves the mesh, as does the mass the weight ceiling scales away, and a refused push-
pull answer's mass. Weight is never cut, so weights stay balanced; the *values* mass is what is inexact. With
training off, models still reach a consensus, but at a point that may differ from the exact mean by the
clipped-off parts: in ``tests/test_merge.py``'s simulation (8 nodes, one-way shares, training off) the
consensus lands 3.5-8 % of the starting spread away from the exact mean (seeds 1-5; the test bounds it at
20 %), where plain push-sum lands within 1e-6. Giving the clipped-off part back to the sender would keep the
sums exact but leave a hostile sender's mass intact, to be sent again and again; dropping it is what bounds
what a liar can do. Honest shares are rarely clipped (``tau`` is twice the lower third of the typical
distances: a few merges in a thousand in the bench), so learning loses little: ``bench/robustness.py`` measures
clipped against plain push-sum with no attacker at equal steps (the ratio is in the README).

**What it does not stop.** An attacker that answers push-pull with models inside the radius, stays there (ALIE,
dissensus, a lagging model at a current version) and sends no more one-way shares than it answers (or none)
is neither a sink, a striker nor an overdrawer: it is only clipped, rate- and mixing-bounded, and honest
domains keep exchanging with it. ``bench/robustness.py --answer-only`` measures it; even an attacker that
answers with a harmless lagging model costs there, because every exchange with it is one not made with an
honest domain. Nor does it stop a peer that sends push-pull requests (which ask for an answer) in a loop
with such models: each is merged, up to ``max_peer_shares`` a round, and answered with half this node's
mass.

Public API::

    MERGE_RULES = ("pushsum", "clipped")
    OVERDRAWN_LIMIT = 2                                                   # one-way shares beyond the answers
    NEUTRAL_REFUSALS = ("calibrating", "peer_budget")                    # refusals that say nothing of the peer
    RuleParams(clip_factor, max_peer_shares, max_version_step, quarantine_after, quarantine_s,
               pull_interval_s, weight_ceiling, min_peers, max_pulls_per_min, stale_versions,
               max_share_weight, require_answer)                           # frozen
    Merged(distance, scale, weight, version, values, trusted_version)         # frozen
    make_rule(name, params) -> MergeRule
    MergeRule  (PushSumRule, ClippedRule)
        .name .params
        .merge(ps, peer, values, weight, version, rows, now, reciprocal=False) -> Merged  # RejectedUpdate
        .refused(peer, reason, now) -> None
        .answered(peer, answered, now) -> None                               # push-pull share taken; answer merged?
        .absorb(ps, weight, rows) -> None             # an answer refused for a NEUTRAL_REFUSALS reason: keep its mass
        .pull_refusal(peer, now) -> str | None                               # None, "pull_rate", "pull_budget"
        .allow_pull(peer, now) -> bool                                       # pull_refusal(...) is None
        .tick(now) -> None                                                   # releases expired quarantines
        .events() -> list[tuple[str, bytes]]                                  # ("quarantined" | "released", peer)
        .is_quarantined(peer, now) -> bool
        .radius(ps, now) -> float | None
        .snapshot(now) -> dict[bytes, dict[str, object]]
        .totals(now) -> dict[str, int]
    ClippedRule.peers_version(now) -> int | None                             # the peers' median version
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from meshd.core.averaging import MAX_VERSION, PushSum, RejectedUpdate

MERGE_RULES = ("pushsum", "clipped")
# Refusals that say nothing against the peer (this node is calibrating, or the peer's budget was spent by its
# own shares): an answer refused for one of them is neither answered nor unanswered (MergeRule.answered).
NEUTRAL_REFUSALS = ("calibrating", "peer_budget")
HISTORY = 4  # distances remembered per peer (their median is the peer's typical distance)
STRIKE_RATIO = 1.25  # a share farther than this times the radius is refused (far_off) and is a strike
QUARANTINE_RATIO = 4.0  # a far-off share is remembered at this times the radius at most
CALIBRATION_MAX_REFUSALS = 16  # after this many shares refused while calibrating, any peer heard will do
STALE_S = 300.0  # a peer not heard from for this long is left out of the radius
# A share within this fraction of the local model's norm is as good as the local model: merged whole, and its
# distance (no measure of how far honest peers are) is not remembered; the radius is never below it.
RADIUS_FLOOR = 1e-3
ROWS_FACTOR = 64.0  # a share's mean-rows estimate counts within this factor of the local one
MAX_PEERS = 4096  # accounts kept; beyond this the least recently seen are forgotten
OVERDRAWN_LIMIT = 2  # (require_answer) one-way shares beyond a peer's answers merged that quarantine it
_BUCKET_SHARES = 2.0  # the per-peer share bucket holds this many shares (or one round's max_peer_shares)


def _clamp_rows(rows: float | None, own_rows: float) -> float | None:
    """A peer's mean-rows estimate, counted within ``ROWS_FACTOR`` of the local one (when there is one)."""
    if rows is None or own_rows <= 0:
        return rows
    return min(ROWS_FACTOR * own_rows, max(own_rows / ROWS_FACTOR, rows))


@dataclass(frozen=True)
class RuleParams:
    """The parameters of the merge rules (``gossip.*`` keys of the same names; see the module docstring)."""

    clip_factor: float = 2.0  # radius = clip_factor x the lower third (the daemon passes gossip.clip_factor, 4)
    max_peer_shares: float = 1.0  # shares merged from one peer per local gossip round
    max_version_step: int = 16  # a merge raises the local version by at most this
    quarantine_after: int = 3  # strikes (or push-pull shares unanswered) in a row that quarantine a peer
    quarantine_s: float = 120.0  # how long a quarantine lasts (then probation)
    pull_interval_s: float = 5.0  # one pull answered per peer per this many seconds
    weight_ceiling: float = math.inf  # the local weight is scaled back to this after a merge
    min_peers: int = 3  # peers with a history needed before the radius exists (calibration)
    max_pulls_per_min: float = 30.0  # pulls answered from all peers together (token bucket of this size)
    stale_versions: int = 16  # a share this many versions behind the peers' median version is refused
    max_share_weight: float = 1.0  # a share moves the model at most as one of this times the receiver's weight
    require_answer: bool = False  # (push-pull tasks) one-way shares count once one of the peer's answers merged
    # Whether a far share (far_off) is a strike. The daemon passes False while the domain's data are being
    # standardised (data.standardize = "mesh"): nobody trains yet, the models differ only by the codec's
    # rounding, and a strike for a rounding outlier quarantined a domain for quarantine_s, so its
    # standardisation timed out. Such shares are still refused (the sender keeps the mass).
    strikes: bool = True


@dataclass(frozen=True)
class Merged:
    """What a merge did: the incoming model's L2 distance to ours, the clip factor applied to ``v - z`` (1.0 =
    unclipped), the weight and version merged, the values merged, and whether its version may be believed."""

    distance: float
    scale: float
    weight: float
    version: int
    values: torch.Tensor
    trusted_version: bool = True


@dataclass
class _Account:
    merged: int = 0
    clipped: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    distances: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    strikes: int = 0
    quarantines: int = 0
    quarantined_until: float | None = None
    probation: bool = False
    last_seen: float = -math.inf
    bucket: float = -1.0  # in units of the local weight; < 0 = not filled yet
    bucket_round: int = 0
    last_pull: float = -math.inf
    version: int = -1  # the version of this peer's latest share (-1: none yet)
    merged_version: int = -1  # the version of this peer's latest share merged
    unanswered: int = 0  # push-pull shares in a row this peer took without answering
    proven: bool = False  # an answer of this peer's was merged here
    last_distance: float | None = None  # the distance of this peer's latest share screened for the radius
    credit: float = 0.0  # (require_answer) one-way shares this peer may still have merged: one per answer merged
    overdrawn: int = 0  # (require_answer) one-way shares beyond the credit, less answers merged since


class MergeRule:
    """The interface, with the accounting both rules share; :class:`PushSumRule` and :class:`ClippedRule`."""

    name = "base"

    def __init__(self, params: RuleParams | None = None) -> None:
        self.params = params or RuleParams()
        self._accounts: dict[bytes, _Account] = {}
        self._events: list[tuple[str, bytes]] = []
        self._pull_tokens: float | None = None  # the all-peers pull bucket; None = full, not yet used
        self._pull_refilled = 0.0

    def merge(
        self, ps: PushSum, peer: bytes, values: torch.Tensor, weight: float, version: int,
        rows: float | None, now: float, *, reciprocal: bool = False,
    ) -> Merged:
        """Screen and merge a peer's share into ``ps``; raises ``RejectedUpdate`` (``ps`` untouched).
        ``reciprocal``: the share asks for this node's share back (push-pull) or answers a request of this
        node's (a push-pull answer, a pull's answer)."""
        raise NotImplementedError

    def refused(self, peer: bytes, reason: str, now: float) -> None:
        """A share or pull of ``peer`` was refused for ``reason`` (by the rule or before it)."""
        acct = self._account(peer, now)
        acct.refused[reason] += 1

    def pull_refusal(self, peer: bytes, now: float) -> str | None:
        """Why ``peer``'s pull may not be answered now (``None``: it may, and is counted as answered)."""
        acct = self._account(peer, now)
        if now - acct.last_pull < self.params.pull_interval_s:
            return "pull_rate"
        rate = max(0.0, self.params.max_pulls_per_min)
        cap = max(1.0, rate)
        tokens = cap if self._pull_tokens is None else min(
            cap, self._pull_tokens + max(0.0, now - self._pull_refilled) * rate / 60.0)
        self._pull_refilled = now
        if tokens < 1.0:
            self._pull_tokens = tokens
            return "pull_budget"
        self._pull_tokens = tokens - 1.0
        acct.last_pull = now
        return None

    def allow_pull(self, peer: bytes, now: float) -> bool:
        """May ``peer``'s pull be answered now? (:meth:`pull_refusal` is ``None``; counted when it is.)"""
        return self.pull_refusal(peer, now) is None

    def answered(self, peer: bytes, answered: bool, now: float) -> None:
        """A push-pull share this node sent to ``peer`` was merged there, and ``answered`` says whether the
        answer carried the peer's share back. The clipped rule quarantines a peer that takes
        ``quarantine_after`` shares in a row and answers none: a sink that only drains the mesh's mass."""

    def absorb(self, ps: PushSum, weight: float, rows: float | None) -> None:
        """An answer (or a pull's answer) refused for a reason of this node's own (``NEUTRAL_REFUSALS``): the
        responder gave its mass away at once, so its weight and rows are kept here, carrying the local model
        (the model, not screened, is not taken), under the weight ceiling and the rows clamp. Lost, they biased
        the mean-rows estimate of a 10:1 two-domain mesh by a third (one answer refused while calibrating)."""
        ps.merge(ps.estimate(), weight, ps.version, _clamp_rows(rows, ps.mean_rows))
        ps.limit_weight(self.params.weight_ceiling)

    def _quarantine(self, peer: bytes, acct: _Account, now: float) -> None:
        acct.quarantined_until = now + self.params.quarantine_s
        acct.quarantines += 1
        acct.probation = False
        acct.strikes = 0
        acct.unanswered = 0
        self._events.append(("quarantined", peer))

    def recalibrate(self) -> None:
        """Training starts on data just standardised: what the rule learned of the distances until now (models
        that differ by the codec's rounding only) says nothing of trained ones. Forgotten, so the radius is
        calibrated again (a radius of rounding noise struck every trained share). Quarantines stand."""
        for acct in self._accounts.values():
            acct.distances.clear()
            acct.strikes = 0
            acct.last_distance = None

    def tick(self, now: float) -> None:
        """Release the quarantines whose time is up (also done when the peer's next share arrives)."""
        for peer, acct in self._accounts.items():
            self._expire(peer, acct, now)

    def events(self) -> list[tuple[str, bytes]]:
        """Quarantine entries and exits since the last call, in order (each logged once by the caller)."""
        out, self._events = self._events, []
        return out

    def is_quarantined(self, peer: bytes, now: float) -> bool:
        acct = self._accounts.get(peer)
        return acct is not None and acct.quarantined_until is not None and now < acct.quarantined_until

    def radius(self, ps: PushSum, now: float) -> float | None:
        """The clipping radius now (``None``: this rule does not clip)."""
        return None

    def snapshot(self, now: float) -> dict[bytes, dict[str, object]]:
        out: dict[bytes, dict[str, object]] = {}
        for peer, a in sorted(self._accounts.items()):
            left = None if a.quarantined_until is None else max(0.0, a.quarantined_until - now)
            out[peer] = {
                "merged": a.merged, "clipped": a.clipped, "refused": dict(sorted(a.refused.items())),
                "quarantined": left is not None and left > 0, "quarantine_left_s": left,
                "quarantines": a.quarantines, "strikes": a.strikes,
                "distance": statistics.median(a.distances) if a.distances else None,
            }
        return out

    def totals(self, now: float) -> dict[str, int]:
        accts = self._accounts.values()
        return {
            "clipped": sum(a.clipped for a in accts),
            "quarantines": sum(a.quarantines for a in accts),
            "quarantined": sum(1 for p in self._accounts if self.is_quarantined(p, now)),
        }

    # -- helpers -----------------------------------------------------------------------------------

    def _account(self, peer: bytes, now: float) -> _Account:
        acct = self._accounts.get(peer)
        if acct is None:
            if len(self._accounts) >= MAX_PEERS:
                oldest = min(self._accounts, key=lambda p: self._accounts[p].last_seen)
                del self._accounts[oldest]
            acct = self._accounts[peer] = _Account()
        acct.last_seen = max(acct.last_seen, now)
        return acct

    def _expire(self, peer: bytes, acct: _Account, now: float) -> None:
        if acct.quarantined_until is not None and now >= acct.quarantined_until:
            acct.quarantined_until = None
            acct.probation = True
            acct.strikes = 0
            self._events.append(("released", peer))


class PushSumRule(MergeRule):
    """Plain push-sum: the share is merged as it came (exact averaging, no defence)."""

    name = "pushsum"

    def merge(
        self, ps: PushSum, peer: bytes, values: torch.Tensor, weight: float, version: int,
        rows: float | None, now: float, *, reciprocal: bool = False,
    ) -> Merged:
        acct = self._account(peer, now)
        distance = float(torch.linalg.vector_norm(values - ps.estimate())) if values.shape == (ps.dim,) else 0.0
        ps.merge(values, weight, version, rows)
        acct.merged += 1
        acct.distances.append(distance)
        return Merged(distance, 1.0, float(weight), version, values)


class ClippedRule(MergeRule):
    """ClippedGossip-class robust merge for asynchronous push-sum (see the module docstring)."""

    name = "clipped"

    def __init__(self, params: RuleParams | None = None) -> None:
        super().__init__(params)
        self._last_radius: float | None = None
        self._calibration_refusals = 0

    def radius(self, ps: PushSum, now: float) -> float | None:
        return self._radius(now, RADIUS_FLOOR * float(torch.linalg.vector_norm(ps.estimate())))

    def recalibrate(self) -> None:
        super().recalibrate()
        self._last_radius = None
        self._calibration_refusals = 0

    def _radius(self, now: float, floor: float) -> float | None:
        typical = [
            statistics.median(a.distances)
            for p, a in self._accounts.items()
            if a.distances and now - a.last_seen <= STALE_S and not self.is_quarantined(p, now)
        ]
        enough = max(1, self.params.min_peers)
        if self._calibration_refusals >= CALIBRATION_MAX_REFUSALS:
            enough = 1  # few peers talk to this node: calibrate on those there are rather than never
        if len(typical) >= enough:
            typical.sort()
            self._last_radius = self.params.clip_factor * typical[(len(typical) - 1) // 3]
        # (Once calibrated, peers gone quiet or quarantined keep the last radius.)
        if self._last_radius is None:
            return None
        return max(self._last_radius, floor)

    def peers_version(self, now: float) -> int | None:
        """The median of the versions in the latest shares of the peers heard recently (not quarantined);
        ``None`` until ``min_peers`` of them have sent one. A minority of peers lying about versions, up or
        down, cannot move it."""
        versions = [a.version for p, a in self._accounts.items()
                    if a.version >= 0 and now - a.last_seen <= STALE_S and not self.is_quarantined(p, now)]
        if len(versions) < max(1, self.params.min_peers):
            return None
        return int(statistics.median_low(versions))

    def merge(
        self, ps: PushSum, peer: bytes, values: torch.Tensor, weight: float, version: int,
        rows: float | None, now: float, *, reciprocal: bool = False,
    ) -> Merged:
        ps.check(values, weight, "merge")  # raises before any accounting on a malformed share
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
            raise RejectedUpdate("bad_values", f"version must be an int in [0, 2**53], got {version!r}")
        acct = self._account(peer, now)
        self._expire(peer, acct, now)
        if acct.quarantined_until is not None:
            raise RejectedUpdate("quarantined", f"quarantined for {acct.quarantined_until - now:.0f} s more")
        reference = self.peers_version(now)
        old = version < acct.merged_version or (
            reference is not None and version + self.params.stale_versions < reference)
        acct.version = version
        if old:
            raise RejectedUpdate("old_version", f"version {version} is older than this peer's last merged "
                                 f"({acct.merged_version}) or {self.params.stale_versions} behind its peers' "
                                 f"({reference})")
        z = ps.estimate()
        distance = float(torch.linalg.vector_norm(values - z))
        # Within RADIUS_FLOOR of this model (a mesh that has not trained yet, or has converged): merged whole,
        # and not remembered. Identical models used to calibrate the radius to 0, and a radius of 0 stayed 0
        # (a distance is remembered at QUARANTINE_RATIO x tau at most): every share of the trained models was
        # then struck or clipped to nothing, and the domains learned alone.
        floor = RADIUS_FLOOR * float(torch.linalg.vector_norm(z))
        near = distance <= floor
        tau = self._radius(now, floor)
        if tau is None and not near:
            acct.distances.append(distance)
            self._calibration_refusals += 1
            raise RejectedUpdate("calibrating", "still learning how far peers' models are; send it again later")
        strike = False
        if tau is not None and not near:
            acct.last_distance = distance
            strike = distance > STRIKE_RATIO * tau and not self._adrift(tau, now)
            # A distance is remembered at QUARANTINE_RATIO x tau at most: honest distances that grow (training
            # speeds up, a domain drifts) raise the radius step by step, while a minority of hostile peers, far
            # off or not, cannot move the lower third.
            acct.distances.append(min(distance, QUARANTINE_RATIO * tau))
        if not strike:
            acct.strikes = 0
        elif self.params.strikes:
            acct.strikes += 1
            if acct.probation or acct.strikes >= self.params.quarantine_after:
                self._quarantine(peer, acct, now)
                raise RejectedUpdate("quarantined", f"{self.params.quarantine_after} shares in a row beyond "
                                     f"{STRIKE_RATIO:g} x the clipping radius; quarantined for "
                                     f"{self.params.quarantine_s:g} s")
        if strike:
            raise RejectedUpdate("far_off", f"{distance:.3g} from this model, beyond {STRIKE_RATIO:g} x the "
                                 f"clipping radius {tau:.3g}"
                                 + ("" if self.params.strikes else " (no strike: nothing trains yet)"))
        oneway = self.params.require_answer and not reciprocal
        if oneway and not acct.proven:
            raise RejectedUpdate("unproven", "a one-way share, and no answer of this peer's merged here yet: "
                                 "its one-way shares count once it has answered one of this node's")
        if oneway and acct.credit < 1.0:
            acct.overdrawn += 1
            if acct.probation or acct.overdrawn >= OVERDRAWN_LIMIT:
                self._quarantine(peer, acct, now)
                raise RejectedUpdate("quarantined", f"{OVERDRAWN_LIMIT} one-way shares more than its answers "
                                     f"merged here; quarantined for {self.params.quarantine_s:g} s")
            raise RejectedUpdate("unproven", "a one-way share beyond this peer's answers merged here (one each): "
                                 "send it again once it has answered another of this node's shares")
        acct.probation = False
        # The per-peer share bucket, refilled by local gossip rounds.
        cap = max(_BUCKET_SHARES, self.params.max_peer_shares)
        if acct.bucket < 0:
            acct.bucket, acct.bucket_round = cap, ps.rounds
        elif ps.rounds > acct.bucket_round:
            acct.bucket = min(cap, acct.bucket + (ps.rounds - acct.bucket_round) * self.params.max_peer_shares)
            acct.bucket_round = ps.rounds
        if acct.bucket < 1.0:
            raise RejectedUpdate("peer_budget", "this peer's shares for this round are used up; send it later")
        take = float(weight)
        scale = 1.0 if tau is None or distance <= tau or distance == 0.0 else tau / distance
        # The share moves the model as a share of at most max_share_weight x our weight would: its weight is
        # merged whole (weight is conserved: cutting it decayed every weight towards 0 with one-way shares),
        # its values are drawn towards ours so that w z + take v'' mixes like w z + heavy v'.
        heavy = self.params.max_share_weight * ps.weight
        mix = scale if take <= heavy else scale * (heavy / (ps.weight + heavy)) * ((ps.weight + take) / take)
        merged_values = values if mix == 1.0 else z + (values - z) * mix
        bounded_version = min(version, ps.version + self.params.max_version_step)
        if reference is not None:  # nor beyond the peers' median by more than a step: no runaway inflation
            bounded_version = min(bounded_version, max(ps.version, reference + self.params.max_version_step))
        ps.merge(merged_values, take, bounded_version, _clamp_rows(rows, ps.mean_rows))
        ps.limit_weight(self.params.weight_ceiling)
        acct.bucket -= 1.0
        if oneway:
            acct.credit -= 1.0
        acct.merged += 1
        acct.merged_version = version
        if scale < 1.0:
            acct.clipped += 1
        return Merged(distance, mix, take, bounded_version, merged_values, trusted_version=mix == 1.0)

    def _adrift(self, tau: float, now: float) -> bool:
        """Is this node's model the one far off: the latest shares of more than two thirds of the peers heard
        recently (not quarantined) beyond the strike distance? Then far shares are clipped, not struck: a node
        that an attack dragged away must not quarantine the honest peers that would bring it back. (Two thirds, as
        for the radius: a hostile minority's far shares alone never make a node adrift.)"""
        last = [a.last_distance for p, a in self._accounts.items()
                if a.last_distance is not None and now - a.last_seen <= STALE_S and not self.is_quarantined(p, now)]
        far = sum(1 for d in last if d > STRIKE_RATIO * tau)
        return len(last) >= max(1, self.params.min_peers) and 3 * far > 2 * len(last)

    def answered(self, peer: bytes, answered: bool, now: float) -> None:
        acct = self._account(peer, now)
        acct.unanswered = 0 if answered else acct.unanswered + 1
        acct.proven = acct.proven or answered
        if answered:
            acct.credit = min(_BUCKET_SHARES, acct.credit + 1.0)
            acct.overdrawn = max(0, acct.overdrawn - 1)
        if acct.unanswered >= self.params.quarantine_after and not self.is_quarantined(peer, now):
            self._quarantine(peer, acct, now)


def make_rule(name: str, params: RuleParams | None = None) -> MergeRule:
    """The rule named by ``gossip.merge``."""
    if name == "pushsum":
        return PushSumRule(params)
    if name == "clipped":
        return ClippedRule(params)
    raise ValueError(f"unknown merge rule {name!r} (expected one of {', '.join(MERGE_RULES)})")
