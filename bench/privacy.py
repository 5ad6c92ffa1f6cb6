"""The cost of privacy: accuracy and membership-inference advantage against epsilon, gossip vs DP-FedAvg.

Digits (scikit-learn), a 20 % shared test set, the rest split over 4 domains by Dirichlet(1.0) (seed 0); model
``mlp``; SGD lr 0.1, batch 32; DP-SGD with meshd's own learner (:class:`meshd.task.learner.Learner` with a
:class:`meshd.task.privacy.PrivacyPlan`: Opacus per-sample clipping at 1.0 and Gaussian noise), the noise
calibrated so that each domain's planned steps (``rounds`` local epochs) spend exactly epsilon at delta 1e-5
(RDP accountant). For each epsilon (and without DP) two methods train the same rows with the same steps:

- ``gossip``: meshd's averaging in memory (:class:`meshd.core.averaging.PushSum`) with the daemon's defaults,
  in lock step: each round every domain trains one local epoch in parts of ``gossip.every_steps`` (8) steps,
  applied with ``apply_update`` and the rows weighting, and after each part runs one push-pull exchange
  (q4 values) with its peer on the exponential graph's ring of the cycle (all delivered). Accuracy: the mean
  over domains of the model each domain serves (``ServedModel``, ``gossip.serve_window`` 16). (Until
  2026-12-04 this bench split each epoch into 8 parts followed by a one-way share to a random peer, and
  scored each domain's own estimate.)
- ``fedavg``: a central server: each round every domain starts from the global model, trains one local epoch,
  and the server averages the results weighted by rows (DP-FedAvg with local DP-SGD, the same epsilon).

Membership inference (loss threshold, Yeom et al. 2018): for each domain's model, the advantage
``max over thresholds of (TPR - FPR)`` of "loss below the threshold => member", members = that domain's
training rows, non-members = as many of its holdout rows (20 %, never trained on); the figure is the mean over
the domains. 0 = no leak. DP noise comes from OS entropy, so every figure is the mean of ``--repeats`` runs
(default 5; each run is in ``runs``). An in-process
simulation, not daemons: the daemons' DP path is this same learner and ledger (tests/test_privacy_daemons.py
runs them).

    .venv/bin/python bench/privacy.py [--quick] [--repeats 5] [--out DIR]

Writes ``DIR/privacy.json`` and ``DIR/privacy.png`` (default ``bench/results``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from meshd.config import PrivacyConfig
from meshd.core.averaging import PushSum, ServedModel
from meshd.core.membership import exponential_targets
from meshd.ops.localmesh import build_mesh
from meshd.task import models
from meshd.task.data import DataProduct, load_data_product
from meshd.task.learner import Learner, TrainConfig
from meshd.task.privacy import PrivacyPlan, epsilon_of

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, LR, DELTA, CLIP = 32, 0.1, 1e-5, 1.0
DOMAINS = 4
EVERY_STEPS, SERVE_WINDOW, CODEC = 8, 16, "q4"  # the daemon's gossip.every_steps, serve_window and codec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and epsilons (about a minute)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--repeats", type=int, default=5, help="runs per (method, epsilon); figures are their mean")
    args = ap.parse_args()
    rounds = 10 if args.quick else 30
    epsilons: list[float | None] = [1.0, 8.0, None] if args.quick else [1.0, 3.0, 8.0, None]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        layout = build_mesh(Path(tmp), DOMAINS, dataset="digits", alpha=1.0, seed=0)
        # 20 % of each domain's rows are held out: never trained on, the non-members of the attack
        domains = [load_data_product(d.directory / "data.npz", "label", None, 0.2, 10, 0) for d in layout.domains]
        test = load_data_product(layout.test_path, "label", None, 0.0, 10, 0)
    spec = models.ModelSpec("mlp")
    init = models.flatten(models.build_model(spec, domains[0].input_dim, models.initial_seed(spec, 64, 0)))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for eps in epsilons:
        for method in ("gossip", "fedavg"):
            torch.manual_seed(0)
            # DP noise comes from OS entropy (never a seed), so each run differs: the figure is a mean of runs.
            runs = [run(method, eps, rounds, domains, test, init, spec) for _ in range(args.repeats)]
            r = dict(runs[0])
            for key in ("accuracy_mean", "accuracy_worst", "mia_advantage", "seconds"):
                r[key] = round(sum(x[key] for x in runs) / len(runs), 4)
            r["runs"] = [{k: x[k] for k in ("accuracy_mean", "accuracy_worst", "mia_advantage")} for x in runs]
            rows.append(r)
            print(_line(r), flush=True)
    out = {"scenario": {"dataset": "digits", "domains": DOMAINS, "alpha": 1.0, "model": "mlp", "rounds": rounds,
                        "batch": BATCH, "lr": LR, "delta": DELTA, "max_grad_norm": CLIP, "accountant": "rdp",
                        "quick": args.quick, "repeats": args.repeats},
           "results": rows, "seconds": round(time.perf_counter() - t0, 1),
           "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": _cpus()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(args.out / "privacy.png", rows)
    print(f"wrote {args.out / 'privacy.json'} and {args.out / 'privacy.png'}")
    return 0


def run(method: str, eps: float | None, rounds: int, domains: list[DataProduct], test: DataProduct,
        init: torch.Tensor, spec: models.ModelSpec) -> dict[str, Any]:
    steps = [math.ceil(d.num_train / BATCH) for d in domains]
    learners, plans = [], []
    for i, d in enumerate(domains):
        plan = None
        if eps is not None:
            plan = PrivacyPlan.build(PrivacyConfig(enabled=True, epsilon=eps, delta=DELTA, max_grad_norm=CLIP,
                                                   planned_steps=rounds * steps[i]), BATCH, d.num_train)
        plans.append(plan)
        module = models.build_model(spec, d.input_dim, 0)
        learners.append(Learner(module, d, TrainConfig(batch_size=BATCH, lr=LR, seed=i), dp=plan))
    t = time.perf_counter()
    if method == "fedavg":
        w = torch.tensor([d.num_train for d in domains], dtype=torch.float64)
        w = w / w.sum()
        g = init.clone()
        for _ in range(rounds):
            g = torch.stack([lr.train(g, k)[0] for lr, k in zip(learners, steps, strict=True)]).mul(
                w.unsqueeze(1)).sum(dim=0)
        finals = [g] * len(domains)
    else:
        finals = _gossip(domains, learners, steps, init, rounds)
    seconds = time.perf_counter() - t
    accs = [learners[0].evaluate(f, test.train_x, test.train_y) for f in finals]
    spent = [epsilon_of([(p.noise_multiplier, p.sample_rate, rounds * k)], DELTA, "rdp") if p else None
             for p, k in zip(plans, steps, strict=True)]
    # The attack on every domain's own model with its own members: one domain's few holdout rows alone made
    # the advantage swing by several points between runs.
    mia = [mia_advantage(f, d, test, spec) for f, d in zip(finals, domains, strict=True)]
    return {"method": method, "epsilon": eps, "accuracy_mean": round(sum(accs) / len(accs), 4),
            "accuracy_worst": round(min(accs), 4), "mia_advantage": round(sum(mia) / len(mia), 4),
            "epsilon_spent_max": round(max(s for s in spent if s is not None), 4) if eps is not None else None,
            "noise_multiplier": [round(p.noise_multiplier, 4) for p in plans if p] or None,
            "steps_per_domain": [rounds * k for k in steps], "seconds": round(seconds, 1)}


def _gossip(domains: list[DataProduct], learners: list[Learner], steps: list[int], init: torch.Tensor,
            rounds: int) -> list[torch.Tensor]:
    """meshd's averaging with the daemon's defaults, in lock step: each round every domain trains one local
    epoch in parts of ``gossip.every_steps`` steps (applied with ``apply_update`` and the rows weighting);
    after each part every domain runs one push-pull exchange with its peer on the exponential graph's ring
    of this cycle (``ring_key``), q4 values; each domain's result is the model it serves (``ServedModel``)."""
    n = len(domains)
    nodes = [PushSum(init.clone(), rows=float(d.num_train), codec=CODEC) for d in domains]
    served = [ServedModel(SERVE_WINDOW) for _ in domains]
    ids = [i.to_bytes(32, "big") for i in range(n)]  # stand-ins for peer ids
    mean_rows = sum(d.num_train for d in domains) / n
    gossip_round = 0
    for _ in range(rounds):
        left = list(steps)
        while any(left):
            for i, (node, lr, d) in enumerate(zip(nodes, learners, domains, strict=True)):
                k = min(EVERY_STEPS, left[i])
                if k:
                    start = node.estimate()
                    new, _ = lr.train(start, k)
                    node.apply_update(new - start, d.num_train / mean_rows)  # training.weighting = "rows"
                    left[i] -= k
            for i, node in enumerate(nodes):
                (target,) = exponential_targets(ids, ids[i], gossip_round, 1)
                j = ids.index(target)
                (share,) = node.prepare(1)
                back = nodes[j].prepare(1, at_most=share.weight)  # its half from before the merge
                nodes[j].merge(share.values, share.weight, share.version, share.rows)
                served[j].observe(share.values)
                node.confirm(share.id)
                if back:
                    nodes[j].confirm(back[0].id)
                    node.merge(back[0].values, back[0].weight, back[0].version, back[0].rows)
                    served[i].observe(back[0].values)
            gossip_round += 1
    return [s.value(node.estimate()) for s, node in zip(served, nodes, strict=True)]


