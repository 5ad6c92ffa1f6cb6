"""Local SGD training and evaluation of the shared model on this domain's data product.

Everything here blocks (torch on CPU); the daemon calls it through ``asyncio.to_thread``.  The model is
always entered and left as a flat float64 vector (:func:`meshd.task.models.flatten` layout), so gossip can
replace the weights between two training calls.

Minibatches are reproducible and resumable: step ``k`` (counted over the learner's life) draws its batch
from an epoch permutation seeded by ``(cfg.seed, k // steps_per_epoch)``, so the sampler's whole state is
the step counter, which :meth:`Learner.optimizer_state` exports for checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meshd.errors import ModelError
from meshd.task.data import DataProduct
from meshd.task.metrics import task_kind
from meshd.task.models import flatten, load_flat
from meshd.task.privacy import PrivacyPlan

__all__ = ["Learner", "TrainConfig", "TrainResult", "limit_torch_threads"]

_EVAL_CHUNK = 4096  # rows per forward pass in evaluate(); bounds peak memory on large holdouts


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # examples per SGD step (the last batch of an epoch may be smaller)
    lr: float = 0.05  # SGD learning rate
    momentum: float = 0.0  # SGD momentum; its buffers persist across train() calls
    weight_decay: float = 0.0  # L2 penalty, as torch.optim.SGD applies it
    seed: int = 0  # seeds the minibatch sampler
    task: str = "classification"  # model.task: the loss and the metrics (meshd.task.metrics)

    def __post_init__(self) -> None:
        task_kind(self.task)  # raises ModelError for an unknown kind
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass(frozen=True)
class TrainResult:
    steps: int  # SGD steps taken
    samples: int  # examples seen (sum of batch sizes)
    loss: float  # mean training loss (the task kind's) over those examples; nan when steps == 0


def limit_torch_threads(n: int) -> None:
    """Cap torch's intra-op CPU threads for the whole process; the daemon calls this once at start.

    Not done at import: it is process-global state and belongs to the composition root.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive integer, got {n!r}")
    torch.set_num_threads(n)


