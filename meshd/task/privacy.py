"""Differential privacy of one task: DP-SGD settings (Opacus), and the task's durable epsilon ledger.

The ledger is the accountant's history, ``[(noise_multiplier, sample_rate, steps), ...]`` (the mechanisms
applied, independent of the accountant that reads them), kept in ``STATE/tasks/NAME/privacy.json`` and in
every checkpoint. Steps are *reserved* (written and fsynced) before they are trained, so no model that
embodies them can be shared, checkpointed or lost before the ledger counts them. Two ledgers merge by
keeping the one that spent more: a restored file, an older checkpoint or a peer's echo never lowers it.
Blocking (file writes, PRV accounting): called from worker threads by the engine. Opacus (and scipy) is
imported on first use, so daemons without a DP task do not pay its seconds of import time.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshd.config import PrivacyConfig
from meshd.errors import StoreError
from meshd.store import read_json, write_json_atomic

__all__ = ["LEDGER_FILE", "Ledger", "PrivacyPlan", "advertised", "epsilon_of", "parse_history", "weaker_than"]

LEDGER_FILE = "privacy.json"
_FORMAT = 1
MAX_HISTORY = 256  # entries of a history read from a file, a checkpoint or a peer
_PRV_EPS_ERROR = 0.01

# Opacus's hooks warn on every first backward of a model whose inputs need no grad, and the RDP analysis
# warns when the best order is the largest one tried; neither is actionable for an operator.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD mechanism of a task, resolved when it opens: noise, clip, sampling rate, accountant."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # Poisson sampling: each row joins a step's batch with this probability
    expected_batch: int
    accountant: str
    calibrated: bool  # noise_multiplier was derived from (epsilon, delta, planned_steps)

    @classmethod
    def build(cls, cfg: PrivacyConfig, batch_size: int, rows: int) -> PrivacyPlan:
        batch = max(1, min(batch_size, rows))
        q = batch / rows
        sigma, calibrated = cfg.noise_multiplier, False
        if sigma == 0:
            from opacus.accountants.utils import get_noise_multiplier

            sigma = float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta, sample_rate=q,
                                               steps=cfg.planned_steps, accountant=cfg.accountant,
                                               epsilon_tolerance=0.005))
            calibrated = True
        return cls(float(sigma), cfg.max_grad_norm, q, batch, cfg.accountant, calibrated)


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """Epsilon spent by ``history`` at ``delta``, computed by Opacus's accountant of that name."""
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    if accountant == "prv":
        return float(acc.get_epsilon(delta, eps_error=_PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta))


def parse_history(raw: Any) -> History | None:
    """A history from untrusted JSON/msgpack (file, checkpoint, peer), or None when malformed."""
    if not isinstance(raw, list | tuple) or len(raw) > MAX_HISTORY:
        return None
    out: History = []
    for item in raw:
        if not isinstance(item, list | tuple) or len(item) != 3:
            return None
        s, q, n = item
        if (not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (s, q))
                or isinstance(n, bool) or not isinstance(n, int)):
            return None
        if not (math.isfinite(s) and s > 0 and 0 < q <= 1 and 0 < n <= 10**12):
            return None
        out.append((float(s), float(q), int(n)))
    return out


