"""Time-to-accuracy and bytes-on-wire of meshd against centralized, local-only and FedAvg training.

MNIST-1D (``meshd.datasets.load_mnist1d_dataset``, seed 0), a shared test set (2,000 rows), and the other rows
split over 16 domains by a Dirichlet(alpha = 0.1) label split with at least 50 rows per domain
(``meshd.localmesh.build_mesh``). For each model (``cnn1d``, ``mlp``) four methods train on exactly the same
rows (``data.holdout = 0``), with the same SGD settings (batch 32, lr 0.1, K = 10 local steps per round):

(a) ``centralized``: one model on the pooled training rows of all domains (K steps per "round");
(b) ``local_only``: every domain alone, never averaged;
(c) ``fedavg``: synchronous FedAvg, simulated in process with :mod:`meshd.learner`: each round every domain
    starts from the global model, runs K local steps, the server averages weighted by sample count; each
    domain moves 2 x model bytes (down + up, f32) per round;
(d) ``meshd``: real ``meshd run`` daemons on loopback (:class:`meshd.localmesh.LocalMesh`, codec f32), every
    domain's own model polled from ``/status``; bytes per domain = gossip.bytes_sent + bytes_received (whole
    signed, encrypted envelopes, pings and pulls included). After the training time, training is switched
    off (hot reload) and gossip runs alone for a few seconds: the "after consensus" figures.

Accuracy is always on the shared test set (all classes); for (b) and (d) it is the mean and the worst over
the domains' own models; for (a) and (c) one model. Wall time of (a)-(c) is the measured training time of
the in-process simulation on this machine, run sequentially on one thread (evaluation excluded); (d) is the
real elapsed time of 16 daemons sharing this machine's cores (evaluation, crypto and HTTP included).
Wall-time figures depend on the machine and its load; rounds and bytes do not.

    .venv/bin/python bench/learning.py [--quick] [--out DIR]

Writes ``DIR/learning.json`` and ``DIR/learning.png`` (default ``bench/results``) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshd import models
from meshd.config_template import set_key
from meshd.data import DataProduct, load_data_product
from meshd.datasets import load_mnist1d_dataset
from meshd.learner import Learner, TrainConfig
from meshd.localmesh import LocalMesh, MeshLayout, build_mesh, get_status

RESULTS = Path(__file__).resolve().parent / "results"
N_DOMAINS = 16
ALPHA = 0.1
MIN_PER_DOMAIN = 50
SEED = 0
BATCH = 32
LR = 0.1
K = 10  # local SGD steps per round, every method
TARGET_FRACTION = 0.95  # "time to reach 95 % of the centralized final accuracy"
F32 = 4
SETTLE_S = 5.0  # meshd: seconds of gossip alone after training is switched off


@dataclass(frozen=True)
class Plan:
    samples: int
    models: tuple[str, ...]
    rounds: int  # rounds of (a), (b), (c): K steps each
    eval_every: int  # rounds between evaluations of (a) and (c)
    local_eval_every: int  # rounds between evaluations of (b) (16 models each time)
    mesh_seconds: float  # training time of (d)
    mesh_interval_s: float  # gossip.interval_s of (d)
    mesh_fanout: int
    mesh_eval_s: float  # training.eval_interval_s of (d)


QUICK = Plan(samples=10_000, models=("cnn1d",), rounds=150, eval_every=5, local_eval_every=25, mesh_seconds=90.0,
             mesh_interval_s=0.5, mesh_fanout=2, mesh_eval_s=3.0)
FULL = Plan(samples=40_000, models=("cnn1d", "mlp"), rounds=400, eval_every=10, local_eval_every=40,
            mesh_seconds=240.0, mesh_interval_s=0.5, mesh_fanout=2, mesh_eval_s=5.0)
# Every method is scored on the same shared test set of TEST_ROWS rows; each daemon evaluates its model and its
# local-only baseline on it every mesh_eval_s, on the CPU the 16 daemons share, so it is kept small.
TEST_ROWS = 2000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="10,000 samples, cnn1d only, 150 rounds, 90 s of meshd (under 5 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default bench/results)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(1)  # like every daemon (training.threads = 1)
    started = time.monotonic()
    mode = (f"QUICK: {plan.samples} samples, {', '.join(plan.models)} only, {plan.rounds} rounds"
            if args.quick else "full")
    print(f"learning bench ({mode}): MNIST-1D, {N_DOMAINS} domains, Dirichlet alpha {ALPHA}, "
          f"K = {K} steps/round, lr {LR}, batch {BATCH}", flush=True)
    x, y = load_mnist1d_dataset(num_samples=plan.samples, seed=SEED)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        for model in plan.models:
            print(f"\n=== model {model} ===", flush=True)
            results[model] = bench_model(model, plan, Path(tmp) / model, (x, y))
    out = {
        "bench": "learning",
        "mode": "quick" if args.quick else "full",
        "plan": plan.__dict__,
        "settings": {"dataset": "mnist1d", "samples": plan.samples, "seed": SEED, "domains": N_DOMAINS,
                     "alpha": ALPHA, "min_per_domain": MIN_PER_DOMAIN, "batch_size": BATCH, "lr": LR,
                     "steps_per_round": K, "codec": "f32", "target": f"{TARGET_FRACTION:.0%} of centralized final",
                     "holdout": 0.0, "test_rows": TEST_ROWS},
        "wall_time_dependent": [
            "*.curve[].t_s", "*.time_to_target_s", "*.summary.time_ratio_vs_fedavg", "*.meshd.startup_s",
            "meshd accuracy at a given time (daemons share this machine's cores; the faster the machine, the "
            "more rounds per second)",
        ],
        "wall_time_independent": ["*.curve[].rounds", "*.curve[].bytes_per_domain", "*.bytes_to_target",
                                  "*.summary.bytes_ratio_vs_fedavg", "fedavg/centralized/local_only accuracy "
                                  "per round"],
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpus": os.cpu_count(), "load_average_at_start": _loadavg()},
        "elapsed_s": round(time.monotonic() - started, 1),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning.json").write_text(json.dumps(out, indent=1))
    plot(args.out / "learning.png", out)
    print()
    print(summary_text(out))
    print(f"\nwrote {args.out / 'learning.json'} and {args.out / 'learning.png'} "
          f"({out['elapsed_s']:.0f} s in all)")
    return 0


# --- one model, four methods -------------------------------------------------------------------------------------


def bench_model(model: str, plan: Plan, workdir: Path, data: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    spec = models.ModelSpec(name=model, num_classes=10)
    settings = {
        "model": {"name": f'"{model}"'},
        "data": {"holdout": "0.0"},
        "gossip": {"interval_s": str(plan.mesh_interval_s), "fanout": str(plan.mesh_fanout), "codec": '"f32"'},
        "training": {"steps_per_round": str(K), "lr": str(LR), "batch_size": str(BATCH),
                     "eval_interval_s": str(plan.mesh_eval_s),
                     # (b) measures local-only training; the daemons need not train a second copy
                     "local_baseline": "false"},
        "log": {"level": '"warning"'},
    }
    layout = build_mesh(workdir, N_DOMAINS, dataset="mnist1d", alpha=ALPHA, seed=SEED, min_per_domain=MIN_PER_DOMAIN,
                        settings=settings, data=data, test_fraction=TEST_ROWS / len(data[1]))
    # The same rows the daemons train on: each domain's whole product (holdout 0), seeds as in build_mesh.
    domains = [load_data_product(d.directory / "data.npz", "label", None, 0.0, 10, SEED + i)
               for i, d in enumerate(layout.domains)]
    test = load_data_product(layout.test_path, "label", None, 0.0, 10, SEED)
    pooled = _pool(domains)
    model_bytes = models.param_count(models.build_model(spec, test.input_dim, SEED)) * F32
    print(f"{len(domains)} domains, rows {min(d.num_train for d in domains)}..{max(d.num_train for d in domains)} "
          f"(pooled {pooled.num_train}), test {test.num_train}; {model} has {model_bytes // F32} parameters "
          f"({model_bytes} bytes at f32)", flush=True)
    res: dict[str, Any] = {"parameters": model_bytes // F32, "model_bytes_f32": model_bytes,
                           "domain_rows": [d.num_train for d in domains],
                           "domain_classes": [list(d.classes) for d in layout.domains]}
    res["centralized"] = run_centralized(spec, pooled, test, plan)
    print(_line("centralized", res["centralized"]), flush=True)
    res["local_only"] = run_local_only(spec, domains, test, plan)
    print(_line("local_only", res["local_only"]), flush=True)
    res["fedavg"] = run_fedavg(spec, domains, test, plan, model_bytes)
    print(_line("fedavg", res["fedavg"]), flush=True)
    res["meshd"] = run_meshd(layout, plan)
    print(_line("meshd", res["meshd"]), flush=True)
    central = res["centralized"]["final_mean"]
    target = TARGET_FRACTION * central
    for method in ("centralized", "local_only", "fedavg", "meshd"):
        r = res[method]
        hit = next((p for p in r["curve"] if p["mean"] >= target), None)
        r["time_to_target_s"] = None if hit is None else hit["t_s"]
        r["rounds_to_target"] = None if hit is None else hit["rounds"]
        r["bytes_to_target"] = None if hit is None else hit["bytes_per_domain"]
    res["target_accuracy"] = target
    fed = res["fedavg"]
    res["summary"] = {
        method: {
            "time_ratio_vs_fedavg": _ratio(res[method]["time_to_target_s"], fed["time_to_target_s"]),
            "bytes_ratio_vs_fedavg": _ratio(res[method]["bytes_to_target"], fed["bytes_to_target"]),
            "final_mean_vs_centralized": res[method]["final_mean"] / central,
            "final_worst_vs_centralized": res[method]["final_worst"] / central,
        }
        for method in ("centralized", "local_only", "fedavg", "meshd")
    }
    return res


def run_centralized(spec: models.ModelSpec, pooled: DataProduct, test: DataProduct, plan: Plan) -> dict[str, Any]:
    learner, flat = _learner(spec, pooled, SEED)
    curve = [_point(0.0, 0, 0, [_eval(learner, flat, test)])]
    t_train = 0.0
    for rnd in range(1, plan.rounds + 1):
        t = time.perf_counter()
        flat, _ = learner.train(flat, K)
        t_train += time.perf_counter() - t
        if rnd % plan.eval_every == 0 or rnd == plan.rounds:
            curve.append(_point(t_train, rnd, 0, [_eval(learner, flat, test)]))
    return _finish(curve, note="one model on the pooled rows; moving the raw data would cost "
                               f"{pooled.num_train * pooled.input_dim * F32 // N_DOMAINS} bytes per domain on "
                               "average (f32 features, once), not counted in bytes_per_domain")


def run_local_only(spec: models.ModelSpec, domains: list[DataProduct], test: DataProduct, plan: Plan
                   ) -> dict[str, Any]:
    learners = [_learner(spec, d, SEED + i) for i, d in enumerate(domains)]
    flats = [f for _, f in learners]
    curve = [_point(0.0, 0, 0, [_eval(lr, f, test) for (lr, _), f in zip(learners, flats, strict=True)])]
    t_train = 0.0
    for rnd in range(1, plan.rounds + 1):
        t = time.perf_counter()
        flats = [lr.train(f, K)[0] for (lr, _), f in zip(learners, flats, strict=True)]
        t_train += time.perf_counter() - t
        if rnd % plan.local_eval_every == 0 or rnd == plan.rounds:
            accs = [_eval(lr, f, test) for (lr, _), f in zip(learners, flats, strict=True)]
            curve.append(_point(t_train, rnd, 0, accs))
    return _finish(curve, note="16 domains trained one after another on one thread")


def run_fedavg(spec: models.ModelSpec, domains: list[DataProduct], test: DataProduct, plan: Plan,
               model_bytes: int) -> dict[str, Any]:
    learners = [_learner(spec, d, SEED + i)[0] for i, d in enumerate(domains)]
    weights = torch.tensor([d.num_train for d in domains], dtype=torch.float64)
    weights = weights / weights.sum()
    global_flat = _learner(spec, domains[0], SEED)[1]
    curve = [_point(0.0, 0, 0, [_eval(learners[0], global_flat, test)])]
    t_train = 0.0
    for rnd in range(1, plan.rounds + 1):
        t = time.perf_counter()
        local = [lr.train(global_flat, K)[0] for lr in learners]
        global_flat = torch.stack(local).mul(weights.unsqueeze(1)).sum(dim=0)
        t_train += time.perf_counter() - t
        if rnd % plan.eval_every == 0 or rnd == plan.rounds:
            curve.append(_point(t_train, rnd, rnd * 2 * model_bytes, [_eval(learners[0], global_flat, test)]))
    return _finish(curve, note="synchronous, simulated: domains one after another on one thread, no network; "
                               "bytes = 2 x model bytes (f32) per domain per round")


def run_meshd(layout: MeshLayout, plan: Plan) -> dict[str, Any]:
    mesh = LocalMesh(layout)
    codes: dict[str, int | None] = {}
    curve: list[dict[str, Any]] = []
    after: dict[str, Any] = {}
    try:
        t_launch = time.monotonic()
        mesh.start()
        mesh.wait_running(timeout=240.0)
        startup = time.monotonic() - t_launch
        print(f"  meshd: {len(layout.domains)} daemons running after {startup:.1f} s; training "
              f"{plan.mesh_seconds:g} s", flush=True)
        t0 = time.monotonic()
        poll = max(1.0, plan.mesh_eval_s)
        for _ in range(int(plan.mesh_seconds / poll) + 2):  # bounded by the training time
            now = time.monotonic() - t0
            if now >= plan.mesh_seconds:
                break
            p = _mesh_point(mesh, layout, now)
            if p is not None:
                curve.append(p)
            time.sleep(max(0.0, min(poll, plan.mesh_seconds - (time.monotonic() - t0))))
        p = _mesh_point(mesh, layout, time.monotonic() - t0)
        if p is not None:
            curve.append(p)
        # Training off (hot reload), gossip alone: every domain converges to the mesh consensus model.
        for d in layout.domains:
            d.config.write_text(set_key(d.config.read_text(), "training", "enabled", "false"))
        for proc in mesh.procs.values():
            proc.send_signal(signal.SIGHUP)  # reload
        time.sleep(SETTLE_S + plan.mesh_eval_s)
        end = _mesh_point(mesh, layout, time.monotonic() - t0)
        if end is not None:
            after = {"t_s": end["t_s"], "mean": end["mean"], "worst": end["worst"],
                     "bytes_per_domain": end["bytes_per_domain"]}
    finally:
        codes = mesh.stop(timeout=20.0)
    if not curve:
        raise RuntimeError("meshd: no daemon reported a test accuracy")
    res = _finish(curve, note="real daemons on loopback sharing this machine; accuracy = each domain's own model")
    res.update({"startup_s": round(startup, 1), "after_consensus": after, "exit_codes": codes,
                "settle_s": SETTLE_S})
    return res


def _mesh_point(mesh: LocalMesh, layout: MeshLayout, t: float) -> dict[str, Any] | None:
    statuses = [get_status(d.status_url, timeout=5.0) for d in layout.domains]
    accs, steps, nbytes = [], [], []
    for s in statuses:
        if s is None:
            continue
        tr, g = s.get("training", {}), s.get("gossip", {})
        if tr.get("test_accuracy") is not None:
            accs.append(float(tr["test_accuracy"]))
        steps.append(int(tr.get("steps") or 0))
        nbytes.append(int(g.get("bytes_sent", 0)) + int(g.get("bytes_received", 0)))
    if len(accs) < len(layout.domains):
        return None
    return _point(t, sum(steps) / len(steps) / K, sum(nbytes) / len(nbytes), accs)


# --- helpers -----------------------------------------------------------------------------------------------------


def _learner(spec: models.ModelSpec, data: DataProduct, seed: int) -> tuple[Learner, torch.Tensor]:
    module = models.build_model(spec, data.input_dim, seed)
    return Learner(module, data, TrainConfig(batch_size=BATCH, lr=LR, seed=seed)), models.flatten(module)


def _eval(learner: Learner, flat: torch.Tensor, test: DataProduct) -> float:
    return learner.evaluate(flat, test.train_x, test.train_y)


def _pool(domains: list[DataProduct]) -> DataProduct:
    import dataclasses

    first = domains[0]
    return dataclasses.replace(
        first,
        train_x=torch.cat([d.train_x for d in domains]),
        train_y=torch.cat([d.train_y for d in domains]),
    )


def _point(t: float, rounds: float, bytes_per_domain: float, accs: list[float]) -> dict[str, Any]:
    return {"t_s": round(t, 3), "rounds": round(rounds, 2), "bytes_per_domain": int(bytes_per_domain),
            "mean": sum(accs) / len(accs), "worst": min(accs)}


def _finish(curve: list[dict[str, Any]], note: str) -> dict[str, Any]:
    last = curve[-1]
    return {"curve": curve, "final_mean": last["mean"], "final_worst": last["worst"], "note": note}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _line(method: str, r: dict[str, Any]) -> str:
    last = r["curve"][-1]
    return (f"  {method:<12} final mean {last['mean']:.3f} worst {last['worst']:.3f} after {last['rounds']:g} rounds, "
            f"{last['t_s']:.1f} s, {last['bytes_per_domain'] / 1e6:.2f} MB/domain")


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _fmt(x: float | None, spec: str, none: str = "never") -> str:
    return none if x is None else format(x, spec)


def summary_text(out: dict[str, Any]) -> str:
    lines = []
    if out["mode"] == "quick":
        lines.append(f"QUICK MODE: {out['settings']['samples']} samples, {', '.join(out['plan']['models'])} only, "
                     f"{out['plan']['rounds']} rounds, {out['plan']['mesh_seconds']:g} s of meshd; "
                     "run without --quick for the full figures")
    for model, res in out["results"].items():
        c = res["centralized"]["final_mean"]
        lines.append(f"\n{model} ({res['parameters']} parameters): centralized final {c:.3f}, target "
                     f"{TARGET_FRACTION:.0%} of it = {res['target_accuracy']:.3f}")
        header = ("method", "time to target", "x FedAvg", "MB/domain to target", "x FedAvg",
                  "final mean / central", "final worst / central", "rounds", "MB/domain")
        rows = []
        for method in ("centralized", "local_only", "fedavg", "meshd"):
            r, s = res[method], res["summary"][method]
            tt = r["time_to_target_s"]
            rows.append((method, _fmt(tt, ".1f") + (" s" if tt is not None else ""),
                         _fmt(s["time_ratio_vs_fedavg"], ".2f", "-"),
                         "0 (data moved)" if method == "centralized" and r["bytes_to_target"] is not None
                         else _fmt(None if r["bytes_to_target"] is None else r["bytes_to_target"] / 1e6, ".2f"),
                         _fmt(s["bytes_ratio_vs_fedavg"], ".2f", "-"),
                         f"{s['final_mean_vs_centralized']:.3f}", f"{s['final_worst_vs_centralized']:.3f}",
                         f"{r['curve'][-1]['rounds']:.0f}", f"{r['curve'][-1]['bytes_per_domain'] / 1e6:.2f}"))
        after = res["meshd"].get("after_consensus") or {}
        if after:
            rows.append(("meshd+consensus", "", "", "", "", f"{after['mean'] / c:.3f}", f"{after['worst'] / c:.3f}",
                         "", f"{after['bytes_per_domain'] / 1e6:.2f}"))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  " + "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                                          for i, (v, w) in enumerate(zip(r, widths, strict=True))))
        m = res["meshd"]
        lines.append(f"  meshd: {m['curve'][-1]['rounds']:.0f} rounds per domain in {m['curve'][-1]['t_s']:.0f} s "
                     f"({N_DOMAINS} daemons sharing {out['machine']['cpus']} cores, start-up {m['startup_s']} s "
                     "not counted); FedAvg/centralized/local-only times are single-thread simulation times;\n"
                     "  'never' = not reached within the run; meshd+consensus = every domain's model after "
                     f"{SETTLE_S:g} s of gossip with training off")
    return "\n".join(lines)


def plot(path: Path, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = list(out["results"])
    fig, axes = plt.subplots(len(model_names), 2, figsize=(12, 4.6 * len(model_names)), squeeze=False)
    colors = {"centralized": "black", "local_only": "tab:red", "fedavg": "tab:blue", "meshd": "tab:green"}
    for row, model in enumerate(model_names):
        res = out["results"][model]
        ax_t, ax_b = axes[row]
        for method in ("centralized", "local_only", "fedavg", "meshd"):
            curve = res[method]["curve"]
            t = [p["t_s"] for p in curve]
            mean = [p["mean"] for p in curve]
            ax_t.plot(t, mean, color=colors[method], label=f"{method} (mean)")
            if method in ("local_only", "meshd"):
                ax_t.plot(t, [p["worst"] for p in curve], color=colors[method], ls=":", label=f"{method} (worst)")
            if method in ("fedavg", "meshd"):
                b = [p["bytes_per_domain"] / 1e6 for p in curve]
                ax_b.plot(b, mean, color=colors[method], label=f"{method} (mean)")
                if method == "meshd":
                    ax_b.plot(b, [p["worst"] for p in curve], color=colors[method], ls=":", label="meshd (worst)")
        for ax in (ax_t, ax_b):
            ax.axhline(res["centralized"]["final_mean"], color="black", lw=0.8, ls="--", label="centralized final")
            ax.axhline(res["target_accuracy"], color="grey", lw=0.8, ls="-.", label=f"target ({TARGET_FRACTION:.0%})")
            ax.axhline(res["local_only"]["final_mean"], color="tab:red", lw=0.8, ls="--", label="local-only final")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.set_ylabel("test accuracy (shared test set)")
        ax_t.set_xlabel("wall time, s (simulations: one thread; meshd: 16 daemons on this machine)")
        ax_b.set_xlabel("MB per domain (sent + received)")
        ax_t.set_title(f"{model}: accuracy vs time")
        ax_b.set_title(f"{model}: accuracy vs bytes per domain")
        ax_t.legend(fontsize=7, loc="lower right")
        ax_b.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"MNIST-1D, {N_DOMAINS} domains, Dirichlet alpha {ALPHA} ({out['mode']} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
