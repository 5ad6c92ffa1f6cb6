"""The cost of privacy: accuracy and membership-inference advantage against epsilon, gossip vs DP-FedAvg.

Every model trains with meshd's own learner (:class:`meshd.task.learner.Learner` with a
:class:`meshd.task.privacy.PrivacyPlan`: Opacus per-sample clipping at 1.0, Gaussian noise, Poisson batches),
SGD lr 0.1 without momentum, batch 32, 4 domains split by Dirichlet(1.0) (seed 0, at least 60 rows each),
model ``mlp`` (64 hidden), every domain starting from the same weights. The noise is calibrated so that each
domain's planned steps (``rounds`` local epochs) spend exactly epsilon at delta 1e-5 (RDP accountant); the
epsilon reported (``epsilon_spent_max``, the largest over domains and runs) is the accountant's
(:func:`meshd.task.privacy.epsilon_of`) for the steps each learner actually took, at its sampling rate and
noise. For each epsilon (and without DP) two methods train the same rows with the same number of steps:

- ``gossip``: meshd's averaging in memory (:class:`meshd.core.averaging.PushSum`) with the daemon's defaults,
  in lock step: each round every domain trains one local epoch in parts of ``gossip.every_steps`` (8) steps,
  applied with ``apply_update`` and the rows weighting, and after each part runs one push-pull exchange
  (q4 values) with its peer on the exponential graph's ring of the cycle (all delivered). Each domain's
  model is the one it serves (``ServedModel``, ``gossip.serve_window`` 16).
- ``fedavg``: a central server: each round every domain starts from the global model, trains one local epoch,
  and the server averages the results weighted by rows (DP-FedAvg with local DP-SGD, the same epsilon).

Two parts, each with its own data:

1. **Accuracy** (``accuracy`` in the JSON): the mean over domains of each domain's model's accuracy on a
   shared 20 % test set after 30 rounds, on ``digits`` (scikit-learn's 8x8 digits, 10 classes) and
   ``breast_cancer`` (scikit-learn's Wisconsin breast-cancer set, 569 rows, 30 features: a tabular binary
   task). 20 % of each domain's rows are held out (never trained on); every run trains the same rows. Bench
   simplification: the breast-cancer features are standardised with the per-feature mean and std of all
   domains' training rows pooled, treated as public (a real domain would use published ranges, or spend
   budget on a private estimate); digits' pixels are divided by 16.
2. **Membership inference** (``mia``): a setting where the non-private model overfits, so that the attack has
   something to find: MNIST-1D (4,000 rows generated offline, 40 features, 10 classes), 20 % shared test set,
   each domain trains on 25 % of its rows (about 200; 800 in all) for 100 rounds. The attack is the loss
   threshold of Yeom et al. (2018), "loss <= t => member", against each domain's model: members = that
   domain's training rows, non-members = as many of its other rows (the same distribution, trained on by no
   domain). Advantage = TPR - FPR at a threshold chosen on half of the rows and scored on the other half
   (both ways, averaged), the losses of all domains pooled (about 800 members, 800 non-members): 0 = no leak,
   and unbiased (the best threshold scored on the rows that chose it is biased upwards, +0.01 to +0.03 here:
   ``advantage_in_sample`` in the JSON). The **noise floor** is the same attack on the same model with a
   second set of unseen rows in place of the members, so its true value is 0. Run ``i`` draws the members
   afresh (split seed ``i``), so the spread over runs includes which rows are members, not only the noise.

DP noise comes from OS entropy, so every figure is the mean of ``--repeats`` runs (each run is in ``runs``);
the membership-inference figures carry the std over runs and a 95 % confidence interval of the mean
(Student t). An in-process simulation, not daemons: the daemons' DP path is this same learner and ledger
(tests/test_privacy_daemons.py runs them).

    .venv/bin/python bench/privacy.py [--quick] [--repeats N] [--out DIR]

Writes ``DIR/privacy.json`` and ``DIR/privacy.png`` (default ``bench/results``) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshd.config import PrivacyConfig
from meshd.core.averaging import PushSum, ServedModel
from meshd.core.membership import exponential_targets
from meshd.ops.localmesh import build_mesh, load_dataset
from meshd.task import datasets, models
from meshd.task.data import DataProduct, load_data_product
from meshd.task.learner import Learner, TrainConfig
from meshd.task.privacy import PrivacyPlan, epsilon_of

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, LR, DELTA, CLIP, ACCOUNTANT = 32, 0.1, 1e-5, 1.0, "rdp"
DOMAINS, ALPHA, SEED = 4, 1.0, 0
EVERY_STEPS, SERVE_WINDOW, CODEC = 8, 16, "q4"  # the daemon's gossip.every_steps, serve_window and codec
METHODS = ("gossip", "fedavg")
MIA_ROWS = 4000  # MNIST-1D rows generated for the membership-inference part
MIA_TRAIN_FRACTION = 0.25  # of each domain's rows; the rest are the non-members and the noise floor's rows
MIN_ROWS = 60  # rows per domain at least (breast cancer's two classes split by Dirichlet(1.0) left one with 22)


@dataclasses.dataclass(frozen=True)
class Mesh:
    """One scenario's data: each domain's data product file, the shared test set, the model."""

    name: str
    paths: list[Path]  # each domain's data.npz (written by localmesh.build_mesh)
    holdout: float  # fraction of each domain's rows held out (never trained on)
    classes: int
    test: DataProduct
    spec: models.ModelSpec
    init: torch.Tensor  # every domain starts from these weights
    scale: tuple[torch.Tensor, torch.Tensor] | None  # per-feature (mean, std) applied to every row, or None

    def domains(self, split_seed: int) -> list[DataProduct]:
        """Each domain's rows, split into training and held-out rows by ``split_seed``."""
        out = [load_data_product(p, "label", None, self.holdout, self.classes, split_seed) for p in self.paths]
        return [_scaled(d, self.scale) for d in out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, epsilons and runs (about 1.5 minutes of CPU)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per (method, epsilon); figures are their mean (default 5, --quick 2)")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 2:
        ap.error("--repeats must be >= 2 (the membership-inference figures carry a std over runs)")
    rounds, mia_rounds = (10, 30) if args.quick else (30, 100)
    epsilons: list[float | None] = [1.0, 8.0, None] if args.quick else [1.0, 3.0, 8.0, None]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "common": {"domains": DOMAINS, "alpha": ALPHA, "min_rows_per_domain": MIN_ROWS, "model": "mlp",
                   "hidden": 64, "batch": BATCH, "lr": LR, "momentum": 0.0, "delta": DELTA, "max_grad_norm": CLIP,
                   "accountant": ACCOUNTANT, "quick": args.quick, "repeats": repeats},
        "accuracy": {}, "mia": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("digits", "breast_cancer"):
            mesh = _mesh(Path(tmp) / name, name, 0.2)
            domains = mesh.domains(SEED)
            print(f"\n== accuracy: {name}, {rounds} rounds, {_rows(domains, mesh.test)}", flush=True)
            rows = [_accuracy_row(mesh, domains, method, eps, rounds, repeats)
                    for eps in epsilons for method in METHODS]
            out["accuracy"][name] = {"rounds": rounds, "train_rows": [d.num_train for d in domains],
                                     "test_rows": mesh.test.num_train, "results": rows}
        mesh = _mesh(Path(tmp) / "mnist1d", "mnist1d", 1 - MIA_TRAIN_FRACTION)
        print(f"\n== membership inference: mnist1d, {mia_rounds} rounds, {_rows(mesh.domains(0), mesh.test)}; "
              "members drawn afresh in each run", flush=True)
        mia_rows = [_mia_row(mesh, method, eps, mia_rounds, repeats) for eps in epsilons for method in METHODS]
    out["mia"] = {"dataset": "mnist1d", "rows_generated": MIA_ROWS, "train_fraction": MIA_TRAIN_FRACTION,
                  "rounds": mia_rounds, "test_rows": mesh.test.num_train,
                  "attack": "loss threshold (Yeom et al. 2018), threshold chosen on one half, scored on the "
                            "other, both ways; losses of all domains pooled",
                  "results": mia_rows}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": _cpus()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(args.out / "privacy.png", out)
    print(f"\n{out['seconds']} s; wrote {args.out / 'privacy.json'} and {args.out / 'privacy.png'}")
    return 0


# ------------------------------------------------------------------------------------------------ scenarios

def _mesh(workdir: Path, name: str, holdout: float) -> Mesh:
    """The scenario's domains (a Dirichlet split by localmesh.build_mesh, at least MIN_ROWS rows each), with
    ``holdout`` of each domain's rows held out, and the shared test set (20 %)."""
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer  # bundled with scikit-learn, no download

        bunch: Any = load_breast_cancer()
        data = (np.asarray(bunch.data, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64))
    elif name == "mnist1d":
        data = datasets.load_mnist1d_dataset(num_samples=MIA_ROWS, seed=SEED)
    else:
        data = load_dataset(name, SEED)
    classes = int(data[1].max()) + 1
    layout = build_mesh(workdir, DOMAINS, dataset=name, alpha=ALPHA, seed=SEED, min_per_domain=MIN_ROWS,
                        data=data)
    paths = [d.directory / "data.npz" for d in layout.domains]
    test = load_data_product(layout.test_path, "label", None, 0.0, classes, SEED)
    scale = None
    if name == "breast_cancer":
        # Bench simplification: per-feature mean and std of every domain's training rows pooled, treated as
        # public (the holdout and test rows do not enter them).
        pooled = torch.cat([load_data_product(p, "label", None, holdout, classes, SEED).train_x for p in paths])
        scale = (pooled.mean(dim=0), pooled.std(dim=0).clamp(min=1e-6))
    spec = models.ModelSpec("mlp", num_classes=classes)
    dim = test.input_dim
    init = models.flatten(models.build_model(spec, dim, models.initial_seed(spec, dim, SEED)))
    return Mesh(name, paths, holdout, classes, _scaled(test, scale), spec, init, scale)


def _scaled(d: DataProduct, scale: tuple[torch.Tensor, torch.Tensor] | None) -> DataProduct:
    if scale is None:
        return d
    mean, std = scale
    return dataclasses.replace(d, train_x=(d.train_x - mean) / std, holdout_x=(d.holdout_x - mean) / std)


def _rows(domains: list[DataProduct], test: DataProduct) -> str:
    return (f"training rows per domain {[d.num_train for d in domains]}, "
            f"held out {[d.num_holdout for d in domains]}, test {test.num_train}")


# ---------------------------------------------------------------------------------------------- the parts

def _accuracy_row(mesh: Mesh, domains: list[DataProduct], method: str, eps: float | None, rounds: int,
                  repeats: int) -> dict[str, Any]:
    """Accuracy of each domain's model on the test set; every run trains the same rows in the same order
    (only the DP noise and Poisson batches differ)."""
    def one(run: int) -> dict[str, Any]:
        finals, learners, info = train(mesh, domains, method, eps, rounds, SEED)
        accs = [learners[0].evaluate(f, mesh.test.train_x, mesh.test.train_y) for f in finals]
        return {**info, "accuracy_mean": sum(accs) / len(accs), "accuracy_worst": min(accs)}

    r = _repeat(one, repeats, ("accuracy_mean", "accuracy_worst"))
    print(f"{method:7s} epsilon={_eps(eps):5s} spent={_eps(r['epsilon_spent_max']):6s} "
          f"accuracy mean={r['accuracy_mean']:.3f} worst={r['accuracy_worst']:.3f}  ({r['seconds']} s)", flush=True)
    return r


def _mia_row(mesh: Mesh, method: str, eps: float | None, rounds: int, repeats: int) -> dict[str, Any]:
    """The attack on each domain's model; run ``i`` draws the members afresh (split seed ``i``), trains with
    minibatch seed ``i`` and splits the attack's rows by seed ``i``, so the spread over runs includes which
    rows are members, not only the DP noise."""
    def one(run: int) -> dict[str, Any]:
        domains = mesh.domains(run)
        finals, learners, info = train(mesh, domains, method, eps, rounds, run)
        accs = [learners[0].evaluate(f, mesh.test.train_x, mesh.test.train_y) for f in finals]
        member, nonmember, unseen = [], [], []
        for flat, d in zip(finals, domains, strict=True):
            n = min(d.num_train, d.num_holdout // 2)
            member.append(losses(mesh.spec, flat, d.train_x[:n], d.train_y[:n]))
            nonmember.append(losses(mesh.spec, flat, d.holdout_x[:n], d.holdout_y[:n]))
            unseen.append(losses(mesh.spec, flat, d.holdout_x[n:2 * n], d.holdout_y[n:2 * n]))
        lm, ln, lu = torch.cat(member), torch.cat(nonmember), torch.cat(unseen)
        return {**info, "accuracy_mean": sum(accs) / len(accs), "advantage": attack_advantage(lm, ln, run),
                "noise_floor": attack_advantage(lu, ln, run), "advantage_in_sample": best_threshold(lm, ln)[1],
                "members": len(lm), "member_loss": float(lm.mean()), "nonmember_loss": float(ln.mean())}

    keys = ("accuracy_mean", "advantage", "noise_floor", "advantage_in_sample", "member_loss", "nonmember_loss")
    r = _repeat(one, repeats, keys)
    for key in ("advantage", "noise_floor"):
        values = [x[key] for x in r["runs"]]
        r[f"{key}_std"] = round(statistics.stdev(values), 4)
        r[f"{key}_ci95"] = round(_t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values)), 4)
    print(f"{method:7s} epsilon={_eps(eps):5s} spent={_eps(r['epsilon_spent_max']):6s} "
          f"accuracy={r['accuracy_mean']:.3f}  advantage={r['advantage']:.3f} ± {r['advantage_ci95']:.3f} "
          f"(std {r['advantage_std']:.3f})  noise floor={r['noise_floor']:.3f} ± {r['noise_floor_ci95']:.3f}  "
          f"loss member/non-member={r['member_loss']:.2f}/{r['nonmember_loss']:.2f}  ({r['seconds']} s)",
          flush=True)
    return r


