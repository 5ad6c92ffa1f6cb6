"""Asynchronous simulation of a mesh's learning loops: real maths, virtual clock, no network.

Why it exists: a lock-step simulation (every domain trains, then every domain exchanges) matched FedAvg, but
16 real daemons did not. This one runs meshd's own ``PushSum``, ``ServedModel`` and ``Learner`` (real SGD on
the bench's MNIST-1D split, ``meshd.ops.localmesh.build_mesh``) under the loops of ``meshd.task.runtime``,
each domain on its own schedule:

- training parts of ``min(every_steps, epoch)`` steps (``gossip.every_steps``; with ``--every-steps 0``,
  ``ceil(epoch / per_round)``), paced like ``training.pace = "mesh"`` (wait while more than half an epoch
  ahead of the median of the peers' epochs heard in shares, and half an epoch at most until one is heard);
  a part takes
  ``steps x step_ms x max(1, training domains / cores)`` of virtual time (the domains share the cores);
- after each part one exchange that the next part waits for, and ``settle`` more after a round;
- a timer round once ``interval`` (jittered) passed without any round, as the gossip loop runs one;
- an exchange: the share reaches the peer after ``lat_ms``, its acknowledgement (and with ``--exchange
  pushpull`` the peer's share from before the merge) comes back ``lat_ms`` later.

It reproduced the daemons' quick-bench figures within a few points (one-way shares: 0.50 simulated, 0.59
real at 800 steps) and showed why: the push-sum weights spread over 0.07-2.9. Prints one JSON line per mark
(mesh average, served and own models' mean / worst accuracy, weights) and writes them to ``--out``.

    .venv/bin/python bench/async_sim.py [--exchange push|pushpull] [--every-steps 8] [--per-round 8] [--settle 0]
        [--serve-window 16] [--codec q8]
        [--samples 10000] [--marks 200,400,800] [--out bench/results/async_sim.json]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from meshd.core.averaging import PushSum, ServedModel, Share, data_scale
from meshd.core.codec import encoded_size
from meshd.core.cohort import paced_steps
from meshd.core.membership import exponential_targets
from meshd.ops.localmesh import build_mesh, load_dataset
from meshd.task import models
from meshd.task.data import load_data_product
from meshd.task.learner import Learner, TrainConfig

BATCH, LR, MOMENTUM = 32, 0.01, 0.9
CORES = 2
# name: (dataset, domains, model, min rows per domain), as bench/learning.py's scenarios
SCENARIOS = {"mnist1d": ("mnist1d", 16, "cnn1d", 50), "digits": ("digits", 8, "mlp", 20)}
RESULTS = Path(__file__).resolve().parent / "results" / "async_sim.json"


class Sim:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        dataset, self.n, model, min_rows = SCENARIOS[args.scenario]
        samples = args.samples if dataset == "mnist1d" else 0
        data = load_dataset(dataset, 0, samples)
        build_mesh(workdir, self.n, dataset=dataset, alpha=0.1, seed=0,
                   min_per_domain=min_rows if samples in (0, 40_000) else 20, data=data, test_fraction=0.2)
        self.doms = [load_data_product(workdir / f"domain-{i}" / "data.npz", "label", None, 0.0, 10, i)
                     for i in range(self.n)]
        self.test = load_data_product(workdir / "shared" / "test.npz", "label", None, 0.0, 10, 0)
        spec = models.ModelSpec(name=model, num_classes=10)
        dim = self.test.input_dim
        init = models.flatten(models.build_model(spec, dim, models.initial_seed(spec, dim, 0)))
        self.learners = [Learner(models.build_model(spec, dim, 0), d,
                                 TrainConfig(batch_size=BATCH, lr=LR, momentum=MOMENTUM, seed=i))
                         for i, d in enumerate(self.doms)]
        self.a = args
        self.rng = random.Random(args.seed)
        self.spe = [math.ceil(d.num_train / BATCH) for d in self.doms]
        self.rows = [d.num_train for d in self.doms]
        self.ps = [PushSum(init.clone(), 1.0, codec=args.codec, rows=float(r)) for r in self.rows]
        self.served = [ServedModel(args.serve_window, args.serve_kind, args.serve_stale_s, args.serve_smooth_s)
                       for _ in self.doms]
        self.value_bytes = encoded_size(init.numel(), args.codec) / init.numel()  # bytes per value on the wire
        self.steps = [0] * self.n
        self.heard: list[dict[int, float]] = [{} for _ in self.doms]
        self.training = [False] * self.n
        self.busy = [False] * self.n  # an exchange in flight (the gossip loop runs one round at a time)
        self.chain = [False] * self.n  # a part's exchanges not done yet
        self.rounds = [0] * self.n
        self.round_started = [-math.inf] * self.n  # virtual time of each domain's latest round
        self.ids = [i.to_bytes(32, "big") for i in range(self.n)]  # stand-ins for peer ids
        self.values_moved = [0] * self.n
        self.queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.counter = itertools.count()

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.queue, (t, next(self.counter), fn, args))

    def epochs(self, i: int) -> float:
        return self.steps[i] / self.spe[i]

    def paced(self, t: float, i: int, wanted: int) -> int:
        # The daemon's rule (meshd.core.cohort.paced_steps): every domain starts training at t = 0 or so.
        return paced_steps(wanted, self.epochs(i), self.spe[i], list(self.heard[i].values()), slack=0.5,
                           started=(0.0, 0.0), now=t, listen_s=max(3.0, 3 * self.a.interval), alone=False)

    def exchange(self, t: float, i: int, round_no: int, then: Callable[[float], None] | None) -> None:
        # The daemons' exponential topology: a ring drawn afresh each cycle, walked by powers of two.
        (target,) = exponential_targets(self.ids, self.ids[i], round_no, 1)
        j = self.ids.index(target)
        shares = self.ps[i].prepare(1)
        if not shares:
            if then is not None:
                then(t)
            return
        share, lat = shares[0], self.a.lat_ms / 1000
        self.busy[i] = True
        self.round_started[i] = t
        sender_epochs = self.epochs(i)

        def deliver(t2: float) -> None:
            back: Share | None = None
            if self.a.exchange == "pushpull":
                answer = self.ps[j].prepare(1, at_most=share.weight)  # its half from before the merge
                back = answer[0] if answer else None
            self.ps[j].merge(share.values, share.weight, share.version, share.rows)
            self.served[j].observe(share.values, bytes([1 + i]), t2)
            self.heard[j][i] = sender_epochs
            moved = share.values.numel()
            if back is not None:
                self.ps[j].confirm(back.id)
                moved += back.values.numel()
            self.values_moved[i] += moved
            self.values_moved[j] += moved
            receiver_epochs = self.epochs(j)

            def ack(t3: float) -> None:
                self.ps[i].confirm(share.id)
                if back is not None:
                    self.ps[i].merge(back.values, back.weight, back.version, back.rows)
                    self.served[i].observe(back.values, bytes([1 + j]), t3)
                    self.heard[i][j] = receiver_epochs
                self.busy[i] = False
                self.rounds[i] += 1
                if then is not None:
                    then(t3)

            self.at(t2 + lat, ack)

        self.at(t + lat, deliver)

    def train(self, t: float, i: int) -> None:
        every = self.a.every_steps
        k = self.paced(t, i, min(every, self.spe[i]) if every else math.ceil(self.spe[i] / self.a.per_round))
        if k == 0:
            self.at(t + 0.05, self.train, i)
            return
        ps = self.ps[i]
        start = ps.estimate()
        new, _ = self.learners[i].train(start, k)
        duration = k * self.a.step_ms / 1000 * max(1.0, (sum(self.training) + 1) / CORES)
        self.training[i] = True

        def done(t2: float) -> None:
            if self.chain[i]:  # overlap: the last part's exchange is still in flight; this part waits for it
                self.at(t2 + 0.005, done)
                return
            self.training[i] = False
            ps.apply_update(new - start, data_scale(self.rows[i], ps.mean_rows))
            this_round, within = divmod(self.steps[i], self.spe[i])
            self.steps[i] += k
            per_epoch = self.a.per_round + self.a.settle
            rounds = [this_round * per_epoch + min(self.a.per_round - 1, within * self.a.per_round // self.spe[i])]
            settling = self.a.settle > 0 and self.steps[i] // self.spe[i] > this_round
            if settling:
                rounds += [this_round * per_epoch + self.a.per_round + s for s in range(self.a.settle)]
            if every:  # the domain's own round counter, as the daemon's gossip loop
                rounds = [-1] * len(rounds)

            def run(t3: float, idx: int = 0) -> None:
                if idx == len(rounds):
                    if settling:
                        self.served[i].settle(ps.estimate())
                    self.chain[i] = False
                    if not self.a.overlap:
                        self.train(t3, i)
                elif self.busy[i]:  # a timer round in flight: the next one waits for it
                    self.at(t3 + 0.005, run, idx)
                else:
                    r = self.rounds[i] if rounds[idx] < 0 else rounds[idx]
                    self.exchange(t3, i, r, lambda t4: run(t4, idx + 1))

            self.chain[i] = True
            run(t2)
            if self.a.overlap:  # gossip.overlap: the next part trains while this one's exchange travels
                self.train(t2, i)

        self.at(t + duration, done)

    def timer(self, t: float, i: int) -> None:
        # As the daemon's gossip loop: every round pushes the timer back, so it fires only after an interval
        # (jittered) without any round.
        due = self.round_started[i] + self.a.interval * (1 + 0.25 * (2 * self.rng.random() - 1))
        if due > t:
            self.at(due, self.timer, i)
            return
        if not self.busy[i]:
            self.exchange(t, i, self.rounds[i], None)
        self.at(t + self.a.interval * (1 + 0.25 * (2 * self.rng.random() - 1)), self.timer, i)

    def point(self, t: float) -> dict[str, Any]:
        def acc(flat: torch.Tensor) -> float:
            return self.learners[0].evaluate(flat, self.test.train_x, self.test.train_y)

        mesh = sum((p.numerator() for p in self.ps), torch.zeros_like(self.ps[0].numerator()))
        served = [acc(s.value(p.estimate(), t)) for s, p in zip(self.served, self.ps, strict=True)]
        own = [acc(p.estimate()) for p in self.ps]
        return {"steps": round(sum(self.steps) / self.n, 1), "t_s": round(t, 2),
                "mesh": acc(mesh / sum(p.weight for p in self.ps)),
                "served": [sum(served) / self.n, min(served)], "own": [sum(own) / self.n, min(own)],
                "mb_per_domain": round(sum(self.values_moved) / self.n * self.value_bytes / 1e6, 2),
                "weights": [round(p.weight, 2) for p in self.ps]}

    def run(self, marks: list[int]) -> list[dict[str, Any]]:
        for i in range(self.n):
            self.at(self.rng.random() * 0.1, self.train, i)
            self.at(self.rng.random() * self.a.interval, self.timer, i)
        out: list[dict[str, Any]] = []
        while marks and self.queue:
            t, _, fn, args = heapq.heappop(self.queue)
            fn(t, *args)
            if sum(self.steps) / self.n >= marks[0]:
                marks.pop(0)
                out.append(self.point(t))
                print(json.dumps(out[-1]), flush=True)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=tuple(SCENARIOS), default="mnist1d")
    ap.add_argument("--exchange", choices=("push", "pushpull"), default="pushpull")
    ap.add_argument("--every-steps", type=int, default=8, help="gossip.every_steps (0: per_round parts)")
    ap.add_argument("--per-round", type=int, default=8)
    ap.add_argument("--serve-window", type=int, default=16)
    ap.add_argument("--serve-kind", choices=("peers", "ema"), default="peers")
    ap.add_argument("--serve-smooth-s", type=float, default=2.0, help="peers: time constant of a peer's entry")
    ap.add_argument("--serve-stale-s", type=float, default=60.0, help="peers: a peer silent this long drops out")
    ap.add_argument("--codec", default="q8")
    ap.add_argument("--settle", type=int, default=0)
    ap.add_argument("--overlap", action="store_true", help="gossip.overlap: train the next part during the exchange")
    ap.add_argument("--samples", type=int, default=10_000, help="MNIST-1D samples (the quick bench's 10,000)")
    ap.add_argument("--marks", default="200,400,800", help="mean local steps per domain to report at")
    ap.add_argument("--step-ms", type=float, default=10.0, help="one SGD step on one core (daemon overheads in)")
    ap.add_argument("--lat-ms", type=float, default=15.0, help="one-way message latency")
    ap.add_argument("--interval", type=float, default=1.0, help="gossip.interval_s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="meshd-asim-") as tmp:
        curve = Sim(args, Path(tmp)).run([int(m) for m in args.marks.split(",")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": "async_sim", "args": {k: str(v) for k, v in vars(args).items()},
                                    "curve": curve}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
