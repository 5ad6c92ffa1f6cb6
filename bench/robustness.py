"""Poisoning robustness: 8 domains, 2 of them hostile, every attack, plain push-sum against the clipped rule.

An in-process simulation of the mesh's learning that runs meshd's own code for everything a domain does:
``PushSum`` (prepare / confirm / abandon, q8 codec), the merge rules of ``meshd.core.merge`` with the
parameters a daemon would give them (weight ceiling and cap = trusted + 1, calibration on 3 peers), the
served model (``ServedModel``, window 8) and local SGD (``Learner``, the optimizer and data set-up of
``bench/learning.py``: same splits, same initial weights). What is simulated: the clock (one round = every
honest domain trains ``STEPS_PER_ROUND`` steps, then sends one share to its exponential-graph target; a
share is delivered at once) and the network (no loss). The attackers are ``tests/hostile.py``'s attacks
(``craft``), seeing every share sent to them, sending a share to every honest domain every round (pulling
from every one, for ``pull``). Real daemons with the socket harness are exercised by
``tests/test_robust_daemons.py``; this bench measures the learning.

For each scenario (digits, MNIST-1D) and each attack: mean accuracy and mean cross-entropy of the 6 honest
domains' served models on the shared test set, after the same local steps, relative to the clean run under
the same rule (the 2 hostile domains silent: they send nothing and refuse what they are sent, so the clean
run learns from the same 6 data products, and the table shows what the attack costs, not the 2 domains'
data). The clean rows compare
the rules with no attacker: clipped / pushsum accuracy at equal steps.

    .venv/bin/python bench/robustness.py [--quick] [--scenario digits|mnist1d|all] [--out DIR]

Writes ``DIR/robustness.json`` and ``DIR/robustness.png`` (default ``bench/results``) and prints the table
(markdown, as in the README).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.hostile, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import BATCH, LR, MOMENTUM, SEED, _learners

from meshd.core.averaging import PushSum, RejectedUpdate, ServedModel
from meshd.core.merge import RuleParams, make_rule
from meshd.errors import ModelError
from meshd.ops.localmesh import build_mesh, load_dataset
from meshd.task import models
from meshd.task.data import DataProduct, load_data_product
from tests.hostile import craft

RESULTS = Path(__file__).resolve().parent / "results"
ATTACKS = ("scaled", "signflip", "alie", "ipm", "dissensus", "weight", "version", "pull", "replay")
RULES = ("pushsum", "clipped")
DOMAINS, HOSTILE = 8, (0, 1)  # domains 0 and 1 are the compromised ones
STEPS_PER_ROUND = 2
SCENARIOS = {  # name: (dataset, samples, model, alpha, rounds full, rounds quick, samples quick)
    "digits": ("digits", 0, "mlp", 0.1, 300, 200, 0),
    "mnist1d": ("mnist1d", 40_000, "cnn1d", 0.1, 400, 100, 10_000),
}
EVAL_EVERY = 25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("digits", "mnist1d", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer rounds; MNIST-1D with 10,000 samples")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="only merge the scenarios of earlier runs' robustness.json files into --out")
    args = parser.parse_args()
    if args.combine:
        runs = [json.loads(p.read_text()) for p in args.combine]
        out = {**runs[0], "scenarios": {k: v for r in runs for k, v in r["scenarios"].items()},
               "elapsed_s": sum(r["elapsed_s"] for r in runs), "combined_from": [str(p) for p in args.combine]}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "robustness.json").write_text(json.dumps(out, indent=1))
        plot(args.out / "robustness.png", out)
        print(table(out))
        return 0
    torch.set_num_threads(1)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    out: dict[str, Any] = {
        "bench": "robustness", "mode": "quick" if args.quick else "full", "domains": DOMAINS, "hostile": len(HOSTILE),
        "steps_per_round": STEPS_PER_ROUND, "optimizer": {"lr": LR, "momentum": MOMENTUM, "batch_size": BATCH},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count()},
        "scenarios": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshd-robust-") as tmp:
        for name in names:
            out["scenarios"][name] = run_scenario(name, Path(tmp) / name, args.quick)
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.json").write_text(json.dumps(out, indent=1))
    plot(args.out / "robustness.png", out)
    print("\n" + table(out))
    print(f"\nwrote {args.out / 'robustness.json'} and {args.out / 'robustness.png'} ({out['elapsed_s']:.0f} s)")
    return 0


def run_scenario(name: str, workdir: Path, quick: bool) -> dict[str, Any]:
    dataset, samples, model, alpha, rounds_full, rounds_quick, samples_quick = SCENARIOS[name]
    rounds, samples = (rounds_quick, samples_quick or samples) if quick else (rounds_full, samples)
    data = load_dataset(dataset, SEED, samples) if samples else load_dataset(dataset, SEED)
    num_classes = int(data[1].max()) + 1
    layout = build_mesh(workdir, DOMAINS, dataset=dataset, alpha=alpha, seed=SEED, data=data,
                        min_per_domain=20, settings={"data": {"holdout": "0.0"}})
    domains = [load_data_product(d.directory / "data.npz", "label", None, 0.0, num_classes, SEED + i)
               for i, d in enumerate(layout.domains)]
    test = load_data_product(layout.test_path, "label", None, 0.0, num_classes, SEED)
    spec = models.ModelSpec(name=model, num_classes=num_classes)
    init = models.flatten(models.build_model(spec, test.input_dim, models.initial_seed(spec, test.input_dim, 0)))
    print(f"\n=== {name}: {DOMAINS} domains ({len(HOSTILE)} hostile), {model} ({init.numel()} parameters), "
          f"{rounds} rounds x {STEPS_PER_ROUND} steps ===", flush=True)
    res: dict[str, Any] = {"rounds": rounds, "steps": rounds * STEPS_PER_ROUND, "samples": samples,
                           "parameters": int(init.numel()), "runs": {}}
    for rule in RULES:
        for attack in ("clean", *ATTACKS):
            t = time.monotonic()
            run = simulate(spec, init, domains, test, rule, attack, rounds)
            run["elapsed_s"] = round(time.monotonic() - t, 1)
            res["runs"][f"{rule}/{attack}"] = run
            last = run["curve"][-1]
            print(f"  {rule:<8} {attack:<10} acc {last['accuracy']:.3f} loss {last['loss']:.3g} "
                  f"({run['elapsed_s']:.0f} s) {run['refused']}", flush=True)
    return res


def simulate(spec: models.ModelSpec, init: torch.Tensor, domains: list[DataProduct], test: DataProduct,
             rule_name: str, attack: str, rounds: int) -> dict[str, Any]:
    hostile = set(HOSTILE)  # in the clean run they are silent: they refuse shares and send none
    honest = [i for i in range(DOMAINS) if i not in hostile]
    learners = _learners(spec, domains)
    nodes = {i: PushSum(init.clone(), codec="q8", max_weight=float(DOMAINS)) for i in honest}
    served = {i: ServedModel(8) for i in honest}
    params = RuleParams(weight_ceiling=float(DOMAINS), min_peers=3)
    rules = {i: make_rule(rule_name, params) for i in honest}
    ids = [bytes([i]) * 32 for i in range(DOMAINS)]
    views: dict[int, dict[int, torch.Tensor]] = {h: {} for h in hostile}
    first: dict[int, torch.Tensor] = {}
    refused: dict[str, int] = {}
    curve = []
    hops = max(1, math.ceil(math.log2(DOMAINS)))
    for rnd in range(rounds):
        now = float(rnd)
        for i in honest:  # local steps on a copy, as the train loop does
            start = nodes[i].estimate()
            try:
                new, _ = learners[i].train(start.to(torch.float32), STEPS_PER_ROUND)
                nodes[i].apply_update(new.to(torch.float64) - start)
            except (ModelError, RejectedUpdate):  # a diverging step is dropped, as the train loop does
                refused["steps_dropped"] = refused.get("steps_dropped", 0) + 1
        for i in honest:  # one share to the exponential-graph target of this round
            j = (i + 2 ** (rnd % hops)) % DOMAINS
            share = nodes[i].prepare(1)[0]
            if j in hostile and attack == "clean":
                nodes[i].abandon(share.id)  # a silent domain: the sender keeps the mass
                continue
            if j in hostile:  # it acknowledges (the sender gives the mass away) and learns the model
                views[j][i] = share.values
                nodes[i].confirm(share.id)
                continue
            if _deliver(rules[j], nodes[j], served[j], ids[i], share.values, share.weight, share.version, share.rows,
                        now, refused):
                nodes[i].confirm(share.id)
            else:
                nodes[i].abandon(share.id)
        for h in sorted(hostile) if attack != "clean" else ():
            for j in honest:
                if attack == "pull":
                    if rules[j].allow_pull(ids[h], now):
                        views[h][j] = nodes[j].split_for_pull().values  # its mass leaves the mesh
                    else:
                        refused["pull_rate"] = refused.get("pull_rate", 0) + 1
                    continue
                view = list(views[h].values()) or [init.to(torch.float64)]
                first.setdefault(h, torch.stack(view).mean(0))
                vals, weight, version = craft(attack, view, views[h].get(j), first[h],
                                              receivers_trusted=DOMAINS - 1, max_abs=1e6)
                _deliver(rules[j], nodes[j], served[j], ids[h], vals, weight, version, None, now, refused)
        if (rnd + 1) % EVAL_EVERY == 0 or rnd + 1 == rounds:
            curve.append(_evaluate(spec, test, learners, nodes, served, rnd + 1))
    quarantined = sum(1 for j in honest for h in hostile if rules[j].is_quarantined(ids[h], float(rounds)))
    return {"curve": curve, "refused": refused, "quarantined_pairs": quarantined,
            "weights": [nodes[i].weight for i in honest if i not in HOSTILE]}


def _deliver(rule: Any, ps: PushSum, served: ServedModel, sender: bytes, values: torch.Tensor, weight: float,
             version: int, rows: float | None, now: float, refused: dict[str, int]) -> bool:
    """What the receiving task does with a share (runtime._model_fields' weight cap, then the rule)."""
    if not 0.0 < weight <= float(DOMAINS):  # trusted + 1 on the receiver
        refused["bad_values"] = refused.get("bad_values", 0) + 1
        return False
    try:
        merged = rule.merge(ps, sender, values, weight, version, rows, now)
    except RejectedUpdate as exc:
        refused[exc.reason] = refused.get(exc.reason, 0) + 1
        return False
    served.observe(merged.values)
    return True


def _evaluate(spec: models.ModelSpec, test: DataProduct, learners: list[Any], nodes: dict[int, PushSum],
              served: dict[int, ServedModel], rnd: int) -> dict[str, Any]:
    scored = [i for i in nodes if i not in HOSTILE]  # the same 6 domains in every run
    module = models.build_model(spec, test.input_dim, 0)
    accs, losses = [], []
    for i in scored:
        flat = served[i].value(nodes[i].estimate()).to(torch.float32)
        if not bool(torch.isfinite(flat).all()):
            accs.append(0.0)
            losses.append(math.inf)
            continue
        accs.append(learners[i].evaluate(flat, test.train_x, test.train_y))
        models.load_flat(module, flat)
        module.eval()
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(module(test.train_x), test.train_y))
        losses.append(loss if math.isfinite(loss) else math.inf)
    return {"round": rnd, "steps": rnd * STEPS_PER_ROUND, "accuracy": sum(accs) / len(accs),
            "worst": min(accs), "loss": sum(losses) / len(losses)}


