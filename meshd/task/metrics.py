"""What a task kind (``model.task``) means for learning: the model's output width, the loss, and the metrics
a domain reports, with which direction of each is better.

* ``classification``: ``num_classes`` logits, cross-entropy, integer labels in ``[0, num_classes)``; accuracy.
* ``binary``: one logit, BCE-with-logits, labels 0/1; accuracy and F1 at probability 0.5 (logit 0), ROC AUC.
* ``regression``: one output, mean squared error, finite float targets; RMSE and MAE.

The metrics are plain numpy over the predictions of a whole evaluation set (no scikit-learn in the daemon);
ROC AUC is the Mann-Whitney rank formula with tied scores given their average rank, which equals the area
under the ROC curve with ties drawn as diagonal segments (what ``sklearn.metrics.roc_auc_score`` computes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from meshd.errors import ModelError

__all__ = [
    "BASELINE_MIN_GAIN",
    "TASK_KINDS",
    "TaskKind",
    "accuracy",
    "f1_score",
    "mae",
    "rmse",
    "roc_auc",
    "task_kind",
]

TASK_KINDS: tuple[str, ...] = ("classification", "binary", "regression")
# A score must improve by this much to count as progress (below it: noise). Absolute for accuracy, AUC and F1
# (half a point); relative for RMSE and MAE, which carry the target's units (half a percent).
BASELINE_MIN_GAIN = 0.005


@dataclass(frozen=True)
class TaskKind:
    """One ``model.task``: how a model's raw output is scored, trained and compared."""

    name: str
    metrics: tuple[str, ...]  # the metrics it reports, in display order
    primary: str  # the headline metric: `meshd status` shows it, the local-only baseline's patience watches it
    higher_is_better: bool  # of the primary metric
    _loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    _reduce: Callable[[torch.Tensor], torch.Tensor]
    _score: Callable[[np.ndarray, np.ndarray], dict[str, float | None]]

    def outputs(self, num_classes: int) -> int:
        """Width of the model's last layer: ``num_classes`` logits, or one output."""
        return num_classes if self.name == "classification" else 1

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean training loss of a batch's raw model output against its labels."""
        return self._loss(self._reduce_logits(out), y)

    def predictions(self, out: torch.Tensor) -> torch.Tensor:
        """A batch's raw output reduced to one value per row: the class (argmax), the logit, or the estimate."""
        return self._reduce(self._reduce_logits(out)).detach()

    def score(self, pred: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> dict[str, float | None]:
        """Every metric of :attr:`metrics` for the predictions of a whole evaluation set (at least one row)."""
        p, t = _as_numpy(pred), _as_numpy(y)
        if p.shape != t.shape or p.ndim != 1 or p.shape[0] == 0:
            raise ValueError(f"need one prediction per label, got {p.shape} and {t.shape}")
        return self._score(p, t)

    def improved(self, new: float, best: float | None) -> bool:
        """Whether ``new`` beats ``best`` by more than noise (:data:`BASELINE_MIN_GAIN`)."""
        if best is None:
            return True
        if self.higher_is_better:
            return new >= best + BASELINE_MIN_GAIN
        return new <= best * (1.0 - BASELINE_MIN_GAIN)

    def headline(self, scores: dict[str, float | None]) -> float | None:
        """The primary metric of ``scores``; for a binary holdout that holds one class only (no AUC), accuracy."""
        value = scores.get(self.primary)
        if value is None and self.name == "binary":
            return scores.get("accuracy")
        return value

    def _reduce_logits(self, out: torch.Tensor) -> torch.Tensor:
        if self.name == "classification":
            return out
        if out.dim() == 2 and out.shape[1] == 1:
            return out.reshape(-1)
        if out.dim() == 1:
            return out
        raise ModelError(
            f"the model outputs shape {tuple(out.shape)}, a {self.name} task needs one output per row "
            "(a custom factory is called with num_classes=1 for it)"
        )


def task_kind(name: str) -> TaskKind:
    """The :class:`TaskKind` of a ``model.task`` value; anything else raises :class:`ModelError`."""
    kind = _KINDS.get(name)
    if kind is None:
        raise ModelError(f"model.task must be one of {', '.join(TASK_KINDS)}, got {name!r}")
    return kind


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose predicted class equals the label."""
    return float(np.mean(pred == y))


def f1_score(pred: np.ndarray, y: np.ndarray) -> float:
    """F1 of the positive class (1) for 0/1 predictions; 0.0 when there is no positive row nor prediction."""
    p, t = pred.astype(bool), y.astype(bool)
    tp = int(np.sum(p & t))
    wrong = int(np.sum(p != t))  # false positives + false negatives
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def roc_auc(scores: np.ndarray, y: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for 0/1 labels ``y``; None unless both classes are present.

    The probability that a random positive row scores above a random negative one (ties count one half):
    (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with tied scores sharing their
    average rank.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(y).astype(bool)
    n_pos = int(pos.sum())
    n_neg = int(pos.shape[0]) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranked = s[order]
    # Each run of equal scores [lo, hi) gets the average of the 1-based ranks lo+1 .. hi.
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], ranked.shape[0]]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty_like(s)
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def rmse(pred: np.ndarray, y: np.ndarray) -> float:
    """Root mean squared error."""
    return math.sqrt(float(np.mean((pred.astype(np.float64) - y.astype(np.float64)) ** 2)))


def mae(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(pred.astype(np.float64) - y.astype(np.float64))))


# --------------------------------------------------------------------------------------------- helpers


def _as_numpy(v: torch.Tensor | np.ndarray) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _binary_scores(logits: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    pred = (logits >= 0.0).astype(np.int64)  # sigmoid(logit) >= 0.5
    return {"accuracy": accuracy(pred, y.astype(np.int64)), "roc_auc": roc_auc(logits, y), "f1": f1_score(pred, y)}


_CE = nn.CrossEntropyLoss(reduction="mean")
_BCE = nn.BCEWithLogitsLoss(reduction="mean")
_MSE = nn.MSELoss(reduction="mean")

_KINDS: dict[str, TaskKind] = {
    "classification": TaskKind(
        "classification", ("accuracy",), "accuracy", True, _CE, lambda out: out.argmax(dim=1),
        lambda p, y: {"accuracy": accuracy(p, y)},
    ),
    "binary": TaskKind("binary", ("accuracy", "roc_auc", "f1"), "roc_auc", True, _BCE, lambda out: out,
                       _binary_scores),
    "regression": TaskKind(
        "regression", ("rmse", "mae"), "rmse", False, _MSE, lambda out: out,
        lambda p, y: {"rmse": rmse(p, y), "mae": mae(p, y)},
    ),
}