def _repeat(one: Callable[[int], dict[str, Any]], repeats: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """``repeats`` runs of ``one``: the first run's fields, ``keys`` averaged over the runs, and the runs."""
    torch.manual_seed(0)
    runs = [one(i) for i in range(repeats)]
    r = dict(runs[0])
    for key in (*keys, "seconds"):
        r[key] = round(sum(x[key] for x in runs) / len(runs), 4)
    spent = [x["epsilon_spent_max"] for x in runs if x["epsilon_spent_max"] is not None]
    r["epsilon_spent_max"] = round(max(spent), 4) if spent else None
    r["runs"] = [{k: round(x[k], 4) for k in keys} for x in runs]
    return r


def train(mesh: Mesh, domains: list[DataProduct], method: str, eps: float | None, rounds: int, seed: int
          ) -> tuple[list[torch.Tensor], list[Learner], dict[str, Any]]:
    """One run: each domain's final model, the learners, and what the accountant says they spent. ``seed``
    seeds the minibatch order without DP (DP's Poisson batches and noise come from OS entropy)."""
    steps = [math.ceil(d.num_train / BATCH) for d in domains]
    learners, plans = [], []
    for i, d in enumerate(domains):
        plan = None
        if eps is not None:
            plan = PrivacyPlan.build(PrivacyConfig(enabled=True, epsilon=eps, delta=DELTA, max_grad_norm=CLIP,
                                                   planned_steps=rounds * steps[i], accountant=ACCOUNTANT),
                                     BATCH, d.num_train)
        plans.append(plan)
        module = models.build_model(mesh.spec, d.input_dim, 0)
        learners.append(Learner(module, d, TrainConfig(batch_size=BATCH, lr=LR, seed=seed * 100 + i), dp=plan))
    t = time.perf_counter()
    if method == "fedavg":
        w = torch.tensor([d.num_train for d in domains], dtype=torch.float64)
        w = w / w.sum()
        g = mesh.init.clone()
        for _ in range(rounds):
            g = torch.stack([lr.train(g, k)[0] for lr, k in zip(learners, steps, strict=True)]).mul(
                w.unsqueeze(1)).sum(dim=0)
        finals = [g] * len(domains)
    else:
        finals = _gossip(mesh.init, domains, learners, steps, rounds)
    seconds = time.perf_counter() - t
    # The accountant's epsilon for the steps each learner actually took, at its sampling rate and noise.
    spent = [epsilon_of([(p.noise_multiplier, p.sample_rate, lr.steps_done)], DELTA, ACCOUNTANT)
             for p, lr in zip(plans, learners, strict=True) if p is not None]
    return finals, learners, {
        "method": method, "epsilon": eps, "epsilon_spent_max": max(spent) if spent else None,
        "noise_multiplier": [round(p.noise_multiplier, 4) for p in plans if p] or None,
        "sample_rate": [round(p.sample_rate, 4) for p in plans if p] or None,
        "steps_per_domain": [lr.steps_done for lr in learners], "seconds": seconds}


def _gossip(init: torch.Tensor, domains: list[DataProduct], learners: list[Learner], steps: list[int],
            rounds: int) -> list[torch.Tensor]:
    """meshd's averaging with the daemon's defaults, in lock step: each round every domain trains one local
    epoch in parts of ``gossip.every_steps`` steps (applied with ``apply_update`` and the rows weighting);
    after each part every domain runs one push-pull exchange with its peer on the exponential graph's ring
    of this cycle (``ring_key``), q4 values; each domain's result is the model it serves (``ServedModel``)."""
    n = len(domains)
    nodes = [PushSum(init.clone(), rows=float(d.num_train), codec=CODEC) for d in domains]
    served = [ServedModel(SERVE_WINDOW, "ema") for _ in domains]  # as measured (the default until stop 23)
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


# ------------------------------------------------------------------------------------------------ the attack

def losses(spec: models.ModelSpec, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of the model with weights ``flat``: what the loss-threshold attacker observes."""
    module = models.build_model(spec, x.shape[1], 0)
    models.load_flat(module, flat)
    module.eval()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(module(x), y, reduction="none")


def best_threshold(member: torch.Tensor, nonmember: torch.Tensor) -> tuple[float, float]:
    """The threshold t maximising TPR - FPR of "loss <= t => member" on these rows, and that maximum."""
    both = torch.cat([member, nonmember])
    is_member = torch.cat([torch.ones(len(member)), torch.zeros(len(nonmember))])
    order = torch.argsort(both)
    gap = torch.cumsum(is_member[order], 0) / len(member) - torch.cumsum(1 - is_member[order], 0) / len(nonmember)
    k = int(gap.argmax())
    return float(both[order][k]), max(0.0, float(gap[k]))


def attack_advantage(member: torch.Tensor, nonmember: torch.Tensor, seed: int) -> float:
    """TPR - FPR of the loss-threshold attack, its threshold chosen on one half of the rows and scored on the
    other half, both ways, averaged: unbiased (0 when members and non-members are alike, up to sampling)."""
    gen = torch.Generator().manual_seed(seed)  # which rows choose the threshold
    pm, pn = torch.randperm(len(member), generator=gen), torch.randperm(len(nonmember), generator=gen)
    halves_m = (member[pm[: len(pm) // 2]], member[pm[len(pm) // 2:]])
    halves_n = (nonmember[pn[: len(pn) // 2]], nonmember[pn[len(pn) // 2:]])
    scores = []
    for fit, score in ((0, 1), (1, 0)):
        t, _ = best_threshold(halves_m[fit], halves_n[fit])
        scores.append(float((halves_m[score] <= t).float().mean() - (halves_n[score] <= t).float().mean()))
    return sum(scores) / 2


# ------------------------------------------------------------------------------------------------ output

def plot(path: Path, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(out["accuracy"].items())
    fig, axes = plt.subplots(1, len(parts) + 1, figsize=(5 * (len(parts) + 1), 4.2))
    names = {"gossip": "meshd gossip", "fedavg": "central DP-FedAvg"}
    markers = {"gossip": "o", "fedavg": "s"}
    for ax, (dataset, part) in zip(axes, parts, strict=False):
        rows = part["results"]
        labels = _labels(rows)
        for method in METHODS:
            ax.plot(range(len(labels)), [r["accuracy_mean"] for r in rows if r["method"] == method],
                    marker=markers[method], label=names[method])
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(f"{dataset}: test accuracy ({part['rounds']} rounds)")
    ax = axes[-1]
    rows = out["mia"]["results"]
    labels = _labels(rows)
    for k, method in enumerate(METHODS):
        sel = [r for r in rows if r["method"] == method]
        xs = [x + (k - 0.5) * 0.08 for x in range(len(labels))]
        ax.errorbar(xs, [r["advantage"] for r in sel], yerr=[r["advantage_ci95"] for r in sel],
                    marker=markers[method], capsize=3, label=names[method])
        ax.errorbar(xs, [r["noise_floor"] for r in sel], yerr=[r["noise_floor_ci95"] for r in sel],
                    marker=markers[method], capsize=3, linestyle=":", color="grey", alpha=0.7,
                    label="noise floor (both sets unseen)" if k == 0 else None)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(f"{out['mia']['dataset']}: membership-inference advantage (95 % CI)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"4 domains, DP-SGD (Opacus), delta = {DELTA:g}; mean of {out['common']['repeats']} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    return ["no DP" if r["epsilon"] is None else f"ε={r['epsilon']:g}" for r in rows if r["method"] == METHODS[0]]


def _eps(e: float | None) -> str:
    return "none" if e is None else f"{e:g}"


def _t95(n: int) -> float:
    from scipy.stats import t  # installed with opacus

    return float(t.ppf(0.975, n - 1))


def _cpus() -> int | None:
    import os

    return os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
