"""The model runtime of one domain: model + data product + learner, the push-sum state, evaluation
and checkpoints. Blocking work (data loading, training, evaluation, checkpoint writes) is exposed as
plain functions that the node runs in worker threads; push-sum state is only touched on the loop.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from meshd.config import DEFAULT_TASK, TaskConfig, codec_for
from meshd.core.averaging import MAX_ROWS, PushSum, ServedModel, data_scale
from meshd.errors import DataError
from meshd.task import models
from meshd.task.checkpoints import Checkpoint, CheckpointStore
from meshd.task.data import DataProduct, holdout_mask, load_data_product, split_product
from meshd.task.learner import Learner, TrainConfig, TrainResult, limit_torch_threads
from meshd.task.metrics import task_kind
from meshd.task.privacy import LEDGER_FILE, Ledger, PrivacyPlan, parse_history
from meshd.task.standardize import MeshMoments, Scaler, local_moments
from meshd.task.versions import DataVersion, data_version, signature

log = structlog.get_logger("meshd.task.engine")

# Where a task is scored, as /status names its fields ("<scope>_<metric>": holdout_accuracy, local_only_rmse...):
# the served model and the local-only baseline, on the holdout split and on data.test_path.
SCOPES = ("holdout", "local_only", "test", "local_only_test")


@dataclass
class TrainingStats:
    steps: int = 0
    samples_seen: int = 0
    loss: float | None = None
    scores: dict[str, float | None] = field(default_factory=dict)  # score_fields(kind) -> value, from evaluate()
    evaluated_at_version: int | None = None
    evaluated_at_steps: int | None = None  # local SGD steps this domain had taken when that model was scored
    steps_dropped: int = 0  # steps of rounds whose update was refused (diverged)
    paced_waits: int = 0  # times the domain waited for its peers (training.pace = "mesh")


class Engine:
    """Built by `load()` in a worker thread; afterwards push-sum methods are called on the loop only."""

    def __init__(self, cfg: TaskConfig, state_dir: Path, *, max_param_abs: float = 1e6) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.state_dir = task_state_dir(state_dir, cfg.name)
        self._legacy_dir = state_dir / "checkpoints" if cfg.name == DEFAULT_TASK else None
        self._max_param_abs = max_param_abs
        self.spec = models.ModelSpec(
            name=cfg.model.name,
            hidden=cfg.model.hidden,
            channels=cfg.model.channels,
            kernel_size=cfg.model.kernel_size,
            num_classes=cfg.model.num_classes,
            task=cfg.model.task,
        )
        self.kind = task_kind(cfg.model.task)
        self._store: CheckpointStore | None = None  # created in load(): it touches the disk
        self.data: DataProduct | None = None
        self.test: DataProduct | None = None
        self.learner: Learner | None = None
        self.baseline: Learner | None = None
        self._baseline_flat: torch.Tensor | None = None
        self.module: torch.nn.Module | None = None
        self.input_dim = 0
        self.schema = ""  # data schema fingerprint (names in order, label, dtype): part of compatibility
        self.schema_set = ""  # the same over the sorted names: tells "same columns, other order" apart
        self.fingerprint = ""
        self.parameters = 0
        self.pushsum: PushSum | None = None
        self.served = ServedModel(cfg.gossip.serve_window, cfg.gossip.serve, smooth_s=cfg.gossip.serve_smooth_s)
        self.fresh = True  # no checkpoint: the first model should come from the mesh (pull)
        self.stats = TrainingStats()
        self.sha256: str | None = None
        self.threads_in_use: int | None = None
        self.baseline_converged = False  # the local-only baseline stopped training (local_baseline_patience)
        self._baseline_best: float | None = None
        self._baseline_best_epoch = 0.0
        # Differential privacy (privacy.enabled): the mechanism and the ledger of spent budget.
        self.plan: PrivacyPlan | None = None
        self.ledger: Ledger | None = None
        self.exhausted = False  # the next training step would exceed privacy.epsilon: training stopped
        # Per peer (hex id): the largest ledger history it advertised, echoed back in pull replies so a
        # peer restored from an older state dir gets its spent budget back (docs/privacy.md).
        self.ledgers_seen: dict[str, list[tuple[float, float, int]]] = {}
        # The data product as last read (data.reload_check_s): reloads keep the model and the epoch count.
        self.data_version: DataVersion | None = None
        self.data_reloads = 0
        self.holdout_kept: bool | None = None  # at the last reload: the old rows kept their split (appended rows)
        self._holdout = np.zeros(0, dtype=bool)  # per row of the product, in file order: held out
        self._epoch_base = 0.0  # epochs trained before the last reload
        self._epoch_steps0 = 0  # steps (attempted) at the last reload
        # data.standardize = "mesh": the mesh's moments until they settle, then the scaler applied to the data.
        self.moments: MeshMoments | None = None
        self.scaler_ready = False  # the frozen scaler is applied to the data and the learners: training may start

    # --- start-up (worker thread) ------------------------------------------------------------------------

    @property
    def store(self) -> CheckpointStore:
        if self._store is None:
            self._store = CheckpointStore(self.state_dir / "checkpoints", keep=self.cfg.checkpoint.keep)
        return self._store

    def load(self) -> list[str]:
        """Load the data product, build the model, restore the newest checkpoint; returns warnings."""
        cfg = self.cfg
        warnings: list[str] = []
        moved = self._adopt_legacy_checkpoints()
        if moved:
            warnings.append(moved)
        if cfg.data.path is not None:
            self.data = self._read_product(cfg.data.path, cfg.data.holdout)
            self.input_dim = self.data.input_dim
            total = self.data.num_train + self.data.num_holdout
            self._holdout = holdout_mask(total, cfg.data.holdout, cfg.training.seed)  # load_data_product's split
            self.data_version = data_version(cfg.data.path, total, signature(cfg.data.path))
        if cfg.data.test_path is not None:
            self.test = self._read_product(cfg.data.test_path, 0.0)
            if self.data is not None and self.test.feature_names != self.data.feature_names:
                raise DataError(f"{cfg.data.test_path}: its features differ from the data product's")
            self.input_dim = self.input_dim or self.test.input_dim
        limit_torch_threads(cfg.training.threads)  # here too: this worker thread's own OpenMP setting
        product = self.data if self.data is not None else self.test
        if product is not None:
            self.schema = product.schema_fingerprint
            self.schema_set = product.schema_set_fingerprint
            if cfg.data.standardize == "mesh":  # scaled inputs mean other numbers: another schema
                self.schema, self.schema_set = _standardized(self.schema), _standardized(self.schema_set)
        if self.data is not None and cfg.data.standardize == "mesh":
            columns = scaled_columns(self.data)
            self.moments = MeshMoments(local_moments(self.data.train_x, columns), columns)
        if self.input_dim == 0:
            warnings.append("data.path is not set: this domain has no model and does not learn until it is set")
            return warnings
        init_seed = models.initial_seed(self.spec, self.input_dim, cfg.model.init_seed)
        self.module = models.build_model(self.spec, self.input_dim, init_seed)
        self.fingerprint = models.fingerprint(self.spec, self.module, self.input_dim)
        self.parameters = models.param_count(self.module)
        tcfg = TrainConfig(
            batch_size=cfg.training.batch_size, lr=cfg.training.lr, momentum=cfg.training.momentum,
            weight_decay=cfg.training.weight_decay, seed=cfg.training.seed, task=cfg.model.task,
        )
        if self.data is not None and cfg.privacy.enabled:
            self.plan = PrivacyPlan.build(cfg.privacy, cfg.training.batch_size, self.data.num_train)
            self.ledger = Ledger(self.state_dir / LEDGER_FILE, cfg.privacy.delta, cfg.privacy.accountant)
        if self.data is not None:
            self.learner = Learner(self.module, self.data, tcfg, dp=self.plan)
        if self.data is not None and cfg.training.local_baseline:
            base_module = models.build_model(self.spec, self.input_dim, init_seed)
            self.baseline = Learner(base_module, self.data, tcfg)
            self._baseline_flat = models.flatten(base_module)
        start = models.flatten(self.module)
        ckpt, store_warnings = self.store.load_latest()
        warnings += store_warnings
        opts: dict[str, Any] = {"max_abs": self._max_param_abs, "codec": codec_for(cfg)}
        if ckpt is not None and ckpt.fingerprint != self.fingerprint:
            warnings.append(
                f"checkpoint {ckpt.file_name} is for another model (fingerprint {ckpt.fingerprint[:12]}); ignored"
            )
            ckpt = None
        rows = float(self.train_rows)
        if ckpt is not None and int(ckpt.values.shape[0]) == int(start.shape[0]):
            extra = ckpt.extra
            # The rows numerator and what this domain injected into it; a checkpoint from before data
            # weighting has neither: start the estimate from this domain's own rows.
            r_num = extra.get("rows_numerator")
            injected = extra.get("rows_injected")
            mean_rows = float(r_num) / ckpt.weight if isinstance(r_num, int | float) else rows
            if not (math.isfinite(mean_rows) and 0.0 <= mean_rows <= MAX_ROWS):
                warnings.append(f"checkpoint {ckpt.file_name}: rows estimate {mean_rows!r} out of range; reset")
                mean_rows = rows
            self.pushsum = PushSum(ckpt.values, ckpt.weight, ckpt.version, rows=mean_rows, **opts)
            if isinstance(injected, int | float) and math.isfinite(injected) and injected != rows:
                self.pushsum.inject_rows(rows - float(injected))  # the data product grew or shrank
            self.fresh = False
            self.stats.steps = int(extra.get("steps", 0))
            self.stats.samples_seen = int(extra.get("samples_seen", 0))
            base = extra.get("baseline")
            if isinstance(base, bytes) and self._baseline_flat is not None and len(base) == 8 * start.numel():
                self._baseline_flat = torch.frombuffer(bytearray(base), dtype=torch.float64).clone()
            if self.moments is not None and extra.get("scaler") is not None:
                try:  # the scaler this model was trained with: no new estimate, the mesh moved on with it
                    scaler = Scaler.from_wire(extra["scaler"], self.moments.columns)
                except ValueError as exc:
                    warnings.append(f"checkpoint {ckpt.file_name}: its scaler is unusable ({exc}); estimated again")
                else:
                    self.apply_scaler(self.moments.freeze("checkpoint", scaler))
            seen = extra.get("ledgers_seen")
            if isinstance(seen, dict):
                for peer, raw_hist in list(seen.items())[:4096]:
                    hist = parse_history(raw_hist)
                    if isinstance(peer, str) and hist is not None:
                        self.ledgers_seen[peer] = hist
            served = extra.get("served")
            if isinstance(served, bytes) and len(served) == 8 * start.numel():
                vec = torch.frombuffer(bytearray(served), dtype=torch.float64).clone()
                if bool(torch.isfinite(vec).all()) and not torch.equal(vec, ckpt.values):
                    self.served.observe(vec)  # resume serving what was served, blended as before
            log.info("checkpoint_loaded", version=ckpt.version, weight=ckpt.weight, file=ckpt.file_name)
        else:
            self.pushsum = PushSum(start, 1.0, 0, rows=rows, **opts)
        if self.ledger is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            warnings += self.ledger.load(ckpt.extra.get("privacy") if ckpt is not None else None)
            self.ledger.save()  # the merged ledger is on disk before anything is trained or shared
            log.info("privacy_ledger_loaded", epsilon_spent=round(self.ledger.spent, 6), steps=self.ledger.steps,
                     source=self.ledger.source, noise_multiplier=round(self.plan.noise_multiplier, 6)
                     if self.plan else None)
        return warnings

    def _adopt_legacy_checkpoints(self) -> str | None:
        """A single-model state dir (``STATE/checkpoints``) becomes the default task's (``STATE/tasks/default``)."""
        legacy, target = self._legacy_dir, self.state_dir / "checkpoints"
        if legacy is None or not legacy.is_dir() or target.exists():
            return None
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(legacy, target)
        return f"moved the single-model checkpoints {legacy} to {target} (the task '{self.name}')"

    def _read_product(self, path: Path, holdout: float) -> DataProduct:
        cfg = self.cfg
        return load_data_product(path, cfg.data.label, cfg.data.features or None, holdout, cfg.model.num_classes,
                                 cfg.training.seed, task=cfg.model.task, columns=cfg.data.columns)

    # --- data that keeps arriving (worker thread, then the loop) -----------------------------------------

    def read_data(self) -> tuple[DataProduct, DataVersion, np.ndarray]:
        """Worker thread: the data product as it is now, split, and its holdout mask; a DataError if it changed
        while being read or its schema is not the running one (a new schema is a new model: it takes a restart
        of the task).

        Rows appended after the ones read before (a new file that sorts last, rows added at the end) leave the
        old rows' split as it was and draw only the new rows' (seeded by ``training.seed`` and the old row
        count): a row the model trained on is never held out afterwards. A product whose old rows changed
        (a file replaced or inserted) is split afresh."""
        path = self.cfg.data.path
        assert path is not None
        before = signature(path)
        full = self._read_product(path, 0.0)  # every row, in file order
        after = signature(path)
        if after != before:
            raise DataError(f"{path}: changed while it was being read; read again at the next check")
        if _standardized(full.schema_fingerprint, self.moments is not None) != self.schema:
            raise DataError(
                f"{path}: its schema changed (fingerprint {full.schema_fingerprint}, the task runs {self.schema}); "
                "the task keeps training on the rows it has: restart it (or the daemon) to train a model for the "
                "new schema"
            )
        version = data_version(path, full.num_train, after)
        if self.moments is not None and self.moments.frozen is not None:
            full = self.moments.frozen.apply_product(full)  # the mesh's scaler, not one of the new rows
        mask = self._reload_mask(full)
        return split_product(full, mask), version, mask

    def _reload_mask(self, full: DataProduct) -> np.ndarray:
        old, mask, cfg = self.data, self._holdout, self.cfg
        n_old, n = len(mask), full.num_train
        if old is not None and n_old <= n and old.num_train + old.num_holdout == n_old:
            held = torch.from_numpy(mask)
            prefix_x, prefix_y = full.train_x[:n_old], full.train_y[:n_old]
            if (torch.equal(prefix_x[~held], old.train_x) and torch.equal(prefix_x[held], old.holdout_x)
                    and torch.equal(prefix_y[~held], old.train_y) and torch.equal(prefix_y[held], old.holdout_y)):
                new = holdout_mask(n - n_old, cfg.data.holdout, cfg.training.seed + n_old)
                return np.concatenate([mask, new])
        return holdout_mask(n, cfg.data.holdout, cfg.training.seed)

    def apply_scaler(self, scaler: Scaler) -> None:
        """Worker thread: the data product, the test set and the learners' rows, scaled; then training may start."""
        if self.data is not None:
            self.data = scaler.apply_product(self.data)
            self.swap_learner_data(self.data)
        if self.test is not None:
            self.test = scaler.apply_product(self.test)
        self.scaler_ready = True

    def swap_learner_data(self, product: DataProduct) -> None:
        """Worker thread: hand the new rows to the learners (each waits for a training part in progress)."""
        for learner in (self.learner, self.baseline):
            if learner is not None:
                learner.replace_data(product)

    def adopt_data(self, product: DataProduct, version: DataVersion, mask: np.ndarray) -> int:
        """On the loop, after :meth:`swap_learner_data`: the task trains on ``product`` from now on; the rows
        estimate of the mesh takes in the change. Returns the change in training rows."""
        self._epoch_base, self._epoch_steps0 = self.epochs, self.stats.steps + self.stats.steps_dropped
        delta = product.num_train - self.train_rows
        n_old = len(self._holdout)
        self.holdout_kept = len(mask) >= n_old and bool(np.array_equal(mask[:n_old], self._holdout))
        self.data, self.data_version, self._holdout = product, version, mask
        self.data_reloads += 1
        if self.pushsum is not None and delta:
            self.pushsum.inject_rows(float(delta))
        return delta

    @property
    def steps_per_epoch(self) -> int:
        """SGD steps of one pass over this domain's training rows."""
        return max(1, math.ceil(self.train_rows / max(1, self.cfg.training.batch_size)))

    @property
    def round_steps(self) -> int:
        """SGD steps of one training round: one epoch (``training.steps_per_round = "epoch"``) or the number."""
        spr = self.cfg.training.steps_per_round
        return self.steps_per_epoch if spr == "epoch" else int(spr)

    @property
    def chunk_steps(self) -> int:
        """Steps between two gossip rounds while training: ``gossip.every_steps`` (never more than a training
        round, so pacing is checked at least once per round), or a round split into ``gossip.per_round`` parts."""
        every = self.cfg.gossip.every_steps
        if every > 0:
            return max(1, min(every, self.round_steps))
        per_round = self.cfg.gossip.per_round
        return max(1, math.ceil(self.round_steps / per_round)) if per_round > 0 else max(1, self.round_steps)

    @property
    def epochs(self) -> float:
        """Passes over its own data this domain has trained (steps attempted / steps per epoch)."""
        steps = self.stats.steps + self.stats.steps_dropped - self._epoch_steps0
        return self._epoch_base + steps / self.steps_per_epoch

    @property
    def train_rows(self) -> int:
        return self.data.num_train if self.data is not None else 0

    def update_scale(self) -> float:
        """How much this domain's local update counts (training.weighting): rows / the mesh's mean rows."""
        if self.cfg.training.weighting != "rows" or self.pushsum is None:
            return 1.0
        return data_scale(float(self.train_rows), self.pushsum.mean_rows)

    # --- training (worker thread: pure function of its inputs) ---------------------------------------------

    def train(self, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, TrainResult]:
        assert self.learner is not None
        if torch.get_num_threads() != self.cfg.training.threads:  # a new worker thread: its own OpenMP setting
            limit_torch_threads(self.cfg.training.threads)
        self.threads_in_use = torch.get_num_threads()  # what the training thread runs with, for /status
        if self.ledger is not None and self.plan is not None:
            steps = self.ledger.affordable(self.plan, steps, self.cfg.privacy.epsilon)
            if steps == 0:
                self.exhausted = True
                return start.clone(), TrainResult(steps=0, samples=0, loss=float("nan"))
            self.ledger.reserve(self.plan, steps)  # fsynced before the steps exist: never under-counted
        new, result = self.learner.train(start, steps)
        if self.baseline is not None and self._baseline_flat is not None and not self.baseline_converged:
            # The local-only baseline: the same data and steps, never averaged. "Is the mesh helping?"
            self._baseline_flat, _ = self.baseline.train(self._baseline_flat, steps)
        return new, result

    def _baseline_evaluated(self, holdout: float | None) -> None:
        """Track the baseline's headline holdout score (accuracy, ROC AUC or RMSE: ``TaskKind.headline``); once
        it has not improved by ``metrics.BASELINE_MIN_GAIN`` for ``training.local_baseline_patience`` epochs it
        has converged on this domain's rows alone: it stops training (and being re-scored), which halves the
        task's training work from then on."""
        patience = self.cfg.training.local_baseline_patience
        if holdout is None or patience <= 0 or self.baseline_converged:
            return
        if self.kind.improved(holdout, self._baseline_best):
            self._baseline_best, self._baseline_best_epoch = holdout, self.epochs
        elif self.epochs - self._baseline_best_epoch >= patience:
            self.baseline_converged = True

    @property
    def score_fields(self) -> list[str]:
        """The /status fields of this task's scores: accuracy's four always (null for regression, so the
        classification fields never disappear), then the task kind's other metrics, scope by scope."""
        names = ("accuracy", *(m for m in self.kind.metrics if m != "accuracy"))
        return [f"{scope}_{m}" for m in names for scope in SCOPES]

    def evaluate(self, flat: torch.Tensor) -> dict[str, float | None]:
        """The served model's and the local-only baseline's scores, keyed by :attr:`score_fields`."""
        out: dict[str, float | None] = dict.fromkeys(self.score_fields)
        learner, baseline, base_flat = self.learner, self.baseline, self._baseline_flat
        # A converged baseline no longer changes: its last scores stand.
        rescore = baseline is not None and base_flat is not None and not self.baseline_converged
        if learner is None:
            return out
        sets: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []
        if self.data is not None and self.data.num_holdout > 0:
            sets.append(("holdout", "local_only", self.data.holdout_x, self.data.holdout_y))
        if self.test is not None:
            sets.append(("test", "local_only_test", self.test.train_x, self.test.train_y))
        for scope, base_scope, x, y in sets:
            out |= _scoped(scope, learner.scores(flat, x, y))
            if rescore and baseline is not None and base_flat is not None:
                base = baseline.scores(base_flat, x, y)
                out |= _scoped(base_scope, base)
                if scope == "holdout":
                    self._baseline_evaluated(self.kind.headline(base))
            else:
                out |= {k: self.stats.scores.get(k) for k in _scoped(base_scope, dict.fromkeys(self.kind.metrics))}
        return out

    def served_model(self) -> torch.Tensor:
        """The model this domain serves (``/status`` scores it, ``meshd export`` writes it)."""
        assert self.pushsum is not None
        return self.served.value(self.pushsum.estimate(), time.monotonic())

    @staticmethod
    def digest(flat: torch.Tensor) -> str:
        return hashlib.sha256(flat.to(torch.float32).numpy().tobytes()).hexdigest()

    # --- checkpoints ---------------------------------------------------------------------------------------

    def checkpoint_now(self) -> Checkpoint:
        """Capture the state on the loop (cheap copies); `save_checkpoint` writes it in a thread."""
        assert self.pushsum is not None
        st = self.pushsum.state()
        extra: dict[str, Any] = {"steps": self.stats.steps, "samples_seen": self.stats.samples_seen,
                                 "rows_numerator": st.rows, "rows_injected": self.train_rows}
        if self._baseline_flat is not None:
            extra["baseline"] = self._baseline_flat.numpy().tobytes()
        extra["served"] = self.served_model().numpy().tobytes()
        if self.ledger is not None:
            extra["privacy"] = self.ledger.to_extra()
        if self.data_version is not None:
            extra["data"] = self.data_version.snapshot()
        if self.moments is not None and self.moments.frozen is not None:
            extra["scaler"] = self.moments.frozen.to_wire()  # the data product version it was trained on
        if self.ledgers_seen:
            extra["ledgers_seen"] = {k: [list(h) for h in v] for k, v in self.ledgers_seen.items()}
        return Checkpoint(
            version=st.version,
            weight=st.weight,
            values=st.numerator / st.weight,
            fingerprint=self.fingerprint,
            created_ms=int(time.time() * 1000),
            extra=extra,
        )

    def save_checkpoint(self, ckpt: Checkpoint) -> str:
        if self.ledger is not None:
            self.ledger.save()  # with each checkpoint, the ledger file too (it is never behind the checkpoint)
        return self.store.save(ckpt).name

    # --- privacy (worker thread: accounting may take milliseconds) -------------------------------------------

    def note_peer_ledger(self, peer_hex: str, raw: object) -> None:
        """Remember the largest ledger history a peer advertised (to echo it back to it in pull replies)."""
        hist = parse_history(raw)
        if hist is None:
            return
        old = self.ledgers_seen.get(peer_hex)
        if old == hist:
            return  # the usual case (no new steps since its last share): no accounting on the loop
        if old is None or _spend_key(hist) > _spend_key(old):
            if old is None and len(self.ledgers_seen) >= 4096:
                return
            self.ledgers_seen[peer_hex] = hist

    def adopt_echo(self, raw: object, source: str) -> tuple[float, float] | None:
        """A peer's echo of our ledger: adopted (and persisted) if it spent more; returns (old, new) epsilon."""
        hist = parse_history(raw)
        if self.ledger is None or hist is None:
            return None
        old = self.ledger.spent
        if not self.ledger.merge(hist, source):
            return None
        self.ledger.save()
        return old, self.ledger.spent

    def privacy_snapshot(self) -> dict[str, object]:
        p, led = self.cfg.privacy, self.ledger
        if led is None or self.plan is None:
            return {"enabled": False, "require_epsilon_at_most": p.require_epsilon_at_most or None}
        return {
            "enabled": True,
            "accountant": self.plan.accountant,
            "epsilon_budget": p.epsilon,
            "epsilon_spent": round(led.spent, 6),
            "epsilon_remaining": round(max(0.0, p.epsilon - led.spent), 6),
            "delta": p.delta,
            "steps": led.steps,
            "noise_multiplier": round(self.plan.noise_multiplier, 6),
            "noise_calibrated": self.plan.calibrated,
            "max_grad_norm": self.plan.max_grad_norm,
            "sample_rate": round(self.plan.sample_rate, 8),
            "exhausted": self.exhausted,
            "ledger_source": led.source,
            "ledger_writes": led.writes,
            "require_epsilon_at_most": p.require_epsilon_at_most or None,
        }

    def export(self, flat: torch.Tensor) -> torch.nn.Module:
        assert self.module is not None
        models.load_flat(self.module, flat)
        return self.module

    # --- status ----------------------------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        ps = self.pushsum
        model = {
            "name": self.spec.name,
            "fingerprint": self.fingerprint,
            "parameters": self.parameters,
            "version": ps.version if ps else 0,
            "sha256": self.sha256,
            "codec": codec_for(self.cfg),
            "data_schema": self.schema or None,
            "task": self.kind.name,
        }
        s = self.stats
        training = {
            "enabled": self.cfg.training.enabled and self.learner is not None,
            "steps": s.steps,
            "samples_seen": s.samples_seen,
            "loss": _finite(s.loss),
            "task": self.kind.name,
            "metric": self.kind.primary,
            "higher_is_better": self.kind.higher_is_better,
            **{k: s.scores.get(k) for k in self.score_fields},
            "evaluated_at_version": s.evaluated_at_version,
            "evaluated_at_steps": s.evaluated_at_steps,
            "train_rows": self.data.num_train if self.data else 0,
            "holdout_rows": self.data.num_holdout if self.data else 0,
            "threads": self.threads_in_use,
            "local_only_converged": self.baseline_converged,
            "weighting": self.cfg.training.weighting,
            "update_scale": round(self.update_scale(), 6),
            "mesh_mean_rows": round(ps.mean_rows, 3) if ps else None,
            "epochs": round(self.epochs, 4) if self.data else 0.0,
            "pace": self.cfg.training.pace,
            "paced_waits": s.paced_waits,
            "steps_dropped": s.steps_dropped,
        }
        return model, training