def advertised(cfg: PrivacyConfig, ledger: Ledger | None, plan: PrivacyPlan | None) -> dict[str, Any]:
    """The ``privacy`` field of this task's share and pull bodies (signed with them): docs/protocol.md."""
    if ledger is None or plan is None or not cfg.enabled:
        return {"dp": False}
    return {"dp": True, "epsilon": cfg.epsilon, "delta": cfg.delta, "spent": ledger.spent,
            "accountant": plan.accountant, "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm, "history": [list(h) for h in ledger.history()]}


def weaker_than(field: Any, at_most: float) -> str | None:
    """Why a peer's advertised ``privacy`` field is weaker than ``epsilon <= at_most``, or None if it is not."""
    if not isinstance(field, dict) or field.get("dp") is not True:
        return "the peer does not train with differential privacy"
    eps, spent = field.get("epsilon"), field.get("spent")
    for name, v in (("epsilon budget", eps), ("spent epsilon", spent)):
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            return f"the peer advertises no valid {name}"
        if v > at_most:
            return f"the peer's {name} {float(v):.3g} is above privacy.require_epsilon_at_most = {at_most:g}"
    return None


class Ledger:
    """The task's spent budget; thread-safe; persisted by :meth:`reserve` and :meth:`save`."""

    def __init__(self, path: Path, delta: float, accountant: str) -> None:
        self.path = path
        self.delta = delta
        self.accountant = accountant
        self._history: History = []
        self._lock = threading.Lock()
        self._spent = 0.0
        self.writes = 0
        self.source = "new"  # where the current history came from: new | file | checkpoint | peer

    @property
    def spent(self) -> float:
        return self._spent

    @property
    def steps(self) -> int:
        with self._lock:
            return sum(n for _, _, n in self._history)

    def history(self) -> History:
        with self._lock:
            return list(self._history)

    def load(self, checkpoint_extra: Any = None) -> list[str]:
        """Read the ledger file and the checkpoint's copy; keep the larger. Returns warnings."""
        warns: list[str] = []
        try:
            raw = read_json(self.path, default=None)
        except StoreError as exc:
            raw = None
            warns.append(f"{self.path}: {exc}; the checkpoint's copy of the ledger is used")
        if raw is not None:
            hist = parse_history(raw.get("history") if isinstance(raw, dict) else None)
            if hist is None:
                warns.append(f"{self.path}: not a meshd privacy ledger; the checkpoint's copy is used")
            else:
                self.merge(hist, "file")
                self.writes = int(raw.get("writes", 0)) if isinstance(raw.get("writes"), int) else 0
        if isinstance(checkpoint_extra, dict):
            hist = parse_history(checkpoint_extra.get("history"))
            if hist is not None and self.merge(hist, "checkpoint") and raw is not None:
                warns.append(f"{self.path} spent less than the checkpoint's ledger: the larger one is kept")
        return warns

    def merge(self, other: History, source: str) -> bool:
        """Adopt ``other`` if it spent more (epsilon at our delta, then steps); True when adopted."""
        eps = epsilon_of(other, self.delta, self.accountant)
        with self._lock:
            mine = (self._spent, sum(n for _, _, n in self._history))
            if (eps, sum(n for _, _, n in other)) <= mine:
                return False
            self._history, self._spent, self.source = list(other), eps, source
            return True

    def affordable(self, plan: PrivacyPlan, wanted: int, budget: float) -> int:
        """The most steps, up to ``wanted``, whose spending keeps the ledger within ``budget`` (binary search)."""
        base = self.history()
        lo, hi = 0, wanted
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if epsilon_of(_added(base, plan, mid), self.delta, self.accountant) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def reserve(self, plan: PrivacyPlan, steps: int) -> None:
        """Count ``steps`` and persist (fsynced) before they are trained; raises StoreError if it cannot."""
        with self._lock:
            new = _added(self._history, plan, steps)
        eps = epsilon_of(new, self.delta, self.accountant)
        self._write(new, eps)
        with self._lock:
            self._history, self._spent = new, eps

    def save(self) -> None:
        """Persist the ledger as it is (at checkpoints, after a merge)."""
        with self._lock:
            hist, eps = list(self._history), self._spent
        self._write(hist, eps)

    def to_extra(self) -> dict[str, Any]:
        """The copy stored in each checkpoint's ``extra`` (msgpack)."""
        with self._lock:
            return {"history": [list(h) for h in self._history], "epsilon": self._spent, "delta": self.delta,
                    "accountant": self.accountant}

    def _write(self, hist: History, eps: float) -> None:
        self.writes += 1
        write_json_atomic(self.path, {"format": _FORMAT, "accountant": self.accountant, "delta": self.delta,
                                      "epsilon_spent": eps, "steps": sum(n for _, _, n in hist),
                                      "history": [list(h) for h in hist], "writes": self.writes})


def _added(history: History, plan: PrivacyPlan, steps: int) -> History:
    out = list(history)
    if steps <= 0:
        return out
    if out and out[-1][0] == plan.noise_multiplier and out[-1][1] == plan.sample_rate:
        s, q, n = out[-1]
        out[-1] = (s, q, n + steps)
    else:
        out.append((plan.noise_multiplier, plan.sample_rate, steps))
    return out
