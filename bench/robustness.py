"""Poisoning robustness: 8 domains, 2 of them hostile, every attack, plain push-sum against the clipped rule.

An in-process simulation of the mesh's learning that runs meshd's own code for everything a domain does, with
the daemon's defaults (``meshd.config.GossipConfig``, read at run time): ``PushSum`` (prepare / confirm /
abandon, the ``gossip.codec``, data weighting by rows), the merge rules of ``meshd.core.merge`` with the
parameters a daemon gives them (``meshd.task.runtime.rule_params``: weight ceiling and cap = trusted + 1,
calibration on 3 peers), the exchange the daemon uses with that rule (``runtime.asks_answers``: push-pull, or
one-way shares), pull answers under the rule's pull limits (``gossip.pull_fraction``, ``pull_min_weight``),
the served model (``ServedModel``: ``gossip.serve``, ``serve_window``, ``serve_smooth_s``) and local SGD
(``Learner``, the optimizer and data set-up of ``bench/learning.py``: same splits, same initial weights). In lock
step, as ``bench/privacy.py``: one round = every honest domain trains ``gossip.every_steps`` steps, then runs one
exchange with its peer on the exponential graph's ring of the cycle
(``meshd.core.membership.exponential_targets``); everything is delivered at once, and a round is ``ROUND_S``
seconds of the rules' clock (a part and its exchange on a daemon). The attackers are ``tests/hostile.py``'s attacks
(``craft``), seeing every share sent to them and the newest version in them, sending a share to every honest domain
every round (a pull, for ``pull``), as the harness does every ``interval_s``. Real daemons with the socket harness
are exercised by ``tests/test_robust_daemons.py``; this bench measures the learning.

For each scenario (digits, MNIST-1D) and each attack: mean accuracy and mean cross-entropy of the 6 honest
domains' served models on the shared test set, after the same local steps, relative to the clean run under
the same rule (the 2 hostile domains silent: dead to the others, who gossip among themselves, so the clean
run learns from the same 6 data products, and the table shows what the attack costs, not the 2 domains'
data). The clean rows compare the rules with no attacker: clipped / pushsum accuracy at equal steps.

    .venv/bin/python bench/robustness.py [--quick] [--scenario digits|mnist1d|all] [--rules pushsum,clipped]
        [--attacks a,b] [--answering | --answer-only] [--out DIR]
    .venv/bin/python bench/robustness.py --combine A.json B.json ... [--out DIR]

Writes ``DIR/robustness.json`` and ``DIR/robustness.png`` (default ``bench/results``) and prints the table
(markdown, as in the README). ``--attacks`` / ``--rules`` (comma lists) run only those, to iterate on a rule
(the table and PNG need every attack and both rules, or ``--combine`` of runs that have them: runs of the same
scenario are merged, later files' runs replacing earlier ones'). ``--answering``: the attackers answer
push-pull requests with their attack instead of answering none (the harness's behaviour); ``--answer-only``:
they answer so and send nothing of their own (no one-way shares; ``pull`` still pulls), the attacker the
clipped rule cannot tell from an honest domain by its traffic.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.hostile, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import BATCH, LR, MOMENTUM, SEED, _learners

from meshd.config import GossipConfig, TaskConfig, codec_for
from meshd.core.averaging import PushSum, RejectedUpdate, ServedModel, data_scale
from meshd.core.membership import exponential_targets
from meshd.core.merge import NEUTRAL_REFUSALS, make_rule
from meshd.errors import ModelError
from meshd.ops.localmesh import build_mesh, load_dataset
from meshd.task import models
from meshd.task.data import DataProduct, load_data_product
from meshd.task.runtime import asks_answers, rule_params
from tests.hostile import craft

RESULTS = Path(__file__).resolve().parent / "results"
ATTACKS = ("scaled", "signflip", "alie", "ipm", "dissensus", "weight", "version", "pull", "replay")
RULES = ("pushsum", "clipped")
DOMAINS, HOSTILE = 8, (0, 1)  # domains 0 and 1 are the compromised ones
GOSSIP = GossipConfig()  # the daemon's defaults
ROUND_S = 0.5  # seconds of the rules' clock per round (quarantines, pull limits)
SCENARIOS = {  # name: (dataset, samples, model, alpha, rounds full, rounds quick, samples quick)
    "digits": ("digits", 0, "mlp", 0.1, 200, 100, 0),
    "mnist1d": ("mnist1d", 40_000, "cnn1d", 0.1, 300, 150, 10_000),
}
EVAL_EVERY = 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("digits", "mnist1d", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer rounds; MNIST-1D with 10,000 samples")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma list of attacks to run (default all)")
    parser.add_argument("--rules", default=",".join(RULES), help="comma list of rules to run (default both)")
    parser.add_argument("--answering", action="store_true",
                        help="attackers answer push-pull requests with their attack (tests/hostile.py's answer none)")
    parser.add_argument("--answer-only", action="store_true",
                        help="attackers answer push-pull with their attack and send no shares of their own")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="only merge the scenarios of earlier runs' robustness.json files into --out")
    args = parser.parse_args()
    if args.combine:
        runs = [json.loads(p.read_text()) for p in args.combine]
        scenarios: dict[str, Any] = {}
        for r in runs:  # runs of the same scenario (say one per rule) are merged
            for k, v in r["scenarios"].items():
                scenarios[k] = {**v, "runs": {**scenarios.get(k, {}).get("runs", {}), **v["runs"]}}
        out = {**runs[0], "scenarios": scenarios,
               "elapsed_s": sum(r["elapsed_s"] for r in runs), "combined_from": [str(p) for p in args.combine]}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "robustness.json").write_text(json.dumps(out, indent=1))
        plot(args.out / "robustness.png", out)
        print(table(out))
        return 0
    attacks = [a for a in args.attacks.split(",") if a]
    rules = [r for r in args.rules.split(",") if r]
    unknown = sorted(set(attacks) - set(ATTACKS)) + sorted(set(rules) - set(RULES))
    if unknown:
        parser.error(f"unknown attack or rule: {', '.join(unknown)}")
    torch.set_num_threads(1)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    out: dict[str, Any] = {
        "bench": "robustness", "mode": "quick" if args.quick else "full", "domains": DOMAINS, "hostile": len(HOSTILE),
        "every_steps": GOSSIP.every_steps, "codec": codec_for(TaskConfig()), "serve_window": GOSSIP.serve_window,
        "topology": "exponential", "round_s": ROUND_S, "attackers_answer": args.answering or args.answer_only,
        "attackers_push": not args.answer_only,
        "optimizer": {"lr": LR, "momentum": MOMENTUM, "batch_size": BATCH},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count()},
        "scenarios": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshd-robust-") as tmp:
        for name in names:
            out["scenarios"][name] = run_scenario(name, Path(tmp) / name, args.quick, rules, attacks,
                                                  args.answering or args.answer_only, not args.answer_only)
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.json").write_text(json.dumps(out, indent=1))
    if set(attacks) == set(ATTACKS) and set(rules) == set(RULES):
        plot(args.out / "robustness.png", out)
        print("\n" + table(out))
    print(f"\nwrote {args.out / 'robustness.json'} ({out['elapsed_s']:.0f} s)")
    return 0


def run_scenario(name: str, workdir: Path, quick: bool, rules: list[str], attacks: list[str],
                 answering: bool, pushing: bool = True) -> dict[str, Any]:
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
    steps = GOSSIP.every_steps
    print(f"\n=== {name}: {DOMAINS} domains ({len(HOSTILE)} hostile), {model} ({init.numel()} parameters), "
          f"{rounds} rounds x {steps} steps ===", flush=True)
    res: dict[str, Any] = {"rounds": rounds, "steps": rounds * steps, "samples": samples,
                           "parameters": int(init.numel()), "runs": {}}
    for rule in rules:
        for attack in ("clean", *attacks):
            t = time.monotonic()
            run = simulate(spec, init, domains, test, rule, attack, rounds, answering, pushing)
            run["elapsed_s"] = round(time.monotonic() - t, 1)
            res["runs"][f"{rule}/{attack}"] = run
            last = run["curve"][-1]
            print(f"  {rule:<8} {attack:<10} acc {last['accuracy']:.3f} loss {last['loss']:.3g} "
                  f"({run['elapsed_s']:.0f} s) clipped {run['clipped']} {run['refused']}", flush=True)
    return res


def simulate(spec: models.ModelSpec, init: torch.Tensor, domains: list[DataProduct], test: DataProduct,
             rule_name: str, attack: str, rounds: int, answering: bool = False, pushing: bool = True) -> dict[str, Any]:
    hostile = set(HOSTILE)
    honest = [i for i in range(DOMAINS) if i not in hostile]
    cfg = replace(TaskConfig(), gossip=replace(GOSSIP, merge=rule_name))
    pushpull = asks_answers(cfg)
    learners = _learners(spec, domains)
    rows = {i: float(domains[i].num_train) for i in honest}
    nodes = {i: PushSum(init.clone(), codec=codec_for(cfg), max_weight=float(DOMAINS), rows=rows[i])
             for i in honest}
    served = {i: ServedModel(GOSSIP.serve_window, GOSSIP.serve, smooth_s=GOSSIP.serve_smooth_s) for i in honest}
    rules = {i: make_rule(rule_name, rule_params(cfg.gossip, DOMAINS - 1, pushpull)) for i in honest}
    ids = [bytes([i]) * 32 for i in range(DOMAINS)]
    # In the clean run the hostile domains are silent (dead): the honest ones walk the graph among themselves.
    ring = [ids[i] for i in (honest if attack == "clean" else range(DOMAINS))]
    views: dict[int, dict[int, torch.Tensor]] = {h: {} for h in hostile}
    newest = 0  # the newest version the attackers have seen
    first: dict[int, tuple[torch.Tensor, int]] = {}
    refused: dict[str, int] = {}
    curve = []
    for rnd in range(rounds):
        now = rnd * ROUND_S
        for i in honest:  # local steps on a copy, as the train loop does
            start = nodes[i].estimate()
            try:
                new, _ = learners[i].train(start.to(torch.float32), GOSSIP.every_steps)
                nodes[i].apply_update(new.to(torch.float64) - start, data_scale(rows[i], nodes[i].mean_rows))
            except (ModelError, RejectedUpdate):  # a diverging step is dropped, as the train loop does
                refused["steps_dropped"] = refused.get("steps_dropped", 0) + 1
        for i in honest:  # one exchange with the exponential graph's peer of this round
            # A task gossips only with peers it does not quarantine (runtime.eligible).
            among = [p for p in ring if p == ids[i] or not rules[i].is_quarantined(p, now)]
            targets = exponential_targets(among, ids[i], rnd, 1)
            if not targets:  # it quarantines every peer
                continue
            j = ids.index(targets[0])
            shares = nodes[i].prepare(1)
            if not shares:
                continue
            share = shares[0]
            if j in hostile:  # it acknowledges (the sender gives the mass away) and learns the model
                views[j][i] = share.values
                newest = max(newest, share.version)
                nodes[i].confirm(share.id)
                if pushpull:  # and answers nothing (a sink, as tests/hostile.py), or with its attack
                    answers = answering and attack != "pull"
                    answer = _craft(attack, j, i, views, first, newest, init) if answers else None
                    merged = answer is not None and _deliver(rules[i], nodes[i], served[i], ids[j], answer[0],
                                                             answer[1], answer[2], None, now, refused,
                                                             prefix="reply_", reciprocal=True)
                    if merged is not None:
                        rules[i].answered(ids[j], merged, now)
                continue
            back = nodes[j].prepare(1, at_most=share.weight) if pushpull else []  # as runtime
            if not _deliver(rules[j], nodes[j], served[j], ids[i], share.values, share.weight, share.version,
                            share.rows, now, refused, reciprocal=pushpull):
                for b in back:
                    nodes[j].abandon(b.id)
                nodes[i].abandon(share.id)
                continue
            nodes[i].confirm(share.id)
            merged: bool | None = False
            if back:  # the answer is one-shot: refused by the asker, its mass is lost
                nodes[j].confirm(back[0].id)
                merged = _deliver(rules[i], nodes[i], served[i], ids[j], back[0].values, back[0].weight,
                                  back[0].version, back[0].rows, now, refused, prefix="reply_", reciprocal=True)
            if pushpull:
                rules[i].answered(ids[j], merged, now)
        for h in sorted(hostile) if attack != "clean" else ():
            for j in honest:
                if attack == "pull":
                    why = rules[j].pull_refusal(ids[h], now)
                    answer = nodes[j].split_for_pull(GOSSIP.pull_fraction, GOSSIP.pull_min_weight) if why is None \
                        else None
                    if answer is not None:
                        views[h][j] = answer.values  # its mass leaves the mesh
                    else:
                        refused[why or "weight_low"] = refused.get(why or "weight_low", 0) + 1
                    continue
                if not pushing:  # --answer-only: the attack rides on its answers alone
                    continue
                vals, weight, version = _craft(attack, h, j, views, first, newest, init)
                _deliver(rules[j], nodes[j], served[j], ids[h], vals, weight, version, None, now, refused)
        if (rnd + 1) % EVAL_EVERY == 0 or rnd + 1 == rounds:
            curve.append(_evaluate(spec, test, learners, nodes, served, rnd + 1))
    end = rounds * ROUND_S
    quarantined = sum(1 for j in honest for h in hostile if rules[j].is_quarantined(ids[h], end))
    return {"curve": curve, "refused": refused, "quarantined_pairs": quarantined,
            "weights": [round(nodes[i].weight, 4) for i in honest],
            "radius": [rules[i].radius(nodes[i], end) for i in honest],
            "clipped": sum(rules[i].totals(end)["clipped"] for i in honest)}


def _craft(attack: str, h: int, j: int, views: dict[int, dict[int, torch.Tensor]],
           first: dict[int, tuple[torch.Tensor, int]], newest: int,
           init: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Attacker ``h``'s share for honest domain ``j`` (tests/hostile.py's ``craft`` on what ``h`` has seen)."""
    view = list(views[h].values()) or [init.to(torch.float64)]
    first.setdefault(h, (torch.stack(view).mean(0), newest))
    return craft(attack, view, views[h].get(j), first[h], receivers_trusted=DOMAINS - 1, version=newest,
                 max_abs=1e6)