class Learner:
    """Owns one model, its SGD optimizer and the domain's data; all methods hold one lock."""

    def __init__(self, model: nn.Module, data: DataProduct, cfg: TrainConfig,
                 dp: PrivacyPlan | None = None) -> None:
        if data.num_train < 1:
            raise ModelError("the data product has no training rows")
        if (data.train_y.dtype == torch.int64) != (cfg.task == "classification"):
            raise ModelError(f"the data product's labels ({data.train_y.dtype}) were not read for a {cfg.task} task; "
                             f"load it with load_data_product(..., task={cfg.task!r})")
        self._model = model
        self._data = data
        self._cfg = cfg
        self._lock = threading.Lock()
        self._optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self._dp = dp
        self._forward: nn.Module = model
        if dp is not None:
            # DP-SGD (Opacus): per-sample gradients by hooks, each clipped to max_grad_norm, summed, plus
            # Gaussian noise of std noise_multiplier * max_grad_norm, divided by the expected batch size.
            # Batches are Poisson samples (the sampling the accountant assumes). Sampling and noise draw
            # from OS entropy, never from training.seed: a known seed would let anyone subtract the noise.
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            self._forward = GradSampleModule(model, loss_reduction="mean")
            self._dp_gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
            self._optimizer = DPOptimizer(
                self._optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                expected_batch_size=dp.expected_batch, loss_reduction="mean",
                generator=torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1),
            )
        self._kind = task_kind(cfg.task)
        self._steps_done = 0
        n = data.num_train
        self._batch = min(cfg.batch_size, n)
        self._steps_per_epoch = math.ceil(n / self._batch)
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def replace_data(self, data: DataProduct) -> None:
        """Train on ``data`` from the next step on (the data product was reloaded); the model, the optimizer's
        momentum and the step count stay. DP-SGD: the same number of rows only (its sampling rate was planned)."""
        if self._dp is not None and data.num_train != self._data.num_train:
            raise ModelError("a DP-SGD learner keeps the rows its privacy budget was planned for")
        if data.num_train < 1:
            raise ModelError("the data product has no training rows")
        if data.train_y.dtype != self._data.train_y.dtype or data.input_dim != self._data.input_dim:
            raise ModelError("the new data product's features or labels differ from the ones this learner trains on")
        with self._lock:
            self._data = data
            self._batch = min(self._cfg.batch_size, data.num_train)
            self._steps_per_epoch = math.ceil(data.num_train / self._batch)
            self._perm_epoch = -1  # the next step draws a permutation of the new rows

    @property
    def steps_done(self) -> int:
        """SGD steps taken over this learner's life (or restored by :meth:`load_optimizer_state`)."""
        return self._steps_done

    @property
    def data(self) -> DataProduct:
        return self._data

    def train(self, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, TrainResult]:
        """Load ``start``, run ``steps`` SGD minibatch steps, return the new flat float64 vector and stats.

        ``start`` is never modified.  A non-finite loss raises :class:`ModelError` (the optimizer's
        momentum is reset and the step counter is left where it was) so that a diverged model is never
        handed to gossip.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        with self._lock:
            load_flat(self._model, start)
            self._model.train()
            x_all, y_all = self._data.train_x, self._data.train_y
            total_loss = 0.0
            samples = 0
            for i in range(steps):
                idx = self._batch_indices(self._steps_done + i)
                if idx.numel() == 0:
                    continue  # an empty Poisson batch: the step is counted (and accounted), nothing is released
                x, y = x_all[idx], y_all[idx]
                self._optimizer.zero_grad(set_to_none=True)
                loss = self._kind.loss(self._forward(x), y)
                value = float(loss.detach())
                if not math.isfinite(value):
                    self._optimizer.state.clear()
                    raise ModelError(
                        f"training diverged: loss is {value} at step {self._steps_done + i} "
                        f"(lr={self._cfg.lr}); the model was not updated"
                    )
                torch.autograd.backward(loss)
                self._optimizer.step()
                total_loss += value * len(idx)
                samples += len(idx)
            self._steps_done += steps
            out = flatten(self._model)
        mean_loss = total_loss / samples if samples else float("nan")
        return out, TrainResult(steps=steps, samples=samples, loss=mean_loss)

    def evaluate(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy in [0, 1] of the model with weights ``flat`` on ``(x, y)``; ``x`` must have rows.

        For classification and binary tasks; a regression task has no accuracy (use :meth:`scores`)."""
        value = self.scores(flat, x, y).get("accuracy")
        if value is None:
            raise ModelError(f"a {self._kind.name} task has no accuracy; it reports {', '.join(self._kind.metrics)}")
        return value

    def scores(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float | None]:
        """Every metric of the task kind (:mod:`meshd.task.metrics`) of the model with weights ``flat`` on
        ``(x, y)``; ``x`` must have rows."""
        if x.shape[0] == 0:
            raise ValueError("cannot evaluate on zero rows")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        with self._lock:
            load_flat(self._model, flat)
            self._model.eval()
            try:
                with torch.no_grad():
                    # Chunked forward passes bound peak memory on large sets; one value per row is kept.
                    pred = torch.cat([self._kind.predictions(self._model(x[lo : lo + _EVAL_CHUNK]))
                                      for lo in range(0, x.shape[0], _EVAL_CHUNK)])
            finally:
                self._model.train()
        return self._kind.score(pred, y)

    def holdout_accuracy(self, flat: torch.Tensor) -> float | None:
        """Accuracy on the data product's holdout rows, or None when it has none."""
        if self._data.num_holdout == 0:
            return None
        return self.evaluate(flat, self._data.holdout_x, self._data.holdout_y)

    def optimizer_state(self) -> dict[str, Any]:
        """A msgpack-able snapshot: step counter and SGD momentum buffers (raw little-endian float64)."""
        with self._lock:
            bufs: list[bytes | None] = []
            for p in self._params():
                buf = self._optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is None:
                    bufs.append(None)
                else:
                    bufs.append(buf.detach().reshape(-1).to(torch.float64).numpy().astype("<f8").tobytes())
            return {"steps_done": self._steps_done, "momentum": bufs}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state` output; a mismatched snapshot raises :class:`ModelError`."""
        try:
            steps_done = state["steps_done"]
            bufs = state["momentum"]
        except (KeyError, TypeError) as exc:
            raise ModelError(f"optimizer state lacks {exc}") from exc
        if isinstance(steps_done, bool) or not isinstance(steps_done, int) or steps_done < 0:
            raise ModelError(f"optimizer state steps_done must be a non-negative integer, got {steps_done!r}")
        params = self._params()
        if not isinstance(bufs, list | tuple) or len(bufs) != len(params):
            got = len(bufs) if isinstance(bufs, list | tuple) else type(bufs).__name__
            raise ModelError(f"optimizer state has momentum for {got} tensors, the model has {len(params)}")
        restored: dict[nn.Parameter, torch.Tensor] = {}
        for p, raw in zip(params, bufs, strict=True):
            if raw is None:
                continue
            if not isinstance(raw, bytes) or len(raw) != 8 * p.numel():
                raise ModelError("optimizer state momentum buffer does not match the model's parameter sizes")
            vec = torch.frombuffer(bytearray(raw), dtype=torch.float64)
            restored[p] = vec.to(p.dtype).view(p.shape).clone()
        with self._lock:
            self._optimizer.state.clear()
            for p, buf in restored.items():
                self._optimizer.state[p] = {"momentum_buffer": buf}
            self._steps_done = steps_done

    # ----------------------------------------------------------------------------------------- helpers

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    def _batch_indices(self, step: int) -> torch.Tensor:
        if self._dp is not None:
            mask = torch.rand(self._data.num_train, generator=self._dp_gen) < self._dp.sample_rate
            return torch.nonzero(mask).reshape(-1)
        epoch, within = divmod(step, self._steps_per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(_mix_seed(self._cfg.seed, epoch))
            self._perm = torch.randperm(self._data.num_train, generator=gen)
            self._perm_epoch = epoch
        lo = within * self._batch
        return self._perm[lo : lo + self._batch]


def _mix_seed(seed: int, epoch: int) -> int:
    # Independent-looking streams for every (seed, epoch) pair, within torch's 64-bit seed range.
    digest = hashlib.sha256(f"meshd-sampler:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