def mia_advantage(flat: torch.Tensor, members: DataProduct, test: DataProduct, spec: models.ModelSpec) -> float:
    """Loss-threshold membership inference: max over thresholds of TPR - FPR (members: lower loss).

    Members: the domain's training rows; non-members: its holdout rows (the same distribution, never trained).
    """
    module = models.build_model(spec, members.input_dim, 0)
    models.load_flat(module, flat)
    module.eval()
    n = min(members.num_train, members.num_holdout)
    with torch.no_grad():
        lm = torch.nn.functional.cross_entropy(module(members.train_x[:n]), members.train_y[:n], reduction="none")
        ln = torch.nn.functional.cross_entropy(module(members.holdout_x[:n]), members.holdout_y[:n],
                                               reduction="none")
    losses = torch.cat([lm, ln])
    is_member = torch.cat([torch.ones(n), torch.zeros(n)])
    order = torch.argsort(losses)
    tpr = torch.cumsum(is_member[order], 0) / n
    fpr = torch.cumsum(1 - is_member[order], 0) / n
    return float((tpr - fpr).max().clamp(min=0))


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [("no DP" if r["epsilon"] is None else f"ε={r['epsilon']:g}") for r in rows if r["method"] == "gossip"]
    xs = range(len(labels))
    for method, marker in (("gossip", "o"), ("fedavg", "s")):
        sel = [r for r in rows if r["method"] == method]
        name = "meshd gossip" if method == "gossip" else "central DP-FedAvg"
        ax1.plot(xs, [r["accuracy_mean"] for r in sel], marker=marker, label=name)
        ax2.plot(xs, [r["mia_advantage"] for r in sel], marker=marker, label=name)
    for ax, title in ((ax1, "test accuracy (mean over domains)"), (ax2, "membership-inference advantage")):
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("digits, 4 domains, DP-SGD (Opacus), delta = 1e-5")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _line(r: dict[str, Any]) -> str:
    eps = "none" if r["epsilon"] is None else f"{r['epsilon']:g}"
    return (f"{r['method']:7s} epsilon={eps:5s} accuracy mean={r['accuracy_mean']:.3f} worst={r['accuracy_worst']:.3f}"
            f"  MIA advantage={r['mia_advantage']:.3f}  ({r['seconds']} s)")


def _cpus() -> int | None:
    import os

    return os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