def _deliver(rule: Any, ps: PushSum, served: ServedModel, sender: bytes, values: torch.Tensor, weight: float,
             version: int, rows: float | None, now: float, refused: dict[str, int], prefix: str = "",
             reciprocal: bool = False) -> bool | None:
    """What the receiving task does with a share (runtime._model_fields' weight cap, then the rule): True when
    merged, None when the rule refused it for a reason that says nothing against the sender."""
    if not 0.0 < weight <= float(DOMAINS):  # trusted + 1 on the receiver
        refused[prefix + "bad_values"] = refused.get(prefix + "bad_values", 0) + 1
        return False
    try:
        merged = rule.merge(ps, sender, values, weight, version, rows, now, reciprocal=reciprocal)
    except RejectedUpdate as exc:
        refused[prefix + exc.reason] = refused.get(prefix + exc.reason, 0) + 1
        return None if exc.reason in NEUTRAL_REFUSALS else False
    served.observe(merged.values, sender, now)
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
    return {"round": rnd, "steps": rnd * GOSSIP.every_steps, "accuracy": sum(accs) / len(accs),
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
                if f"{rule}/{attack}" not in runs:  # a combined table whose runs were cut short
                    row.append("not run")
                    continue
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
            accs = [runs[f"{rule}/{a}"]["curve"][-1]["accuracy"] if f"{rule}/{a}" in runs else math.nan
                    for a in labels]
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