def table(out: dict[str, Any]) -> str:
    lines = [f"Honest domains' mean accuracy / loss relative to the clean run of the same rule ({out['mode']} mode, "
             f"{out['domains']} domains, {out['hostile']} hostile; acceptance: accuracy >= 0.95, loss <= 1.1)", ""]
    names = list(out["scenarios"])
    head = "| attack | " + " | ".join(f"{n} push-sum | {n} clipped" for n in names) + " |"
    lines += [head, "|---" * (1 + 2 * len(names)) + "|"]
    clean_row = ["clean (accuracy, loss)"]
    for n in names:
        for rule in RULES:
            c = out["scenarios"][n]["runs"][f"{rule}/clean"]["curve"][-1]
            clean_row.append(f"{c['accuracy']:.3f}, {c['loss']:.3f}")
    lines.append("| " + " | ".join(clean_row) + " |")
    for attack in ATTACKS:
        row = [attack]
        for n in names:
            for rule in RULES:
                runs = out["scenarios"][n]["runs"]
                c, a = runs[f"{rule}/clean"]["curve"][-1], runs[f"{rule}/{attack}"]["curve"][-1]
                loss = a["loss"] / c["loss"] if math.isfinite(a["loss"]) else math.inf
                row.append(f"{a['accuracy'] / c['accuracy']:.2f} / {_g(loss)}")
        lines.append("| " + " | ".join(row) + " |")
    parity = []
    for n in names:
        runs = out["scenarios"][n]["runs"]
        p, c = runs["pushsum/clean"]["curve"][-1], runs["clipped/clean"]["curve"][-1]
        parity.append(f"{n}: clipped / push-sum accuracy with no attacker, at {p['steps']} steps: "
                      f"{c['accuracy'] / p['accuracy']:.3f}")
    return "\n".join([*lines, "", *parity])


def _g(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 100 else f"{x:.1e}"


def plot(path: Path, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["scenarios"])
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4.8), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):
        runs = out["scenarios"][n]["runs"]
        labels = ["clean", *ATTACKS]
        xs = range(len(labels))
        for k, rule in enumerate(RULES):
            accs = [runs[f"{rule}/{a}"]["curve"][-1]["accuracy"] for a in labels]
            ax.bar([x + (k - 0.5) * 0.4 for x in xs], accs, width=0.4, label=rule)
        ax.set_xticks(list(xs), labels, rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("honest domains' mean test accuracy")
        ax.set_title(f"{n}: 2 of 8 domains hostile ({out['mode']} mode)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