def _spend_key(hist: list[tuple[float, float, int]]) -> int:
    # A sender's history only grows (steps are appended), so the one with more steps is the later one; no
    # accounting here: this runs on the loop, and even in tasks without DP (which never import Opacus).
    return sum(n for _, _, n in hist)


def scaled_columns(product: DataProduct) -> tuple[int, ...]:
    """The inputs data.standardize scales: every input of an untyped product; a typed one's numeric columns
    (not one-hot categories, booleans or missing-value indicators)."""
    if not product.columns:
        return tuple(range(product.input_dim))
    numeric = {c.name for c in product.columns if c.type == "numeric"}
    return tuple(i for i, name in enumerate(product.feature_names) if name in numeric)


def _standardized(fingerprint: str, on: bool = True) -> str:
    """The schema fingerprint of a product whose numeric inputs the mesh standardises."""
    return hashlib.sha256(f"{fingerprint}:standardize=mesh".encode()).hexdigest()[:16] if on else fingerprint


def task_state_dir(state_dir: Path, name: str) -> Path:
    """Where a task keeps its checkpoints: ``STATE/tasks/NAME``."""
    return state_dir / "tasks" / name


def _scoped(scope: str, scores: dict[str, float | None]) -> dict[str, float | None]:
    return {f"{scope}_{metric}": value for metric, value in scores.items()}


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
