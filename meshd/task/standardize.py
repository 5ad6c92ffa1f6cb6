"""Federated standardisation (``data.standardize = "mesh"``): every domain scales its numeric inputs by the
mesh's per-feature mean and standard deviation, estimated by gossip before training starts.

Each domain starts a push-sum over the vector ``(n, sum x_j, sum x_j^2)`` of its training rows (one entry per
scaled input ``j``). Push-sum converges every domain to the mesh's average of those vectors; the mean and the
variance are ratios of its entries (``sum x / n``, ``sum x^2 / n - mean^2``), so they are the pooled rows'
statistics exactly, whatever the weights. The halves travel in the task's own shares (``moments``, beside the
model, docs/protocol.md section 8) while no domain trains. A domain **settles** once ``STABLE_MERGES`` merges
in a row moved its estimate by less than ``REL_TOL`` (relative), or ``WAIT_S`` after it joined (with a
warning), or at once without peers; it then freezes the scaler, sends it in its shares and answers (``scaler``)
instead of its moments, and trains. A domain still estimating adopts the first frozen scaler it hears (so the
mesh trains with one scaler, and a domain that joins late takes it from its first exchange or pull); the
scaler is checkpointed and exported with the model, so a restart keeps it and serving applies it.

What a peer learns: nothing of one domain's own sums. Until a domain has merged a peer's half (its state is
then a mixture), every half it sends is **masked**: a random vector ``r`` (OS entropy, 1,000 times the
half's magnitude) is added to what leaves and subtracted from what stays, once the receiver merged it. The
mesh's total is unchanged, so the estimate converges to the same pooled statistics (the masks cancel to
within float64 rounding, ~1e-13 relative); a receiver sees noise. Receivers of *all* of a domain's masked
halves, colluding with a view of its state, could still subtract the masks: the guarantee is against one
curious peer, not a coalition.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

import torch

from meshd.core.averaging import PushSum, Share
from meshd.task.data import DataProduct

__all__ = ["REL_TOL", "STABLE_MERGES", "WAIT_S", "MeshMoments", "Scaler", "local_moments"]

STABLE_MERGES = 8  # merges in a row that leave the estimate still before a domain settles
REL_TOL = 1e-12  # what "still" means: the largest relative change of an entry
WAIT_S = 120.0  # a domain that has not settled this long after joining settles with what it has (warning)
MASK_SCALE = 1e3  # a mask is up to this many times the half it hides (and never below 1 per entry)
_MAX_ABS = 1e300  # sums of squares of inputs at 1e6 over millions of rows: far above a model's max_param_abs


@dataclass(frozen=True)
class Scaler:
    """``x[:, j] -> (x[:, j] - mean) / std`` for the scaled inputs ``columns`` (positions in the encoded row)."""

    columns: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def full(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std over all ``dim`` inputs (0 and 1 where an input is not scaled): what the export holds."""
        mean, std = torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64)
        idx = torch.tensor(self.columns, dtype=torch.int64)
        mean[idx], std[idx] = torch.tensor(self.mean, dtype=torch.float64), torch.tensor(self.std, dtype=torch.float64)
        return mean, std

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if not self.columns or x.shape[0] == 0:
            return x
        mean, std = self.full(int(x.shape[1]))
        return ((x.to(torch.float64) - mean) / std).to(x.dtype)

    def apply_product(self, product: DataProduct) -> DataProduct:
        return replace(product, train_x=self.apply(product.train_x), holdout_x=self.apply(product.holdout_x))

    def to_wire(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_wire(cls, obj: Any, columns: tuple[int, ...]) -> Scaler:
        """A peer's (or a checkpoint's) scaler for the same scaled inputs; ValueError saying what is wrong."""
        if not isinstance(obj, dict) or list(obj.get("columns", ())) != list(columns):
            raise ValueError("scaler for other inputs")
        mean, std = obj.get("mean"), obj.get("std")
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == len(columns)):
            raise ValueError("scaler mean and std must be lists with one number per scaled input")
        for v in (*mean, *std):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError("scaler values must be finite numbers")
        if any(s <= 0 for s in std):
            raise ValueError("scaler std must be > 0")
        return cls(columns, tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def snapshot(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "mean": list(self.mean), "std": list(self.std)}


def local_moments(x: torch.Tensor, columns: tuple[int, ...]) -> torch.Tensor:
    """``(n, sum x_j, sum x_j^2)`` over the rows of ``x`` for the inputs ``columns``, float64."""
    sel = x[:, list(columns)].to(torch.float64)
    n = torch.tensor([float(x.shape[0])], dtype=torch.float64)
    return torch.cat([n, sel.sum(dim=0), (sel * sel).sum(dim=0)])


class MeshMoments:
    """This domain's push-sum of the mesh's moments, until it settles or adopts a peer's frozen scaler."""

    def __init__(self, local: torch.Tensor, columns: tuple[int, ...]) -> None:
        self.columns = columns
        self.ps = PushSum(local, 1.0, codec="f64", max_abs=_MAX_ABS)
        self.frozen: Scaler | None = None
        self.source = ""  # "mesh" (settled here), "peer" (adopted), "checkpoint", "alone", "timeout"
        self.merges = 0
        self._stable = 0
        self._masks: dict[int, torch.Tensor] = {}  # share id -> the mask added to that outgoing half

    def outgoing(self, one_shot: bool = False) -> Share | None:
        """Half of this domain's moments to send (None: nothing to give), masked until a peer's half was merged.
        ``one_shot`` (an answer): given away now; otherwise :meth:`delivered` or :meth:`lost` settles it."""
        shares = self.ps.prepare(1)
        if not shares:
            return None
        share = shares[0]
        if self.merges == 0:  # our own sums alone: hide them
            gen = torch.Generator().manual_seed(secrets.randbits(63))  # a known seed would unmask them
            noise = torch.rand(self.ps.dim, generator=gen, dtype=torch.float64) * 2.0 - 1.0
            mask = noise * MASK_SCALE * (share.values.abs() * share.weight + 1.0)
            self._masks[share.id] = mask
            share = replace(share, values=share.values + mask / share.weight, encoded=None)
        if one_shot:
            self.delivered(share.id)
        return share

    def delivered(self, share_id: int) -> None:
        """The half was merged where it went: it leaves this state, and so does its mask (with the opposite
        sign: the mesh's total keeps no trace of it)."""
        self.ps.confirm(share_id)
        mask = self._masks.pop(share_id, None)
        if mask is not None:
            self.ps.apply_update(-mask / self.ps.weight)

    def lost(self, share_id: int) -> None:
        self.ps.abandon(share_id)
        self._masks.pop(share_id, None)

    @property
    def settled(self) -> bool:
        return self._stable >= STABLE_MERGES

    def merge(self, values: torch.Tensor, weight: float) -> None:
        """A peer's half (raises RejectedUpdate on bad values, state untouched)."""
        before = self.ps.estimate()
        self.ps.merge(values, weight, 0)
        after = self.ps.estimate()
        change = float(((after - before).abs() / (after.abs() + 1e-300)).max())
        self._stable = self._stable + 1 if change < REL_TOL else 0
        self.merges += 1

    def scaler(self) -> Scaler:
        est = self.ps.estimate()
        k = len(self.columns)
        n = float(est[0])
        mean = est[1 : 1 + k] / n
        var = (est[1 + k :] / n - mean * mean).clamp(min=0.0)
        std = var.sqrt()
        std = torch.where(std > 1e-12 * (mean.abs() + 1.0), std, torch.ones_like(std))  # a constant input: 1
        return Scaler(self.columns, tuple(mean.tolist()), tuple(std.tolist()))

    def freeze(self, source: str, scaler: Scaler | None = None) -> Scaler:
        self.frozen = scaler if scaler is not None else self.scaler()
        self.source = source
        return self.frozen

    def snapshot(self) -> dict[str, Any]:
        return {"state": "settled" if self.frozen is not None else "estimating", "source": self.source or None,
                "merges": self.merges, "scaled_inputs": len(self.columns),
                "scaler": self.frozen.snapshot() if self.frozen is not None else None}
