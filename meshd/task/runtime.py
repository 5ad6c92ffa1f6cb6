"""One learning task of a domain: its model, push-sum state, training, evaluation and checkpoints.

A task runs its own loops (join, gossip, train, evaluate, checkpoint) under :meth:`LearningTask.run`, and
talks to the rest of the daemon only through :class:`meshd.mesh.link.MeshLink`: it sends bodies to peers,
answers the ``share`` and ``pull`` envelopes the mesh routes to it, and gossips with the peers of its cohort
that run the same task with the same model and data schema. A failure inside a task (a data product that
disappears at start, an unexpected error in one of its loops) is reported in its status and stops only that
task; a diverging step is dropped and a failed checkpoint write is logged and retried, without stopping it.
The mesh and the other tasks carry on either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import structlog
import torch

from meshd.config import DEFAULT_TASK, GossipConfig, TaskConfig, codec_for
from meshd.core import codec as codecmod
from meshd.core.averaging import RejectedUpdate, Share
from meshd.core.codec import CodecName
from meshd.core.cohort import Cohort, TaskPeers, paced_steps
from meshd.core.membership import PeerState
from meshd.core.merge import NEUTRAL_REFUSALS, MergeRule, RuleParams, make_rule
from meshd.errors import DataError, MeshdError, ModelError, StoreError, WireError
from meshd.identity import peer_id_of
from meshd.logs import QuietLog
from meshd.mesh.link import Answer, MeshLink
from meshd.mesh.transport import SendError
from meshd.task.engine import Engine
from meshd.task.privacy import advertised, weaker_than
from meshd.task.standardize import WAIT_S, Scaler
from meshd.task.versions import Signature, signature

log = structlog.get_logger("meshd.task")

STANDARDIZE_POLL_S = 0.2  # how often the standardisation loop looks whether the moments settled
# While the mesh's moments are estimated (data.standardize = "mesh"; nothing trains meanwhile) timer rounds
# come this many times as often: settling takes some 75 merges per domain (3 domains: ~50 s at one round a
# second, and up to the 120 s timeout when calibrating refusals came first).
ESTIMATING_RATE = 5.0
DATA_IDLE_S = 5.0  # the data loop's look at its config while data.reload_check_s = 0
IDLE_S = 0.5  # the training loop's poll while training is off or impossible
INLINE_VALUES = 65_536  # models up to this many values are encoded on the loop (well under a millisecond)
GOSSIP_WAIT_S = 2.0  # longest a training part waits for the exchange it asked for
PACE_WAIT_S = 0.05  # a domain ahead of its peers re-checks this often
PACE_SLACK_EPOCHS = 0.5  # how far (in passes over its own data) a domain may run ahead of its peers' median
PACE_HORIZON_S = 30.0  # peers' epoch counts older than this (or than 2 x dead_after_s) are not waited for
# When training starts (or resumes) and no alive peer's epoch count has been heard yet, a domain trains at most
# PACE_SLACK_EPOCHS and waits this many gossip intervals (at least PACE_LISTEN_MIN_S) to hear one: peers that
# train say so in every share and answer. Without the wait, the first domains to start ran up to 12 epochs
# on their own skewed rows before any pace applied (digits, 8 real daemons), a local-only burst the mesh
# took 40 further steps to average away.
PACE_LISTEN_INTERVALS = 3.0
PACE_LISTEN_MIN_S = 3.0
# The merge rule's refusals (meshd/core/merge.py) and their HTTP status; the sender keeps the share's mass.
RULE_REFUSALS = {"quarantined": 409, "far_off": 409, "old_version": 409, "peer_budget": 429, "calibrating": 503,
                 "unproven": 503}
# 409 reasons that block a peer
REFUSALS = ("schema_mismatch", "incompatible", "unknown_task", "not_in_cohort", "privacy_too_weak")



def rule_params(g: GossipConfig, trusted: int, pushpull: bool) -> RuleParams:
    """The merge rule's parameters for a task's ``gossip`` section, its ``trusted`` peers and whether it asks for
    push-pull answers (bench/robustness.py builds its rules with it too)."""
    # The weight ceiling is the mesh's honest total weight: one per domain (see _model_fields' cap).
    return RuleParams(clip_factor=g.clip_factor, max_peer_shares=g.max_peer_shares,
                      max_version_step=g.max_version_step, quarantine_after=g.quarantine_after,
                      quarantine_s=g.quarantine_s, pull_interval_s=g.pull_interval_s,
                      weight_ceiling=float(trusted + 1), min_peers=max(1, min(3, trusted)),
                      max_pulls_per_min=g.max_pulls_per_min, stale_versions=g.stale_versions,
                      max_share_weight=g.max_share_weight, require_answer=pushpull)


def asks_answers(cfg: TaskConfig) -> bool:
    """Does a task's share ask for the receiver's share back (push-pull)? Not with a privacy requirement: a
    weaker peer's model refused would throw away the half the answering peer gave up; those tasks send one-way
    shares. (The clipped rule does ask: it refuses an honest answer rarely, and then loses that half, which
    bench/robustness.py shows costs far less than one-way shares do.)"""
    return cfg.gossip.exchange == "pushpull" and not cfg.privacy.require_epsilon_at_most


@dataclass
class TaskStats:
    rounds: int = 0
    merged: int = 0
    pulls: int = 0
    shares_sent: int = 0
    replies_sent: int = 0  # push-pull: shares sent back in answers
    replies_merged: int = 0  # push-pull: answers' shares merged here
    rejected: Counter[str] = field(default_factory=Counter)


class LearningTask:
    """One ``[[task]]``: built from its config, run by :meth:`run`, stopped by cancelling that and :meth:`close`."""

    def __init__(self, cfg: TaskConfig, link: MeshLink, *, state_dir: Path, max_param_abs: float) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.link = link
        self.engine = Engine(cfg, state_dir, max_param_abs=max_param_abs)
        self.cohort = Cohort(cfg.cohort)
        self.peers = TaskPeers("", "")
        self.stats = TaskStats()
        self.merge_rule: MergeRule = make_rule(cfg.gossip.merge, self._rule_params())
        self.state = "starting"  # starting | running | failed | stopped
        self.error: str | None = None
        self._quiet = QuietLog(60.0)
        self._opened = False
        self._joined = asyncio.Event()  # set once the first model is settled (pulled, or none to pull)
        self._pull_wanted = asyncio.Event()
        self._gossip_round = 0
        self._baseline_logged = False
        self._round_hint: int | None = None  # the topology round training asked for (aligned to its epochs)
        self._gossip_now = asyncio.Event()  # set by training after each part of a round
        self._gossip_done = asyncio.Event()  # set by gossip after each round
        self.data_reload_error: str | None = None  # why the last change of the data product was not adopted
        self._data_failed: Signature | None = None  # that change: not read again until the files change again
        self._part_exchange: asyncio.Task[None] | None = None  # gossip.overlap: the last part's exchange
        self._pace_start: tuple[float, float] | None = None  # (when, epochs) training last became active
        self._closed = False
        self._final_ok = True
        # Checkpoint writes run on this one thread, in order: a final write never races a periodic one.
        self._ckpt_exec = ThreadPoolExecutor(1, thread_name_prefix=f"meshd-ckpt-{self.name}"[:15])
        self.checkpoints: dict[str, Any] = {"last_file": None, "last_version": None, "last_at": None,
                                            "last_error": None, "last_error_at": None, "failures": 0}
        self._log = log.bind(task=self.name)

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the data product, the model and its newest checkpoint (in a worker thread)."""
        for warning in await asyncio.to_thread(self.engine.load):
            self._log.warning("engine_warning", detail=warning)
        self.peers = TaskPeers(self.engine.fingerprint, self.engine.schema)
        self._opened = True
        # A task with a privacy ledger pulls once even with a checkpoint: a peer's echo of its ledger brings
        # back budget spent after the backup its state dir may have been restored from.
        syncs_ledger = self.engine.ledger is not None and self.cfg.gossip.pull_on_join
        if self.engine.pushsum is None or not (self.engine.fresh or syncs_ledger) or not self.cfg.gossip.pull_on_join:
            self._joined.set()

    async def run(self) -> None:
        """Open (unless done), then run the task's loops until cancelled. A failure is reported, not raised."""
        try:
            if not self._opened:
                await self.open()
            self.state = "running"
            self._log.info("task_started", model=self.engine.spec.name, fingerprint=self.engine.fingerprint[:12],
                           cohort=self.cohort.describe())
            async with asyncio.TaskGroup() as tg:
                for name, coro in self.loops().items():
                    tg.create_task(coro, name=f"{self.name}:{name}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
        self.state = "failed"
        self.error = "; ".join(f"{type(e).__name__}: {e}" for e in errors)[:500]
        self._log.error("task_failed", error=self.error, hint="fix the cause, then reload the config to restart it")

    def loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {
            "join": self._join_loop(),
            "gossip": self._gossip_loop(),
            "train": self._train_loop(),
            "evaluate": self._evaluate_loop(),
            "checkpoint": self._checkpoint_loop(),
            "data": self._data_loop(),
            "standardize": self._standardize_loop(),
        }

    async def close(self) -> bool:
        """After its loops were cancelled: return unconfirmed shares' mass and write a final checkpoint.

        Returns False when the task had a model and its final checkpoint could not be written (the daemon
        then exits non-zero and says so). The write queues behind one still in flight: one writer.
        """
        if self._closed:
            return self._final_ok
        self._closed = True
        if self.state != "failed":
            self.state = "stopped"
        if self.engine.pushsum is not None:
            self.engine.pushsum.abandon_all()
            try:
                await self._save_checkpoint(final=True)
            except Exception as exc:  # reported; the stop goes on
                self._final_ok = False
                self._log.error("final_checkpoint_failed", error=str(exc),
                                hint="the task resumes from its previous checkpoint; check the state dir's disk")
        self._ckpt_exec.shutdown(wait=False)  # its last write was awaited above: the thread is idle
        return self._final_ok

    def apply(self, cfg: TaskConfig) -> None:
        """A reload changed keys that apply in place (training pace and weighting, gossip cadence and codec,
        cohort...); the daemon restarts the task instead when a ``[restart]`` key of it changed."""
        old_budget = self.cfg.privacy.epsilon
        self.cfg = cfg
        self.engine.cfg = cfg
        if self.engine.exhausted and cfg.privacy.epsilon > old_budget:
            self.engine.exhausted = False  # an explicit raise of the budget: training resumes
            self._log.warning("privacy_budget_raised", epsilon_budget=cfg.privacy.epsilon, previous=old_budget)
        if self.engine.pushsum is not None:
            self.engine.pushsum.codec = cast(CodecName, codec_for(cfg))
        g = cfg.gossip
        if self.engine.served.reconfigure(g.serve_window, g.serve, g.serve_smooth_s):
            self._log.info("task_served_model_changed", serve=g.serve, serve_window=g.serve_window,
                           serve_smooth_s=g.serve_smooth_s)
        if cfg.gossip.merge != self.merge_rule.name:
            self.merge_rule = make_rule(cfg.gossip.merge, self._rule_params())
            self._log.info("task_merge_rule_changed", rule=cfg.gossip.merge)
        if cfg.cohort != self.cohort.members:
            self.cohort = Cohort(cfg.cohort)
            self._log.info("task_cohort_changed", cohort=self.cohort.describe())

    # --- what the mesh asks ------------------------------------------------------------------------------

    def advertised(self) -> tuple[str, str] | None:
        if self.engine.pushsum is None or self.state == "failed":
            return None
        return self.engine.fingerprint, self.engine.schema

    def admits(self, peer_id: bytes, domain: str | None) -> bool:
        return self.cohort.admits(peer_id, domain)

    def peer_advertised(self, peer_id: bytes, ids: tuple[str | None, str | None] | None, now: float) -> None:
        if self.engine.pushsum is None:
            return
        if ids is None:
            self.peers.advertised(peer_id, False, None, None, now)
        else:
            self.peers.advertised(peer_id, True, ids[0], ids[1], now)

    async def receive(self, kind: str, sender: bytes, body: dict[str, Any]) -> Answer:
        try:
            if kind == "share":
                return await self._receive_share(sender, body)
            return await self._answer_pull(sender, body)
        except WireError as exc:
            self.stats.rejected[exc.reason] += 1
            self.merge_rule.refused(sender, exc.reason, time.monotonic())
            raise
        finally:
            self._log_rule_events()

    # --- merge rule --------------------------------------------------------------------------------------

    def _rule_params(self) -> RuleParams:
        params = rule_params(self.cfg.gossip, self.link.trusted_count, self._asks_answers())
        return replace(params, strikes=False) if self._estimating_moments() else params

    def _estimating_moments(self) -> bool:
        """The mesh's moments are being estimated here (``data.standardize = "mesh"``): nothing trains yet."""
        return self.engine.moments is not None and self.engine.moments.frozen is None

    def _merge(self, sender: bytes, vec: torch.Tensor, weight: float, version: int, rows: float | None,
               *, reciprocal: bool) -> bool:
        """Merge a peer's model through the task's merge rule (``reciprocal``: it asks for our share back, or
        answers a request of ours); True when its version may be believed."""
        ps = self.engine.pushsum
        assert ps is not None
        rule = self.merge_rule
        rule.params = self._rule_params()  # follows reloads and changes of the trusted set
        try:
            merged = rule.merge(ps, sender, vec, weight, version, rows, time.monotonic(), reciprocal=reciprocal)
        except RejectedUpdate as exc:
            status = RULE_REFUSALS.get(exc.reason)
            if status is None:
                raise WireError("bad_values", 400, exc.detail or exc.reason) from None
            raise WireError(exc.reason, status, exc.detail) from None
        self.engine.served.observe(merged.values, sender, time.monotonic())  # what was merged (clipped)
        return merged.trusted_version

    def _log_rule_events(self) -> None:
        now = time.monotonic()
        for event, peer in self.merge_rule.events():
            if event == "quarantined":
                self._log.warning("peer_quarantined", peer_id=peer_id_of(peer), duration_s=self.cfg.gossip.quarantine_s,
                                  detail="its shares stayed far beyond the clipping radius; refused until then")
            else:
                self._log.info("peer_released", peer_id=peer_id_of(peer), detail="quarantine over, on probation",
                               quarantined=self.merge_rule.is_quarantined(peer, now))

    # --- receiving ---------------------------------------------------------------------------------------

    def _check_compatible(self, sender: bytes, body: dict[str, Any]) -> None:
        """Same model and same data schema, or a 409 with its own reason (and the peer marked in /status)."""
        why: WireError | None = None
        now = time.monotonic()
        reason = self.peers.incompatibility(body.get("fp"), body.get("schema"))
        if self.engine.pushsum is None:
            why = WireError("incompatible", 409, "this domain has no model for this task")
        elif reason == "incompatible":
            why = WireError("incompatible", 409, "model fingerprint differs")
        elif reason == "schema_mismatch":
            # Averaging models trained on different column meanings is silent corruption: refused.
            detail = f"data schema differs (ours {self.engine.schema}, yours {str(body.get('schema'))[:32]})"
            if body.get("schema_set") == self.engine.schema_set:
                detail = ("same feature columns in a different order: list data.features (or data.columns) in the "
                          "mesh's order on one side")
            why = WireError("schema_mismatch", 409, detail)
        privacy = body.get("privacy")
        at_most = self.cfg.privacy.require_epsilon_at_most
        if why is None and at_most > 0 and (weak := weaker_than(privacy, at_most)) is not None:
            why = WireError("privacy_too_weak", 409, weak)
        if why is not None:
            if self.engine.pushsum is not None:
                self.peers.block(sender, why.reason, now)
            raise why
        self.peers.advertised(sender, True, self.engine.fingerprint, self.engine.schema, now)
        if isinstance(privacy, dict) and privacy.get("dp") is True:
            self.engine.note_peer_ledger(peer_id_of(sender), privacy.get("history"))

    def _model_fields(self, sender: bytes, body: dict[str, Any]) -> tuple[torch.Tensor, float, int, float | None]:
        self._check_compatible(sender, body)
        ps = self.engine.pushsum
        assert ps is not None
        codec, count, weight, version = body.get("codec"), body.get("count"), body.get("weight"), body.get("version")
        values = body.get("values")
        if (codec not in codecmod.CODECS or not isinstance(values, bytes) or type(count) is not int or count != ps.dim
                or not isinstance(weight, float | int) or isinstance(weight, bool)
                or not isinstance(version, int) or isinstance(version, bool)):
            raise WireError("bad_body", 400, "share fields missing or of the wrong type")
        # Honest push-sum weights never exceed the mesh's total mass: one per domain that started. A larger
        # one (a buggy or hostile trusted peer) would take over every model it reached, so it is refused.
        max_weight = float(self.link.trusted_count + 1)
        if not 0.0 < float(weight) <= max_weight:
            raise WireError("bad_values", 400, f"weight {float(weight)!r} outside (0, {max_weight:g}]")
        rows, epochs = body.get("rows"), body.get("epochs")
        for name, x in (("rows", rows), ("epochs", epochs)):
            if x is not None and (not isinstance(x, float | int) or isinstance(x, bool) or not 0 <= x <= 1e12):
                raise WireError("bad_body", 400, f"{name} must be a number in [0, 1e12]")
        # No epochs: the sender stopped training, nobody waits for it.
        self.peers.heard_epochs(sender, None if epochs is None else float(epochs), time.monotonic())
        try:
            vec = codecmod.decode(values, count, codec)
        except codecmod.CodecError as exc:
            raise WireError("bad_values", 400, str(exc)) from None
        return vec, float(weight), version, None if rows is None else float(rows)

    def _answer_fields(self, sender: bytes, body: dict[str, Any]) -> tuple[torch.Tensor, float, int, float | None]:
        """The model fields of a ``model`` answer (a pull's, or a push-pull share's), which must be of this task."""
        if body.get("task", DEFAULT_TASK) != self.name:
            raise WireError("bad_reply", 400, f"a model of task {str(body.get('task'))[:64]!r}")
        return self._model_fields(sender, body)

    async def _receive_share(self, sender: bytes, body: dict[str, Any]) -> Answer:
        ps = self.engine.pushsum
        if not self.link.joined or self._closed or self.state != "running":
            # Leaving or stopping: a merge now could land after the final checkpoint and be lost;
            # refused, the sender keeps the mass.
            return Answer.refuse(503, "task_stopped", "this task is not running here")
        vec, weight, version, rows = self._model_fields(sender, body)
        assert ps is not None
        if self.engine.fresh and not self._joined.is_set():
            # Still joining: merging now would be discarded by adopt(); refuse, the sender keeps its mass.
            return Answer.refuse(503, "not_ready", "joining the mesh")
        far = self.cfg.gossip.far_behind_versions
        # Push-pull: the sender asked for a share back. It is half of this node's free mass *before* the merge
        # (so both end with the pair's average weight and model), subtracted only once the merge succeeded,
        # and never more weight than the share brought: a peer cannot drain this
        # node with tiny shares, and an exchange never lowers this node's weight, so no pull floor applies
        # (with one, a drained domain answered nobody and the clipped rule took it for a sink).
        back = ps.prepare(1, at_most=weight) if body.get("reply") is True else []
        try:
            standardize = self._read_standardize(sender, body)  # checked before anything is merged
            believed = self._merge(sender, vec, weight, version, rows, reciprocal=body.get("reply") is True)
        except BaseException:
            for share in back:
                ps.abandon(share.id)
            raise
        standardize()
        moments_back = self._standardize_fields(half=bool(back))
        self.stats.merged += 1
        if far and believed and version - ps.version > far:
            self._pull_wanted.set()
        if not back:
            return Answer(204)
        ps.confirm(back[0].id)  # one-shot, as a pull's answer: a lost answer loses this half
        self.stats.replies_sent += 1
        answer = await self._share_body_off_loop(back[0])
        answer.pop("reply", None)  # an answer never asks for another one
        answer |= moments_back
        return Answer(200, "model", answer)

    async def _answer_pull(self, sender: bytes, body: dict[str, Any]) -> Answer:
        self._check_compatible(sender, body)
        ps = self.engine.pushsum
        assert ps is not None
        if not self.link.joined or self._closed or self.state != "running":
            return Answer.refuse(503, "task_stopped", "this task is not running here")
        if self.engine.fresh and not self._joined.is_set():
            return Answer.refuse(503, "not_ready", "joining the mesh too")
        g = self.cfg.gossip
        self.merge_rule.params = self._rule_params()  # follows reloads
        refusal = self.merge_rule.pull_refusal(sender, time.monotonic())
        if refusal == "pull_budget":
            raise WireError("pull_budget", 429, f"this domain answers {g.max_pulls_per_min:g} pulls a minute in all")
        if refusal is not None:
            raise WireError("pull_rate", 429, f"one pull per {g.pull_interval_s:g} s per peer")
        share = ps.split_for_pull(g.pull_fraction, g.pull_min_weight)
        if share is None:
            raise WireError("weight_low", 429, f"this domain's weight {ps.weight:.3g} is too low to give a share of; "
                            f"it keeps at least {g.pull_min_weight:g}")
        self.stats.pulls += 1
        self._log.info("pull_answered", peer_id=peer_id_of(sender), weight=share.weight, version=share.version)
        reply = await self._share_body_off_loop(share)  # with the frozen scaler, if any: a joiner adopts it
        echo = self.engine.ledgers_seen.get(peer_id_of(sender))
        if echo is not None:
            reply["privacy_echo"] = [list(h) for h in echo]  # what the puller spent, as far as we know
        return Answer(200, "model", reply)

    # --- sending -----------------------------------------------------------------------------------------

    def model_ids(self) -> dict[str, Any]:
        """What a peer checks before combining models with ours: the task, model and data schema fingerprints."""
        return {"task": self.name, "fp": self.engine.fingerprint, "schema": self.engine.schema,
                "schema_set": self.engine.schema_set,
                "privacy": advertised(self.cfg.privacy, self.engine.ledger, self.engine.plan)}

    async def _share_body_off_loop(self, share: Share) -> dict[str, Any]:
        """:meth:`_share_body` on a worker thread for a big model; a small one's encoding takes less time than the
        hand-over to a thread (which, with many daemons on few cores, waits for a core)."""
        if share.values.shape[0] <= INLINE_VALUES:
            return self._share_body(share)
        return await asyncio.to_thread(self._share_body, share)

    def _share_body(self, share: Share) -> dict[str, Any]:
        codec = self.engine.pushsum.codec if self.engine.pushsum is not None else codec_for(self.cfg)
        return self._standardize_fields(half=False) | {
            **self.link.hello_body(),
            **self.model_ids(),
            "version": int(share.version),
            "weight": float(share.weight),
            "rows": float(share.rows),
            **({"epochs": self.engine.epochs} if self._training_active() else {}),
            "codec": codec,
            "count": int(share.values.shape[0]),
            "values": (share.encoded[1] if share.encoded is not None and share.encoded[0] == codec
                       else codecmod.encode(share.values, codec)),  # type: ignore[arg-type]
            **({"reply": True} if self._asks_answers() else {}),
        }

    def _asks_answers(self) -> bool:
        return asks_answers(self.cfg)

    def _training_active(self) -> bool:
        tr = self.cfg.training
        return (tr.enabled and self.engine.learner is not None and tr.steps_per_round != 0
                and not self.engine.exhausted and (self.engine.moments is None or self.engine.scaler_ready))

    def eligible(self, now: float) -> set[bytes]:
        """Trusted peers this task may gossip with now: in its cohort, known to run this task (their signed ping,
        pong or share said so; before that, their mDNS TXT), not found unable to take its shares, and not
        quarantined by the merge rule (a share sent to a quarantined peer would only feed it mass)."""
        out: set[bytes] = set()
        for p in self.link.peers():
            if (not self.cohort.admits(p.peer_id, p.domain) or self.peers.is_blocked(p.peer_id, now)
                    or self.merge_rule.is_quarantined(p.peer_id, now)):
                continue
            view = self.peers.get(p.peer_id)
            runs = view.runs if view is not None and view.runs is not None else self.name in p.tasks
            if runs:
                out.add(p.peer_id)
        return out

    def _note_refusal(self, peer_id: bytes, status: int, reply: bytes) -> None:
        if status != 409:
            return
        for reason in REFUSALS:
            if f'"{reason}"'.encode() in reply:
                self.peers.block(peer_id, reason, time.monotonic())
                return

    # --- loops -------------------------------------------------------------------------------------------

    async def _join_loop(self) -> None:
        """A fresh task pulls its cohort's model before it trains or gossips; a straggler pulls on demand."""
        if not self._joined.is_set():
            await self._initial_pull()
            self._joined.set()
        while True:
            await self._pull_wanted.wait()
            self._pull_wanted.clear()
            if self.link.joined:
                await self._pull_once(adopt=False)
            await asyncio.sleep(self.cfg.gossip.interval_s * 5)  # at most one catch-up pull per 5 rounds

    async def _initial_pull(self) -> None:
        if not self.link.trusted_count:
            self._log.info("join_alone", detail="no trusted peers configured")
            return
        deadline = time.monotonic() + max(5.0, 3 * self.cfg.gossip.interval_s)
        while time.monotonic() < deadline:
            outcome = await self._pull_once(adopt=self.engine.fresh)
            if outcome in ("adopted", "everyone_new"):
                return
            await asyncio.sleep(min(0.5, self.cfg.gossip.interval_s))
        self._log.info("join_alone", detail="no peer answered a pull; starting from this domain's own model")

    async def _pull_once(self, adopt: bool) -> str:
        ps = self.engine.pushsum
        eligible = self.eligible(time.monotonic())
        candidates = [p for p in self.link.peers() if p.peer_id in eligible and p.address
                      and p.state in (PeerState.ALIVE, PeerState.UNKNOWN, PeerState.SUSPECT)]
        if ps is None or not candidates or not self.link.joined:
            return "no_candidates"
        self.link.rng.shuffle(candidates)
        not_ready = 0
        for p in candidates[:4]:
            try:
                status, reply, _ = await self.link.exchange(p.peer_id, p.address or "", "pull",
                                                            {**self.link.hello_body(), **self.model_ids()})
            except SendError:
                continue
            self._note_refusal(p.peer_id, status, reply)
            if status == 503:
                not_ready += 1
                continue
            if status != 200:
                continue
            body = await self.link.open_reply(p.peer_id, reply, "model")
            if body is None:
                continue
            fields = None
            try:
                vec, weight, version, rows = fields = self._answer_fields(p.peer_id, body)
                self._read_standardize(p.peer_id, body)()
                if adopt:
                    # Keep this domain's own weight (now carrying the mesh's model): the mesh's total weight
                    # keeps counting every domain, which the mean-rows estimate of data weighting needs.
                    ps.adopt(vec, weight, version, rows, keep_own_weight=True)
                    self.engine.served.reset()
                else:
                    self._merge(p.peer_id, vec, weight, version, rows, reciprocal=True)
            except (WireError, RejectedUpdate) as exc:
                if fields is not None and isinstance(exc, WireError) and exc.reason in NEUTRAL_REFUSALS:
                    # Refused for a reason of ours (the clipped rule calibrating, as after a restart): the
                    # answer's mass is kept, and so is what the peer says this domain spent.
                    self.merge_rule.absorb(ps, fields[1], fields[3])
                    await self._adopt_ledger_echo(p.peer_id, body.get("privacy_echo"))
                self.stats.rejected["bad_pull_reply"] += 1
                self.link.reject("bad_pull_reply", p.address or "?", str(exc), p.peer_id)
                continue
            self.engine.fresh = False
            await self._adopt_ledger_echo(p.peer_id, body.get("privacy_echo"))
            self._log.info("model_pulled", peer_id=peer_id_of(p.peer_id), version=version, weight=weight,
                           mode="adopt" if adopt else "merge")
            return "adopted"
        if not_ready and not_ready == min(4, len(candidates)):
            self._log.info("join_everyone_new", peers=not_ready)
            return "everyone_new"
        return "nobody_answered"

    async def _adopt_ledger_echo(self, peer_id: bytes, echo: object) -> None:
        if echo is None or self.engine.ledger is None:
            return
        try:
            changed = await asyncio.to_thread(self.engine.adopt_echo, echo, "peer")
        except MeshdError as exc:  # the ledger file cannot be written: the larger ledger is kept in memory
            self._log.error("privacy_ledger_write_failed", error=str(exc))
            return
        if changed is not None:
            self._log.warning("privacy_ledger_restored", peer_id=peer_id_of(peer_id), epsilon_was=round(changed[0], 6),
                              epsilon_spent=round(changed[1], 6),
                              detail="a peer saw this domain spend more than its state dir says (a restored backup?)")

    async def _gossip_loop(self) -> None:
        """A round each time training finished a part, and a timer round when ``gossip.interval_s``
        (jittered) passed without any round.

        Every round pushes the timer back: a domain whose parts exchange often (a big data product) does no
        timer rounds on top, which saved bytes and CPU for no mixing it lacked; a domain that waits for the
        mesh's pace, trains slowly or not at all still exchanges once per interval, and that is what averages
        the models once training stops.
        """
        await self._joined.wait()
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            g = self.cfg.gossip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await self._gossip_now.wait()
            now = loop.time()
            interval = g.interval_s / (ESTIMATING_RATE if self._estimating_moments() else 1.0)
            due = now + interval * (1 + g.jitter * (2 * self.link.rng.random() - 1))
            self._gossip_now.clear()
            try:
                await self._gossip_round_once()
            except Exception as exc:  # one failed round never stops the task
                if self._quiet.should_log(("gossip_round_failed", type(exc).__name__))[0]:
                    self._log.exception("gossip_round_failed")
            finally:
                self._gossip_done.set()

    async def _gossip_round_once(self) -> None:
        g = self.cfg.gossip
        ps = self.engine.pushsum
        if ps is None or not self.link.joined:
            return
        round_no, self._round_hint = (self._gossip_round if self._round_hint is None else self._round_hint), None
        targets = self.link.gossip_targets(g.fanout, topology=g.topology, round_no=round_no,
                                           among=self.eligible(time.monotonic()))
        self._gossip_round += 1
        if not targets:
            return
        shares = ps.prepare(len(targets))
        self.stats.rounds += 1
        async with asyncio.TaskGroup() as tg:
            for peer, share in zip(targets, shares, strict=False):
                tg.create_task(self._send_share(peer.peer_id, peer.address or "", share))

    async def _send_share(self, peer_id: bytes, address: str, share: Share) -> None:
        ps = self.engine.pushsum
        assert ps is not None
        delivered = merged_there = False  # merged there: a 204, a 200 (push-pull), or a retry found merged
        moments = self.engine.moments
        half = moments.outgoing() if moments is not None and moments.frozen is None else None
        try:
            body = await self._share_body_off_loop(share)
            if half is not None:
                body["moments"] = _moments_field(half)
            status, reply, attempts = await self.link.exchange(peer_id, address, "share", body)
            self._note_refusal(peer_id, status, reply)
            # A retry answered 'replayed' means an earlier attempt did arrive and was merged (its answer, and
            # the receiver's share in it, were lost).
            delivered = status == 204 or (status == 409 and attempts > 1 and b'"replayed"' in reply)
            merged_there = delivered or status == 200
            answered: bool | None = False
            if status == 200:  # push-pull: merged there, and the answer carries the receiver's share
                ps.confirm(share.id)
                self.stats.shares_sent += 1
                answered = await self._merge_reply(peer_id, address, reply)
            if status in (200, 204) and body.get("reply") is True and answered is not None:
                self.merge_rule.answered(peer_id, answered, time.monotonic())  # merged there: a share back here?
                self._log_rule_events()
        except (SendError, MeshdError):
            delivered = False
        except Exception as exc:  # contained: this share's mass stays here
            delivered = False
            if self._quiet.should_log(("share_send_failed", type(exc).__name__))[0]:
                self._log.exception("share_send_failed", peer_id=peer_id_of(peer_id))
        finally:
            if delivered:
                ps.confirm(share.id)
                self.stats.shares_sent += 1
            else:
                ps.abandon(share.id)
            if half is not None and moments is not None:  # the moments half went (or not) with the share
                (moments.delivered if merged_there else moments.lost)(half.id)

    async def _merge_reply(self, peer_id: bytes, address: str, reply: bytes) -> bool | None:
        """Merge the share a receiver sent back in its answer (push-pull); a bad one is counted, never merged.
        True when it was merged, None when the merge rule refused it for a reason of ours (NEUTRAL_REFUSALS)."""
        body = await self.link.open_reply(peer_id, reply, "model")
        if body is None:
            return False
        try:
            vec, weight, version, rows = self._answer_fields(peer_id, body)
            standardize = self._read_standardize(peer_id, body)
            try:
                self._merge(peer_id, vec, weight, version, rows, reciprocal=True)
            except WireError as exc:
                # The answer's moments half was given away at once: a model refused for a reason of ours
                # (calibrating: the standardisation runs before training, just when the clipped rule
                # calibrates) must not take it down too, or the mesh's moments lose mass (9% off, measured).
                if exc.reason in NEUTRAL_REFUSALS and (ps := self.engine.pushsum) is not None:
                    standardize()
                    self.merge_rule.absorb(ps, weight, rows)
                raise
            standardize()
        except WireError as exc:
            # The merge rule's refusals (quarantined, far_off...) under their own reason, as reply_<reason>.
            reason = f"reply_{exc.reason}" if exc.reason in RULE_REFUSALS else "bad_share_reply"
            self.stats.rejected[reason] += 1
            self.link.reject(reason, address or "?", str(exc), peer_id)
            return None if exc.reason in NEUTRAL_REFUSALS else False
        except RejectedUpdate as exc:
            self.stats.rejected["bad_share_reply"] += 1
            self.link.reject("bad_share_reply", address or "?", str(exc), peer_id)
            return False
        self.stats.merged += 1
        self.stats.replies_merged += 1
        return True

    async def _train_loop(self) -> None:
        """Local training back to back in the worker thread: rounds of ``training.steps_per_round`` steps (one
        epoch by default), each trained in parts of ``gossip.every_steps`` steps (or ``gossip.per_round`` parts)
        with one exchange after each part.

        Each part's update is applied with the data weighting (``Engine.update_scale``). With
        ``training.pace = "mesh"`` a domain that is more than ``PACE_SLACK_EPOCHS`` epochs ahead of the
        median of its peers waits, so every domain makes about one pass over its own data per pass of the
        others: a domain's steps are proportional to its rows, as in FedAvg's one epoch per round.
        """
        await self._joined.wait()
        try:
            await self._train_parts()
        finally:  # the part's exchange in flight (gossip.overlap) belongs to this loop
            if self._part_exchange is not None:
                self._part_exchange.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._part_exchange
                self._part_exchange = None

    async def _train_parts(self) -> None:
        while True:
            ps = self.engine.pushsum
            if ps is None or not self._training_active():
                self.engine.served.unsettle()  # no more drift: serve the converging estimate
                self._pace_start = None
                await asyncio.sleep(IDLE_S)
                continue
            if self._pace_start is None:
                self._pace_start = (time.monotonic(), self.engine.epochs)
            steps = self._paced_steps(self.engine.chunk_steps, time.monotonic(), self._pace_start)
            if steps == 0:
                self.engine.stats.paced_waits += 1
                await asyncio.sleep(PACE_WAIT_S)
                continue
            start = ps.estimate()
            try:
                new, result = await asyncio.to_thread(self.engine.train, start, steps)
                if result.steps == 0 and self.engine.exhausted:
                    p = self.engine.privacy_snapshot()
                    self._log.warning("privacy_budget_exhausted", epsilon_spent=p.get("epsilon_spent"),
                                      epsilon_budget=p.get("epsilon_budget"),
                                      detail="training stopped, gossip goes on; raise privacy.epsilon to resume")
                    continue
                ps.apply_update(new - start, self.engine.update_scale())
            except StoreError as exc:
                # The privacy ledger could not be written (disk full...): nothing was trained, nothing spent.
                if self._quiet.should_log(("privacy_ledger_write_failed", str(exc)[:80]))[0]:
                    self._log.error("privacy_ledger_write_failed", error=str(exc),
                                    detail="training waits until the ledger can be written; gossip goes on")
                await asyncio.sleep(IDLE_S)
            except (RejectedUpdate, ModelError) as exc:
                # The model is kept as it was; a diverging step is dropped, never merged.
                self.engine.stats.steps_dropped += steps
                if self._quiet.should_log(("training_diverged",))[0]:
                    self._log.error("training_diverged", detail=str(exc), hint="lower training.lr")
                await asyncio.sleep(IDLE_S)
            else:
                st = self.engine.stats
                st.steps += result.steps
                st.samples_seen += result.samples
                st.loss = result.loss
                if self.cfg.gossip.overlap:
                    # At most one exchange in flight: the last part's is done before this part's starts, so
                    # the next part trains while this one's exchange travels, never further ahead.
                    if self._part_exchange is not None:
                        await self._part_exchange
                    self._part_exchange = asyncio.create_task(self._after_part(result.steps))
                else:
                    await self._after_part(result.steps)
            await asyncio.sleep(0)  # let gossip and the status API in between two rounds

    async def _after_part(self, steps: int) -> None:
        """The exchanges that follow a trained part: one, and at the end of a training round ``gossip.settle``
        more with no training in between; the model they leave is served.

        By default the next part waits for them (each bounded by ``GOSSIP_WAIT_S``) and starts from the model
        they left; with ``gossip.overlap`` it trains meanwhile and waits for them only before its own exchange.
        Either way the steps between two exchanges do not depend on how fast this host is. (Overlap measured on
        16 real daemons, 2 cores: slower to 0.90, 91 s against 80 s, and 3 points lower at 1,000 steps: with
        every domain busy the cores are full anyway, and more runnable threads only contend.)

        With ``gossip.every_steps`` (the default) every domain exchanges after the same number of local steps,
        so a domain with many rows exchanges more often per epoch than a small one: drift from the mesh grows
        with the steps taken since the last exchange, not with the fraction of an epoch. The topology round is
        then the domain's own gossip round counter. With ``gossip.per_round`` parts instead, the topology round
        is the part's place in the domain's training rounds, so domains that keep pace walk the exponential
        graph in step without any coordination.
        """
        g = self.cfg.gossip
        if (g.every_steps == 0 and g.per_round == 0) or not self.link.joined:
            return
        round_steps = max(1, self.engine.round_steps)
        total = self.engine.stats.steps + self.engine.stats.steps_dropped
        this_round, within = divmod(total - steps, round_steps)
        first: int | None = None  # every_steps: the gossip loop's own round counter
        settle: list[int | None] = [None] * g.settle
        if g.every_steps == 0:
            per_epoch = g.per_round + g.settle
            first = this_round * per_epoch + min(g.per_round - 1, within * g.per_round // round_steps)
            settle = [this_round * per_epoch + g.per_round + k for k in range(g.settle)]
        await self._exchange_now(first)
        if not settle or total // round_steps == this_round:
            return  # no settling, or the round is not over yet
        for round_no in settle:
            await self._exchange_now(round_no)
        ps = self.engine.pushsum
        if ps is not None:
            self.engine.served.settle(ps.estimate())

    async def _exchange_now(self, round_no: int | None) -> None:
        """Ask the gossip loop for one round now and wait for it (bounded); ``None``: its own next round."""
        self._round_hint = round_no
        self._gossip_done.clear()
        self._gossip_now.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GOSSIP_WAIT_S):
                await self._gossip_done.wait()

    def _paced_steps(self, wanted: int, now: float, started: tuple[float, float]) -> int:
        """How many steps this domain may take now: ``wanted``, or fewer (0 = wait) when it is ahead; training
        (re)started at ``started = (time, epochs)``."""
        if self.cfg.training.pace != "mesh":
            return wanted
        horizon = max(PACE_HORIZON_S, 2 * self.link.dead_after_s)
        alive = {p.peer_id for p in self.link.peers() if p.state == PeerState.ALIVE} & self.eligible(now)
        return paced_steps(wanted, self.engine.epochs, self.engine.steps_per_epoch,
                           self.peers.epochs_heard(alive, now, horizon), slack=PACE_SLACK_EPOCHS, started=started,
                           now=now, listen_s=max(PACE_LISTEN_MIN_S, PACE_LISTEN_INTERVALS * self.cfg.gossip.interval_s),
                           alone=not alive)

    async def _evaluate_loop(self) -> None:
        while True:
            self.peers.forget_except({p.peer_id for p in self.link.peers()})  # distrusted peers leave the view
            self.merge_rule.tick(time.monotonic())
            self._log_rule_events()
            ps = self.engine.pushsum
            if ps is not None:
                flat = self.engine.served_model()
                version, steps = ps.version, self.engine.stats.steps
                result = await asyncio.to_thread(self.engine.evaluate, flat)
                digest = await asyncio.to_thread(self.engine.digest, flat)
                st = self.engine.stats
                st.scores = result
                st.evaluated_at_version = version
                st.evaluated_at_steps = steps
                self.engine.sha256 = digest
                if self.engine.baseline_converged and not self._baseline_logged:
                    self._baseline_logged = True
                    self._log.info("local_baseline_converged", epochs=round(self.engine.epochs, 1),
                                   metric=self.engine.kind.primary,
                                   local_only=st.scores.get(f"local_only_{self.engine.kind.primary}"),
                                   detail="the local-only baseline stopped training; its last scores stand")
            await asyncio.sleep(self.cfg.training.eval_interval_s)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.checkpoint.interval_s)
            try:
                await self._save_checkpoint()
            except Exception as exc:  # disk full, I/O error...: reported in status, retried next interval
                if self._quiet.should_log(("checkpoint_failed", str(exc)[:80]))[0]:
                    self._log.error("checkpoint_failed", error=str(exc))

    async def _save_checkpoint(self, *, final: bool = False) -> None:
        if self.engine.pushsum is None:
            return
        ckpt = self.engine.checkpoint_now()
        loop = asyncio.get_running_loop()
        # Not cancellable half-way: the write is awaited even when the caller is cancelled (shielded), so
        # the status and the next write always see where it ended.
        future = loop.run_in_executor(self._ckpt_exec, self.engine.save_checkpoint, ckpt)
        try:
            name = await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise
        except Exception as exc:
            c = self.checkpoints
            c["last_error"], c["last_error_at"], c["failures"] = str(exc)[:300], _now_iso(), c["failures"] + 1
            raise
        c = self.checkpoints
        c["last_file"], c["last_version"], c["last_at"] = name, ckpt.version, _now_iso()
        (self._log.info if final else self._log.debug)("checkpoint_saved", file=name, version=ckpt.version,
                                                       final=final)

    # --- federated standardisation (data.standardize = "mesh") ---------------------------------------------

    def _standardize_fields(self, half: bool) -> dict[str, Any]:
        """What a body says of the standardisation: the frozen scaler; or, while estimating and when ``half``
        (an answer to a share), half of this domain's moments, given away at once (one-shot, as the answer)."""
        m = self.engine.moments
        if m is None:
            return {}
        if m.frozen is not None:
            return {"scaler": m.frozen.to_wire()}
        share = m.outgoing(one_shot=True) if half else None
        return {} if share is None else {"moments": _moments_field(share)}

    def _read_standardize(self, sender: bytes, body: dict[str, Any]) -> Callable[[], None]:
        """Check a peer's frozen scaler or moments half (WireError if bad); returns what takes it in: adopting
        the scaler while this domain still estimates, or merging the half. Nothing when this domain is frozen."""
        m = self.engine.moments
        if m is None or m.frozen is not None:
            return _nothing
        try:
            if "scaler" in body:
                scaler = Scaler.from_wire(body["scaler"], m.columns)

                def adopt() -> None:
                    if m.frozen is None:
                        m.freeze("peer", scaler)
                        self._log.info("standardization_adopted", peer_id=peer_id_of(sender))
                return adopt
            moments = body.get("moments")
            if not isinstance(moments, dict):
                return _nothing
            values, weight = moments.get("values"), moments.get("weight")
            if (not isinstance(values, bytes) or isinstance(weight, bool)
                    or not isinstance(weight, int | float) or not 0.0 < float(weight) <= 1e6):
                raise ValueError("moments need values (f64 bytes) and a weight in (0, 1e6]")
            vec = codecmod.decode(values, m.ps.dim, "f64")
            m.ps.check(vec, float(weight), "moments")
        except (ValueError, RejectedUpdate) as exc:
            raise WireError("bad_values", 400, f"standardisation: {exc}") from None
        return lambda: m.merge(vec, float(weight)) if m.frozen is None else None

    async def _standardize_loop(self) -> None:
        """Until the scaler is frozen (settled here, adopted from a peer, alone, or after WAIT_S) and applied."""
        m = self.engine.moments
        if m is None or self.engine.scaler_ready:
            return
        await self._joined.wait()
        deadline = time.monotonic() + WAIT_S
        while m.frozen is None:
            if self.link.trusted_count == 0:
                m.freeze("alone")
            elif m.settled:
                m.freeze("mesh")
            elif time.monotonic() >= deadline:
                m.freeze("timeout")
                self._log.warning("standardization_timeout", merges=m.merges, waited_s=WAIT_S,
                                  detail="the mesh's moments did not settle; training starts with this estimate")
            else:
                await asyncio.sleep(STANDARDIZE_POLL_S)
        assert m.frozen is not None
        await asyncio.to_thread(self.engine.apply_scaler, m.frozen)
        self.merge_rule.recalibrate()  # the distances of untrained models say nothing of trained ones
        self._log.info("standardization_settled", source=m.source, merges=m.merges, inputs=len(m.columns))

    # --- data that keeps arriving --------------------------------------------------------------------------

    async def _data_loop(self) -> None:
        """Every ``data.reload_check_s``, look at the data product's files (names, sizes, modification times);
        a change seen at two looks in a row (so a file still being written is not read half-way) is read in a
        worker thread and trained on from the next part, with the model, its push-sum state and the epoch
        count kept. A product that cannot be read, or whose schema changed, is not adopted: the task keeps
        training on the rows it has, and says why in ``/status`` ``data.reload_error`` and one log line."""
        engine = self.engine
        path = self.cfg.data.path
        if path is None or engine.data_version is None or engine.learner is None:
            return
        seen: Signature | None = None  # a change noticed at the last look
        while True:
            every = self.cfg.data.reload_check_s
            await asyncio.sleep(every if every > 0 else DATA_IDLE_S)
            if every <= 0 or engine.data_version is None:
                continue
            try:
                now = await asyncio.to_thread(signature, path)
            except OSError as exc:
                self._data_refused(None, f"{path}: {exc.strerror or exc}; training goes on with the rows it has")
                continue
            if now == engine.data_version.signature or now == self._data_failed:
                seen = None
                continue
            if now != seen:
                seen = now  # changed since the last look: read it once it holds still
                continue
            seen = None
            await self._reload_data(now)

    async def _reload_data(self, sig: Signature) -> None:
        engine = self.engine
        if engine.plan is not None:
            self._data_refused(sig, "a task with differential privacy trains on the rows its budget was planned "
                                    "for: restart the task to read the new data product")
            return
        try:
            product, version, mask = await asyncio.to_thread(engine.read_data)
            await asyncio.to_thread(engine.swap_learner_data, product)
        except (DataError, ModelError) as exc:
            self._data_refused(sig, str(exc))
            return
        before = engine.data_version
        delta = engine.adopt_data(product, version, mask)
        self.data_reload_error, self._data_failed = None, None
        self._log.info("data_reloaded", rows=version.rows, train_rows_change=delta, content=version.content,
                       previous=before.content if before else None, files=version.files,
                       holdout="kept" if engine.holdout_kept else "redrawn")

    def _data_refused(self, sig: Signature | None, why: str) -> None:
        self._data_failed = sig
        if why != self.data_reload_error:
            self._log.warning("data_reload_refused", detail=why)
        self.data_reload_error = why

    def data_snapshot(self) -> dict[str, Any]:
        e = self.engine
        return {"path": str(self.cfg.data.path) if self.cfg.data.path else None,
                "version": e.data_version.snapshot() if e.data_version else None,
                "reloads": e.data_reloads, "reload_check_s": self.cfg.data.reload_check_s,
                "holdout": None if e.holdout_kept is None else ("kept" if e.holdout_kept else "redrawn"),
                "reload_error": self.data_reload_error,
                "standardize": ({"mode": "mesh", **e.moments.snapshot()} if e.moments is not None
                                else {"mode": self.cfg.data.standardize})}

    # --- status ------------------------------------------------------------------------------------------

    async def model_file(self) -> bytes | None:
        """The served model now, as ``meshd export``'s safetensors (``GET /v1/model``); the metadata adds the
        version, the local SGD steps and the epochs it was served at. ``None`` before the task has a model."""
        from meshd.task.export import safetensors_bytes

        ps = self.engine.pushsum
        if ps is None or self.engine.module is None:
            return None
        flat = self.engine.served_model()  # a copy, taken on the loop: consistent with the counters below
        meta = {"meshd.version": str(ps.version), "meshd.steps": str(self.engine.stats.steps),
                "meshd.epochs": f"{self.engine.epochs:.4f}", "meshd.task_name": self.name}
        return await asyncio.to_thread(safetensors_bytes, self.engine, flat, meta)

    def snapshot(self) -> dict[str, Any]:
        model, training = self.engine.snapshot() if self.engine.fingerprint else ({}, {})
        ps = self.engine.pushsum
        gossip: dict[str, Any] = {
            "rounds": self.stats.rounds, "merged": self.stats.merged, "pulls": self.stats.pulls,
            "shares_sent": self.stats.shares_sent, "replies_sent": self.stats.replies_sent,
            "replies_merged": self.stats.replies_merged, "rejected": dict(sorted(self.stats.rejected.items())),
            "served": "settled" if self.engine.served.settled else "blend",
        }
        now = time.monotonic()
        rule = self.merge_rule
        gossip["merge"] = {"rule": rule.name, **rule.totals(now),
                           "radius": rule.radius(ps, now) if ps is not None else None}
        if ps is not None:
            gossip |= {"weight": ps.weight, "consensus_distance": ps.mean_distance, "pending_shares": ps.pending}
        peers: dict[str, Any] = self.peers.snapshot()
        for peer, account in rule.snapshot(now).items():
            peers.setdefault(peer.hex(), {})["merge"] = account
        return {
            "state": self.state,
            "error": self.error,
            "cohort": self.cohort.describe(),
            "joined": self._joined.is_set(),
            "peers": peers,
            "model": model,
            "training": training,
            "gossip": gossip,
            "checkpoint": dict(self.checkpoints),
            "privacy": self.engine.privacy_snapshot(),
            "data": self.data_snapshot(),
        }


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _moments_field(share: Share) -> dict[str, Any]:
    return {"values": codecmod.encode(share.values, "f64"), "weight": float(share.weight)}


def _nothing() -> None:
    return None
